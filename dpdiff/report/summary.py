"""The end-of-run summary: the lines printed in the terminal, and the flat values sent to a tracker."""

from __future__ import annotations

from pathlib import Path


def _fmt(v, nd: int = 3) -> str:
    return "n/a" if v is None else (f"{v:.{nd}g}" if isinstance(v, float) else str(v))


def probe_clauses(probes: dict | None) -> list[str]:
    """One short clause per probe that ran, with the baseline it must be read against."""
    probes = probes or {}
    ex, mia, audit = probes.get("extraction") or {}, probes.get("mia") or {}, probes.get("audit") or {}
    out = []
    if ex and ex.get("extracted_count") is not None:
        out.append(f"extraction {ex['extracted_count']} of {ex.get('training_items_probed')} training images matched "
                   f"(held-out false-match rate {_fmt(ex.get('heldout_false_match_rate'), 2)}), "
                   f"{ex.get('near_copy_count')} near copies")
    if mia and mia.get("auc") is not None:
        out.append(f"MIA AUC {_fmt(mia['auc'])}")
    if audit and audit.get("verdict") is not None:
        out.append(f"audit {audit['verdict']} (eps_lower {_fmt(audit.get('eps_lower'))})")
    return out or ["none ran"]


def terminal_summary(*, privacy: dict, probes: dict | None, steps: int, seconds: float, run_dir: Path,
                     weights_dir: Path, samples_path: Path, stopped_for_budget: bool) -> str:
    if privacy["dp"]:
        guarantee = (f"({privacy['epsilon']:.3f}, {privacy['delta']:.2g})-DP per {privacy['privacy_unit']} "
                     f"[{privacy['accountant']}], target epsilon {privacy['target_epsilon']}")
        if privacy.get("reproducible_noise"):
            guarantee += " (REPRODUCIBLE NOISE: debugging only, no guarantee across runs)"
    else:
        guarantee = "NO PRIVACY GUARANTEE (privacy=none)"
    lines = [
        "",
        f"dpdiff: finished {steps} steps in {seconds:.0f}s",
        f"  privacy : {guarantee}",
        f"  run dir : {run_dir}",
        f"  weights : {weights_dir}",
        f"  samples : {samples_path}",
        f"  report  : {Path(run_dir) / 'report.html'}",
    ]
    if probes:
        lines.append("  probes  : " + "; ".join(probe_clauses(probes)))
    if stopped_for_budget:
        lines.append("  note    : training stopped early: one more step would exceed the target epsilon")
    return "\n".join(lines)


def flat_summary(privacy: dict, probes: dict | None) -> dict:
    """``privacy/KEY`` and ``probes/SECTION/KEY`` scalars (a remote tracker only receives the privacy part
    unless ``tracker.log_private_data=true``)."""
    out = {f"privacy/{k}": v for k, v in privacy.items() if isinstance(v, (int, float, str, bool)) or v is None}
    for section, vals in (probes or {}).items():
        if isinstance(vals, dict):
            for k, v in vals.items():
                if isinstance(v, (int, float, str, bool)):
                    out[f"probes/{section}/{k}"] = v
    return out
