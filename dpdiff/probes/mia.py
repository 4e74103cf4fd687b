"""Membership inference on members vs held-out non-members.

Three white-box attacks on the denoising loss, each a score per image (higher = member):

* ``loss``: minus the fine-tuned model's loss, averaged over a grid of timesteps and D noise
  draws shared by all images (Carlini et al. 2023, Sec. 5; Matsumoto et al. 2023).
* ``calibrated``: base loss minus fine-tuned loss (the "reference model" attack of Carlini et al.
  2022 with the pre-fine-tuning model as the reference; free for LoRA: adapters disabled). It
  removes the per-image difficulty that dominates the plain loss.
* ``pia``: Proximal Initialization Attack (Kong et al., ICLR 2024): the model's own prediction at
  t=0 as the noise, x_t built deterministically from it, and the prediction error at t as score.

Results: AUC with a bootstrap interval, TPR at 1% and 0.1% FPR with counts and intervals, and the
DP consistency check TPR <= e^eps FPR + delta at every reported point (Kairouz et al. 2015).
"""

from __future__ import annotations

import numpy as np
import torch

from dpdiff.probes.context import (
    ProbeContext,
    denoising_losses,
    encode_captions,
    encode_images,
    shared_noises,
)
from dpdiff.probes.stats import dp_consistency, mia_summary


def _subsample(indices: list[int], n: int, seed: int) -> list[int]:
    if n is None or len(indices) <= n:
        return list(indices)
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(indices, size=n, replace=False).tolist())


@torch.no_grad()
def loss_scores(ctx: ProbeContext, record_ids: list[int], *, timesteps: list[int], draws: int,
                calibrated: bool) -> dict[str, np.ndarray]:
    recs = [ctx.records[i] for i in record_ids]
    latents = encode_images(ctx, recs)
    text = encode_captions(ctx, [r.text for r in recs])
    noises = shared_noises(tuple(latents.shape[1:]), draws, ctx.seed + 17)
    sched = ctx.base.noise_scheduler
    ft = denoising_losses(ctx.unet, sched, latents, text, timesteps=timesteps, noises=noises, device=ctx.device)
    out = {"loss": -ft.mean(dim=(1, 2)).numpy()}
    if calibrated:
        with ctx.base_model() as base_unet:
            base = denoising_losses(base_unet, sched, latents, text, timesteps=timesteps, noises=noises,
                                    device=ctx.device)
        out["calibrated"] = (base - ft).mean(dim=(1, 2)).numpy()
    return out


@torch.no_grad()
def pia_scores(ctx: ProbeContext, record_ids: list[int], *, timestep: int = 200, p: float = 2.0,
               batch_size: int = 64) -> np.ndarray:
    """PIA: eps0 = eps_theta(x0, 0); x_t = sqrt(a_t) x0 + sqrt(1-a_t) eps0; score = -||eps_theta(x_t, t) - eps0||_p."""
    recs = [ctx.records[i] for i in record_ids]
    latents = encode_images(ctx, recs)
    text = encode_captions(ctx, [r.text for r in recs])
    sched = ctx.base.noise_scheduler
    abar = sched.alphas_cumprod[timestep].float()
    scores = []
    for s in range(0, len(recs), batch_size):
        x0 = latents[s : s + batch_size].to(ctx.device)
        c = text[s : s + batch_size].to(ctx.device)
        t0 = torch.zeros(len(x0), dtype=torch.long, device=ctx.device)
        eps0 = ctx.unet(x0, t0, c, return_dict=False)[0].float()
        xt = abar.sqrt() * x0 + (1 - abar).sqrt() * eps0
        tt = torch.full((len(x0),), timestep, dtype=torch.long, device=ctx.device)
        eps_t = ctx.unet(xt, tt, c, return_dict=False)[0].float()
        scores.append(-(eps_t - eps0).abs().pow(p).flatten(1).mean(1).pow(1 / p).cpu())
    return torch.cat(scores).numpy()


def run_mia(ctx: ProbeContext, cfg) -> dict:
    """All attacks on up to ``cfg.members`` members and as many held-out non-members."""
    if not ctx.nonmember_records:
        return {"skipped": "no held-out non-members (data.holdout_fraction=0)", "auc": None}
    n = int(cfg.get("members", 256))
    members = _subsample(ctx.member_records, min(n, len(ctx.nonmember_records) * 4), ctx.seed)
    nonmembers = _subsample(ctx.nonmember_records, n, ctx.seed + 1)
    timesteps = [int(t) for t in cfg.get("timesteps", [50, 100, 200, 300, 500])]
    draws = int(cfg.get("noise_draws", 4))
    calibrated = bool(cfg.get("calibrated", True))
    sm = loss_scores(ctx, members, timesteps=timesteps, draws=draws, calibrated=calibrated)
    sn = loss_scores(ctx, nonmembers, timesteps=timesteps, draws=draws, calibrated=calibrated)
    if cfg.get("pia", True):
        t_pia = int(cfg.get("pia_timestep", 200))
        sm["pia"] = pia_scores(ctx, members, timestep=t_pia)
        sn["pia"] = pia_scores(ctx, nonmembers, timestep=t_pia)
    eps, delta = ctx.privacy.get("epsilon"), ctx.privacy.get("delta")
    attacks = {}
    for name in sm:
        summ = mia_summary(sm[name], sn[name], n_boot=int(cfg.get("bootstrap", 500)), seed=ctx.seed)
        if eps is not None:
            summ["dp_check"] = {
                key: dp_consistency(tpr=pt["tpr"], fpr=pt["fpr"], epsilon=eps, delta=delta,
                                    n_members=pt["n_members"], n_nonmembers=pt["n_nonmembers"])
                for key, pt in summ["tpr_at_fpr"].items() if pt.get("tpr") is not None
            }
        attacks[name] = summ
    best = max(attacks, key=lambda k: attacks[k]["auc"])
    violated = any(v.get("violated") for a in attacks.values() for v in (a.get("dp_check") or {}).values())
    return {
        "auc": attacks[best]["auc"],
        "auc_ci": attacks[best]["auc_ci"],
        "best_attack": best,
        "tpr_at_1pct_fpr": attacks[best]["tpr_at_fpr"].get("0.01", {}).get("tpr"),
        "members": len(members),
        "nonmembers": len(nonmembers),
        "timesteps": timesteps,
        "noise_draws": draws,
        "attacks": attacks,
        "dp_bound_violated": violated if eps is not None else None,
        "note": "auc is the strongest of the attacks run (chosen after the fact: an optimistic view of the "
                "attacker); each attack's own numbers are under 'attacks'",
    }
