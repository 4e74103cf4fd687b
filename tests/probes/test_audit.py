"""One-run audit (Steinke, Nasr, Jagielski 2023) against closed forms, an independent transcription of
the paper's Appendix D procedure, exact false-positive rates and a GDP simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from scipy.special import expit, logit

from dpdiff.probes.audit import (
    audit_from_scores,
    audit_p_value,
    best_k_audit,
    default_k_choices,
    eps_lower_bound,
    gdp_delta,
    gdp_epsilon,
    max_eps_lower,
    simulate_gdp_scores,
)


def _paper_p_value(m, r, v, eps, delta):
    """The p-value as the paper states it, with an explicit loop (independent of the module's code)."""
    q = math.exp(eps) / (1 + math.exp(eps))
    pmf = stats.binom.pmf(np.arange(r + 1), r, q)
    tail = float(pmf[v:].sum())  # P[Binomial(r, q) >= v]
    best, window = 0.0, 0.0
    for i in range(1, v + 1):
        window += pmf[v - i]  # P[v - i <= Binomial < v]
        best = max(best, window / i)
    return min(1.0, tail + 2 * m * delta * best)


def _paper_eps(m, r, v, delta, confidence):
    """Bisection on eps keeping p(lo) < alpha <= p(hi), as the paper's code does."""
    alpha = 1 - confidence
    lo, hi = 0.0, 1.0
    while _paper_p_value(m, r, v, hi, delta) < alpha:
        hi += 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if _paper_p_value(m, r, v, mid, delta) < alpha:
            lo = mid
        else:
            hi = mid
    return lo


def test_reference_value_all_correct_delta_zero():
    # 100 guesses all correct: P[Binomial(100, q) >= 100] = q^100 = 0.05, so eps = logit(0.05^(1/100)).
    expected = float(logit(0.05 ** (1 / 100)))
    got = eps_lower_bound(m=1000, num_guesses=100, num_correct=100, delta=0.0, confidence=0.95)
    assert got == pytest.approx(expected, abs=1e-7)
    assert round(got, 2) == 3.49
    assert stats.binom.sf(99, 100, expit(got)) == pytest.approx(0.05, abs=1e-7)
    assert stats.binom.sf(99, 100, expit(got)) < 0.05  # reported on the rejected side
    assert max_eps_lower(m=1000, num_guesses=100, delta=0.0) == got


@pytest.mark.parametrize("m,r,v,delta", [
    (1000, 100, 100, 1e-5), (1000, 100, 90, 1e-5), (1000, 200, 150, 1e-4), (500, 500, 330, 1e-6),
    (1000, 100, 80, 0.0), (10000, 1000, 700, 5e-5), (20, 20, 17, 0.0), (20, 20, 20, 1e-3),
])
def test_agrees_with_the_papers_procedure(m, r, v, delta):
    assert 2 * m * delta <= 1  # where the module's p-value is exactly the paper's
    ours = eps_lower_bound(m=m, num_guesses=r, num_correct=v, delta=delta)
    assert ours == pytest.approx(_paper_eps(m, r, v, delta, 0.95), abs=1e-6)
    for eps in (0.0, 0.5, ours, 3.0):
        assert audit_p_value(m=m, num_guesses=r, num_correct=v, epsilon=eps, delta=delta) == pytest.approx(
            _paper_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-15)


def test_large_delta_p_value_is_a_valid_looser_bound():
    # 2 m delta > 1: the module's p-value is >= the paper's (so the bound is still valid) and monotone.
    m, r, v, delta = 1000, 100, 95, 2e-3
    grid = np.linspace(0, 6, 25)
    ours = [audit_p_value(m=m, num_guesses=r, num_correct=v, epsilon=e, delta=delta) for e in grid]
    paper = [_paper_p_value(m, r, v, e, delta) for e in grid]
    assert all(o >= p - 1e-12 for o, p in zip(ours, paper))
    assert all(b >= a - 1e-12 for a, b in zip(ours, ours[1:]))


def test_monotone_in_num_correct():
    r = 120
    for delta in (0.0, 1e-5):
        bounds = [eps_lower_bound(m=1000, num_guesses=r, num_correct=v, delta=delta) for v in range(r + 1)]
        assert all(b >= a for a, b in zip(bounds, bounds[1:]))
        assert bounds[-1] > 3.0


def test_zero_at_chance_level():
    for r in (10, 100, 1000):
        for v in (0, r // 4, r // 2):
            assert eps_lower_bound(m=1000, num_guesses=r, num_correct=v, delta=0.0) == 0.0
    assert eps_lower_bound(m=10, num_guesses=0, num_correct=0, delta=0.0) == 0.0


def test_larger_delta_lowers_the_bound():
    deltas = [0.0, 1e-6, 1e-5, 1e-4, 4e-4]
    for v in (100, 90):
        bounds = [eps_lower_bound(m=1000, num_guesses=100, num_correct=v, delta=d) for d in deltas]
        assert all(b < a for a, b in zip(bounds, bounds[1:]))


def _min_winning_count(r, eps_true, delta, m):
    """Smallest number of correct guesses whose bound exceeds eps_true (bisection; the bound is monotone)."""
    lo, hi = 0, r + 1  # eps_lower(lo) <= eps_true < eps_lower(hi), hi = r + 1 meaning "never"
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if eps_lower_bound(m=m, num_guesses=r, num_correct=mid, delta=delta) > eps_true:
            hi = mid
        else:
            lo = mid
    return hi


@pytest.mark.parametrize("eps_true", [0.5, 1.0, 2.0])
def test_exact_false_positive_rate_under_randomized_response(eps_true):
    # eps-DP randomized response on the canary bits makes each guess right with probability
    # q = e^eps / (1 + e^eps), independently: the number correct is exactly Binomial(r, q), so the
    # probability that the audit overstates eps is an exact binomial tail, no simulation needed.
    m, r = 1000, 200
    q = expit(eps_true)
    for delta in (0.0, 1e-5):
        w = _min_winning_count(r, eps_true, delta, m)
        false_positive = stats.binom.sf(w - 1, r, q)
        assert false_positive <= 0.05
        if delta == 0.0:  # and the test is not needlessly conservative: one fewer would exceed 5%
            assert stats.binom.sf(w - 2, r, q) > 0.05


def test_gdp_simulation_rarely_exceeds_the_true_epsilon():
    rng = np.random.default_rng(2023)
    delta, trials, m = 1e-5, 200, 1000
    means = []
    for mu in (0.5, 1.0, 2.0):
        true_eps = gdp_epsilon(mu, delta)
        lows = []
        for _ in range(trials):
            scores, included = simulate_gdp_scores(m=m, mu=mu, rng=rng)
            lows.append(audit_from_scores(scores=scores, included=included, k_plus=50, k_minus=50,
                                          delta=delta)["eps_lower"])
        lows = np.array(lows)
        assert np.mean(lows > true_eps) <= 0.05
        means.append(lows.mean())
    assert means[0] < means[1] < means[2]  # more leakage, higher bounds
    assert means[2] > 2.0


def test_gdp_epsilon_against_dp_accounting_and_the_formula():
    import dp_accounting
    from scipy.stats import norm

    for mu in (0.5, 1.0, 2.0, 5.0):
        for delta in (1e-3, 1e-5, 1e-10):
            eps = gdp_epsilon(mu, delta)
            direct = norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)
            assert direct == pytest.approx(delta, rel=1e-6)
            assert gdp_delta(mu, eps) == pytest.approx(delta, rel=1e-6)
            # mu-GDP is the Gaussian mechanism with sensitivity 1 and sigma = 1 / mu
            assert dp_accounting.get_sigma_gaussian(eps, delta) == pytest.approx(1 / mu, rel=1e-5)
    assert gdp_epsilon(0.1, 0.5) == 0.0  # delta above 2 Phi(mu/2) - 1: every eps >= 0 works


def test_audit_from_scores_counts_by_hand():
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    included = np.array([True, False, True, False, False, True])
    res = audit_from_scores(scores=scores, included=included, k_plus=2, k_minus=2, delta=0.0)
    # top 2: canaries 0 (in, right) and 1 (out, wrong); bottom 2: 4 (out, right) and 5 (in, wrong)
    assert (res["num_guesses"], res["num_correct"], res["m"]) == (4, 2, 6)
    assert (res["k_plus"], res["k_minus"]) == (2, 2)
    assert res["eps_lower"] == 0.0
    perfect = audit_from_scores(scores=np.arange(200.0), included=np.arange(200) >= 100, k_plus=50,
                                k_minus=50, delta=0.0)
    assert perfect["num_correct"] == 100
    assert perfect["eps_lower"] == pytest.approx(perfect["eps_ceiling"])
    assert perfect["eps_ceiling"] == max_eps_lower(m=200, num_guesses=100, delta=0.0)


def test_best_k_is_bonferroni_corrected():
    scores, included = simulate_gdp_scores(m=1000, mu=1.5, rng=7)
    choices = default_k_choices(1000)
    assert choices[0] == (10, 10) and choices[-1] == (500, 500)
    best = best_k_audit(scores=scores, included=included, delta=1e-5)
    per = 1 - 0.05 / len(choices)
    assert best["confidence_per_choice"] == pytest.approx(per)
    assert best["choices_tried"] == len(choices)
    corrected = [audit_from_scores(scores=scores, included=included, k_plus=kp, k_minus=km, delta=1e-5,
                                   confidence=per)["eps_lower"] for kp, km in choices]
    uncorrected = [audit_from_scores(scores=scores, included=included, k_plus=kp, k_minus=km, delta=1e-5)
                   ["eps_lower"] for kp, km in choices]
    assert best["eps_lower"] == pytest.approx(max(corrected))
    assert best["eps_lower"] < max(uncorrected)


def test_arguments_are_validated_and_keyword_only():
    with pytest.raises(TypeError):
        eps_lower_bound(1000, 100, 100, 0.0)  # type: ignore[misc]
    with pytest.raises(ValueError, match="exceeds num_guesses"):
        eps_lower_bound(m=1000, num_guesses=10, num_correct=11, delta=0.0)
    with pytest.raises(ValueError, match="exceeds the number of canaries"):
        eps_lower_bound(m=10, num_guesses=11, num_correct=1, delta=0.0)
    with pytest.raises(ValueError, match="delta"):
        eps_lower_bound(m=10, num_guesses=5, num_correct=5, delta=None)
    with pytest.raises(ValueError, match="confidence"):
        eps_lower_bound(m=10, num_guesses=5, num_correct=5, delta=0.0, confidence=95)
    with pytest.raises(TypeError):
        eps_lower_bound(m=10, num_guesses=5.5, num_correct=5, delta=0.0)
    with pytest.raises(ValueError, match="k_plus"):
        audit_from_scores(scores=np.zeros(5), included=np.zeros(5, bool), k_plus=3, k_minus=3, delta=0.0)
    with pytest.raises(ValueError, match="boolean"):
        audit_from_scores(scores=np.zeros(3), included=np.array([0.5, 1, 0]), k_plus=1, k_minus=1, delta=0.0)
    with pytest.raises(ValueError, match="delta"):
        gdp_epsilon(1.0, 1.0)  # arguments swapped by mistake: a delta of 1 is rejected
