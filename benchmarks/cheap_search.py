"""Cheap hyper-parameter search (Sander et al. 2023, "TAN without a burn"): search at 1/K of the batch with the
same sigma/B and steps, train the winner at full size.

    python benchmarks/cheap_search.py [--scale 8] [--lrs 5e-3,1e-2,2e-2,4e-2] [--epsilon 8]

On the built-in demo: ``dpdiff plan --search-scale K`` (the command a user runs) gives the full-size schedule at
``--epsilon`` and the scaled-down search config; every learning rate of the grid is trained both ways with
``dpdiff finetune``, one run after the other, and scored by the demo's utility (the requested digit in the private
look, from the run's own evaluation) and its held-out loss. The search picks the learning rate with the best
scaled-down utility; the claim is the full-size utility of that pick against the best full-size utility (target
>= 95%) and the training compute of the scaled search against a full-size search (target <= 1/4; rows processed
and the train phase's wall time, from each run's run.json).

The search runs here train on the demo's public data: their own epsilon is what ``dpdiff plan`` prints (thousands),
which is why a real search runs on data the user may spend.

Results: benchmarks/results/cheap_search.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import utility_frontier as uf

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"


def plan_lines(scale: int, epsilon: float) -> dict:
    """Run ``dpdiff plan --search-scale`` as a user would and read its two override lines."""
    cmd = [sys.executable, "-m", "dpdiff.cli", "plan", "--search-scale", str(scale),
           f"privacy.target_epsilon={epsilon}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    full = next(ln for ln in out.splitlines() if ln.strip().startswith("full size :"))
    search = next(ln for ln in out.splitlines() if ln.strip().startswith("search    :"))
    keys = lambda ln: [w for w in ln.split(":", 1)[1].split() if "=" in w]  # noqa: E731
    return {"full": keys(full), "search": keys(search), "plan_output": out}


def train_seconds(run_dir: str) -> float | None:
    ranks = json.loads((Path(run_dir) / "run.json").read_text()).get("phases") or [[]]
    return sum(p.get("seconds", 0.0) for p in ranks[0] if p.get("phase") == "train") or None  # rank 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=int, default=8)
    ap.add_argument("--lrs", default="5e-3,1e-2,2e-2,4e-2")
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--out", default=str(ROOT / "runs" / "cheap_search"))
    args = ap.parse_args()
    lrs = [x for x in args.lrs.split(",") if x]
    plan = plan_lines(args.scale, args.epsilon)
    print(plan["plan_output"], flush=True)
    env = dict(os.environ)
    out = Path(args.out)
    rows = []
    for size in ("search", "full"):
        for lr in lrs:
            r = uf.run_one(f"{size}-lr{lr}", [*plan[size], f"train.lr={lr}"], out, env)
            r.update(size=size, lr=lr, train_seconds=None if "error" in r else train_seconds(r["run_dir"]))
            rows.append(r)
            print(json.dumps(r), flush=True)
    import torch

    res = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch "
           f"{torch.__version__}", "scale": args.scale, "epsilon": args.epsilon, "lrs": lrs,
           "full_overrides": plan["full"], "search_overrides": plan["search"], "runs": rows}
    res["summary"] = summarize(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cheap_search.json").write_text(json.dumps(res, indent=2))
    (RESULTS / "cheap_search.md").write_text(markdown(res))
    print(markdown(res))


def summarize(rows: list[dict]) -> dict:
    ok = [r for r in rows if "error" not in r]
    by = {(r["size"], r["lr"]): r for r in ok}
    search = [r for r in ok if r["size"] == "search"]
    full = [r for r in ok if r["size"] == "full"]
    if not search or not full:
        return {}
    pick = max(search, key=lambda r: r["accuracy_in_style"])["lr"]
    pick_loss = min(search, key=lambda r: r["heldout_loss"])["lr"]
    best = max(full, key=lambda r: r["accuracy_in_style"])
    picked_full = by.get(("full", pick))
    rows_ratio = (sum(r["expected_batch_size"] * r["steps"] for r in search)
                  / sum(r["expected_batch_size"] * r["steps"] for r in full))
    secs = [r["train_seconds"] for r in ok]
    time_ratio = (sum(r["train_seconds"] for r in search) / sum(r["train_seconds"] for r in full)
                  if all(s is not None for s in secs) else None)
    return {"search_pick_lr": pick, "search_pick_lr_by_heldout_loss": pick_loss, "best_full_lr": best["lr"],
            "best_full_utility": best["accuracy_in_style"],
            "pick_full_utility": picked_full["accuracy_in_style"] if picked_full else None,
            "utility_ratio": (picked_full["accuracy_in_style"] / best["accuracy_in_style"])
            if picked_full and best["accuracy_in_style"] else None,
            "search_rows_ratio": rows_ratio, "search_train_time_ratio": time_ratio,
            "search_plus_final_time_ratio": ((sum(r["train_seconds"] for r in search) + picked_full["train_seconds"])
                                             / sum(r["train_seconds"] for r in full))
            if time_ratio is not None and picked_full else None,
            "rank_agreement": [r["lr"] for r in sorted(search, key=lambda r: -r["accuracy_in_style"])]
            == [r["lr"] for r in sorted(full, key=lambda r: -r["accuracy_in_style"])]}


def markdown(res: dict) -> str:
    f = uf._f
    s = res["summary"]
    lines = [f"# Cheap search at 1/{res['scale']} of the batch (TAN): the built-in demo, "
             f"epsilon {res['epsilon']:g}", "",
             f"Measured {res['date']} on {res['machine']}; one run per row, one after the other "
             "(`python benchmarks/cheap_search.py`).", "",
             f"Full size: `{' '.join(res['full_overrides'])}`; search: `{' '.join(res['search_overrides'])}` "
             "(both from `dpdiff plan --search-scale`). Utility: the requested digit in the private look (the demo's "
             "evaluation, 20 generations per digit: a cell's standard error is about 0.05).", "",
             "| lr | search: utility | search: held-out loss | search: train s | full: utility | full: held-out loss "
             "| full: epsilon | full: train s |", "|---|---|---|---|---|---|---|---|"]
    for lr in res["lrs"]:
        sr = next((r for r in res["runs"] if r["lr"] == lr and r["size"] == "search"), {})
        fr = next((r for r in res["runs"] if r["lr"] == lr and r["size"] == "full"), {})
        lines.append(f"| {lr} | {f(sr.get('accuracy_in_style'), '{:.0%}')} | {f(sr.get('heldout_loss'), '{:.4f}')} | "
                     f"{f(sr.get('train_seconds'), '{:.0f}')} | {f(fr.get('accuracy_in_style'), '{:.0%}')} | "
                     f"{f(fr.get('heldout_loss'), '{:.4f}')} | {f(fr.get('epsilon'), '{:.2f}')} | "
                     f"{f(fr.get('train_seconds'), '{:.0f}')} |")
    for r in res["runs"]:
        if "error" in r:
            lines.append(f"- {r['name']} failed: {r['error']}")
    if s:
        lines += ["", f"The search picks lr {s['search_pick_lr']} (by held-out loss: "
                  f"{s['search_pick_lr_by_heldout_loss']});"
                  f" the best full-size lr is {s['best_full_lr']}.", "",
                  "| target | result |", "|---|---|",
                  f"| the search's pick at full size >= 95% of the best full-size utility | "
                  f"{f(s['utility_ratio'], '{:.0%}')} ({f(s['pick_full_utility'], '{:.0%}')} vs "
                  f"{f(s['best_full_utility'], '{:.0%}')}) |",
                  f"| search compute <= 1/4 of a full-size search | rows {s['search_rows_ratio']:.3f}; train wall "
                  f"{f(s['search_train_time_ratio'], '{:.3f}')} (with the final full-size run "
                  f"{f(s['search_plus_final_time_ratio'], '{:.3f}')}) |",
                  f"| same ranking of the grid at both sizes | {'yes' if s['rank_agreement'] else 'no'} |", "",
                  "Wall times are each run's train phase (run.json); when other jobs share the machine, the rows "
                  "ratio is the compute measure."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
