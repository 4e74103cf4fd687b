"""Run every benchmark and write benchmarks/results/*.json and benchmarks/results/README.md.

    python benchmarks/run_all.py [--quick] [--only step,cache,generation]

Every claim is a ratio measured within one run on one machine (e.g. DP step time / non-DP step
time at the same logical batch); absolute times are recorded for context only. Each step
configuration runs in a fresh process so that its peak memory is its own.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def step(**kw) -> dict:
    args = [sys.executable, str(HERE / "bench_step.py")]
    for k, v in kw.items():
        args += [f"--{k}", str(v)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=7200)
    if out.returncode != 0:
        return {**kw, "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def ratio(a: dict, b: dict, key: str) -> float | None:
    if "error" in a or "error" in b or not b.get(key):
        return None
    return round(a[key] / b[key], 3)


def faster(a: dict | None, b: dict) -> dict:
    """The faster of two runs of one configuration (a failed run loses)."""
    if a is None:
        return b
    return a if a.get("step_seconds", float("inf")) <= b.get("step_seconds", float("inf")) else b


def best_of(rounds: int, **kw) -> dict:
    """The fastest of ``rounds`` runs of one configuration (each in its own process)."""
    best = None
    for _ in range(rounds):
        best = faster(best, step(**kw))
    return best


#: (model, adapter, logical batch, micro-batch, latent size, DP engines, the issue's time / peak-memory targets).
#: SD 1.5 at 16x16 latents (128 px) and at 64x64 (512 px, its training resolution), micro-batches that fit 24 GB.
STEP_PLANS = [
    ("tiny", "lora", 32, 32, 16, ["hooks"], (1.10, None)),
    ("tiny", "full", 32, 32, 16, ["hooks", "bookkeeping"], (None, None)),
    ("sd15", "lora", 8, 8, 16, ["hooks"], (1.05, 1.10)),
    ("sd15", "full", 8, 4, 16, ["bookkeeping"], (1.30, 1.10)),
    ("sd15", "lora", 2, 2, 64, ["hooks"], (1.05, 1.10)),
    ("sd15", "full", 2, 2, 64, ["bookkeeping"], (1.30, 1.10)),
]


def bench_steps(quick: bool) -> dict:
    """DP vs non-DP (time, memory), LoRA and full FT, tiny and SD-1.5-shaped at two latent sizes; the per-unit
    loop; K=4 vs K=1. The tiny configurations run twice, interleaved, and keep their faster run (a shared CPU
    moves a 0.3 s step by several percent); an SD configuration runs once (minutes per step)."""
    n = 3 if quick else 6
    res = {"configs": [], "ratios": {}}
    for model, adapter, batch, micro, resolution, engines, (time_target, mem_target) in STEP_PLANS:
        if quick and resolution > 16:
            continue
        steps, rounds = (1 if resolution > 16 else 2, 1) if model == "sd15" else (n, 2)
        common = dict(model=model, adapter=adapter, batch=batch, micro=micro, resolution=resolution, steps=steps)
        non, results = None, dict.fromkeys(engines)
        for _ in range(rounds):  # interleaved: non-DP and DP runs see the same machine
            non = faster(non, step(mode="nondp", **common))
            for eng in engines:
                results[eng] = faster(results[eng], step(mode="dp", engine=eng, **common))
        res["configs"].append(non)
        for eng in engines:
            dp = results[eng]
            res["configs"].append(dp)
            key = f"{model}/{adapter}/{eng}" + (f" @{resolution}x{resolution}" if resolution != 16 else "")
            t, m = ratio(dp, non, "step_seconds"), ratio(dp, non, "peak_mib")
            res["ratios"][key] = {"dp_over_nondp_time": t, "dp_over_nondp_peak": m,
                                  "dp_over_nondp_training_memory": ratio(dp, non, "training_mib"),
                                  "batch": batch, "micro": micro, "time_target": time_target,
                                  "memory_target": mem_target, "device": non.get("device")}
    # speed-up over the straightforward per-unit loop at logical batch 32 (tiny, LoRA)
    naive = step(model="tiny", adapter="lora", mode="naive", batch=32, micro=32, steps=n)
    fast = best_of(2, model="tiny", adapter="lora", mode="dp", engine="hooks", batch=32, micro=32, steps=n)
    res["configs"] += [naive, fast]
    res["ratios"]["speedup_over_naive_loop_tiny_lora_b32"] = ratio(naive, fast, "step_seconds")
    res["ratios"]["nondp_speedup_over_naive_loop_tiny_lora_b32"] = ratio(
        naive, next(c for c in res["configs"] if c.get("model") == "tiny" and c.get("adapter") == "lora"
                    and c.get("mode") == "nondp"), "step_seconds")
    # augmentation multiplicity: K=4 vs K=1 per logical step
    k4 = step(model="tiny", adapter="lora", mode="dp", engine="hooks", batch=32, micro=32, augmult=4, steps=n)
    res["configs"].append(k4)
    res["ratios"]["augmult4_over_augmult1_time"] = ratio(k4, fast, "step_seconds")
    return res


def bench_families(quick: bool) -> dict:
    """DP vs non-DP step time of the tiny SDXL, SD3 and Flux-style denoisers (LoRA on the family's default
    targets, and every weight), logical batch 16, the engine ``train.per_sample=auto`` picks (hooks: their
    per-unit gradients fit), best of two interleaved runs."""
    n = 3 if quick else 6
    res = {"configs": [], "ratios": {}}
    for family in ("sdxl", "sd3", "flux"):
        for adapter in ("lora", "full"):
            common = dict(model=family, adapter=adapter, batch=16, micro=16, resolution=8, steps=n)
            non, dp = None, None
            for _ in range(2):
                non = faster(non, step(mode="nondp", **common))
                dp = faster(dp, step(mode="dp", engine="hooks", **common))
            res["configs"] += [non, dp]
            res["ratios"][f"{family}/{adapter}"] = {"dp_over_nondp_time": ratio(dp, non, "step_seconds"),
                                                   "nondp_seconds": non.get("step_seconds"),
                                                   "dp_seconds": dp.get("step_seconds"),
                                                   "trainable": non.get("trainable")}
    return res


def bench_cache(quick: bool) -> dict:
    """One epoch of training rows from cached posteriors vs VAE-encoding the images every step."""
    import torch

    from dpdiff.data.demos import builtin_digits_dir
    from dpdiff.data.formats import read_dataset
    from dpdiff.data.preprocess import to_pixels
    from dpdiff.data.records import PrivacyUnits
    from dpdiff.models.loading import load_base
    from dpdiff.training.encode import encode_dataset
    from dpdiff.training.rows import RowBuilder

    torch.set_num_threads(2)
    base = load_base(None)
    recs = read_dataset(builtin_digits_dir())[: 256 if quick else None]
    batch = 64
    t0 = time.perf_counter()
    enc = encode_dataset(recs, base=base,
                         resolution=32, center_crop=True, flips=False, device="cpu", progress=False)
    encode_once = time.perf_counter() - t0
    units = PrivacyUnits("example", tuple((i,) for i in range(len(recs))), tuple(r.key for r in recs))
    builder = RowBuilder(enc, units, augmult=1, random_flip=False, num_train_timesteps=1000, key=bytes(32))
    t0 = time.perf_counter()
    for s in range(0, len(recs), batch):
        builder.build(list(range(s, min(s + batch, len(recs)))), step=s)
    cached_epoch = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, len(recs), batch):
            chunk = recs[s : s + batch]
            px = torch.stack([to_pixels(r.open(), resolution=32) for r in chunk])
            base.vae.encode(px).latent_dist.sample()
            base.text_encoder(base.tokenizer([r.text for r in chunk], padding="max_length",
                                             max_length=base.tokenizer.model_max_length, return_tensors="pt").input_ids)
    fly_epoch = time.perf_counter() - t0
    return {"images": len(recs), "encode_once_seconds": round(encode_once, 3),
            "cached_epoch_seconds": round(cached_epoch, 4), "on_the_fly_epoch_seconds": round(fly_epoch, 3),
            "speedup_per_epoch": round(fly_epoch / cached_epoch, 1),
            "note": "data-side cost of one epoch (the UNet step is the same in both)"}


def bench_generation(quick: bool) -> dict:
    """The probes' batched generation vs a plain diffusers pipeline call on the same prompts."""
    import torch

    from dpdiff.data.digits import caption
    from dpdiff.models.loading import build_pipeline, load_base
    from dpdiff.models.pipeline import generate

    torch.set_num_threads(2)
    base = load_base(None)
    pipe = build_pipeline(base)
    n = 64 if quick else 128
    prompts = [caption(i % 10) for i in range(n)]
    seeds = list(range(n))
    generate(pipe, prompts[:8], seeds=seeds[:8], steps=20)  # warm-up

    def probe_path():
        generate(pipe, prompts, seeds=seeds, steps=20, batch_size=64)

    def plain_path():
        for s in range(0, n, 64):
            pipe(prompts[s : s + 64], num_inference_steps=20, guidance_scale=3.0,
                 generator=[torch.Generator().manual_seed(i) for i in seeds[s : s + 64]], output_type="np")

    # interleaved repeats, best of each: the order of two runs on a shared CPU is worth several percent
    ours, plain = float("inf"), float("inf")
    for _ in range(2 if quick else 3):
        for fn, which in ((plain_path, "plain"), (probe_path, "ours")):
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            ours, plain = (min(ours, dt), plain) if which == "ours" else (ours, min(plain, dt))
    return {"images": n, "probe_images_per_second": round(n / ours, 2), "plain_images_per_second": round(n / plain, 2),
            "throughput_ratio": round(plain / ours, 3), "target": ">= 0.95"}


def write_table(results: dict) -> None:
    lines = ["# Benchmarks", "",
             f"On {results['machine']} ({results['threads']} threads); each section says when it was measured "
             "(the step table gives the device of every row).",
             "Ratios are within one run; absolute times are for context.", ""]
    st = results.get("step")
    if st:
        def verdict(value, target):
            if target is None or value is None:
                return ""
            return f" (target <= {target}: {'met' if value <= target else 'MISSED'})"

        lines += ["## DP step vs non-DP step (same logical batch)", "", f"Measured {st.get('measured', '?')}.", "",
                  "| model / adapter / engine | logical batch (micro) | DP/non-DP time | DP/non-DP peak memory "
                  "| DP/non-DP training memory |",
                  "|---|---|---|---|---|"]
        for k, v in st["ratios"].items():
            if isinstance(v, dict):
                lines.append(f"| {k} | {v['batch']} ({v.get('micro', v['batch'])}) | {v['dp_over_nondp_time']}"
                             f"{verdict(v['dp_over_nondp_time'], v.get('time_target'))} | "
                             f"{v.get('dp_over_nondp_peak', v.get('dp_over_nondp_peak_rss'))}"
                             f"{verdict(v.get('dp_over_nondp_peak'), v.get('memory_target'))} | "
                             f"{v['dp_over_nondp_training_memory']} |")
        naive = st["ratios"].get("speedup_over_naive_loop_tiny_lora_b32")
        naive_verdict = "" if naive is None else f" (target >= 10x: {'met' if naive >= 10 else 'MISSED'})"
        lines += ["", f"- speed-up of dpdiff's DP step over a per-unit forward/backward loop (tiny LoRA, batch 32): "
                      f"**{naive}x**{naive_verdict} "
                      f"(the non-DP batched step: {st['ratios'].get('nondp_speedup_over_naive_loop_tiny_lora_b32')}x)",
                  f"- augmentation multiplicity K=4 vs K=1, time per logical step: "
                  f"**{st['ratios'].get('augmult4_over_augmult1_time')}x**", "",
                  "Engines: hooks (every per-unit gradient held), bookkeeping (one backward, ghost norms where "
                  "cheaper, the clipped gradient formed from kept layer inputs and output gradients). "
                  "'peak memory' is the process's peak RSS on a CPU "
                  "(CUDA: max allocated); 'training memory' is that peak minus the memory before the steps. "
                  "sd15 = a UNet of SD 1.5's shape and size (random weights); @64x64 = 512 px images.", "",
                  "Raw step timings (seconds per logical step, peak memory MiB):", "",
                  "| model | adapter | latents | mode | engine | batch (micro) | K | s/step | peak MiB | training MiB "
                  "| device |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in st["configs"]:
            if "error" in c:
                lines.append(f"| {c.get('model')} | {c.get('adapter')} | | {c.get('mode')} | {c.get('engine', '')} | "
                             f"{c.get('batch')} | | error: {c['error']} | | | |")
            else:
                engine = c["engine"] if c["mode"] == "dp" else ""
                res = c.get("resolution", 16)
                lines.append(f"| {c['model']} | {c['adapter']} | {res}x{res} | {c['mode']} | {engine} | "
                             f"{c['batch']} ({c.get('micro', c['batch'])}) | {c['augmult']} | "
                             f"{c['step_seconds']:.3f} | "
                             f"{c.get('peak_mib', c.get('peak_rss_mib'))} | {c['training_mib']} | "
                             f"{c.get('device', '')} |")
    ca = results.get("cache")
    if ca:
        lines += ["", "## Latent cache", "", f"Measured {ca.get('measured', '?')}.", "",
                  f"One epoch over {ca['images']} images: cached {ca['cached_epoch_seconds']} s "
                  f"vs encoding on the fly {ca['on_the_fly_epoch_seconds']} s: **{ca['speedup_per_epoch']}x** "
                  f"(the one-time encoding costs {ca['encode_once_seconds']} s)."]
    fa = results.get("families")
    if fa:
        lines += ["", "## Model families (tiny denoisers)", "", f"Measured {fa.get('measured', '?')}.", "",
                  "| family / adapter | trainable weights | non-DP s/step | DP s/step | DP/non-DP time |",
                  "|---|---|---|---|---|"]
        for k, v in fa["ratios"].items():
            secs = [("error" if x is None else f"{x:.3f}") for x in (v["nondp_seconds"], v["dp_seconds"])]
            lines.append(f"| {k} | {v['trainable']} | {secs[0]} | {secs[1]} | {v['dp_over_nondp_time']} |")
    ge = results.get("generation")
    if ge:
        lines += ["", "## Probe generation throughput", "", f"Measured {ge.get('measured', '?')}.", "",
                  f"{ge['probe_images_per_second']} images/s (probe) vs {ge['plain_images_per_second']} images/s "
                  f"(plain pipeline call, same prompts and seeds): ratio **{ge['throughput_ratio']}** "
                  "(target >= 0.95)."]
    (RESULTS / "README.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="step,families,cache,generation")
    a = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    prev = RESULTS / "all.json"
    results = json.loads(prev.read_text()) if prev.exists() else {}
    results.update({"when": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()} {platform.processor()}",
                    "threads": 2, "python": platform.python_version()})
    for name, fn in (("step", bench_steps), ("families", bench_families), ("cache", bench_cache),
                     ("generation", bench_generation)):
        if name in a.only.split(","):
            print(f"benchmark: {name}", flush=True)
            results[name] = {**fn(a.quick), "measured": time.strftime("%Y-%m-%d %H:%M")}
            (RESULTS / f"{name}.json").write_text(json.dumps(results[name], indent=2) + "\n")
    prev.write_text(json.dumps(results, indent=2) + "\n")
    write_table(results)
    print((RESULTS / "README.md").read_text())


if __name__ == "__main__":
    main()
