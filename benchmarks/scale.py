"""The data path at scale: wall time and memory per phase of a short DP run, as N grows.

    python benchmarks/scale.py [--sizes 4000,40000,400000] [--processes 1,2] [--steps 3]

For each N it writes a synthetic image folder (distinct 32 x 32 images, every caption distinct, as private
sets such as reports have), runs `dpdiff finetune` on the built-in tiny base with a short DP run (probes,
eval and samples off), and reads the run's own phase records (run.json ``phases``, written by every rank:
wall time, resident and peak resident memory at the end of each phase, ``dpdiff.runtime.PhaseClock``), the
feature cache's size on disk, and the step time. It also computes the bytes per image the frozen-feature
cache needs for each model family from the family's real shapes (latent channels and downsampling, text
tokens x width, pooled widths) at float32 and at the cache's storage dtype.

Results: benchmarks/results/scale.json and scale.md. Ratios within one run of this script are the claims
(peak RSS at 10x N over peak RSS at N; setup time at 10x N over setup at N); absolute numbers are context.
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


def write_dataset(root: Path, n: int, *, size: int = 32, seed: int = 0) -> float:
    """n distinct images (random blocks of ink on a blank page, 8 x 8 cells scaled to ``size``), captions
    "a digit k, record i" (all distinct). Returns the seconds it took."""
    import numpy as np
    from PIL import Image

    t0 = time.time()
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(root / "metadata.jsonl", "w") as meta:
        for i in range(n):
            cells = (rng.random((8, 8)) < 0.35).astype(np.uint8) * 255
            img = Image.fromarray(cells, "L").resize((size, size), Image.Resampling.NEAREST).convert("RGB")
            name = f"{i:07d}.png"
            img.save(root / name, optimize=False, compress_level=1)
            meta.write(json.dumps({"file_name": name, "text": f"a digit {i % 5}, record {i}"}) + "\n")
    return time.time() - t0


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def run_once(data: Path, *, processes: int, steps: int, work: Path) -> dict:
    run_dir = work / f"run-{processes}p"
    cache = work / f"cache-{processes}p"
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    dpdiff = Path(sys.executable).with_name("dpdiff")
    args = [str(dpdiff), "finetune", f"data.path={data}", f"data.cache_dir={cache}", f"hydra.run.dir={run_dir}",
            f"train.max_steps={steps}", "train.batch_size=256", "train.micro_batch_size=64", "train.log_every=1",
            "train.checkpoint_every=0", "train.sample.per_prompt=1", "train.sample.steps=2", "train.progress=false",
            "probes=none", "eval=none", "privacy.augmult=1", "data.holdout_fraction=0.01",
            f"launcher.num_processes={processes}"]
    env = {**os.environ, "DPDIFF_HOME": str(work / "home"), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"
           if processes > 1 else os.environ.get("OMP_NUM_THREADS", "")}
    env = {k: v for k, v in env.items() if v != ""}
    t0 = time.time()
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=6 * 3600)
    wall = time.time() - t0
    if proc.returncode != 0:
        return {"processes": processes, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1],
                "wall_seconds": round(wall, 1)}
    run = json.loads((run_dir / "run.json").read_text())
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    cum = [m["seconds"] for m in metrics if m.get("seconds") is not None]  # cumulative, logged every step
    step_times = [b - a for a, b in zip(cum, cum[1:])]  # the first step (warm-up) is left out
    phases = run.get("phases") or []
    per_rank_peak = [max(p["peak_rss_mib"] for p in ranks) for ranks in phases if ranks]
    # private (anonymous) memory at the phase ends: what a process owns, page cache of the mapped store excluded
    per_rank_private = [max(p.get("private_mib") or 0 for p in ranks) for ranks in phases if ranks]
    out = {"processes": processes, "wall_seconds": round(wall, 1), "phases": phases,
           "peak_rss_mib_per_rank": per_rank_peak, "private_mib_per_rank": per_rank_private,
           "feature_cache_bytes": du(cache) if cache.exists() else 0,
           "step_seconds_median": (round(sorted(step_times)[len(step_times) // 2], 3) if step_times else None),
           "setup_seconds": round(sum(p["seconds"] for p in phases[0] if p["phase"] != "train"), 2) if phases
           else None}
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    return out


#: each family's frozen-feature shapes: (latent channels, VAE downsampling, default resolution, text tokens,
#: text width, pooled widths, per-image added floats). From the families' published configs: SD 1.5 (CLIP
#: ViT-L 77 x 768), SDXL (CLIP-L + bigG 77 x 2048, pooled 1280, 6 time ids), SD3 (16 ch, CLIP 77 + T5 77 x
#: 4096, pooled 2048), Flux (16 ch, T5 512 x 4096, pooled 768).
FAMILIES = {
    "SD 1.5, 512 px": (4, 8, 512, 77, 768, 0, 0),
    "SDXL, 1024 px": (4, 8, 1024, 77, 2048, 1280, 6),
    "SD3, 1024 px, T5 77": (16, 8, 1024, 154, 4096, 2048, 0),
    "Flux, 1024 px, T5 512": (16, 8, 1024, 512, 4096, 768, 0),
}


def family_bytes(storage_bytes: int = 2) -> list[dict]:
    """Bytes per image of the feature cache (posterior mean + std, one orientation; one text row per image,
    as with distinct captions) at float32 and at ``storage_bytes`` per value."""
    rows = []
    for name, (ch, down, res, tokens, width, pooled, added) in FAMILIES.items():
        latent = 2 * ch * (res // down) ** 2
        text = tokens * width + pooled
        values = latent + text + added
        rows.append({"family": name, "latent_values": latent, "text_values": text,
                     "bytes_float32": 4 * values, "bytes_stored": storage_bytes * values,
                     "per_100k_float32_gb": round(4 * values * 1e5 / 1e9, 1),
                     "per_100k_stored_gb": round(storage_bytes * values * 1e5 / 1e9, 1)})
    return rows


def markdown(res: dict) -> str:
    lines = ["# The data path at scale", "", f"Machine: {res['machine']}. Tiny base, short DP run "
             f"({res['steps']} steps, batch 256), every caption distinct. Generated by `python benchmarks/scale.py`.",
             "", "| N | processes | setup (s) | step (s) | peak RSS per process (MiB) | private memory per process, "
             "largest at a phase end (MiB) | feature cache on disk (MB) | slowest phase |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        if "error" in r:
            lines.append(f"| {r['n']} | {r['processes']} | error: {r['error']} | | | | | |")
            continue
        slow = max(r["phases"][0], key=lambda p: p["seconds"]) if r["phases"] else {"phase": "n/a", "seconds": 0}
        lines.append(f"| {r['n']} | {r['processes']} | {r['setup_seconds']} | {r['step_seconds_median']} | "
                     f"{', '.join(f'{x:.0f}' for x in r['peak_rss_mib_per_rank'])} | "
                     f"{', '.join(f'{x:.0f}' for x in r['private_mib_per_rank'])} | "
                     f"{r['feature_cache_bytes'] / 1e6:.1f} | {slow['phase']} ({slow['seconds']:.0f} s) |")
    lines += ["", "Per phase (rank 0): seconds / peak RSS MiB at the phase's end", ""]
    for r in res["runs"]:
        if r.get("phases"):
            lines.append(f"- N={r['n']}, {r['processes']} process(es): " + "; ".join(
                f"{p['phase']} {p['seconds']:.1f} s / {p['peak_rss_mib']:.0f}" for p in r["phases"][0]))
    lines += ["", "Ratios (the claims):", ""]
    for k, v in res.get("ratios", {}).items():
        lines.append(f"- {k}: {v}")
    lines += ["", "Feature-cache bytes per image by family (posterior mean + std, one text row per image):", "",
              "| family | per image, float32 | per image, stored | 100k images, float32 | 100k images, stored |",
              "|---|---|---|---|---|"]
    for f in res["family_bytes"]:
        lines.append(f"| {f['family']} | {f['bytes_float32'] / 1e6:.2f} MB | {f['bytes_stored'] / 1e6:.2f} MB | "
                     f"{f['per_100k_float32_gb']} GB | {f['per_100k_stored_gb']} GB |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="4000,40000")
    ap.add_argument("--processes", default="1,2")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--work", default=None, help="scratch dir (default: a temp dir, removed)")
    ap.add_argument("--out", default=str(RESULTS / "scale"))
    args = ap.parse_args()
    import platform

    work = Path(args.work or tempfile.mkdtemp(prefix="dpdiff-scale-"))
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "steps": args.steps, "runs": [],
           "family_bytes": family_bytes()}
    try:
        for n in [int(x) for x in args.sizes.split(",")]:
            data = work / f"data-{n}"
            gen = write_dataset(data, n)
            print(f"N={n}: dataset written in {gen:.0f} s ({du(data) / 1e6:.0f} MB)", flush=True)
            for p in [int(x) for x in args.processes.split(",")]:
                r = {"n": n, **run_once(data, processes=p, steps=args.steps, work=work)}
                res["runs"].append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "phases"}), flush=True)
            shutil.rmtree(data, ignore_errors=True)
        ok = {(r["n"], r["processes"]): r for r in res["runs"] if "error" not in r}
        sizes = sorted({n for n, _ in ok})
        ratios = {}
        for a, b in zip(sizes, sizes[1:]):
            if (a, 1) in ok and (b, 1) in ok:
                ra, rb = ok[(a, 1)], ok[(b, 1)]
                ratios[f"peak RSS, N={b} / N={a} (1 process)"] = round(
                    max(rb["peak_rss_mib_per_rank"]) / max(ra["peak_rss_mib_per_rank"]), 2)
                ratios[f"private memory, N={b} / N={a} (1 process)"] = round(
                    max(rb["private_mib_per_rank"]) / max(ra["private_mib_per_rank"]), 2)
                ratios[f"setup time, N={b} / N={a} (1 process)"] = round(rb["setup_seconds"] / ra["setup_seconds"], 2)
                if ra["step_seconds_median"] and rb["step_seconds_median"]:
                    ratios[f"step time, N={b} / N={a}"] = round(rb["step_seconds_median"] / ra["step_seconds_median"],
                                                                2)
        for n in sizes:
            if (n, 1) in ok and (n, 2) in ok:
                ratios[f"peak RSS per process, 2 processes / 1, N={n}"] = round(
                    max(ok[(n, 2)]["peak_rss_mib_per_rank"]) / max(ok[(n, 1)]["peak_rss_mib_per_rank"]), 2)
        res["ratios"] = ratios
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
