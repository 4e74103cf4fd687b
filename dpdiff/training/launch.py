"""``dpdiff finetune launcher.num_processes=N``: start N processes with ``accelerate launch``.

The run dir is decided once, here, and passed to every rank as ``hydra.run.dir`` (otherwise
each rank's Hydra would create its own timestamped dir). ``--multi_gpu`` is what starts N
processes on any machine, with NCCL on GPUs and gloo on CPU (PITFALLS: ``--cpu`` starts one).
"""

from __future__ import annotations

import datetime as _dt
import os
import shlex
import subprocess
import sys

from dpdiff.errors import UserError


def _value(args: list[str], key: str) -> str | None:
    for a in args:
        if a.startswith(key + "="):
            return a.split("=", 1)[1]
    return None


def maybe_launch(args: list[str]) -> bool:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or "-m" in args or "--multirun" in args:
        return False
    n = _value(args, "launcher.num_processes")
    if n is None and _value(args, "launcher") == "accelerate":
        n = "2"
    if n is None:
        return False
    try:
        num = int(n)
    except ValueError:
        raise UserError(f"launcher.num_processes={n}: must be an integer") from None
    if num < 1:
        raise UserError(f"launcher.num_processes={n}: must be >= 1")
    if num == 1:
        return False
    rest = [a for a in args if not a.startswith("launcher")]
    run_dir = _value(rest, "hydra.run.dir")
    if run_dir is None:
        run_dir = os.path.join("runs", _dt.datetime.now().strftime("%Y-%m-%d"), _dt.datetime.now().strftime("%H-%M-%S"))
        rest.append(f"hydra.run.dir={run_dir}")
    extra = _value(args, "launcher.extra_args")
    extra_args = shlex.split(extra.strip("[]").replace(",", " ")) if extra else []
    machines = [] if "--num_machines" in extra_args else ["--num_machines", "1"]
    if "--num_machines" in extra_args and _value(args, "hydra.run.dir") is None:
        raise UserError("a multi-node run needs hydra.run.dir=DIR on a filesystem every node shares "
                        "(each node would otherwise pick its own timestamped run dir)")
    # dpdiff does its own autocast (train.mixed_precision): accelerate's must stay off
    quiet = [a for flag in ("--mixed_precision", "--dynamo_backend") if flag not in extra_args for a in (flag, "no")]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num),
           *machines, *quiet, *extra_args, "-m", "recipes.finetune", *rest]
    print(f"dpdiff: launching {num} processes: {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num)))
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise SystemExit(proc.returncode)
    return True
