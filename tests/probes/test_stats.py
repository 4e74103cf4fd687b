"""Membership-inference statistics against scikit-learn, scipy and hand-made examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import sklearn.metrics as sklearn_metrics
from scipy.stats import binomtest

from dpdiff.probes.stats import (
    bootstrap_ci,
    clopper_pearson,
    dp_consistency,
    mia_summary,
    min_nonmembers_for_fpr,
    roc_auc,
    tpr_at_fpr,
)


def _sklearn_tpr_at_fpr(members, nonmembers, fpr):
    """Reference: the best ROC point (sklearn, rule score >= t) with FPR <= the target."""
    y = np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]
    f, t, _ = sklearn_metrics.roc_curve(y, np.r_[members, nonmembers], drop_intermediate=False)
    return float(np.max(t[f <= fpr + 1e-12]))


def test_auc_matches_sklearn_with_and_without_ties():
    rng = np.random.default_rng(0)
    for members, nonmembers in [
        (rng.normal(0.5, 1, 300), rng.normal(0, 1, 200)),
        (rng.integers(0, 5, 100).astype(float), rng.integers(0, 4, 150).astype(float)),  # many ties
    ]:
        y = np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]
        expected = sklearn_metrics.roc_auc_score(y, np.r_[members, nonmembers])
        assert roc_auc(members, nonmembers) == pytest.approx(expected, abs=1e-12)
    assert roc_auc([1.0, 1.0], [1.0]) == 0.5  # ties count 1/2
    assert roc_auc([2.0], [1.0]) == 1.0


def test_tpr_at_fpr_hand_example():
    members = [0.95, 0.9, 0.8, 0.7, 0.3]
    nonmembers = [0.85, 0.6, 0.5, 0.4, 0.35, 0.3, 0.2, 0.15, 0.1, 0.05]
    # FPR <= 10% of 10 non-members: one false positive allowed; threshold = 2nd largest non-member (0.6);
    # "member iff score > 0.6": members 0.95, 0.9, 0.8, 0.7 and non-member 0.85.
    res = tpr_at_fpr(members, nonmembers, fpr=0.1)
    assert res["threshold"] == 0.6
    counts = (res["true_positives"], res["n_members"], res["false_positives"], res["n_nonmembers"])
    assert counts == (4, 5, 1, 10)
    assert res["tpr"] == pytest.approx(0.8) and res["fpr"] == pytest.approx(0.1)
    assert res["estimable"] is True
    # 0 false positives allowed: threshold = max non-member (0.85) -> 0.95 and 0.9
    zero = tpr_at_fpr(members, nonmembers, fpr=0.05)
    assert (zero["threshold"], zero["true_positives"], zero["false_positives"]) == (0.85, 2, 0)
    assert zero["estimable"] is False  # 10 non-members cannot resolve 5%
    everything = tpr_at_fpr(members, nonmembers, fpr=1.0)
    assert everything["threshold"] is None and everything["tpr"] == 1.0 and everything["fpr"] == 1.0


def test_tpr_at_fpr_is_conservative_with_ties_at_the_threshold():
    res = tpr_at_fpr([1.0, 1.0, 2.0], [1.0, 1.0, 1.0, 0.0], fpr=0.25)  # one false positive allowed
    assert res["fpr"] == 0.0 and res["tpr"] == pytest.approx(1 / 3)  # taking 1.0 would give FPR 3/4


@pytest.mark.parametrize("seed", range(4))
def test_tpr_at_fpr_matches_the_best_sklearn_roc_point(seed):
    rng = np.random.default_rng(seed)
    members = np.round(rng.normal(0.8, 1, 400), 1)  # rounded: ties across both groups
    nonmembers = np.round(rng.normal(0, 1, 500), 1)
    for fpr in (0.002, 0.01, 0.05, 0.2):
        res = tpr_at_fpr(members, nonmembers, fpr=fpr)
        assert res["fpr"] <= fpr
        assert res["tpr"] == pytest.approx(_sklearn_tpr_at_fpr(members, nonmembers, fpr))


def test_bootstrap_ci_contains_the_point_estimate_and_is_reproducible():
    rng = np.random.default_rng(1)
    members, nonmembers = rng.normal(0.3, 1, 200), rng.normal(0, 1, 200)
    point = roc_auc(members, nonmembers)
    low, high = bootstrap_ci(roc_auc, members, nonmembers, n_boot=300, rng=np.random.default_rng(5))
    assert low < point < high
    assert high - low < 0.2
    assert (low, high) == bootstrap_ci(roc_auc, members, nonmembers, n_boot=300, rng=5)


def test_mia_summary_on_identical_distributions():
    rng = np.random.default_rng(2)
    members, nonmembers = rng.normal(0, 1, 500), rng.normal(0, 1, 500)
    summ = mia_summary(members, nonmembers, n_boot=400, seed=0)
    low, high = summ["auc_ci"]
    assert low < 0.5 < high
    assert summ["auc"] == pytest.approx(roc_auc(members, nonmembers))
    one = summ["tpr_at_fpr"]["0.01"]
    assert one["estimable"] and one["tpr"] is not None and one["tpr_ci"][0] <= one["tpr"] <= one["tpr_ci"][1]
    assert one["tpr_ci_clopper_pearson"][0] <= one["tpr"] <= one["tpr_ci_clopper_pearson"][1]
    tiny = summ["tpr_at_fpr"]["0.001"]
    assert tiny["estimable"] is False and tiny["tpr"] is None and tiny["tpr_ci"] is None
    assert "1000 non-members" in tiny["reason"]


def test_mia_summary_becomes_estimable_with_enough_nonmembers():
    assert min_nonmembers_for_fpr(0.001) == 1000 and min_nonmembers_for_fpr(0.01) == 100
    rng = np.random.default_rng(3)
    summ = mia_summary(rng.normal(1, 1, 300), rng.normal(0, 1, 1000), n_boot=200, seed=1)
    point = summ["tpr_at_fpr"]["0.001"]
    assert point["estimable"] and point["tpr"] is not None and point["false_positives"] <= 1
    assert summ["auc_ci"][0] > 0.7


def test_clopper_pearson_matches_scipy_exact_interval():
    for k, n in [(0, 20), (3, 20), (17, 20), (20, 20), (5, 1000)]:
        lower, upper = clopper_pearson(k, n, alpha=0.025)
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
        assert lower == pytest.approx(ci.low, abs=1e-10) and upper == pytest.approx(ci.high, abs=1e-10)


def test_dp_consistency_flags_a_clear_violation_only():
    bad = dp_consistency(tpr=0.5, fpr=0.01, epsilon=1.0, delta=1e-5, n_members=1000, n_nonmembers=1000)
    assert bad["tpr_bound"] == pytest.approx(math.e * 0.01 + 1e-5)
    assert bad["point_violated"] and bad["violated"]
    assert bad["eps_lower_from_point"] > 1.0
    good = dp_consistency(tpr=0.02, fpr=0.01, epsilon=1.0, delta=1e-5, n_members=1000, n_nonmembers=1000)
    assert not good["point_violated"] and not good["violated"]
    # the raw point is outside the region but 5 of 100 vs 1 of 100 is within sampling error
    noisy = dp_consistency(tpr=0.05, fpr=0.01, epsilon=1.0, delta=1e-5, n_members=100, n_nonmembers=100)
    assert noisy["point_violated"] and not noisy["violated"]
    assert noisy["tpr_lower"] < 0.05 < noisy["fpr_upper"] * math.e
    without_counts = dp_consistency(tpr=0.5, fpr=0.01, epsilon=1.0, delta=1e-5)
    assert without_counts["point_violated"] and without_counts["violated"] is None


def test_dp_consistency_second_inequality_and_eps_lower_agree():
    # high FPR: 1 - FPR <= e^eps (1 - TPR) + delta is the binding side of the privacy region
    res = dp_consistency(tpr=0.999, fpr=0.6, epsilon=0.5, delta=0.0, n_members=1000, n_nonmembers=1000)
    assert res["tpr_bound"] == pytest.approx(1 - 0.4 / math.exp(0.5))
    assert res["violated"]
    for tpr, fpr in [(0.3, 0.05), (0.9, 0.5), (0.2, 0.1)]:
        for eps in (0.1, 0.5, 1.0, 2.0):
            r = dp_consistency(tpr=tpr, fpr=fpr, epsilon=eps, delta=1e-5, n_members=500, n_nonmembers=500)
            assert r["violated"] == (eps < r["eps_lower_from_point"])


def test_dp_consistency_false_alarm_rate_at_the_region_boundary():
    # TPR exactly e^eps FPR + delta (the worst case a DP mechanism allows): flagged at most 5% of the time.
    rng = np.random.default_rng(4)
    eps, delta, fpr_true, n = 1.0, 1e-5, 0.02, 500
    tpr_true = math.exp(eps) * fpr_true + delta
    tps = rng.binomial(n, tpr_true, size=400)
    fps = rng.binomial(n, fpr_true, size=400)
    flags = [dp_consistency(tpr=tp / n, fpr=fp / n, epsilon=eps, delta=delta, n_members=n, n_nonmembers=n)
             ["violated"] for tp, fp in zip(tps, fps)]
    assert np.mean(flags) <= 0.05


def test_inputs_are_validated():
    with pytest.raises(ValueError, match="non-empty"):
        roc_auc([], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        tpr_at_fpr([np.nan], [1.0], fpr=0.1)
    with pytest.raises(ValueError, match="fpr"):
        tpr_at_fpr([1.0], [1.0], fpr=1.5)
    with pytest.raises(ValueError, match="epsilon and delta"):
        dp_consistency(tpr=0.1, fpr=0.1, epsilon=1.0, delta=None)
    with pytest.raises(ValueError, match="not a count"):
        dp_consistency(tpr=0.1234, fpr=0.1, epsilon=1.0, delta=0.0, n_members=10, n_nonmembers=10)
    with pytest.raises(TypeError):
        dp_consistency(0.1, 0.1, 1.0, 0.0)  # type: ignore[misc]
