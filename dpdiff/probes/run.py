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
from dpdiff.schema import required

log = logging.getLogger("dpdiff")

REQUIRED = {"extraction": ("extracted_count", "rate"), "mia": ("auc",), "audit": ("eps_lower", "verdict")}


def canary_loss_scores(ctx: ProbeContext, cfg) -> tuple[np.ndarray, np.ndarray]:
    """Each data canary's base-calibrated loss ``L_base - L_finetuned`` and its inclusion bit."""
    from PIL import Image

    items = ctx.canaries["canaries"]
    canary_dir = ctx.run_dir / "canaries"
    images = [Image.open(canary_dir / f"{c['key']}.png").convert("RGB") for c in items]
    latents = encode_images(ctx, images)
    cond = encode_captions(ctx, [c["caption"] for c in items], images)
    timesteps = [int(t) for t in required(cfg, "timesteps")]
    noises = shared_noises(tuple(latents.shape[1:]), int(required(cfg, "noise_draws")), ctx.seed + 29)
    obj = ctx.objective()
    ft = denoising_losses(ctx.denoiser, obj, latents, cond, timesteps=timesteps, noises=noises, device=ctx.device)
    with ctx.base_model() as base_model:
        base = denoising_losses(base_model, obj, latents, cond, timesteps=timesteps, noises=noises,
                                device=ctx.device)
    scores = (base - ft).mean(dim=(1, 2)).numpy()
    included = np.array([bool(c["included"]) for c in items])
    return scores, included


def audit_verdict(*, scores, included, claimed_epsilon, delta: float, confidence: float, choices=None,
                  kind: str, choices_for=None) -> dict:
    """One-run audit of canary scores (coins drawn independently with probability 1/2), its power against the
    optimal attacker and its verdict. ``choices_for(m)``: the guess families the probe would use with m canaries
    (for the advice on how many would be enough)."""
    from dpdiff.probes.audit import detectable_epsilon, one_run_audit
    from dpdiff.probes.verdict import POWER_FACTOR, three_way_verdict, to_detect_twice_the_claim, verdict_fields

    res = one_run_audit(scores=scores, included=included, delta=delta, confidence=confidence, choices=choices)
    m = res["m"]
    power = None
    if claimed_epsilon is not None:
        power = detectable_epsilon(claimed_epsilon=float(claimed_epsilon), m=m, included=None, delta=delta,
                                   confidence=confidence, fixed_count=False, choices=choices)
        to_conclude = None
        if power["detectable_epsilon"] is None or power["detectable_epsilon"] > POWER_FACTOR * claimed_epsilon:
            to_conclude = to_detect_twice_the_claim(
                claimed_epsilon=float(claimed_epsilon), delta=delta, confidence=confidence, fixed_count=False,
                now=m, what=kind, choices_for=choices_for)
    else:
        to_conclude = "the run has no DP guarantee: only a FAIL (leak shown) is possible"
    v = three_way_verdict(claimed_epsilon=claimed_epsilon, eps_lower=res["eps_lower"], ceiling=res["ceiling"],
                          confidence=confidence, to_conclude=to_conclude,
                          detectable_epsilon=power["detectable_epsilon"] if power else None)
    res.pop("per_choice", None)
    return {**res, **verdict_fields(v), "power_at_2x": power["power_at_2x"] if power else None,
            "score_mean_included": float(np.mean(scores[included])) if included.any() else None,
            "score_mean_excluded": float(np.mean(scores[~included])) if (~included).any() else None}


def run_audit(ctx: ProbeContext, cfg, *, confidence: float | None = None) -> dict:
    """The one-run audit: data canaries scored by their base-calibrated loss and, when the run recorded
    them, white-box gradient canaries scored by their likelihood ratio over all noisy gradients
    (``gradient_canaries.json``, ``dpdiff.privacy.gradient_canaries.GradientCanaries``). Both bounds of each
    (Steinke et al.; Mahloujifar et al.'s f-DP) are reported; the verdict takes the largest rigorous
    bound over the canary sets, Bonferroni-corrected over them."""
    from dpdiff.privacy.gradient_canaries import load_gradient_canaries
    from dpdiff.probes.verdict import three_way_verdict, verdict_fields

    grad = load_gradient_canaries(ctx.run_dir)
    if not ctx.canaries and not grad:
        return {"skipped": "no canaries (set probes.audit.canaries=m, e.g. 1000, before training)",
                "eps_lower": None, "verdict": None}
    dp = bool(ctx.privacy.get("dp"))
    claimed = ctx.privacy.get("epsilon") if dp else None
    delta = float(ctx.privacy["delta"]) if dp else float(required(cfg, "delta_if_no_dp"))
    conf = float(confidence if confidence is not None else required(cfg, "confidence"))
    sets = int(bool(ctx.canaries)) + int(bool(grad))
    per_set = 1.0 - (1.0 - conf) / sets
    k_plus, k_minus = cfg.get("k_plus"), cfg.get("k_minus")
    out: dict = {}
    if ctx.canaries:
        scores, included = canary_loss_scores(ctx, cfg)
        m = len(scores)
        choices = None
        if k_plus or k_minus:  # a user-fixed guess count replaces the Bonferroni family
            kp, km = int(k_plus or max(1, m // 10)), int(k_minus or max(1, m // 10))
            if kp + km > m:
                from dpdiff.errors import UserError

                raise UserError(f"probes.audit.k_plus + k_minus = {kp + km} > {m} canaries")
            choices = [(kp, km)]
        out["data_canaries"] = audit_verdict(scores=scores, included=included, claimed_epsilon=claimed, delta=delta,
                                             confidence=per_set, choices=choices, kind="canaries")
    if grad:
        from dpdiff.probes.audit import gradient_canary_k_choices

        out["gradient_canaries"] = audit_verdict(scores=np.asarray(grad["scores"], dtype=np.float64),
                                                 included=np.asarray(grad["included"], dtype=bool),
                                                 claimed_epsilon=claimed, delta=delta, confidence=per_set,
                                                 choices=gradient_canary_k_choices(len(grad["scores"])),
                                                 kind="gradient canaries", choices_for=gradient_canary_k_choices)
    parts = list(out.values())
    best = max(parts, key=lambda r: r["eps_lower"])
    ceiling = max(r["ceiling"] for r in parts)
    # each set ran at confidence 1 - (1 - conf) / sets: the best of them is a bound at conf (Bonferroni)
    tos = [r["to_conclude"] for r in parts if r.get("to_conclude")]
    # each set's power was measured at its own (Bonferroni) level: the audit detects what its best set detects
    detectable = min((r["detectable_epsilon"] for r in parts if r.get("detectable_epsilon") is not None), default=None)
    v = verdict_fields(three_way_verdict(claimed_epsilon=claimed, eps_lower=best["eps_lower"], ceiling=ceiling,
                                         confidence=conf, to_conclude="; ".join(tos) or None,
                                         detectable_epsilon=detectable))
    head = out.get("data_canaries") or out["gradient_canaries"]
    return {
        **{k: head[k] for k in ("m", "included", "num_guesses", "num_correct", "k_plus", "k_minus",
                                "score_mean_included", "score_mean_excluded")},
        "eps_lower": best["eps_lower"],
        "ceiling": ceiling,
        "eps_lower_steinke": max(r["eps_lower_steinke"] for r in parts),
        "ceiling_steinke": max(r["ceiling_steinke"] for r in parts),
        "eps_lower_fdp": max(r["eps_lower_fdp"] for r in parts),
        "ceiling_fdp": max(r["ceiling_fdp"] for r in parts),
        "eps_lower_gdp": max(r["eps_lower_gdp"] for r in parts),
        "epsilon": ctx.privacy.get("epsilon"),
        "delta": delta,
        **{k: v[k] for k in ("verdict", "colour", "claimed_epsilon", "detectable_epsilon", "confidence",
                             "verdict_reason", "to_conclude", "blockers")},
        **out,
        "note": "eps_lower: the largest rigorous one-run lower bound (Steinke et al. 2023; f-DP analysis of "
                "Mahloujifar et al. 2025 with the (eps, delta) curve), Bonferroni-corrected over the guesses, "
                "analyses and canary sets tried; 'ceiling' is the largest bound these could show with every "
                "guess right; eps_lower_gdp assumes a Gaussian trade-off curve (Mahloujifar et al.'s empirical "
                "privacy) and is not used for the verdict",
    }


HISTORY = "probes_history.jsonl"


def probe_history(run_dir: Path) -> list[dict]:
    """The attempts recorded in ``probes_history.jsonl`` (owner only): one ``started`` line per attempt, and a
    ``finished`` line with its verdicts when it completed. A torn last line (a crash mid-write) is skipped."""
    import json

    path = Path(run_dir) / HISTORY
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def check_probe_settings(cfg) -> None:
    """The probe settings a run would use, checked before any private data is read (a typo found after training
    costs the whole training): the family-wise confidence, the membership probe's declared headline attack and
    LiRA's keys."""
    from dpdiff.errors import UserError
    from dpdiff.probes.lira import LiraSettings
    from dpdiff.probes.mia import _primary_attack

    conf = float(required(cfg, "confidence"))
    if not 0.0 < conf < 1.0:
        raise UserError(f"probes.confidence must be in (0, 1), got {conf}")
    mia = cfg.get("mia") or {}
    if required(mia, "enabled"):
        lira = LiraSettings.from_config(mia.get("lira"))
        _primary_attack(str(required(mia, "primary_attack")), calibrated=bool(required(mia, "calibrated")),
                        pia=bool(required(mia, "pia")),
                        lira=lira.runs)


def _probes_that_run(ctx: ProbeContext, cfg) -> tuple[list[str], list[str]]:
    """(the probes to run, those of them that can reach a verdict: the family the error rate is split over). An
    audit asked for without canaries in the run runs only to say so."""
    names = []
    if required(required(cfg, "extraction"), "enabled"):
        names.append("extraction")
    if required(required(cfg, "mia"), "enabled"):
        names.append("mia")
    has_canaries = bool(ctx.canaries) or (ctx.run_dir / "gradient_canaries.json").exists()
    if has_canaries or required(required(cfg, "audit"), "canaries"):
        names.append("audit")
    return names, [n for n in names if n != "audit" or has_canaries]


def run_probes(ctx: ProbeContext, cfg) -> dict:
    """Run the enabled probes, write probes.json (null where a probe did not run) and return it.

    Family-wise error control (``dpdiff.probes.verdict``): this is attempt j on the run dir (counted in
    ``probes_history.jsonl``, recorded before any probe runs, so an interrupted attempt counts too); it spends
    ``attempt_alpha(1 - probes.confidence, j)``, split evenly over the probes that run; the overall verdict also
    carries every earlier attempt's FAILs. Earlier probes.json files are kept in the history, not overwritten
    unseen."""
    from datetime import datetime, timezone

    from dpdiff.io import append_jsonl
    from dpdiff.probes.verdict import attempt_alpha, overall_verdict, summary_lines

    t0 = time.time()
    out: dict = {"extraction": None, "mia": None, "audit": None}
    budget = cfg.get("budget_images")
    torch.manual_seed(ctx.seed)
    ctx.denoiser.eval()
    family_conf = float(required(cfg, "confidence"))
    if not 0.0 < family_conf < 1.0:
        from dpdiff.errors import UserError

        raise UserError(f"probes.confidence must be in (0, 1), got {family_conf}")
    history = probe_history(ctx.run_dir)
    attempt = 1 + sum(1 for h in history if h.get("event") == "started")
    names, family = _probes_that_run(ctx, cfg)
    alpha = attempt_alpha(1.0 - family_conf, attempt)
    confidence = 1.0 - alpha / max(len(family), 1)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    append_jsonl(ctx.run_dir / HISTORY, {"event": "started", "attempt": attempt, "time": now, "probes": names,
                                         "family_confidence": family_conf, "alpha": alpha,
                                         "confidence_per_probe": confidence})
    if "extraction" in names:
        from dpdiff.probes.extraction import run_extraction

        log.info("probe: extraction")
        out["extraction"] = run_extraction(ctx, cfg.extraction, budget_images=budget, confidence=confidence)
    if "mia" in names:
        from dpdiff.probes.mia import run_mia

        log.info("probe: membership inference")
        out["mia"] = run_mia(ctx, cfg.mia, confidence=confidence)
    if "audit" in names:
        log.info("probe: one-run audit")
        out["audit"] = run_audit(ctx, cfg.get("audit") or {}, confidence=confidence)
    for section, keys in REQUIRED.items():  # the contract: these keys exist, null when not run
        if out[section] is None:
            out[section] = {k: None for k in keys} | {"skipped": "disabled", "verdict": None}
    earlier = [f"{name} (attempt {h['attempt']})" for h in history if h.get("event") == "finished"
               for name, v in (h.get("verdicts") or {}).items() if v.get("verdict") == "FAIL"]
    out["overall"] = overall_verdict({k: out[k] for k in names}, family_confidence=family_conf, attempt=attempt,
                                     earlier_fails=earlier)
    out["overall"].update({"alpha_this_attempt": alpha, "confidence_per_probe": confidence,
                           "earlier_attempts": attempt - 1,
                           "history": [{k: h.get(k) for k in ("attempt", "time", "overall")} for h in history
                                       if h.get("event") == "finished"]})
    out["summary"] = summary_lines(out)
    for line in out["summary"]:
        log.info("probe verdict: %s", line)
    out["seconds"] = round(time.time() - t0, 2)
    out["for_data_owner_only"] = ("Probe results describe the training data (which images leak); "
                                  "they are for the data owner, not for publication.")
    write_json_atomic(ctx.run_dir / "probes.json", out)
    keep = ("verdict", "eps_lower", "ceiling", "detectable_epsilon", "claimed_epsilon", "confidence")
    append_jsonl(ctx.run_dir / HISTORY, {
        "event": "finished", "attempt": attempt,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "overall": out["overall"]["verdict"],
        "verdicts": {k: {f: out[k].get(f) for f in keep} for k in names},
        "settings": _settings_digest(cfg)})
    return out


def _settings_digest(cfg) -> dict:
    """The probe settings of an attempt, for the history (what was tried, so a reader sees re-runs)."""
    from omegaconf import DictConfig, OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    return {k: plain.get(k) for k in ("extraction", "mia", "audit") if isinstance(plain.get(k), dict)}


def build_probe_context(*, run_dir: Path, base, denoiser, data, cfg, probes, privacy: dict, resolution: int, device,
                        schedule: dict | None, embedding=None) -> ProbeContext:
    """The probes' view of a trained run, as ``dpdiff finetune`` (after training) and ``dpdiff probe`` (later, from
    the run dir) both build it: ``data`` the run's ``PreparedData`` (its members and held-out units), ``cfg`` the
    run's composed config (LiRA's shadows train as it did), ``probes`` the probes group in force, ``schedule``
    privacy.json's schedule record, ``embedding`` the embedding adapter's settings (prompts carry its token)."""
    from dpdiff.probes.canaries import load_canaries
    from dpdiff.probes.lira import ShadowRecipe

    return ProbeContext(run_dir=Path(run_dir), base=base, denoiser=denoiser, adapter_kind=str(cfg.adapter.kind),
                        records=data.records, member_records=data.member_records(),
                        nonmember_records=data.holdout_records(), resolution=int(resolution), device=device,
                        privacy=privacy, canaries=load_canaries(run_dir), seed=int(probes.seed or 0), demo=data.demo,
                        unit_of_record=data.unit_of_record(), max_sequence_length=cfg.model.max_sequence_length,
                        shadow_recipe=ShadowRecipe.from_config(cfg, schedule=schedule),
                        prompt_template=(embedding.template.replace("{token}", embedding.token)
                                         if embedding is not None else None))
