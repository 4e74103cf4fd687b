"""The report's epsilon curve: the values the run logged, which are the ledger's own epsilons."""

from __future__ import annotations

import pytest

from dpdiff.privacy.accountants import MechanismSegment, get_accountant
from dpdiff.report.plots import epsilon_curve


def _privacy(steps: int) -> dict:
    seg = MechanismSegment(1.1, 0.1, steps)
    eps = get_accountant("rdp").epsilon(history=[seg], delta=1e-5).epsilon
    return {"dp": True, "accountant": "rdp", "delta": 1e-5, "epsilon": eps,
            "ledger": [{"noise_multiplier": 1.1, "sample_rate": 0.1, "steps": steps}]}


def test_curve_recomputed_from_the_ledger_without_logged_values():
    priv = _privacy(60)
    steps, eps = epsilon_curve(priv, [], points=6)
    assert steps == [0, 10, 20, 30, 40, 50, 60] and eps[0] == 0
    assert eps == sorted(eps) and eps[-1] == pytest.approx(priv["epsilon"])


def test_curve_from_logged_values_matches_the_ledger():
    priv = _privacy(60)
    acc = get_accountant("rdp")
    metrics = [{"step": t, "loss": 0.1, "epsilon": acc.epsilon(history=[MechanismSegment(1.1, 0.1, t)],
                                                               delta=1e-5).epsilon} for t in (10, 20, 30, 40, 50)]
    steps, eps = epsilon_curve(priv, metrics)
    recomputed = epsilon_curve(priv, [], points=6)
    assert steps == recomputed[0] and eps == pytest.approx(recomputed[1])
    # a step past the ledger (a metrics file from a longer, discarded attempt) is not plotted
    steps, _ = epsilon_curve(priv, [*metrics, {"step": 70, "epsilon": 9.0}])
    assert steps[-1] == 60
