"""``dpdiff data check`` and ``dpdiff clean``."""

from __future__ import annotations

import shutil
from pathlib import Path

from dpdiff.errors import UserError


def check_command(path: str, *, caption_column: str = "text", unit: str = "example", batch_size: float | None = None,
                  dedup_hash_distance: int = 4) -> None:
    """``dpdiff data check DIR``: what training would refuse or warn about, without training."""
    opts = {"path": path, "caption_column": caption_column, "unit": unit, "batch_size": batch_size,
            "dedup_hash_distance": dedup_hash_distance}
    from dpdiff.data.dedup import find_duplicate_sets
    from dpdiff.data.prepare import load_and_check
    from dpdiff.data.records import group_units
    from dpdiff.data.validate import check_units, summarize

    root, _, records, problems = load_and_check(path=opts["path"], caption_column=opts["caption_column"])
    fatal = [p for p in problems if p.fatal_for_record]
    good = [r for r in records if r.key not in {p.key for p in fatal}]
    dup_sets = find_duplicate_sets(good, max_hash_distance=int(opts["dedup_hash_distance"]))
    units = group_units(good, unit=opts["unit"]) if good else None
    if units is not None:
        bs = float(opts["batch_size"]) if opts["batch_size"] else None
        problems += check_units([len(m) for m in units.members], batch_size=bs)
    print(f"{root}: {len(records)} images listed, {len(good)} usable, "
          f"{len(units) if units else 0} privacy units ({opts['unit']}), {len(dup_sets)} duplicate sets "
          f"({sum(len(s) for s in dup_sets)} images)")
    for s in dup_sets[:10]:
        print("  duplicates: " + ", ".join(good[i].key for i in s[:6]) + (" ..." if len(s) > 6 else ""))
    if problems:
        print(summarize(problems, limit=200))
    bad = [p for p in problems if p.fatal_for_record or p.kind in ("too_few_units",)]
    if bad:
        raise UserError(f"{len(bad)} problem(s) would stop training (listed above); fix them or train with "
                        "data.skip_bad_files=true")
    print("ok: the dataset can be trained on")


def clean_command(run_dirs: list[str], *, cache_only: bool = False, yes: bool = False, ask=None) -> list[str]:
    """Remove the cached private features (encoded training images) and, for each run dir given, its checkpoints
    (and a run-local cache). Everything to delete is listed first; without ``yes`` the user is asked (``ask``:
    a function of the question returning the answer, default ``input`` on a terminal) and a non-interactive
    call without ``yes`` deletes nothing. Returns what was removed."""
    import sys

    from dpdiff.paths import home

    targets: list[Path] = []
    cache = home() / "cache"
    if cache.exists():
        targets.append(cache)
    if not cache_only:
        for a in run_dirs:
            run = Path(a).expanduser()
            if not (run / "privacy.json").exists() and not list(run.glob("checkpoint-*")):
                raise UserError(f"{run} is not a dpdiff run dir (no privacy.json or checkpoints); nothing deleted")
            targets += sorted(run.glob("checkpoint-*")) + sorted(run.glob("cache"))
    elif run_dirs:
        raise UserError("--cache deletes only the feature cache: drop the run dirs, or --cache")
    if not targets:
        print("removed: nothing to remove")
        return []
    print("to delete:\n  " + "\n  ".join(str(t) for t in targets))
    if not yes:
        if ask is None:
            if not sys.stdin.isatty():
                raise UserError("dpdiff clean deletes files: pass --yes to confirm (nothing deleted)")
            ask = input
        if str(ask("delete these? [y/N] ")).strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return []
    for t in targets:
        shutil.rmtree(t)
    print("removed: " + ", ".join(str(t) for t in targets))
    return [str(t) for t in targets]
