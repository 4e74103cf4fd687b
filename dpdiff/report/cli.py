"""``dpdiff report``: rebuild a run's report from its run dir."""

from __future__ import annotations

from pathlib import Path

from dpdiff.commandline import parse_kv
from dpdiff.errors import UserError


def report_command(args: list[str]) -> None:
    opts = parse_kv(args, {"run_dir": None})
    if not opts["run_dir"]:
        raise UserError("dpdiff report needs run_dir=DIR")
    run_dir = Path(str(opts["run_dir"])).expanduser()
    if not run_dir.is_dir():
        raise UserError(f"run_dir={run_dir} is not a directory")
    from dpdiff.report.run_report import write_run_report

    html, md = write_run_report(run_dir)
    print(f"wrote {html} and {md}")


def sweep_report_command(args: list[str]) -> None:
    paths = [a for a in args if not a.startswith("-")]
    if len(paths) != 1:
        raise UserError("usage: dpdiff sweep-report DIR (a Hydra multirun dir, e.g. runs/multirun/DATE/TIME)")
    root = Path(paths[0]).expanduser()
    if not root.is_dir():
        raise UserError(f"{root} is not a directory")
    from dpdiff.report.sweep import write_sweep_report

    html_path, md_path = write_sweep_report(root)
    print(f"wrote {html_path} and {md_path}")
    print(md_path.read_text())


def budget_command(args: list[str]) -> None:
    """``dpdiff budget DATASET [ledger=PATH] [delta=D] [accountant=prv|pld|rdp]``: per record, what every run
    recorded in the dataset's ledger has spent (see ``dpdiff.privacy.dataset_ledger``)."""
    from dpdiff.privacy.accountants import DEFAULT_ACCOUNTANT

    pos = [a for a in args if "=" not in a]
    opts = parse_kv([a for a in args if "=" in a], {"ledger": None, "delta": None, "accountant": DEFAULT_ACCOUNTANT,
                                                    "caption_column": "text"})
    if len(pos) != 1:
        raise UserError("usage: dpdiff budget DATASET_DIR [ledger=PATH] [delta=D] [accountant=prv|pld|rdp]")
    from dpdiff.data.formats import read_dataset
    from dpdiff.data.prepare import resolve_data_path
    from dpdiff.data.records import RecordIds, fingerprint, record_ids
    from dpdiff.privacy.dataset_ledger import DatasetLedger, ledger_location, record_charges

    def show(eps: float) -> str:
        return "inf" if eps == float("inf") else f"{eps:.4g}"

    root, _ = resolve_data_path(pos[0] if pos[0] not in ("digits", "builtin") else None)
    records = read_dataset(root, caption_column=opts["caption_column"])
    ids = record_ids(records)  # each image read once: the ids and the folder's fingerprint
    fp = fingerprint(records, ids=ids)
    users = tuple(str(r.user_id) if r.user_id else None for r in records)
    current = RecordIds(digests=tuple(ids), users=users if any(users) else None)
    ledger = DatasetLedger(ledger_location(data_root=root, source_fingerprint=fp, configured=opts["ledger"]))
    entries = ledger.entries()
    print(f"dataset {root} ({len(records)} records, fingerprint {fp[:16]}...)")
    if not entries:
        print("no run has been recorded on this dataset: nothing spent")
        return
    delta = float(opts["delta"]) if opts["delta"] else max((e.delta for e in entries if e.delta), default=1e-5)
    ch = record_charges(ledger, entries, current, delta=delta, accountant=opts["accountant"])
    legacy = {e.attempt_id for e in ch.legacy}
    print(f"ledger {ledger.path}")
    shown_entries = entries[-15:]
    if len(entries) > len(shown_entries):
        print(f"  ({len(entries) - len(shown_entries)} earlier attempts not listed)")
    for e in shown_entries:
        eps = "NO DP (unbounded)" if not e.dp else f"{e.epsilon:.4g}" if e.epsilon is not None else "?"
        flag = " (reproducible noise)" if e.reproducible_noise else ""
        if e.attempt_id in legacy:
            recs = "all*"
        else:
            n = int((e.record_set or {}).get("records") or 0)
            recs = f"{n} ({ch.touching.get(e.attempt_id, 0)} here)"
        print(f"  {e.time}  {e.status:8s}  epsilon {eps:>10s}  steps {e.steps:6d}  {e.privacy_unit:7s}  "
              f"records {recs:>13s}  {e.run_dir}{flag}")
    if legacy:
        print(f"  * {len(legacy)} attempt(s) without a readable record set (recorded before per-record ledgers, or "
              "its set was deleted): charged to every record, conservatively")
    worst = ch.worst.total
    print(f"worst-charged record: epsilon {show(worst['epsilon'])} at delta {delta:.3g} ({worst['runs']} attempts "
          f"composed, {worst.get('accountant', '')}, "
          f"{'units mixed' if worst['unit'] == 'mixed' else 'per ' + worst['unit']})"
          + (f"; {worst['note']}" if worst.get("note") else ""))
    print("records carrying each charge (worst first):")
    rows: dict[tuple[str, int], int] = {}
    for h in ch.histogram():
        key = (show(h["epsilon"]), h["runs"])
        rows[key] = rows.get(key, 0) + h["records"]
    items = list(rows.items())
    for (eps, runs), count in items[:8]:
        what = "new: no run trained on them" if runs == 0 else f"{runs} attempt{'s' if runs != 1 else ''}"
        print(f"  epsilon {eps:>8s}  {count:7d} record{'s' if count != 1 else ' '}  ({what})")
    if len(items) > 8:
        rest = items[8:]
        print(f"  ... {len(rest)} more charges over {sum(c for _, c in rest)} records (epsilon <= {rest[0][0][0]})")
    if not ch.new_records:
        print("  no record is new (every record of the folder was charged by at least one attempt)")
    absent = f"{ch.absent}" + (f" (worst epsilon {show(ch.absent_worst)})" if ch.absent_worst is not None else "")
    print(f"ledger-known records absent from the folder now: {absent}")


def plan_command(args: list[str]) -> None:
    """``dpdiff plan [data.path=DIR | units=N] [target_epsilon=E] [steps=S | minutes=M] ...``"""
    from dpdiff.models.adapters import count_trainable
    from dpdiff.privacy.planning import assess, plan_grid, units_per_prompt
    from dpdiff.privacy.settings import default_delta

    opts = parse_kv(args, {"data.path": None, "units": None, "unit": "example", "target_epsilon": "8",
                           "delta": None, "steps": None, "batch_size": None, "minutes": None,
                           "rows_per_second": "60", "trainable": None, "model.pretrained": None,
                           "adapter": "lora", "adapter.rank": "16", "adapter.target_modules": None,
                           "max_grad_norm": "0.01", "augmult": "1", "accountant": "rdp"})
    captions = None
    if opts["data.path"] is not None or opts["units"] is None:
        from dpdiff.data.formats import read_dataset
        from dpdiff.data.prepare import resolve_data_path
        from dpdiff.data.records import group_units

        root, _ = resolve_data_path(opts["data.path"])
        records = read_dataset(root)
        units = group_units(records, unit=opts["unit"])
        n = len(units)
        captions = [records[m[0]].text for m in units.members]
        where = f"{root} ({len(records)} images, {n} {opts['unit']} units)"
    else:
        n = int(opts["units"])
        where = f"{n} privacy units"
    eps = float(opts["target_epsilon"])
    delta = float(opts["delta"]) if opts["delta"] else default_delta(n)
    k = int(opts["augmult"])
    c = float(opts["max_grad_norm"])
    if opts["trainable"]:
        d = int(opts["trainable"])
    else:
        tm = opts["adapter.target_modules"]
        d = count_trainable(pretrained=opts["model.pretrained"], kind=opts["adapter"], rank=int(opts["adapter.rank"]),
                            target_modules=tm.strip("[]").split(",") if tm else None)
    if opts["steps"]:
        b = int(opts["batch_size"] or 128)
        rows = int(opts["steps"]) * b * k
        budget = f"{opts['steps']} steps at batch {b} x K={k} = {rows} rows"
    elif opts["minutes"]:
        rows = int(float(opts["minutes"]) * 60 * float(opts["rows_per_second"]))
        budget = f"{opts['minutes']} minutes at {opts['rows_per_second']} rows/s = {rows} rows"
    else:
        raise UserError("dpdiff plan needs a compute budget: steps=S (with batch_size=B) or minutes=M "
                        "(with rows_per_second=R, measured on your hardware)")
    grid = plan_grid(num_units=n, target_epsilon=eps, delta=delta, rows_budget=rows, trainable=d,
                     max_grad_norm=c, augmult=k, accountant=opts["accountant"])
    best = grid[0]
    upp = units_per_prompt(captions or [])
    print(f"dataset   : {where}")
    print(f"budget    : epsilon {eps:g} at delta {delta:.2g} ({opts['accountant']}); {budget}")
    print(f"trainable : {d:,} weights; clipping bound C={c:g}; K={k}")
    print("\n  batch   steps        q   sigma  noise std/coord  noise/signal per step  over the run")
    for r in sorted(grid, key=lambda r: r.batch_size):
        mark = "  <- recommended" if r is best else ""
        print(f"  {r.batch_size:5d}  {r.steps:6d}  {r.sample_rate:7.4f}  {r.noise_multiplier:6.3f}  "
              f"{r.noise_std_per_coordinate:15.3g}  {r.nsr_step:21.3g}  {r.nsr_run:12.3g}{mark}")
    print(f"\nrecommended: train.batch_size={best.batch_size} train.max_steps={best.steps} (sigma "
          f"{best.noise_multiplier:.3f}, epsilon {best.epsilon:.3f})")
    for w in assess(nsr_run=best.nsr_run, units_per_prompt=upp):
        print(f"warning: {w}")
    if captions is not None:
        print("(units per prompt were counted from the captions: private data, read locally only)")
