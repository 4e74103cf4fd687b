"""The ``dpdiff`` command.

    dpdiff finetune [hydra overrides]        train (DP by default), save, probe, report
    dpdiff plan [key=value ...]              batch size, sigma and steps that a dataset and a budget allow
    dpdiff probe run_dir=DIR [probes.K=V]    run the probes on an existing run
    dpdiff report run_dir=DIR                rebuild report.html / report.md of a run
    dpdiff data check path=DIR               check a dataset without training
    dpdiff budget DATASET                    composed epsilon of every run on a dataset
    dpdiff sweep-report DIR                  table + privacy-utility frontier of a sweep
    dpdiff clean [--cache] [RUN_DIR ...]     delete cached private latents (and checkpoints)
    dpdiff pretrain-base [--out DIR]         rebuild the built-in tiny base model

Recipes (finetune, probe, pretrain-base) are run by name, as torchtune's CLI runs recipe files: the
library never imports them. Errors a user can fix print one line ``dpdiff: error: ...`` and exit 2.
"""

from __future__ import annotations

import contextlib
import os
import runpy
import sys
from collections.abc import Callable

from dpdiff.errors import UserError

RECIPES = {"finetune": "recipes.finetune", "probe": "recipes.probe", "pretrain-base": "recipes.pretrain_base"}
LIBRARY_COMMANDS = ("plan", "report", "data", "budget", "sweep-report", "clean")
COMMANDS = (*RECIPES, *LIBRARY_COMMANDS)


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # private data stays local: no hub unless allowed
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*torchvision.*")


@contextlib.contextmanager
def user_errors_exit():
    """Turn a ``UserError`` into ``dpdiff: error: ...`` on stderr and exit code 2 (no traceback)."""
    try:
        yield
    except UserError as err:
        sys.stderr.write(f"dpdiff: error: {err}\n")
        sys.stderr.flush()
        raise SystemExit(err.exit_code) from None


def _value(args: list[str], key: str) -> str | None:
    for a in args:
        if a.startswith(key + "="):
            return a.split("=", 1)[1]
    return None


def hydra_entry(name: str, main_fn: Callable[[], None], argv: list[str] | None = None) -> None:
    """Run a Hydra-decorated recipe main with ``argv`` as its overrides.

    A run dir named on the command line that already holds a run is refused here, before Hydra writes
    its own files into it, unless the run is being resumed."""
    _quiet_libraries()
    args = list(sys.argv[1:] if argv is None else argv)
    rank = int(os.environ.get("RANK", "0"))
    run_dir = _value(args, "hydra.run.dir")
    multirun = "-m" in args or "--multirun" in args
    if rank == 0 and int(os.environ.get("WORLD_SIZE", "1")) == 1 and run_dir and not multirun \
            and not _value(args, "train.resume_from"):
        from dpdiff.runtime import refuse_reused_run_dir

        with user_errors_exit():
            refuse_reused_run_dir(run_dir)
    if rank > 0:
        # one rank writes Hydra's files and log; the others compose the same config silently
        args += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    sys.argv = [f"dpdiff {name}", *args]
    main_fn()


def run_recipe(name: str, args: list[str]) -> None:
    """Run a recipe module as ``__main__`` with ``args`` as its command line (torchtune's ``tune run``)."""
    sys.argv = [f"dpdiff {name}", *args]
    runpy.run_module(RECIPES[name], run_name="__main__", alter_sys=True)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__.strip())
        raise SystemExit(0 if argv else 2)
    cmd, rest = argv[0], argv[1:]
    _quiet_libraries()
    with user_errors_exit():
        if cmd in RECIPES:
            run_recipe(cmd, rest)
        elif cmd == "plan":
            from dpdiff.report.cli import plan_command

            plan_command(rest)
        elif cmd == "report":
            from dpdiff.report.cli import report_command

            report_command(rest)
        elif cmd == "budget":
            from dpdiff.report.cli import budget_command

            budget_command(rest)
        elif cmd == "sweep-report":
            from dpdiff.report.cli import sweep_report_command

            sweep_report_command(rest)
        elif cmd == "data":
            from dpdiff.data.cli import data_command

            data_command(rest)
        elif cmd == "clean":
            from dpdiff.data.cli import clean_command

            clean_command(rest)
        else:
            raise UserError(f"unknown command {cmd!r}; commands: {', '.join(COMMANDS)} (dpdiff --help)")


if __name__ == "__main__":
    main()
