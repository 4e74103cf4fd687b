"""``dpdiff data check`` and ``dpdiff clean``."""

from __future__ import annotations

import shutil
from pathlib import Path

from dpdiff.commandline import parse_kv
from dpdiff.errors import UserError


def data_command(args: list[str]) -> None:
    if not args or args[0] != "check":
        raise UserError("usage: dpdiff data check path=DIR [caption_column=text] [unit=example|user] [batch_size=B]")
    opts = parse_kv(args[1:], {"path": None, "caption_column": "text", "unit": "example", "batch_size": None,
                                "dedup_hash_distance": "4"})
    if not opts["path"]:
        raise UserError("dpdiff data check needs path=DIR")
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


def clean_command(args: list[str]) -> None:
    """Remove cached private features (and, for run dirs given, their checkpoints)."""
    from dpdiff.paths import home

    cache_only = "--cache" in args or not [a for a in args if not a.startswith("--")]
    removed = []
    cache = home() / "cache"
    if cache.exists():
        shutil.rmtree(cache)
        removed.append(str(cache))
    if not cache_only or any(not a.startswith("--") for a in args):
        for a in args:
            if a.startswith("--"):
                continue
            run = Path(a)
            if not (run / "privacy.json").exists() and not list(run.glob("checkpoint-*")):
                raise UserError(f"{run} is not a dpdiff run dir (no privacy.json or checkpoints)")
            for ck in run.glob("checkpoint-*"):
                shutil.rmtree(ck)
                removed.append(str(ck))
            for c in run.glob("cache"):
                shutil.rmtree(c)
                removed.append(str(c))
    print("removed: " + (", ".join(removed) if removed else "nothing to remove"))
