"""LiRA against the other membership attacks, on an over-trained (non-private) LoRA of the tiny base.

    python benchmarks/lira.py [--images 240] [--adapter full] [--steps 800] [--members 100] [--shadows 4,8]

Writes a folder of the first ``--images`` built-in demo digits with one distinct caption each, fine-tunes the
tiny base on half of them without DP until it memorises (``dpdiff finetune``, the other half held out), then runs
the membership probe (``dpdiff probe``, extraction off) once per shadow count. For each attack: AUC, TPR at
1% FPR with its Clopper-Pearson interval, the split audit's epsilon lower bound, and the probe's wall time.
The claim checked: LiRA's TPR at 1% FPR is at least the loss attack's on a model that leaks (Carlini et al.
2022, Fig. 1 on image classifiers; here on a diffusion LoRA). Results: benchmarks/results/lira.json and
lira.md; the ROC plot of the last probe is copied to lira_roc.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ROOT = HERE.parent


def _run(args: list[str], env: dict) -> float:
    t0 = time.time()
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=6 * 3600)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed: {proc.stderr.strip()[-2000:]}")
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=240)
    ap.add_argument("--adapter", default="full", choices=("full", "lora", "attn"))
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--members", type=int, default=100)
    ap.add_argument("--shadows", default="4,8")
    ap.add_argument("--work", default=None)
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="dpdiff-lira-"))
    data, run_dir = work / "data", work / "run"
    shutil.rmtree(work, ignore_errors=True)
    from dpdiff.data.demos import write_distinct_caption_digits

    write_distinct_caption_digits(data, a.images)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "DPDIFF_HOME": str(work / "home"), "WANDB_MODE": "offline"}
    train_s = _run([str(bin_dir / "dpdiff"), "finetune", f"data.path={data}", f"hydra.run.dir={run_dir}",
                    "privacy=none", f"adapter={a.adapter}",
                    *([f"adapter.rank={a.rank}"] if a.adapter == "lora" else []),
                    f"train.max_steps={a.steps}",
                    f"train.batch_size={a.batch}", f"train.lr={a.lr}", "train.lr_warmup_steps=0",
                    "data.holdout_fraction=0.5", "train.checkpoint_every=0", "train.sample.per_prompt=1",
                    "train.sample.steps=2", "train.progress=false", "probes=none", "eval=none"], env)
    rows = []
    for k in [int(x) for x in a.shadows.split(",")]:
        secs = _run([str(bin_dir / "dpdiff"), "probe", str(run_dir), "probes.extraction.enabled=false",
                     f"probes.mia.members={a.members}", f"probes.mia.lira.shadows={k}",
                     f"probes.mia.lira.batch_size={a.batch}", "probes.mia.lira.pool_units=4096",
                     "probes.mia.min_nonmembers=20"], env)
        rows += summarise(run_dir, k, secs)
        write(a, train_s, rows)


def summarise(run_dir: Path, k: int, secs: float) -> list[dict]:
    """The rows of one probe attempt (its probes.json), and its ROC plot copied beside the results."""
    mia = json.loads((run_dir / "probes.json").read_text())["mia"]
    rows = []
    for name, att in mia["attacks"].items():
        pt = att["tpr_at_fpr"]["0.01"]
        rows.append({"shadows": k, "attack": name, "auc": att["auc"], "tpr_at_1pct_fpr": pt["tpr"],
                     "tpr_ci": pt.get("tpr_ci_clopper_pearson"),
                     "eps_lower": mia["split_audit"]["attacks"][name]["eps_lower"],
                     "probe_seconds": round(secs, 1), "lira_seconds": (mia.get("lira") or {}).get("seconds"),
                     "members": mia["members"], "nonmembers": mia["nonmembers"],
                     "lira": mia.get("lira") if name == "lira" else None})
    if (run_dir / "plot_mia_roc.png").exists():
        RESULTS.mkdir(exist_ok=True)
        shutil.copy(run_dir / "plot_mia_roc.png", RESULTS / f"lira_roc_{k}_shadows.png")
    return rows


def write(a, train_s: float, rows: list[dict]) -> None:
    out = {"images": a.images, "adapter": a.adapter, "train_steps": a.steps, "batch": a.batch, "rank": a.rank,
           "lr": a.lr, "train_seconds": round(train_s, 1), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lira.json").write_text(json.dumps(out, indent=1) + "\n")
    what = f"LoRA rank {a.rank}" if a.adapter == "lora" else f"{a.adapter} fine-tuning"
    lines = [f"# LiRA vs the other membership attacks (over-trained non-private {what}, {a.images} "
             f"digits with distinct captions, half held out, {a.steps} steps of {a.batch}, lr {a.lr}; "
             f"training {train_s:.0f} s on this machine)", "",
             "| shadows | attack | AUC | TPR at 1% FPR [95% CI] | epsilon lower bound | probe wall s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ci = r["tpr_ci"] or [None, None]
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
        lines.append(f"| {r['shadows']} | {r['attack']} | {fmt(r['auc'])} | {fmt(r['tpr_at_1pct_fpr'])} "
                     f"[{fmt(ci[0])}, {fmt(ci[1])}] | {fmt(r['eps_lower'])} | {r['probe_seconds']} |")
    (RESULTS / "lira.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
