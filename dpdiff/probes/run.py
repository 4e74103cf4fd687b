"""Running the probes (extraction, membership inference, one-run audit) and writing probes.json."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from dpdiff.io import write_json_atomic
from dpdiff.probes.context import (
    ProbeContext,
    denoising_losses,
    encode_captions,
    encode_images,
    shared_noises,
)

log = logging.getLogger("dpdiff")

REQUIRED = {"extraction": ("extracted_count", "rate"), "mia": ("auc",), "audit": ("eps_lower", "verdict")}


def run_audit(ctx: ProbeContext, cfg) -> dict:
    """Score every canary by its base-calibrated loss; guess the top k+ in and bottom k- out."""
    from dpdiff.probes.audit import audit_from_scores, max_eps_lower

    can = ctx.canaries
    if not can:
        return {"skipped": "no canaries (set probes.audit.canaries=m, e.g. 500, before training)",
                "eps_lower": None, "verdict": None}
    canary_dir = ctx.run_dir / "canaries"
    from PIL import Image

    items = can["canaries"]
    images = [Image.open(canary_dir / f"{c['key']}.png").convert("RGB") for c in items]
    latents = encode_images(ctx, images)
    text = encode_captions(ctx, [c["caption"] for c in items])
    timesteps = [int(t) for t in cfg.get("timesteps", [50, 100, 200, 300, 500])]
    noises = shared_noises(tuple(latents.shape[1:]), int(cfg.get("noise_draws", 4)), ctx.seed + 29)
    sched = ctx.base.noise_scheduler
    ft = denoising_losses(ctx.unet, sched, latents, text, timesteps=timesteps, noises=noises, device=ctx.device)
    with ctx.base_model() as base_unet:
        base = denoising_losses(base_unet, sched, latents, text, timesteps=timesteps, noises=noises,
                                device=ctx.device)
    scores = (base - ft).mean(dim=(1, 2)).numpy()
    included = np.array([bool(c["included"]) for c in items])
    m = len(items)
    k_plus = int(cfg.get("k_plus") or max(1, m // 10))
    k_minus = int(cfg.get("k_minus") or max(1, m // 10))
    if k_plus + k_minus > m:
        from dpdiff.errors import UserError

        raise UserError(f"probes.audit.k_plus + k_minus = {k_plus + k_minus} > {m} canaries")
    dp = bool(ctx.privacy.get("dp"))
    delta = float(ctx.privacy["delta"]) if dp else float(cfg.get("delta_if_no_dp", 1e-5))
    conf = float(cfg.get("confidence", 0.95))
    res = audit_from_scores(scores=scores, included=included, k_plus=k_plus, k_minus=k_minus, delta=delta,
                            confidence=conf)
    ceiling = max_eps_lower(m=m, num_guesses=k_plus + k_minus, delta=delta, confidence=conf)
    eps = ctx.privacy.get("epsilon")
    if not dp:
        verdict = "n/a: trained without DP (the lower bound shows how much it leaks)"
    elif res["eps_lower"] > eps:
        verdict = "FAIL: measured leakage exceeds the claimed epsilon (a privacy bug)"
    else:
        verdict = "PASS: no leakage beyond the claimed epsilon detected"
    return {
        **res,
        "eps_lower": float(res["eps_lower"]),
        "ceiling": float(ceiling),
        "epsilon": eps,
        "delta": delta,
        "confidence": conf,
        "verdict": verdict,
        "included": int(included.sum()),
        "score_mean_included": float(scores[included].mean()) if included.any() else None,
        "score_mean_excluded": float(scores[~included].mean()) if (~included).any() else None,
        "note": "eps_lower is a 95%-confidence lower bound on the epsilon actually achieved (Steinke et al. 2023); "
                "'ceiling' is the largest bound this m and k can show even with every guess right",
    }


def run_probes(ctx: ProbeContext, cfg) -> dict:
    """Run the enabled probes, write probes.json (null where a probe did not run) and return it."""
    t0 = time.time()
    out: dict = {"extraction": None, "mia": None, "audit": None}
    budget = cfg.get("budget_images")
    torch.manual_seed(ctx.seed)
    ctx.unet.eval()
    if (cfg.get("extraction") or {}).get("enabled", True):
        from dpdiff.probes.extraction import run_extraction

        log.info("probe: extraction")
        out["extraction"] = run_extraction(ctx, cfg.extraction, budget_images=budget)
    if (cfg.get("mia") or {}).get("enabled", True):
        from dpdiff.probes.mia import run_mia

        log.info("probe: membership inference")
        out["mia"] = run_mia(ctx, cfg.mia)
    if (cfg.get("audit") or {}).get("canaries", 0):
        log.info("probe: one-run audit")
        out["audit"] = run_audit(ctx, cfg.audit)
    for section, keys in REQUIRED.items():  # the contract: these keys exist, null when not run
        if out[section] is None:
            out[section] = {k: None for k in keys} | {"skipped": "disabled"}
    out["seconds"] = round(time.time() - t0, 2)
    out["for_data_owner_only"] = ("Probe results describe the training data (which images leak); "
                                  "they are for the data owner, not for publication.")
    write_json_atomic(ctx.run_dir / "probes.json", out)
    return out


def load_run_canaries(run_dir: Path) -> dict | None:
    from dpdiff.probes.canaries import load_canaries

    return load_canaries(run_dir)
