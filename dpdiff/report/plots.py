"""Figures of a run: epsilon vs step, the training loss, the signal-to-noise per step (matplotlib, Agg, PNG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def epsilon_curve(privacy: dict, metrics: list[dict] | None = None, points: int = 12) -> tuple[list[int], list[float]]:
    """Epsilon against the step count.

    The values the run logged (metrics.jsonl ``epsilon``: the run's accountant over its ledger at that
    step) plus the final one from privacy.json, when the run logged at least three; otherwise recomputed
    from the ledger at ``points`` step counts (a PRV epsilon costs about a second, so not at every step).
    """
    from dpdiff.privacy.accountants import MechanismSegment, get_accountant

    segs = [MechanismSegment(**s) for s in privacy.get("ledger") or []]
    total = sum(s.steps for s in segs)
    if not total:
        return [], []
    logged = {int(m["step"]): float(m["epsilon"]) for m in metrics or []
              if m.get("epsilon") is not None and 0 < int(m["step"]) <= total}
    if len(logged) >= 3 and privacy.get("epsilon") is not None:
        logged[total] = float(privacy["epsilon"])
        logged[0] = 0.0  # nothing spent before the first step
        steps = sorted(logged)
        return steps, [logged[t] for t in steps]
    acc = get_accountant(privacy["accountant"])
    steps = sorted({0} | {max(1, round(total * i / points)) for i in range(1, points + 1)})
    eps = []
    for t in steps:
        if t == 0:
            eps.append(0.0)
            continue
        left, hist = t, []
        for s in segs:
            take = min(left, s.steps)
            if take:
                hist.append(MechanismSegment(s.noise_multiplier, s.sample_rate, take))
            left -= take
        eps.append(acc.epsilon(history=hist, delta=privacy["delta"]).epsilon)
    return steps, eps


def write_run_plots(run_dir: Path, *, metrics: list[dict], privacy: dict) -> dict[str, Path]:
    plt = _plt()
    out: dict[str, Path] = {}
    if privacy.get("dp"):
        steps, eps = epsilon_curve(privacy, metrics)
        if steps:
            fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=110)
            ax.plot(steps, eps, color="#0969da", lw=2)
            if privacy.get("target_epsilon"):
                ax.axhline(privacy["target_epsilon"], color="#cf222e", ls="--", lw=1, label="target")
                ax.legend(loc="lower right")
            ax.set_xlabel("step")
            ax.set_ylabel(f"epsilon (delta={privacy['delta']:.2g})")
            ax.set_title(f"Privacy spent ({privacy['accountant']})")
            ax.grid(alpha=0.3)
            out["epsilon vs step"] = _save(plt, fig, Path(run_dir) / "plot_epsilon.png")
    pts = [(m["step"], m["loss"]) for m in metrics if m.get("loss") is not None]
    if pts:
        fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=110)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color="#8250df", lw=1.5)
        ax.set_xlabel("step")
        ax.set_ylabel("denoising loss (train, non-private)")
        ax.set_title("Training loss")
        ax.grid(alpha=0.3)
        out["training loss"] = _save(plt, fig, Path(run_dir) / "plot_loss.png")
    snr = [(m["step"], m["snr"]) for m in metrics if m.get("snr") is not None]
    if snr:
        fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=110)
        ax.plot([p[0] for p in snr], [p[1] for p in snr], color="#1a7f37", lw=1.5, label="all trainable weights")
        for g in sorted({k for m in metrics for k in m if k.startswith("snr/")}):
            pts = [(m["step"], m[g]) for m in metrics if m.get(g) is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=0.8, alpha=0.7, label=g[4:])
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("|clipped mean| / |noise|")
        ax.set_title("Signal to noise per step (non-private statistic)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
        out["signal to noise"] = _save(plt, fig, Path(run_dir) / "plot_snr.png")
    return out


def dp_roc_boundary(epsilon: float, delta: float, fpr: np.ndarray) -> np.ndarray:
    """The highest TPR any membership test can reach at each FPR against an (epsilon, delta)-DP mechanism
    (Kairouz, Oh & Viswanath 2015): ``min(e^eps FPR + delta, 1 - e^-eps (1 - delta - FPR), 1)``."""
    fpr = np.asarray(fpr, dtype=np.float64)
    return np.clip(np.minimum(np.exp(epsilon) * fpr + delta, 1.0 - np.exp(-epsilon) * (1.0 - delta - fpr)), 0.0, 1.0)


def write_mia_roc(run_dir: Path, *, mia: dict, privacy: dict) -> Path | None:
    """The membership attacks' ROC curves on log-log axes (Carlini et al. 2022's view: what matters is the TPR at
    low FPR), with the region an (epsilon, delta)-DP claim allows shaded: a curve above the boundary beyond
    sampling error is a violation (the verdict's one-run analysis decides that, not the eye). The lowest FPR
    shown is one false positive among the held-out units: below it the empirical curve says nothing."""
    attacks = {k: a["roc"] for k, a in (mia.get("attacks") or {}).items() if isinstance(a, dict) and a.get("roc")}
    if not attacks:
        return None
    plt = _plt()
    n0 = int(mia.get("nonmembers") or 0) or None
    lo = 1.0 / n0 if n0 else 1e-3
    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=110)
    grid = np.logspace(np.log10(lo), 0, 200)
    ax.plot(grid, grid, color="#57606a", lw=0.8, ls=":", label="chance")
    if privacy.get("dp") and privacy.get("epsilon") is not None:
        eps, delta = float(privacy["epsilon"]), float(privacy.get("delta") or 0.0)
        bound = dp_roc_boundary(eps, delta, grid)
        ax.fill_between(grid, lo, bound, color="#1a7f37", alpha=0.08,
                        label=f"allowed by ({eps:.3g}, {delta:.2g})-DP")
        ax.plot(grid, bound, color="#1a7f37", lw=1)
    colours = {"lira": "#cf222e", "calibrated": "#0969da", "loss": "#8250df", "pia": "#9a6700"}
    for name, roc in attacks.items():
        f, t = np.asarray(roc["fpr"]), np.asarray(roc["tpr"])
        f, t = np.clip(f, lo, 1.0), np.clip(t, lo, 1.0)  # 0 has no place on a log axis: drawn at the floor
        style = "-" if name == mia.get("primary_attack") else "--"
        ax.plot(f, t, style, lw=1.6 if style == "-" else 1.0, color=colours.get(name), label=name,
                drawstyle="steps-post")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, 1.0)
    ax.set_ylim(lo, 1.05)
    ax.set_xlabel("false positive rate (held-out units)")
    ax.set_ylabel("true positive rate (members)")
    ax.set_title(f"Membership inference ROC ({mia.get('members')} vs {mia.get('nonmembers')} units)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    return _save(plt, fig, Path(run_dir) / "plot_mia_roc.png")
