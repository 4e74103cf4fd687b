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
    """``dpdiff budget DATASET [ledger=PATH] [delta=D] [accountant=prv|pld|rdp]``"""
    from dpdiff.privacy.accountants import DEFAULT_ACCOUNTANT

    pos = [a for a in args if "=" not in a]
    opts = parse_kv([a for a in args if "=" in a], {"ledger": None, "delta": None, "accountant": DEFAULT_ACCOUNTANT,
                                                    "caption_column": "text"})
    if len(pos) != 1:
        raise UserError("usage: dpdiff budget DATASET_DIR [ledger=PATH] [delta=D] [accountant=prv|pld|rdp]")
    from dpdiff.data.prepare import source_fingerprint
    from dpdiff.privacy.dataset_ledger import DatasetLedger, compose_runs, ledger_location

    root, fp = source_fingerprint(pos[0] if pos[0] not in ("digits", "builtin") else None,
                                  caption_column=opts["caption_column"])
    loc = ledger_location(data_root=root, source_fingerprint=fp, configured=opts["ledger"])
    entries = DatasetLedger(loc).entries({fp})
    # a run that trained on a subset (skipped files, deduplication) is found by the folder's fingerprint; its
    # own fingerprint then names the other entries of that subset
    subsets = {e.fingerprint for e in entries}
    entries = DatasetLedger(loc).entries({fp, *subsets})
    print(f"dataset {root} (fingerprint {fp[:16]}...)")
    if not entries:
        print("no run has been recorded on this dataset: nothing spent")
        return
    delta = float(opts["delta"]) if opts["delta"] else max((e.delta for e in entries if e.delta), default=1e-5)
    for e in entries:
        eps = "NO DP (unbounded)" if not e.dp else f"{e.epsilon:.4g}" if e.epsilon is not None else "?"
        flag = " (reproducible noise)" if e.reproducible_noise else ""
        print(f"  {e.time}  {e.status:8s}  epsilon {eps:>10s}  steps {e.steps:6d}  {e.privacy_unit:7s}  "
              f"{e.run_dir}{flag}")
    total = compose_runs(entries, delta=delta, accountant=opts["accountant"])
    eps = total["epsilon"]
    print(f"total: epsilon {'inf' if eps == float('inf') else f'{eps:.4g}'} at delta {delta:.3g} "
          f"({total['runs']} attempts composed, {total.get('accountant', '')}, per {total['unit']})"
          + (f"; {total['note']}" if total.get("note") else ""))


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
