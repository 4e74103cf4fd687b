"""Membership inference on members vs held-out non-members.

Three white-box attacks on the denoising loss, each a score per image (higher = member):

* ``loss``: minus the fine-tuned model's loss, averaged over a grid of timesteps and D noise
  draws shared by all images (Carlini et al. 2023, Sec. 5; Matsumoto et al. 2023).
* ``calibrated``: base loss minus fine-tuned loss (the "reference model" attack of Carlini et al.
  2022 with the pre-fine-tuning model as the reference; free for LoRA: adapters disabled). It
  removes the per-image difficulty that dominates the plain loss.
* ``pia``: Proximal Initialization Attack (Kong et al., ICLR 2024): the model's own prediction at
  t=0 as the noise, x_t built deterministically from it, and the l4 prediction error at t as score
  (v-prediction outputs converted to noise estimates).

Results: AUC (not estimable below ``min_nonmembers``) with a bootstrap interval and an exact
permutation p-value, TPR at 1% and 0.1% FPR with counts and intervals, and the verdict: the
one-run analysis of the random member / held-out split against the claimed epsilon.
"""

from __future__ import annotations

import numpy as np
import torch

from dpdiff.errors import UserError
from dpdiff.probes.context import (
    ProbeContext,
    denoising_losses,
    encode_captions,
    encode_images,
    shared_noises,
)
from dpdiff.probes.lira import LiraSettings
from dpdiff.probes.stats import mia_summary, roc_points
from dpdiff.schema import required


def _subsample(indices: list[int], n: int, seed: int) -> list[int]:
    if n is None or len(indices) <= n:
        return list(indices)
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(indices, size=n, replace=False).tolist())


@torch.no_grad()
def loss_scores(ctx: ProbeContext, record_ids: list[int], *, timesteps: list[int], draws: int,
                calibrated: bool, keep: dict | None = None) -> dict[str, np.ndarray]:
    """The loss attacks' scores of ``record_ids``; ``keep`` (a dict) receives the latents, conditioning, noise
    draws and the fine-tuned model's losses ``[N, T, D]`` for LiRA to reuse."""
    recs = [ctx.records[i] for i in record_ids]
    latents = encode_images(ctx, recs)
    cond = encode_captions(ctx, [r.text for r in recs], recs)
    noises = shared_noises(tuple(latents.shape[1:]), draws, ctx.seed + 17)
    obj = ctx.objective()
    ft = denoising_losses(ctx.denoiser, obj, latents, cond, timesteps=timesteps, noises=noises, device=ctx.device)
    out = {"loss": -ft.mean(dim=(1, 2)).numpy()}
    if keep is not None:
        keep.update(latents=latents, cond=cond, noises=noises, losses=ft)
    if calibrated:
        with ctx.base_model() as base_model:
            base = denoising_losses(base_model, obj, latents, cond, timesteps=timesteps, noises=noises,
                                    device=ctx.device)
        out["calibrated"] = (base - ft).mean(dim=(1, 2)).numpy()
    return out


@torch.no_grad()
def pia_scores(ctx: ProbeContext, record_ids: list[int], *, timestep: int = 200, lp: float = 4.0,
               batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """PIA, the Proximal Initialization Attack (Kong et al., ICLR 2024), as in their code
    (``components.PIA``): ``eps0 = eps_theta(x0, t=0)``, ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps0``,
    distance ``sum |eps_theta(x_t, t) - eps0|^lp`` with their ``lp = 4`` at their attack step
    ``t = 200`` (of 1000 training timesteps; scaled to the scheduler's count). Members are denoised
    back to their own initial noise more exactly: score = minus the distance (higher = member).
    Returns the scores and, per image, the RMS of the proxy noise ``eps0``: PIA assumes ``eps0`` is a plausible
    standard Gaussian draw (RMS near 1); far from 1 the re-noised ``x_t`` is off the training distribution and
    PIA's direction is not to be trusted (``pia_diagnostic``).
    The noise estimates are the objective's (``noise_estimate``): the output itself for epsilon prediction,
    turned into noise for v prediction, and ``x_t + (1 - sigma) v`` for flow models (SD3, Flux), whose
    ``x_t = (1 - sigma) x0 + sigma eps0`` takes the place of the DDPM mix (the same deterministic re-noising).
    """
    recs = [ctx.records[i] for i in record_ids]
    latents = encode_images(ctx, recs)
    cond = encode_captions(ctx, [r.text for r in recs], recs)
    obj = ctx.objective()
    t_attack = int(round(timestep * obj.num_train_timesteps / 1000))
    scores, rms = [], []
    for s in range(0, len(recs), batch_size):
        x0 = latents[s : s + batch_size].to(ctx.device)
        c = {k: v[s : s + batch_size].to(ctx.device) for k, v in cond.items()}
        t0 = torch.zeros(len(x0), dtype=torch.long, device=ctx.device)
        tt = torch.full((len(x0),), t_attack, dtype=torch.long, device=ctx.device)
        eps0 = obj.noise_estimate(ctx.denoiser, x0, t0, c)
        xt = obj.noisy(x0, eps0, tt)
        eps_t = obj.noise_estimate(ctx.denoiser, xt, tt, c)
        scores.append(-(eps_t - eps0).abs().pow(lp).flatten(1).sum(1).cpu())
        rms.append(eps0.float().pow(2).flatten(1).mean(1).sqrt().cpu())
    return torch.cat(scores).numpy(), torch.cat(rms).numpy()


#: PIA's proxy noise counts as on-distribution when its median RMS lies in this range (a standard Gaussian: 1)
PIA_PROXY_RMS_RANGE = (0.7, 1.3)


def pia_diagnostic(rms_members: np.ndarray, rms_nonmembers: np.ndarray) -> dict:
    """The scale of PIA's proxy noise ``eps_theta(x0, 0)``: median and 10th / 90th percentiles of its per-image
    RMS (a standard Gaussian draw has RMS near 1, within a few percent at latent sizes). Outside
    ``PIA_PROXY_RMS_RANGE`` the proxy is off-distribution (measured on an over-trained tiny model: PIA's AUC
    inverted there, 0.16, while the loss attacks' exceeded 0.8), and PIA's scores say little either way."""
    both = np.concatenate([np.asarray(rms_members, float), np.asarray(rms_nonmembers, float)])
    med = float(np.median(both))
    lo, hi = PIA_PROXY_RMS_RANGE
    ok = lo <= med <= hi
    return {"proxy_noise_rms_median": med, "proxy_noise_rms_p10": float(np.quantile(both, 0.1)),
            "proxy_noise_rms_p90": float(np.quantile(both, 0.9)),
            "proxy_noise_rms_members": float(np.median(rms_members)),
            "proxy_noise_rms_nonmembers": float(np.median(rms_nonmembers)),
            "expected": 1.0, "on_distribution": ok,
            "note": ("the proxy noise looks like a standard Gaussian draw: PIA's premise holds" if ok else
                     f"the proxy noise's RMS {med:.3g} is outside [{lo:g}, {hi:g}] (a Gaussian draw: 1): PIA's "
                     "re-noised input is off the training distribution on this model, so its scores (and their "
                     "direction) say little")}


ATTACKS = ("loss", "calibrated", "pia", "lira")


def _primary_attack(declared: str, *, calibrated: bool, pia: bool, lira: bool) -> str:
    """The headline attack, fixed before any score is seen: ``auto`` is LiRA when it runs, else the calibrated
    attack when it runs, else the loss attack; a named attack must be one that runs."""
    runs = {"loss": True, "calibrated": calibrated, "pia": pia, "lira": lira}
    if declared == "auto":
        return "lira" if lira else "calibrated" if calibrated else "loss"
    if declared not in runs:
        raise UserError(f"probes.mia.primary_attack must be auto or one of {', '.join(ATTACKS)}, got {declared!r}")
    if not runs[declared]:
        raise UserError(f"probes.mia.primary_attack={declared} but that attack does not run (switched off"
                        f"{' or too few unprobed images for shadows' if declared == 'lira' else ''}: probes.mia."
                        f"{'lira.shadows' if declared == 'lira' else declared}); declare another or auto")
    return declared


def run_mia(ctx: ProbeContext, cfg, *, confidence: float | None = None) -> dict:
    """Every attack on the same balanced sample: n members and n held-out non-members.

    n = min(``members``, members available, held-out available). The headline ``auc`` is the
    pre-declared ``primary_attack``'s (no choice after seeing the results); every attack's numbers
    are under ``attacks``. The DP verdict is the one-run analysis of the random split
    (``split_dp_check``), Bonferroni-corrected over the attacks.
    """
    from dpdiff.probes.audit import detectable_epsilon
    from dpdiff.probes.stats import split_dp_check
    from dpdiff.probes.verdict import POWER_FACTOR, three_way_verdict, to_detect_twice_the_claim, verdict_fields

    confidence = float(confidence if confidence is not None else required(cfg, "confidence"))
    claimed = ctx.privacy.get("epsilon") if ctx.privacy.get("dp") else None
    if not ctx.nonmember_records:
        v = three_way_verdict(claimed_epsilon=claimed, eps_lower=None, ceiling=None, confidence=confidence,
                              not_estimable="no held-out non-members (data.holdout_fraction=0)",
                              to_conclude="hold out units (data.holdout_fraction > 0) to compare against")
        return {"skipped": "no held-out non-members (data.holdout_fraction=0)", "auc": None, **verdict_fields(v)}
    member_units = ctx.one_record_per_unit(ctx.member_records)  # one coin per privacy unit
    held_units = ctx.one_record_per_unit(ctx.nonmember_records)
    n = min(int(required(cfg, "members")), len(member_units), len(held_units))
    members = _subsample(member_units, n, ctx.seed)
    nonmembers = _subsample(held_units, n, ctx.seed + 1)
    timesteps = [int(t) for t in required(cfg, "timesteps")]
    draws = int(required(cfg, "noise_draws"))
    calibrated = bool(required(cfg, "calibrated"))
    lira = LiraSettings.from_config(cfg.get("lira"))
    run_lira_now = lira.runs
    lira_info = None
    if run_lira_now and ctx.adapter_kind == "embedding":
        run_lira_now = False
        lira_info = {"skipped": "shadow models of an embedding adapter are not built; the other attacks ran"}
    if run_lira_now:
        from dpdiff.probes.lira import MIN_POOL, shadow_pool

        pool = len(shadow_pool(ctx, members + nonmembers, size=MIN_POOL, seed=ctx.seed))
        if pool < MIN_POOL:
            run_lira_now = False
            lira_info = {"skipped": f"only {pool} images outside the {2 * n} probed units to train shadow models on "
                                    f"(LiRA needs {MIN_POOL}); probe fewer members (probes.mia.members) or hold "
                                    "out more units"}
    primary = _primary_attack(str(required(cfg, "primary_attack")), calibrated=calibrated,
                              pia=bool(required(cfg, "pia")), lira=run_lira_now)
    pia_diag = None
    keep_m, keep_n = {}, {}
    sm = loss_scores(ctx, members, timesteps=timesteps, draws=draws, calibrated=calibrated, keep=keep_m)
    sn = loss_scores(ctx, nonmembers, timesteps=timesteps, draws=draws, calibrated=calibrated, keep=keep_n)
    if run_lira_now:
        from dpdiff.probes.lira import ShadowRecipe, run_lira

        recipe = ctx.shadow_recipe if ctx.shadow_recipe is not None else ShadowRecipe.shipped(ctx.adapter_kind)
        cat = lambda k: torch.cat([keep_m[k], keep_n[k]])
        scores, lira_info = run_lira(
            ctx, lira, recipe, probed=members + nonmembers, latents=cat("latents"),
            cond={k: torch.cat([keep_m["cond"][k], keep_n["cond"][k]]) for k in keep_m["cond"]},
            target_losses=cat("losses"), timesteps=timesteps, noises=keep_m["noises"])
        lira_info["trained_like"] = ("the run (its adapter and train settings)" if ctx.shadow_recipe is not None
                                     else "dpdiff's default recipe: the run's training settings were not known")
        sm["lira"], sn["lira"] = scores[: len(members)], scores[len(members):]
    if required(cfg, "pia"):
        t_pia = int(required(cfg, "pia_timestep"))
        lp = float(required(cfg, "pia_lp"))
        sm["pia"], rms_m = pia_scores(ctx, members, timestep=t_pia, lp=lp)
        sn["pia"], rms_n = pia_scores(ctx, nonmembers, timestep=t_pia, lp=lp)
        pia_diag = pia_diagnostic(rms_m, rms_n)
    dp = bool(ctx.privacy.get("dp"))
    delta = float(ctx.privacy["delta"]) if dp else float(required(cfg, "delta_if_no_dp"))
    min_n = int(required(cfg, "min_nonmembers"))
    attacks = {}
    for name in sm:
        summ = mia_summary(sm[name], sn[name], n_boot=int(required(cfg, "bootstrap")), seed=ctx.seed,
                           alpha=1.0 - confidence, min_nonmembers=min_n)
        summ["auc_p_value_corrected"] = min(1.0, summ["auc_p_value"] * len(sm))  # Bonferroni over attacks
        summ["roc"] = roc_points(sm[name], sn[name])
        attacks[name] = summ
    check = split_dp_check(scores_by_attack={k: (sm[k], sn[k]) for k in sm}, delta=delta, confidence=confidence,
                           seed=ctx.seed)
    to_conclude, power = None, None
    if claimed is not None:  # the optimal attacker is one of the attacks, at the level each attack ran at
        power = detectable_epsilon(claimed_epsilon=float(claimed), m=check["units"], included=n, delta=delta,
                                   confidence=check["confidence_per_attack"], fixed_count=True, seed=ctx.seed)
        if power["detectable_epsilon"] is None or power["detectable_epsilon"] > POWER_FACTOR * float(claimed):
            to_conclude = to_detect_twice_the_claim(
                claimed_epsilon=float(claimed), delta=delta, confidence=check["confidence_per_attack"],
                fixed_count=True, now=n, what="held-out units and as many members", seed=ctx.seed)
        else:
            to_conclude = ""
        if n < min_n:
            to_conclude = "; ".join(filter(None, [to_conclude, f"at least {min_n} held-out units for an AUC"]))
        to_conclude = to_conclude or None
    else:
        to_conclude = "the run has no DP guarantee: only a FAIL (leak shown) is possible"
    v = three_way_verdict(claimed_epsilon=claimed, eps_lower=check["eps_lower"], ceiling=check["ceiling"],
                          confidence=confidence, to_conclude=to_conclude,
                          detectable_epsilon=power["detectable_epsilon"] if power else None)
    prim = attacks[primary]
    return {
        "auc": prim["auc"],
        "auc_ci": prim["auc_ci"],
        "auc_p_value": prim["auc_p_value"],
        "auc_reason": prim["auc_reason"],
        "primary_attack": primary,
        "tpr_at_1pct_fpr": prim["tpr_at_fpr"].get("0.01", {}).get("tpr"),
        "members": len(members),
        "nonmembers": len(nonmembers),
        "timesteps": timesteps,
        "noise_draws": draws,
        "attacks": attacks,
        "pia_diagnostic": pia_diag,
        "lira": lira_info,
        "split_audit": check,
        "eps_lower_steinke": check["eps_lower_steinke"],
        "eps_lower_fdp": check["eps_lower_fdp"],
        "eps_lower_gdp": check["eps_lower_gdp"],
        "delta": delta,
        **verdict_fields(v),
        "note": (f"auc is the pre-declared {primary} attack's; every attack's own numbers are under 'attacks' "
                 "(auc_p_value_corrected: Bonferroni over the attacks). The verdict tests the claimed epsilon "
                 "with the one-run analysis of the random member / held-out split, corrected for the number "
                 "of attacks and guesses tried."),
    }
