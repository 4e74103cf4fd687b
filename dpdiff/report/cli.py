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
