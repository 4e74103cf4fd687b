"""``dpdiff data check`` and ``dpdiff clean``."""

from __future__ import annotations

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
