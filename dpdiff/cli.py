"""The ``dpdiff`` command: argparse subcommands, each with ``--help``.

    dpdiff finetune [OVERRIDE ...]                 train (DP by default), save, probe, report
    dpdiff plan [--units N] [--minutes M] [OVERRIDE ...]
                                                   batch size, sigma and steps that a dataset and a budget allow
    dpdiff probe RUN_DIR [probes.KEY=VALUE ...]    run the probes on an existing run
    dpdiff report RUN_DIR                          rebuild report.html / report.md of a run
    dpdiff data check DIR                          check a dataset without training
    dpdiff budget DATASET                          composed epsilon of every run on a dataset
    dpdiff sweep-report DIR                        table + privacy-utility frontier of a sweep
    dpdiff clean [--cache] [--yes] [RUN_DIR ...]   delete cached private features (and checkpoints)
    dpdiff explain KEY                             a config key's default and documentation
    dpdiff tune OUT_DIR --grid KEY=V1,V2 [...]     private selection among candidates (the cost accounted)
    dpdiff pretrain-base [--out DIR]               rebuild the built-in tiny base model

OVERRIDEs are Hydra's ``key=value`` (``privacy.target_epsilon=4 adapter.rank=8``), the same for finetune and
plan; every other option is a ``--flag``. (``key=value`` spellings of a command's own options, such as
``run_dir=DIR`` or ``path=DIR``, are accepted for the flags of the same name.)

Recipes (finetune, probe, pretrain-base) are run by name, as torchtune's CLI runs recipe files: the
library never imports them. Errors a user can fix print one line ``dpdiff: error: ...`` and exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import runpy
import sys
from collections.abc import Callable

from dpdiff.errors import UserError

RECIPES = {"finetune": "recipes.finetune", "probe": "recipes.probe", "pretrain-base": "recipes.pretrain_base",
           "tune": "recipes.tune"}


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
    if name == "finetune" and rank == 0 and not any(a.startswith("-") for a in args):
        # a bad override (unknown key, wrong type against dpdiff.schema) is one error line and exit 2, not
        # Hydra's multi-line report: the same composition Hydra is about to do (Hydra's own flags, -m sweeps
        # included, are left to Hydra)
        from dpdiff.schema import compose

        with user_errors_exit():
            compose(args)
    if rank > 0:
        # one rank writes Hydra's files and log; the others compose the same config silently
        args += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    sys.argv = [f"dpdiff {name}", *args]
    main_fn()


def run_recipe(name: str, args: list[str]) -> None:
    """Run a recipe module as ``__main__`` with ``args`` as its command line (torchtune's ``tune run``)."""
    sys.argv = [f"dpdiff {name}", *args]
    runpy.run_module(RECIPES[name], run_name="__main__", alter_sys=True)


class _Parser(argparse.ArgumentParser):
    """argparse with dpdiff's error line: ``dpdiff: error: ...`` (and the usage above it), exit 2."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        who = self.prog.removeprefix("dpdiff").strip()
        sys.stderr.write(f"dpdiff: error: {who + ': ' if who else ''}{message}\n")
        raise SystemExit(2)


_KV = re.compile(r"^([a-z][a-z0-9_]*)=(.*)$", re.S)


def _flags_from_kv(args: list[str], names: tuple[str, ...]) -> list[str]:
    """``name=value`` for a command's own option ``--name`` (the Hydra-style spelling) as ``--name value``."""
    out = []
    for a in args:
        m = _KV.match(a)
        if m and m.group(1) in names:
            out += ["--" + m.group(1).replace("_", "-"), m.group(2)]
        else:
            out.append(a)
    return out


def _overrides(values: list[str]) -> list[str]:
    """Hydra overrides: ``key=value`` (``+key=value``, ``~key`` and group choices alike); a bare word is refused."""
    for v in values:
        if v.startswith("-"):
            raise UserError(f"unknown option {v!r} (see --help)")
        if "=" not in v and not v.startswith("~"):
            raise UserError(f"expected a config override key=value, got {v!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = _Parser(prog="dpdiff", description="Differentially private fine-tuning of diffusion models, with "
                "privacy accounting, leak probes and reports.", formatter_class=fmt,
                epilog="dpdiff COMMAND --help describes a command; dpdiff explain KEY a config key.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    # the recipes are listed here for the command overview; main() hands their arguments to them untouched
    sub.add_parser("finetune", help="train (DP by default), save, probe and report", add_help=False,
                       formatter_class=fmt, description="Fine-tune on the composed config (configs/finetune.yaml) "
                       "with Hydra overrides; -m / --multirun sweeps, hydra.run.dir=DIR names the run dir.")

    pl = sub.add_parser("plan", help="batch size, sigma and steps that a dataset and a budget allow",
                        formatter_class=fmt, description=(
                            "The noise-to-signal arithmetic of the finetune config composed with the same overrides "
                            "(data.path, privacy.*, adapter.*, model.pretrained, train.batch_size, train.max_steps): "
                            "the compute budget is train.max_steps x train.batch_size x privacy.augmult rows unless "
                            "--minutes is given. Reads the dataset (locally) only to count its units and prompts."))
    pl.add_argument("--units", type=int, help="plan for N privacy units instead of reading data.path")
    pl.add_argument("--trainable", type=int, help="trainable weights (default: counted from the model and adapter)")
    pl.add_argument("--minutes", type=float, help="compute budget in minutes instead of the config's steps")
    pl.add_argument("--rows-per-second", type=float, default=60.0,
                    help="training rows per second on your hardware (with --minutes; default 60)")
    pl.add_argument("--search-scale", type=int, metavar="K",
                    help="also print a hyper-parameter search config at 1/K of the batch with the same sigma/B and "
                         "steps (TAN), and the full-size config it extrapolates to")
    pl.add_argument("overrides", nargs="*", help="finetune config overrides, key=value")

    sub.add_parser("probe", help="run the probes on an existing run dir", add_help=False, formatter_class=fmt,
                        description="Run the extraction, membership and audit probes on a finished run (its own "
                        "probe settings, merged with probes.KEY=VALUE overrides); rebuilds the report.")

    r = sub.add_parser("report", help="rebuild report.html / report.md of a run", formatter_class=fmt)
    r.add_argument("run_dir", nargs="?", help="the run dir")
    r.add_argument("--run-dir", dest="run_dir_flag", help=argparse.SUPPRESS)

    d = sub.add_parser("data", help="dataset tools (check)", formatter_class=fmt)
    dsub = d.add_subparsers(dest="data_command", metavar="ACTION", parser_class=_Parser, required=True)
    dc = dsub.add_parser("check", help="check a dataset without training: bad files, duplicates, unit counts")
    dc.add_argument("path", nargs="?", help="the image folder (metadata.jsonl) or dataset")
    dc.add_argument("--path", dest="path_flag", help=argparse.SUPPRESS)
    dc.add_argument("--caption-column", default="text")
    dc.add_argument("--unit", choices=("example", "user"), default="example", help="the privacy unit")
    dc.add_argument("--batch-size", type=float, help="the planned expected batch (warns on too few units)")
    dc.add_argument("--dedup-hash-distance", type=int, default=4, help="pHash bits within which images are "
                    "near-duplicates")

    b = sub.add_parser("budget", help="epsilon spent per record by every run on a dataset", formatter_class=fmt)
    b.add_argument("dataset", help="the dataset folder (or 'digits' for the built-in demo)")
    b.add_argument("--ledger", help="the dataset ledger file (default: the one beside the dataset)")
    b.add_argument("--delta", type=float, help="delta at which to state epsilon (default: each run's)")
    b.add_argument("--accountant", choices=("prv", "pld", "rdp"), default=None)
    b.add_argument("--caption-column", default="text")

    s = sub.add_parser("sweep-report", help="table and privacy-utility frontier of a sweep", formatter_class=fmt)
    s.add_argument("dir", help="a Hydra multirun dir, e.g. runs/multirun/DATE/TIME")

    c = sub.add_parser("clean", help="delete cached private features (and run dirs' checkpoints)",
                       formatter_class=fmt, description="Deletes the feature cache (private: encoded training "
                       "images) and, for each RUN_DIR given, its checkpoints. Asks first, or needs --yes.")
    c.add_argument("run_dirs", nargs="*", metavar="RUN_DIR")
    c.add_argument("--cache", action="store_true", help="only the feature cache (the default without RUN_DIRs)")
    c.add_argument("--yes", "-y", action="store_true", help="delete without asking")

    e = sub.add_parser("explain", help="a config key's default and documentation", formatter_class=fmt)
    e.add_argument("key", nargs="?", help="a dotted key, e.g. probes.mia.lira.shadows; a group (probes.mia) "
                   "lists its keys; none lists the groups")

    sub.add_parser("pretrain-base", help="rebuild the built-in tiny base model", add_help=False)
    sub.add_parser("tune", help="private hyperparameter selection: a random number of candidates, the best "
                   "released, the procedure accounted", add_help=False)
    return p


def _one(positional: str | None, flag: str | None, what: str, usage: str) -> str:
    if positional and flag and positional != flag:
        raise UserError(f"{what} given twice ({positional} and {flag}); usage: {usage}")
    v = positional or flag
    if not v:
        raise UserError(f"{what} is required; usage: {usage}")
    return v


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:
        parser.print_help()
        raise SystemExit(2)
    if argv[0] == "help":
        argv = [*argv[1:], "--help"] if len(argv) > 1 else ["--help"]
    cmd = argv[0]
    if cmd in RECIPES:  # Hydra's own flags (-m, --cfg job, ...) pass through untouched; --help is dpdiff's
        _quiet_libraries()
        with user_errors_exit():
            if any(a in ("-h", "--help") for a in argv[1:]):
                from dpdiff.commandline import finetune_help, probe_help

                if cmd in ("pretrain-base", "tune"):
                    run_recipe(cmd, ["--help"])
                else:
                    print(finetune_help() if cmd == "finetune" else probe_help())
                return
            run_recipe(cmd, argv[1:])
        return
    if cmd in ("report", "data", "budget"):  # their own options may be spelled key=value
        argv = [cmd, *_flags_from_kv(argv[1:], ("run_dir", "path", "caption_column", "unit", "batch_size",
                                                "dedup_hash_distance", "ledger", "delta", "accountant"))]
    args = parser.parse_args(argv)
    _quiet_libraries()
    with user_errors_exit():
        if args.command == "plan":
            from dpdiff.report.cli import plan_command

            plan_command(overrides=_overrides(args.overrides), units=args.units, trainable=args.trainable,
                         minutes=args.minutes, rows_per_second=args.rows_per_second,
                         search_scale=args.search_scale)
        elif args.command == "report":
            from dpdiff.report.cli import report_command

            report_command(_one(args.run_dir, args.run_dir_flag, "the run dir", "dpdiff report RUN_DIR"))
        elif args.command == "budget":
            from dpdiff.report.cli import budget_command

            budget_command(args.dataset, ledger=args.ledger, delta=args.delta, accountant=args.accountant,
                           caption_column=args.caption_column)
        elif args.command == "sweep-report":
            from dpdiff.report.cli import sweep_report_command

            sweep_report_command(args.dir)
        elif args.command == "data":
            from dpdiff.data.cli import check_command

            check_command(_one(args.path, args.path_flag, "the dataset folder", "dpdiff data check DIR"),
                          caption_column=args.caption_column, unit=args.unit, batch_size=args.batch_size,
                          dedup_hash_distance=args.dedup_hash_distance)
        elif args.command == "clean":
            from dpdiff.report.cli import clean_command

            clean_command(args.run_dirs, cache_only=args.cache, yes=args.yes)
        elif args.command == "explain":
            from dpdiff.commandline import explain

            print(explain(args.key))


if __name__ == "__main__":
    main()
