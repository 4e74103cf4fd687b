"""Rows of the report's probe section, from probes.json.

Each probe opens with its verdict row, ``PASS: ...`` / ``FAIL: ...`` / ``INCONCLUSIVE: ...`` (the HTML
report colours it green / red / amber); every other row is a number with the baseline it must be
read against. No other row carries a colour: a count is not a verdict.
"""

from __future__ import annotations


def _f(v, nd=3):
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{nd}g}"
    return str(v)


def _pct(conf) -> str:
    return "n/a" if conf is None else f"{100 * float(conf):.4g}%"


def _verdict(sec: dict) -> str:
    from dpdiff.probes.verdict import verdict_sentence

    if sec.get("verdict") is None:
        return "not run"
    if sec.get("verdict_reason") is None:  # a probes.json written before three-way verdicts
        return str(sec["verdict"])
    return verdict_sentence(sec)


def _bounds(sec: dict, priv: dict) -> str:
    claimed = sec.get("claimed_epsilon")
    claim = f"claimed epsilon {_f(claimed)}" if claimed is not None else "no DP claim"
    parts = [f"lower bound {_f(sec.get('eps_lower'))} vs {claim}; ceiling {_f(sec.get('ceiling'))} "
             f"(the most this test could certify); {_pct(sec.get('confidence'))} confidence"]
    if claimed is not None and "detectable_epsilon" in sec:
        det = sec.get("detectable_epsilon")
        parts.append("detects " + (f"epsilon >= {_f(det)}" if det is not None else
                                   f"no epsilon up to {_f(16 * float(claimed))}")
                     + " (80% power against the optimal attacker; a PASS needs at most twice the claim)")
    extra = []
    if sec.get("eps_lower_steinke") is not None:
        extra.append(f"Steinke et al. {_f(sec['eps_lower_steinke'])}")
    if sec.get("eps_lower_fdp") is not None:
        extra.append(f"f-DP (Mahloujifar et al.) {_f(sec['eps_lower_fdp'])}")
    if sec.get("eps_lower_gdp") is not None:
        extra.append(f"assuming a Gaussian trade-off curve {_f(sec['eps_lower_gdp'])}")
    if extra:
        parts.append("bounds: " + ", ".join(extra))
    return "; ".join(parts)


def _extraction_rows(ex: dict, priv: dict) -> list[tuple[str, str]]:
    if "training_items_probed" not in ex or "verdict_reason" not in ex:  # an older probes.json
        return [("extraction", f"{ex.get('extracted_count')} extracted (rate {_f(ex.get('rate'))}); "
                               "no three-way verdict in this probes.json (re-run dpdiff probe)")]
    thr, thr_cfg = ex.get("l2_threshold"), ex.get("l2_threshold_configured")
    thr_note = f"L2 {_f(thr)}" + (f" (calibrated down from {_f(thr_cfg)})" if thr != thr_cfg else "")
    rows = [
        ("extraction verdict", _verdict(ex)),
        ("extraction: epsilon bound from training vs held-out images", _bounds(ex, priv)),
        ("extraction: training images matched (a generation of their caption within " + thr_note + ")",
         f"{ex['extracted_count']} of {ex['training_items_probed']} probed (rate {_f(ex.get('rate'))}, at most "
         f"{_f(ex.get('rate_upper'))} at {_pct(ex.get('confidence'))} confidence)"),
        ("extraction: held-out controls matched the same way (never trained on)",
         f"{ex.get('control_matches')} of {ex.get('heldout_items_probed')} "
         f"(rate {_f(ex.get('control_false_match_rate'))})"),
        ("extraction: held-out images within the threshold of some training image",
         f"{_f(ex.get('heldout_false_match_rate'))} at L2 {_f(thr_cfg)}, "
         f"{_f(ex.get('heldout_false_match_rate_calibrated'))} at L2 {_f(thr)}"),
        ("extraction: base VAE floor (its own reconstruction distance of the probed training images)",
         f"median {_f(ex.get('vae_floor_median'))}, 90th percentile {_f(ex.get('vae_floor_p90'))} "
         f"(no generation can come closer; above {_f(thr)} extraction cannot fire)"),
        ("extraction: generations", f"{ex.get('generations')} at {ex.get('generation_resolution')} px "
                                    f"({ex.get('captions_probed')} captions x {ex.get('per_caption_generations')})"),
        ("extraction: detectors",
         f"{', '.join(ex.get('detectors') or ['l2'])} (Bonferroni); tiled L2 matches {_f(ex.get('tiled_matches'))} "
         f"training vs {_f(ex.get('tiled_control_matches'))} held-out"
         + (f"; permutation test of no leak p = {_f(ex['leak_p_value'])}" if ex.get("leak_p_value") is not None
            else "")),
        ("largest clique of near-identical generations",
         f"{ex.get('max_clique')}; captions flagged by the held-out-calibrated rule (size >= "
         f"{_f(ex.get('clique_size_threshold'))}): {ex.get('clique_flagged_captions')}"),
    ]
    if ex.get("feature_matches") is not None:
        rows.append(("extraction: copy-detection model matches (training vs held-out)",
                     f"{ex['feature_matches']} vs {ex.get('feature_control_matches')}"))
    for w in ex.get("warnings") or []:
        rows.append(("extraction: warning", w))
    return rows


def _mia_rows(mia: dict, priv: dict) -> list[tuple[str, str]]:
    if "verdict_reason" not in mia:  # an older probes.json
        return [("membership inference AUC", f"{_f(mia.get('auc'))} (no three-way verdict in this probes.json)")]
    rows = [
        ("membership inference verdict", _verdict(mia)),
        ("MIA: epsilon bound from the random member / held-out split", _bounds(mia, priv)),
    ]
    primary = mia.get("primary_attack")
    ci = mia.get("auc_ci") or [None, None]
    if mia.get("auc") is None:
        auc = "not estimable" if not mia.get("auc_reason") else mia["auc_reason"].split(";")[0]
    else:
        auc = f"{_f(mia['auc'])} [{_f(ci[0])}, {_f(ci[1])}]"
    rows.append((f"MIA AUC ({primary}, declared before the run)",
                 f"{auc}; permutation p-value {_f(mia.get('auc_p_value'))} "
                 f"({mia.get('members')} members vs {mia.get('nonmembers')} held-out)"))
    for name, a in (mia.get("attacks") or {}).items():
        pts = []
        for key, pt in (a.get("tpr_at_fpr") or {}).items():
            if pt.get("tpr") is None:
                pts.append(f"TPR@{key}: {pt.get('reason', 'not estimable')}")
            else:
                ci = pt.get("tpr_ci_clopper_pearson") or [None, None]
                pts.append(f"TPR@{key} FPR {_f(pt['tpr'])} [{_f(ci[0])}, {_f(ci[1])}] ({pt.get('true_positives')}/"
                           f"{pt.get('n_members')}, {pt.get('false_positives')}/{pt.get('n_nonmembers')} false "
                           "positives)")
        auc = _f(a.get("auc")) if a.get("auc") is not None else f"{_f(a.get('auc_observed'))} (not estimable)"
        rows.append((f"  attack {name}", f"AUC {auc}, p {_f(a.get('auc_p_value_corrected'))} (corrected for "
                                         f"{len(mia.get('attacks') or {})} attacks); " + "; ".join(pts)))
    lira = mia.get("lira")
    if lira and lira.get("skipped"):
        rows.append(("  LiRA (Carlini et al. 2022)", f"not run: {lira['skipped']}"))
    elif lira:
        rows.append(("  LiRA's shadow models (Carlini et al. 2022, offline)",
                     f"{lira.get('shadows')} shadow {lira.get('shadow_adapter')} models trained like "
                     f"{lira.get('trained_like', 'the run')} without clipping or noise: {lira.get('steps')} steps "
                     f"of {lira.get('batch_size')} images from {lira.get('pool_images')} images of unprobed units "
                     f"({lira.get('training_rows')} training rows, {_f(lira.get('seconds'))} s); variance "
                     f"{lira.get('variance')}"))
    diag = mia.get("pia_diagnostic")
    if diag:
        rows.append(("  PIA's proxy noise (RMS of eps(x0, 0); a Gaussian draw: 1)",
                     f"median {_f(diag.get('proxy_noise_rms_median'))} (10-90%: {_f(diag.get('proxy_noise_rms_p10'))}"
                     f"-{_f(diag.get('proxy_noise_rms_p90'))}): {diag.get('note')}"))
    return rows


def _audit_rows(audit: dict, priv: dict) -> list[tuple[str, str]]:
    if "verdict_reason" not in audit:  # an older probes.json
        return [("one-run audit verdict", f"(written before three-way verdicts; re-run dpdiff probe) "
                                          f"{audit.get('verdict')}"),
                ("audit: epsilon lower bound", f"{_f(audit.get('eps_lower'))} (ceiling {_f(audit.get('ceiling'))})")]
    rows = [
        ("one-run audit verdict", _verdict(audit)),
        ("audit: epsilon bound", _bounds(audit, priv)
         + f"; ceilings: Steinke et al. {_f(audit.get('ceiling_steinke'))}, f-DP {_f(audit.get('ceiling_fdp'))}"),
    ]
    for key, label in (("data_canaries", "data canaries"), ("gradient_canaries", "gradient canaries")):
        sec = audit.get(key)
        if sec:
            rows.append((f"audit: {label}", f"{sec.get('num_correct')} of {sec.get('num_guesses')} guesses correct "
                                            f"({sec.get('included')} of {sec.get('m')} included); lower bound "
                                            f"{_f(sec.get('eps_lower'))}, ceiling {_f(sec.get('ceiling'))}"))
    return rows


def _overall_rows(ov: dict) -> list[tuple[str, str]]:
    if ov.get("verdict") is None:
        return []
    rows = [("overall probe verdict", f"{ov['verdict']}: {ov.get('reason')}"),
            ("probe attempts on this run",
             f"this is attempt {ov.get('attempt')}; it spent error rate {_f(ov.get('alpha_this_attempt'))} of the "
             f"family's {_f(1 - float(ov.get('family_confidence') or 0))} (each later attempt spends less), "
             f"{_pct(ov.get('confidence_per_probe'))} confidence per probe")]
    earlier = ov.get("history") or []
    if earlier:
        rows.append(("earlier attempts", "; ".join(f"attempt {h.get('attempt')} ({h.get('time')}): {h.get('overall')}"
                                                   for h in earlier)))
    return rows


def probe_rows(probes: dict, priv: dict) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = _overall_rows(probes.get("overall") or {})
    for name, title, fn in (("extraction", "extraction", _extraction_rows),
                            ("mia", "membership inference", _mia_rows),
                            ("audit", "one-run audit", _audit_rows)):
        sec = probes.get(name) or {}
        if sec.get("skipped"):
            rows.append((title, f"not run ({sec['skipped']})"))
        elif sec:
            rows += fn(sec, priv)
    rows.append(("probe wall time (s)", _f(probes.get("seconds"))))
    return rows
