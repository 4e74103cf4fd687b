"""The end-of-run summary: the lines printed in the terminal, and the flat values sent to a tracker."""

from __future__ import annotations

from pathlib import Path


def _fmt(v, nd: int = 3) -> str:
    return "n/a" if v is None else (f"{v:.{nd}g}" if isinstance(v, float) else str(v))


def probe_clauses(probes: dict | None) -> list[str]:
    """One clause per probe: its three-way verdict, the claim, the measured lower bound and the ceiling."""
    from dpdiff.probes.verdict import summary_lines

    return summary_lines(probes or {}) or ["none ran"]


def terminal_summary(*, privacy: dict, probes: dict | None, steps: int, seconds: float, run_dir: Path,
                     weights_dir: Path, samples_path: Path, stopped_for_budget: bool) -> str:
    if privacy["dp"]:
        guarantee = (f"({privacy['epsilon']:.3f}, {privacy['delta']:.2g})-DP per {privacy['privacy_unit']} "
                     f"[{privacy['accountant']}], target epsilon {privacy['target_epsilon']}")
        if privacy["epsilon"] is not None and not privacy["epsilon"] <= 100:
            guarantee += " (NO MEANINGFUL GUARANTEE: epsilon above 100)"
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
        clauses = probe_clauses(probes)
        lines.append("  probes  : " + clauses[0])
        lines += ["            " + c for c in clauses[1:]]
    if stopped_for_budget:
        lines.append("  note    : training stopped early: one more step would exceed the target epsilon")
    return "\n".join(lines)


def flat_summary(privacy: dict, probes: dict | None) -> dict:
    """``privacy/KEY`` and ``probes/SECTION/KEY`` scalars. ``privacy`` is privacy.json's record, public by
    construction (the data-dependent fields are in data_owner.json); only its public keys pass
    (``PUBLIC_PRIVACY_KEYS``: an older record's fingerprints or run ids do not). A remote tracker receives the
    probes part only with ``tracker.log_private_data=true`` (``dpdiff.training.tracking.public_part``)."""
    from dpdiff.report.privacy_json import PUBLIC_PRIVACY_KEYS

    out = {f"privacy/{k}": v for k, v in privacy.items()
           if k in PUBLIC_PRIVACY_KEYS and (isinstance(v, (int, float, str, bool)) or v is None)}
    for section, vals in (probes or {}).items():
        if isinstance(vals, dict):
            for k, v in vals.items():
                if isinstance(v, (int, float, str, bool)):
                    out[f"probes/{section}/{k}"] = v
    return out
