"""Time and peak memory of one training step configuration, in a fresh process (so peak RSS is its own).

    python benchmarks/bench_step.py --model tiny|sd15|sdxl|sd3|flux --adapter lora|full --mode nondp|dp|naive
        [--engine hooks|bookkeeping] [--batch 32] [--micro 32] [--augmult 1] [--steps 5] [--resolution 16]
        [--device auto|cpu|cuda]

Prints one JSON line: median seconds per logical step (after a warm-up step), peak memory (MiB) and the
device it ran on. On a CPU the peak is the process's RSS during the steps (sampled every 20 ms); on CUDA it
is ``torch.cuda.max_memory_allocated`` (timings synchronise the device). The same script, unchanged, gives
GPU figures where a GPU exists (``--device auto`` picks it).
``naive`` is the straightforward DP implementation: a forward/backward per unit, clip, sum, noise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from dpdiff.privacy.randomness import GaussianNoise


def sd15_unet_config(sample_size: int) -> dict:
    """Stable Diffusion 1.5's UNet2DConditionModel config (random weights are built from it)."""
    return dict(sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
                attention_head_dim=8, norm_num_groups=32)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    import platform

    return f"{platform.machine()} {platform.processor()} ({torch.get_num_threads()} threads)"


def build(model: str, adapter: str, resolution: int):
    """(denoiser, trainable params, objective, latent shape, text shape, family) of a benchmark model: ``tiny`` (the
    built-in SD), ``sd15`` (SD 1.5's UNet, random weights), or the tiny ``sdxl`` / ``sd3`` / ``flux`` denoisers."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from dpdiff.models import adapters, tiny
    from dpdiff.models.families import FAMILIES
    from dpdiff.training.loss import DiffusionObjective, FlowMatchingObjective

    torch.manual_seed(0)
    family = FAMILIES["sd"]
    targets = None
    if model == "tiny":
        from dpdiff.models.loading import load_base

        unet = load_base(None).denoiser
        text_len, text_dim, latent = 32, unet.config.cross_attention_dim, unet.config.sample_size
    elif model in tiny.FAMILY_DENOISERS:
        family = FAMILIES[model]
        unet = tiny.family_denoiser(model)
        (text_len, text_dim), latent, targets = tiny.FAMILY_DENOISERS[model][2], 8, list(family.lora_targets)
    else:
        latent = resolution
        unet = UNet2DConditionModel(**sd15_unet_config(latent))
        text_len, text_dim = 77, 768
    params = adapters.attach(unet, kind=adapter, rank=16, target_modules=targets)
    if adapter == "lora":
        for n, p in unet.named_parameters():  # non-zero B so every LoRA weight has a gradient
            if "lora_B" in n:
                p.data.normal_(0, 0.01)
    unet.train()
    if family.objective == "flow":
        obj = FlowMatchingObjective(tiny.family_scheduler(model), family=family)
    else:
        obj = DiffusionObjective(DDPMScheduler(**tiny.scheduler_config()), family=family)
    return unet, params, obj, (4, latent, latent), (text_len, text_dim), family


def rows(batch: int, augmult: int, shape, text, seed: int, device: torch.device | str = "cpu", family: str = "sd"):
    from dpdiff.models import tiny
    from dpdiff.training.loss import RowBatch

    g = torch.Generator().manual_seed(seed)
    r = batch * augmult
    if family in tiny.FAMILY_DENOISERS:
        emb, added = tiny.family_conditioning(family, r, generator=g)
    else:
        emb, added = torch.randn(r, *text, generator=g), {}
    return RowBatch(torch.randn(r, *shape, generator=g), torch.randn(r, *shape, generator=g),
                    torch.randint(0, 1000, (r,), generator=g), emb,
                    torch.arange(batch).repeat_interleave(augmult), torch.full((r,), 1.0 / augmult), batch,
                    added).to(device)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--adapter", default="lora")
    ap.add_argument("--mode", default="dp")
    ap.add_argument("--engine", default="hooks")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--micro", type=int, default=32)
    ap.add_argument("--augmult", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--resolution", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    cuda = device.type == "cuda"
    from dpdiff.privacy.engines import BookKeepingDPSGDEngine, DPSGDEngine, NonPrivateEngine
    from dpdiff.training.trainer import split_units

    unet, params, obj, shape, text, family = build(a.model, a.adapter, a.resolution)
    unet.to(device)  # parameters move in place: the engines' and optimizer's references stay valid
    opt = torch.optim.AdamW(params, lr=1e-5)
    if a.mode == "dp":
        cls = {"hooks": DPSGDEngine, "bookkeeping": BookKeepingDPSGDEngine}[a.engine]
        engine = cls(unet, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=float(a.batch),
                     noise=GaussianNoise.seeded(0, device=device), params=params)
    else:
        engine = NonPrivateEngine(unet, params=params)

    def naive_step(rb):
        """Per unit: forward/backward alone, clip its gradient, add to the sum; then noise once."""
        summed = [torch.zeros_like(p) for p in params]
        for u in range(rb.num_units):
            sel = (rb.unit_pos == u).nonzero().flatten()
            loss = obj.row_losses(unet, rb.select(sel, unit_pos=rb.unit_pos[sel] * 0, num_units=1)).mean()
            grads = torch.autograd.grad(loss, params)
            norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
            c = min(1.0, 1.0 / (float(norm) + 1e-6))
            for s, g in zip(summed, grads):
                s.add_(g, alpha=c)
        for p, s in zip(params, summed):
            p.grad = (s + torch.randn_like(s)) / rb.num_units

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    import threading

    import psutil

    proc = psutil.Process()
    baseline = proc.memory_info().rss
    peak = [baseline]
    done = threading.Event()

    def poll():  # peak RSS of the training steps alone (ru_maxrss would include model building)
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.02)

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        threading.Thread(target=poll, daemon=True).start()
    times = []
    for step in range(a.steps + 1):
        rb = rows(a.batch, a.augmult, shape, text, step, device, family.name)
        sync()
        t0 = time.perf_counter()
        if a.mode == "naive":
            naive_step(rb)
        else:
            engine.start_step()
            for micro in split_units(rb, a.micro):
                engine.backward(obj.row_losses(unet, micro), unit_pos=micro.unit_pos, row_weight=micro.row_weight,
                                num_units=micro.num_units)
            engine.finalize()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if step > 0:
            times.append(time.perf_counter() - t0)
    done.set()
    peak_mib = (torch.cuda.max_memory_allocated(device) if cuda else max(peak[0], proc.memory_info().rss)) / 2**20
    print(json.dumps({"model": a.model, "adapter": a.adapter, "mode": a.mode, "engine": a.engine, "batch": a.batch,
                      "micro": a.micro, "augmult": a.augmult, "resolution": a.resolution,
                      "device": device_name(device), "memory_kind": "CUDA allocated" if cuda else "RSS",
                      "step_seconds": statistics.median(times), "peak_mib": round(peak_mib, 1),
                      "baseline_mib": round(baseline / 2**20, 1),
                      "training_mib": round(peak_mib - baseline / 2**20, 1),
                      "trainable": sum(p.numel() for p in params)}))


if __name__ == "__main__":
    main()
