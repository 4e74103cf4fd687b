"""Rows of the report's probe section, from probes.json."""

from __future__ import annotations


def _f(v, nd=3):
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{nd}g}"
    return str(v)


def probe_rows(probes: dict, priv: dict) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    ex = probes.get("extraction") or {}
    if ex.get("skipped"):
        rows.append(("extraction", f"not run ({ex['skipped']})"))
    elif ex:
        rows += [
            ("extraction: extracted training images",
             f"{ex['extracted_count']} of {ex.get('training_items_probed')} probed (rate {_f(ex['rate'])}); "
             f"{ex.get('extracted_generations')} of {ex.get('generations')} generations within L2 "
             f"{ex.get('l2_threshold')}"),
            ("extraction: near copies (calibrated)",
             f"{ex.get('near_copy_count')} training images closer than "
             f"{_f(ex.get('near_copy_threshold'))} (held-out images reach it at rate "
             f"{_f(ex.get('heldout_near_copy_rate'))})"),
            ("extraction: held-out false-match rate at the L2 threshold", _f(ex.get("heldout_false_match_rate"))),
            ("nearest-training L2, 5th percentile: generations vs held-out images",
             f"{_f(ex.get('nearest_l2_p5_generations'))} vs {_f(ex.get('heldout_nearest_l2_p5'))} "
             "(generations much closer than held-out images = memorisation)"),
            ("largest clique of near-identical generations", f"{ex.get('max_clique')} (per caption: "
             + ", ".join(str(c["largest_clique"]) for c in ex.get("per_caption", [])) + ")"),
        ]
    mia = probes.get("mia") or {}
    if mia.get("skipped"):
        rows.append(("membership inference", f"not run ({mia['skipped']})"))
    elif mia:
        ci = mia.get("auc_ci") or [None, None]
        rows.append(("membership inference AUC (strongest attack)",
                     f"{_f(mia['auc'])} [{_f(ci[0])}, {_f(ci[1])}] ({mia.get('best_attack')}; "
                     f"{mia.get('members')} members vs {mia.get('nonmembers')} held-out)"))
        for name, a in (mia.get("attacks") or {}).items():
            pts = []
            for key, pt in (a.get("tpr_at_fpr") or {}).items():
                if pt.get("tpr") is None:
                    pts.append(f"TPR@{key}: {pt.get('reason', 'not estimable')}")
                else:
                    pts.append(f"TPR@{key} FPR {_f(pt['tpr'])} ({pt.get('true_positives')}/{pt.get('n_members')}, "
                                f"{pt.get('false_positives')}/{pt.get('n_nonmembers')} false positives)")
            rows.append((f"  attack {name}", f"AUC {_f(a['auc'])}; " + "; ".join(pts)))
        if mia.get("dp_bound_violated") is not None:
            rows.append(("MIA vs the DP bound TPR <= e^eps FPR + delta",
                         "FAIL: an attack beats what the guarantee allows" if mia["dp_bound_violated"]
                         else "PASS: every attack stays within the bound"))
    audit = probes.get("audit") or {}
    if audit.get("skipped"):
        rows.append(("one-run audit", f"not run ({audit['skipped']})"))
    elif audit:
        rows += [
            ("one-run audit verdict", str(audit.get("verdict"))),
            ("audit: epsilon lower bound (95%)",
             f"{_f(audit.get('eps_lower'))} vs claimed epsilon {_f(priv.get('epsilon'))} "
             f"(ceiling for m={audit.get('m')}, {audit.get('num_guesses')} guesses: {_f(audit.get('ceiling'))})"),
            ("audit: correct guesses", f"{audit.get('num_correct')} of {audit.get('num_guesses')} "
                                       f"({audit.get('included')} of {audit.get('m')} canaries included)"),
        ]
    rows.append(("probe wall time (s)", _f(probes.get("seconds"))))
    return rows
