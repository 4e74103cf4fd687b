"""Power of the verdicts: the detectable epsilon is what one_run_audit itself would refute, a mechanism at the
claim is refuted at most at the nominal rate, one at the detectable epsilon at least 80% of the time, and the
MIA's default sizes (256 + 256, three attacks) do not earn a PASS at epsilon 1 although their ceiling (3.9)
exceeds the claim.

Every simulation here is seeded: the tests are deterministic (false-failure probability 0); the margins below
say how far each seeded estimate sits from its threshold."""

from __future__ import annotations

import numpy as np
import pytest

from dpdiff.probes.audit import (
    _Refuter,
    default_k_choices,
    detectable_epsilon,
    gdp_epsilon,
    gdp_mu_for_epsilon,
    gradient_canary_k_choices,
    one_run_audit,
    power_to_refute,
    units_for_power,
)
from dpdiff.probes.verdict import INCONCLUSIVE, PASS, three_way_verdict

DELTA = 1e-5
MIA_LEVEL = 1.0 - 0.05 / 3  # three attacks at 95%: Bonferroni


def test_gdp_mu_for_epsilon_inverts_gdp_epsilon():
    for eps in (0.25, 1.0, 4.0, 16.0):
        assert gdp_epsilon(gdp_mu_for_epsilon(eps, DELTA), DELTA) == pytest.approx(eps, rel=1e-8)
    with pytest.raises(ValueError):
        gdp_mu_for_epsilon(0.0, DELTA)


@pytest.mark.parametrize("fixed_count,m,claim", [(False, 300, 0.5), (False, 300, 1.0), (True, 240, 0.5),
                                                 (False, 1200, 1.0)])
def test_the_fast_decision_is_one_run_audits_own(fixed_count, m, claim):
    """The power simulation counts correct guesses against precomputed thresholds; on every draw its decision
    equals one_run_audit's ``eps_lower > claim`` (both analyses, every choice), except where one_run_audit's
    f-DP bound, computed on a grid of about 1e-3, sits within that resolution of the claim."""
    rng = np.random.default_rng([m, int(claim * 100), fixed_count])
    test = _Refuter(claimed_epsilon=claim, m=m, included=m // 2 if fixed_count else None, delta=DELTA,
                    confidence=0.95, fixed_count=fixed_count, choices=None)
    decided = {True: 0, False: 0}
    for trial in range(40):
        inc = np.zeros(m, bool)
        if fixed_count:
            inc[rng.permutation(m)[: m // 2]] = True
        else:
            inc = rng.random(m) < 0.5
        mu = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0][trial % 8]
        scores = rng.standard_normal(m) + mu * inc
        res = one_run_audit(scores=scores, included=inc, delta=DELTA, confidence=0.95, fixed_count=fixed_count)
        if abs(res["eps_lower"] - claim) < 2e-3:
            continue
        assert test.refutes(scores, inc) == (res["eps_lower"] > claim), (trial, res["eps_lower"])
        decided[res["eps_lower"] > claim] += 1
    assert decided[True] >= 5 and decided[False] >= 5  # both outcomes were exercised


@pytest.mark.parametrize("fixed_count,m,claim", [(False, 1000, 0.5), (False, 1000, 2.0), (True, 512, 1.0)])
def test_a_mechanism_at_the_claim_is_refuted_at_most_at_the_nominal_rate(fixed_count, m, claim):
    # 1000 seeded trials; the nominal rate is 5%: an estimate of at most 5% from 1000 trials is what validity
    # predicts (the one-run bounds are conservative, the observed rate is far below)
    rate = power_to_refute(true_epsilon=claim, claimed_epsilon=claim, m=m, included=m // 2 if fixed_count else None,
                           delta=DELTA, confidence=0.95, fixed_count=fixed_count, trials=1000, seed=3)
    assert rate <= 0.05


@pytest.mark.parametrize("design", ["coins", "mia", "gradient"])
def test_at_the_detectable_epsilon_an_independent_simulation_refutes_at_least_80_percent(design):
    kw = {"coins": dict(claimed_epsilon=0.25, m=1000, included=None, confidence=0.95, fixed_count=False),
          "mia": dict(claimed_epsilon=1.0, m=512, included=256, confidence=MIA_LEVEL, fixed_count=True),
          "gradient": dict(claimed_epsilon=1.0, m=4000, included=None, confidence=0.9, fixed_count=False,
                           choices=gradient_canary_k_choices(4000))}[design]
    found = detectable_epsilon(delta=DELTA, **kw, seed=0)
    eps = found["detectable_epsilon"]
    assert eps is not None
    # independent seed, 1000 trials: the estimate's standard error is at most 0.016; seeded, so deterministic
    assert power_to_refute(true_epsilon=eps, delta=DELTA, **kw, trials=1000, seed=99) >= 0.75
    # and the grid point below it was not enough (the search returned the first with power)
    lower = [f for f in (1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0) if f * kw["claimed_epsilon"] < eps]
    if lower:
        below = lower[-1] * kw["claimed_epsilon"]
        assert power_to_refute(true_epsilon=below, delta=DELTA, **kw, trials=1000, seed=99) < 0.85


def test_mia_defaults_do_not_pass_at_epsilon_one_although_the_ceiling_exceeds_it():
    """The situation of a privacy officer reading green: 256 members + 256 held out, three attacks, claim 1.
    Ceiling 3.9 > 1, yet a true epsilon of 4 is (almost) never refuted by the optimal attacker."""
    rng = np.random.default_rng(5)
    inc = np.zeros(512, bool)
    inc[rng.permutation(512)[:256]] = True
    res = one_run_audit(scores=rng.standard_normal(512), included=inc, delta=DELTA, confidence=MIA_LEVEL,
                        fixed_count=True)
    assert res["ceiling"] > 3.0
    at_4 = power_to_refute(true_epsilon=4.0, claimed_epsilon=1.0, m=512, included=256, delta=DELTA,
                           confidence=MIA_LEVEL, fixed_count=True, trials=300, seed=1)
    assert at_4 < 0.1
    power = detectable_epsilon(claimed_epsilon=1.0, m=512, included=256, delta=DELTA, confidence=MIA_LEVEL,
                               fixed_count=True)
    assert power["detectable_epsilon"] == 8.0 and power["power_at_2x"] < 0.05
    v = three_way_verdict(claimed_epsilon=1.0, eps_lower=res["eps_lower"], ceiling=res["ceiling"], confidence=0.95,
                          detectable_epsilon=power["detectable_epsilon"])
    assert v["verdict"] == INCONCLUSIVE and "detects only epsilon >= 8" in v["reason"]


def test_enough_canaries_earn_a_pass_and_the_advice_says_how_many():
    """units_for_power's answer is an audit size that does have the power (and half of it does not)."""
    need = units_for_power(claimed_epsilon=1.0, delta=DELTA, confidence=0.9, fixed_count=False,
                           choices_for=gradient_canary_k_choices)
    assert need is not None and 4000 < need < 131072
    kw = dict(claimed_epsilon=1.0, delta=DELTA, confidence=0.9, fixed_count=False, included=None, trials=300, seed=7)
    assert power_to_refute(true_epsilon=2.0, m=need, choices=gradient_canary_k_choices(need), **kw) >= 0.7
    assert power_to_refute(true_epsilon=2.0, m=need // 2, choices=gradient_canary_k_choices(need // 2), **kw) < 0.8
    power = detectable_epsilon(claimed_epsilon=1.0, m=need, included=None, delta=DELTA, confidence=0.9,
                               fixed_count=False, choices=gradient_canary_k_choices(need))
    v = three_way_verdict(claimed_epsilon=1.0, eps_lower=0.3, ceiling=5.0, confidence=0.9,
                          detectable_epsilon=power["detectable_epsilon"])
    assert v["verdict"] == PASS


def test_power_is_zero_where_not_even_a_perfect_attack_could_refute():
    # 20 canaries cannot reject epsilon 8 whatever the guesses: no simulation needed, power 0
    assert power_to_refute(true_epsilon=100.0, claimed_epsilon=8.0, m=20, included=None, delta=DELTA,
                           confidence=0.95, fixed_count=False, choices=default_k_choices(20)) == 0.0
    assert detectable_epsilon(claimed_epsilon=8.0, m=20, included=None, delta=DELTA, confidence=0.95,
                              fixed_count=False)["detectable_epsilon"] is None
