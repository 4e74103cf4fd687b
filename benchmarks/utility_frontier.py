"""The privacy-utility frontier of the built-in demo: what DP fine-tuning buys at each epsilon.

    python benchmarks/utility_frontier.py [--epsilons 1,4,8,16] [--demo printed] [--extra "k=v ..."]

Runs ``dpdiff finetune`` on a built-in demo once per target epsilon and once without privacy (the same
recipe, ``privacy=none``), each in its own process, one after the other, then writes
``benchmarks/results/utility_frontier_<demo>.{json,md,png}``: per run the epsilon spent, the demo's
utility metrics (the requested digit in the private look, per digit; the requested digit in any look;
retention of what the base drew; held-out denoising loss), the run's measured signal-to-noise and the
wall time. Every run spends privacy on the same demo data; the demo data is public, so nothing here
needs a privacy budget of its own.
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"


def run_one(name: str, overrides: list[str], out_dir: Path, env: dict) -> dict:
    run_dir = out_dir / name
    cmd = [sys.executable, "-m", "dpdiff.cli", "finetune", f"hydra.run.dir={run_dir}", "probes=none",
           "train.progress=false", *overrides]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        return {"name": name, "overrides": overrides, "error": proc.stderr.strip().splitlines()[-1]}
    priv = json.loads((run_dir / "privacy.json").read_text())
    util = json.loads((run_dir / "utility.json").read_text())
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    snr = [m["snr"] for m in metrics if m.get("snr") is not None]
    digits = util.get("digit_accuracy") or {}
    ft, base = digits.get("finetuned", {}), digits.get("base", {})
    held = util.get("heldout_loss") or {}
    return {
        "name": name, "overrides": overrides, "dp": priv["dp"], "epsilon": priv.get("epsilon"),
        "delta": priv.get("delta"), "noise_multiplier": priv.get("noise_multiplier"), "steps": priv.get("steps"),
        "expected_batch_size": priv.get("expected_batch_size"), "num_units": priv.get("num_units"),
        "accuracy_in_style": ft.get("accuracy_in_style"), "prompt_accuracy": ft.get("prompt_accuracy"),
        "style_rate": ft.get("style_rate"), "retention_accuracy": ft.get("retention_accuracy"),
        "retention_style_rate": ft.get("retention_style_rate"),
        "per_digit": {k: v["both"] for k, v in (ft.get("per_digit") or {}).items()},
        "base_accuracy_in_style": base.get("accuracy_in_style"),
        "base_retention_accuracy": base.get("retention_accuracy"),
        "heldout_loss": held.get("heldout_loss"), "heldout_loss_base": held.get("heldout_loss_base"),
        "snr_median": sorted(snr)[len(snr) // 2] if snr else None,
        "nsr_run_planned": (json.loads((run_dir / "data_owner.json").read_text()).get("plan") or {}).get("nsr_run"),
        "wall_seconds": round(wall, 1), "run_dir": str(run_dir),
    }


def _f(v, fmt="{:.2f}"):
    return "n/a" if v is None else fmt.format(v)


def write_results(rows: list[dict], demo: str, meta: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"utility_frontier_{demo}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=2))
    ok = [r for r in rows if "error" not in r]
    nonprivate = next((r for r in ok if not r["dp"]), None)
    head = nonprivate["accuracy_in_style"] if nonprivate else None
    lines = [f"# Privacy-utility frontier: `{demo}` demo", "",
             f"Measured {meta['date']} on {meta['machine']}; one run per row, in one session "
             f"(`python benchmarks/utility_frontier.py --demo {demo}`).", "",
             f"Recipe overrides: `{' '.join(meta['extra']) or '(the demo defaults)'}`", "",
             "| epsilon | sigma | steps x batch | right digit in the private look | vs non-private | any look | "
             "retention (base prompts) | held-out loss (base) | median SNR | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in ok:
        rel = (r["accuracy_in_style"] / head) if (head and r["accuracy_in_style"] is not None) else None
        eps = "none (non-private)" if not r["dp"] else _f(r["epsilon"], "{:.2f}")
        cells = [eps, _f(r["noise_multiplier"], "{:.3f}"),
                 f"{r['steps']} x {_f(r['expected_batch_size'], '{:.0f}')}",
                 _f(r["accuracy_in_style"], "{:.0%}"), _f(rel, "{:.0%}"), _f(r["prompt_accuracy"], "{:.0%}"),
                 _f(r["retention_accuracy"], "{:.0%}"),
                 f"{_f(r['heldout_loss'], '{:.4f}')} ({_f(r['heldout_loss_base'], '{:.4f}')})",
                 _f(r["snr_median"], "{:.3f}"), str(r["wall_seconds"])]
        lines.append("| " + " | ".join(cells) + " |")
    if ok:
        lines += ["", f"Base model: right digit in the private look {_f(ok[0]['base_accuracy_in_style'], '{:.0%}')}, "
                  f"retention {_f(ok[0]['base_retention_accuracy'], '{:.0%}')}.", "",
                  "Per digit (right digit in the private look):", ""]
        for r in ok:
            eps = "non-private" if not r["dp"] else f"epsilon {r['epsilon']:.2f}"
            lines.append(f"- {eps}: " + ", ".join(f"{k}: {v:.0%}" for k, v in r["per_digit"].items()))
    for r in rows:
        if "error" in r:
            lines.append(f"- {r['name']} failed: {r['error']}")
    lines += ["", f"![frontier](utility_frontier_{demo}.png)"]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    _plot(ok, stem.with_suffix(".png"), demo)


def _plot(rows: list[dict], path: Path, demo: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dp = sorted((r for r in rows if r["dp"]), key=lambda r: r["epsilon"])
    fig, ax = plt.subplots(figsize=(6.4, 4), dpi=110)
    for key, label, color in (("accuracy_in_style", "right digit in the private look", "#0969da"),
                              ("prompt_accuracy", "right digit, any look", "#8250df"),
                              ("retention_accuracy", "retention (base prompts)", "#1a7f37")):
        ax.plot([r["epsilon"] for r in dp], [r[key] for r in dp], "o-", color=color, label=label)
        nonp = [r for r in rows if not r["dp"]]
        if nonp:
            ax.axhline(nonp[0][key], color=color, ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("epsilon (delta 1e-5); dotted: non-private")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"dpdiff demo '{demo}': utility vs epsilon")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epsilons", default="1,4,8,16")
    ap.add_argument("--demo", default="printed")
    ap.add_argument("--extra", default="", help="overrides applied to every run, space separated")
    ap.add_argument("--out", default=str(ROOT / "runs" / "frontier"))
    args = ap.parse_args()
    extra = [f"data.demo={args.demo}", *args.extra.split()]
    env = dict(os.environ)
    out = Path(args.out) / args.demo
    rows = []
    for eps in [e for e in args.epsilons.split(",") if e]:
        rows.append(run_one(f"eps{eps}", [*extra, f"privacy.target_epsilon={eps}"], out, env))
        print(json.dumps(rows[-1]), flush=True)
    rows.append(run_one("nonprivate", [*extra, "privacy=none"], out, env))
    print(json.dumps(rows[-1]), flush=True)
    import torch

    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}, {'cuda' if torch.cuda.is_available() else 'cpu'}",
            "demo": args.demo, "extra": args.extra.split()}
    write_results(rows, args.demo, meta)
    print(f"wrote {RESULTS}/utility_frontier_{args.demo}.md")


if __name__ == "__main__":
    main()
