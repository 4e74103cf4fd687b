"""``launcher.num_processes=N`` (N > 1): start N processes with ``accelerate launch``.

Read from the composed config (the ``launcher`` group: ``launcher=accelerate``, an experiment file, or
``launcher.num_processes=N`` on the command line), inside the Hydra job, so the run dir is already
decided: every rank gets it as ``hydra.run.dir`` (otherwise each rank's Hydra would create its own
timestamped dir). ``--multi_gpu`` is what starts N processes on any machine, with NCCL on GPUs and
gloo on CPU (accelerate's ``--cpu`` starts a single process).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

from dpdiff.errors import UserError


def accelerate_command(*, num_processes: int, extra_args: list[str], module: str, overrides: list[str],
                       run_dir: str) -> list[str]:
    machines = [] if "--num_machines" in extra_args else ["--num_machines", "1"]
    # dpdiff does its own autocast (train.mixed_precision): accelerate's must stay off
    quiet = [a for flag in ("--mixed_precision", "--dynamo_backend") if flag not in extra_args for a in (flag, "no")]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            *machines, *quiet, *extra_args, "-m", module, *overrides, f"hydra.run.dir={run_dir}"]


def relaunch_if_requested(cfg, *, module: str = "recipes.finetune") -> bool:
    """Start ``launcher.num_processes`` processes of ``module`` and wait for them (True), or do nothing (False)
    when one process is asked for or this process was itself started by a launcher."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return False
    launcher = cfg.get("launcher") or {}
    n = launcher.get("num_processes", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"launcher.num_processes={n}: must be an integer >= 1")
    if n == 1:
        return False
    from hydra.core.hydra_config import HydraConfig

    from dpdiff.settings import RunSettings

    RunSettings.from_config(cfg)  # bad settings: one error line here, not one per process and a launcher traceback

    hc = HydraConfig.get()
    extra = [str(a) for a in (launcher.get("extra_args") or [])]
    explicit_dir = any(str(o).startswith("hydra.run.dir=") for o in hc.overrides.hydra)
    if "--num_machines" in extra and not explicit_dir:
        raise UserError("a multi-node run needs hydra.run.dir=DIR on a filesystem every node shares "
                        "(each node would otherwise pick its own timestamped run dir)")
    cmd = accelerate_command(num_processes=n, extra_args=extra, module=module, overrides=list(hc.overrides.task),
                             run_dir=hc.runtime.output_dir)
    print(f"dpdiff: launching {n} processes: {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise SystemExit(proc.returncode)
    return True
