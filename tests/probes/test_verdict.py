"""Three-way verdicts: each verdict from synthetic scores, and the rule that a verdict that cannot come
out either way is INCONCLUSIVE, never PASS."""

from __future__ import annotations

import numpy as np
import pytest

from dpdiff.probes.audit import detectable_epsilon, one_run_audit, simulate_gdp_scores
from dpdiff.probes.stats import split_dp_check
from dpdiff.probes.verdict import (
    FAIL,
    INCONCLUSIVE,
    PASS,
    summary_lines,
    three_way_verdict,
    verdict_fields,
    verdict_line,
    verdict_sentence,
)


def _verdict_from_scores(scores, included, *, claimed, confidence=0.95, fixed_count=False):
    res = one_run_audit(scores=scores, included=included, delta=1e-5, confidence=confidence, fixed_count=fixed_count)
    power = detectable_epsilon(claimed_epsilon=claimed, m=res["m"], included=res["included"], delta=1e-5,
                               confidence=confidence, fixed_count=fixed_count)
    return res, three_way_verdict(claimed_epsilon=claimed, eps_lower=res["eps_lower"], ceiling=res["ceiling"],
                                  confidence=confidence, to_conclude="more canaries",
                                  detectable_epsilon=power["detectable_epsilon"])


def test_rules_by_hand():
    v = three_way_verdict(claimed_epsilon=1.0, eps_lower=0.2, ceiling=3.0, confidence=0.95, detectable_epsilon=2.0)
    assert v["verdict"] == PASS and v["colour"] == "green" and v["to_conclude"] is None
    assert v["detectable_epsilon"] == 2.0
    # the ceiling exceeds the claim, but the test detects only 2.5 (or nothing): not a PASS
    v = three_way_verdict(claimed_epsilon=1.0, eps_lower=0.2, ceiling=3.0, confidence=0.95, detectable_epsilon=2.5,
                          to_conclude="more canaries")
    assert v["verdict"] == INCONCLUSIVE and "detects only epsilon >= 2.5" in v["reason"]
    assert v["to_conclude"] == "more canaries"
    v = three_way_verdict(claimed_epsilon=1.0, eps_lower=0.2, ceiling=3.0, confidence=0.95)
    assert v["verdict"] == INCONCLUSIVE and "16x" in v["reason"]
    v = three_way_verdict(claimed_epsilon=1.0, eps_lower=1.5, ceiling=3.0, confidence=0.95)
    assert v["verdict"] == FAIL  # power is a condition of PASS only: a refutation needs none
    v = three_way_verdict(claimed_epsilon=1.0, eps_lower=1.5, ceiling=3.0, confidence=0.95, blockers=["weak probe"])
    assert v["verdict"] == FAIL and v["colour"] == "red"  # a valid rejection stands whatever limits the power
    v = three_way_verdict(claimed_epsilon=4.0, eps_lower=0.5, ceiling=3.5, confidence=0.95, to_conclude="more canaries")
    assert v["verdict"] == INCONCLUSIVE and v["colour"] == "amber"
    assert "3.5" in v["reason"] and v["to_conclude"] == "more canaries"
    v = three_way_verdict(claimed_epsilon=4.0, eps_lower=4.0, ceiling=4.0, confidence=0.95)
    assert v["verdict"] == INCONCLUSIVE  # ceiling == claim: exceeding it was impossible
    v = three_way_verdict(claimed_epsilon=1.0, eps_lower=0.1, ceiling=3.0, confidence=0.95,
                          blockers=["the VAE floor is above the threshold"])
    assert v["verdict"] == INCONCLUSIVE and "VAE floor" in v["reason"]
    v = three_way_verdict(claimed_epsilon=1.0, eps_lower=None, ceiling=None, confidence=0.95, not_estimable="no data")
    assert v["verdict"] == INCONCLUSIVE and v["reason"] == "no data"


def test_without_a_dp_claim_leakage_fails_and_nothing_passes():
    assert three_way_verdict(claimed_epsilon=None, eps_lower=0.7, ceiling=3.0, confidence=0.95)["verdict"] == FAIL
    for low in (0.0, None):
        v = three_way_verdict(claimed_epsilon=None, eps_lower=low, ceiling=3.0, confidence=0.95)
        assert v["verdict"] == INCONCLUSIVE


def test_configured_confidence_is_what_is_reported():
    v = three_way_verdict(claimed_epsilon=1.0, eps_lower=0.2, ceiling=3.0, confidence=0.9, detectable_epsilon=2.0)
    assert "90%" in v["reason"] and "95%" not in v["reason"] and v["confidence"] == 0.9
    with pytest.raises(ValueError):
        three_way_verdict(claimed_epsilon=1.0, eps_lower=0.2, ceiling=3.0, confidence=95)
    with pytest.raises(TypeError):
        three_way_verdict(1.0, 0.2, 3.0, 0.95)  # type: ignore[misc]


def test_fail_from_a_mechanism_that_leaks_more_than_claimed():
    scores, included = simulate_gdp_scores(m=1000, mu=4.0, rng=1)  # true epsilon at 1e-5: about 22
    res, v = _verdict_from_scores(scores, included, claimed=1.0)
    assert v["verdict"] == FAIL and res["eps_lower"] > 1.0


def test_pass_only_when_the_test_could_have_failed_at_twice_the_claim():
    scores, included = simulate_gdp_scores(m=1000, mu=0.0, rng=2)  # no leakage at all
    res, v = _verdict_from_scores(scores, included, claimed=1.0)
    # 1000 canaries at claim 1: the ceiling exceeds the claim, but only epsilon 4 is detected with 80% power
    assert res["ceiling"] > 1.0 and res["eps_lower"] <= 1.0
    assert v["verdict"] == INCONCLUSIVE and v["detectable_epsilon"] == 4.0
    # 30000 canaries detect epsilon 2 (twice the claim): PASS
    scores, included = simulate_gdp_scores(m=30000, mu=0.0, rng=2)
    res, v = _verdict_from_scores(scores, included, claimed=1.0)
    assert v["verdict"] == PASS and v["detectable_epsilon"] <= 2.0


def test_inconclusive_when_the_ceiling_is_below_the_claim():
    # the demo's situation: epsilon 7.97 against 1000 canaries, whose ceiling is about 5
    scores, included = simulate_gdp_scores(m=1000, mu=0.0, rng=3)
    res, v = _verdict_from_scores(scores, included, claimed=7.97)
    assert res["ceiling"] < 7.97 and v["verdict"] == INCONCLUSIVE
    assert v["to_conclude"] == "more canaries"
    # the same claim is INCONCLUSIVE even against a perfect attack: FAIL was unreachable
    perfect = np.arange(1000.0)
    res, v = _verdict_from_scores(perfect, perfect >= 500, claimed=7.97)
    assert res["eps_lower"] == pytest.approx(res["ceiling"], rel=1e-6) and v["verdict"] == INCONCLUSIVE


def test_mia_split_of_90_held_out_units_is_inconclusive_at_epsilon_8_and_can_fail_at_0_5():
    rng = np.random.default_rng(4)
    no_leak = {"loss": (rng.normal(0, 1, 90), rng.normal(0, 1, 90)),
               "calibrated": (rng.normal(0, 1, 90), rng.normal(0, 1, 90))}
    check = split_dp_check(scores_by_attack=no_leak, delta=1e-5)
    assert check["ceiling"] < 3.3  # what 90 non-members can certify (the issue measured about 3.3)
    v = three_way_verdict(claimed_epsilon=7.97, eps_lower=check["eps_lower"], ceiling=check["ceiling"],
                          confidence=0.95)
    assert v["verdict"] == INCONCLUSIVE
    # a ceiling above 0.5, yet 90 + 90 units detect nothing near it: never green
    v = three_way_verdict(claimed_epsilon=0.5, eps_lower=check["eps_lower"], ceiling=check["ceiling"],
                          confidence=0.95, detectable_epsilon=detectable_epsilon(
                              claimed_epsilon=0.5, m=180, included=90, delta=1e-5,
                              confidence=check["confidence_per_attack"], fixed_count=True)["detectable_epsilon"])
    assert check["ceiling"] > 0.5 and v["verdict"] == INCONCLUSIVE
    leak = {"loss": (rng.normal(5, 1, 90), rng.normal(0, 1, 90)),
            "calibrated": (rng.normal(0, 1, 90), rng.normal(0, 1, 90))}
    check = split_dp_check(scores_by_attack=leak, delta=1e-5)
    v = three_way_verdict(claimed_epsilon=0.5, eps_lower=check["eps_lower"], ceiling=check["ceiling"],
                          confidence=0.95)
    assert v["verdict"] == FAIL and check["best_attack"] == "loss"


def test_two_held_out_units_are_never_green_or_red():
    # the 16-image folder with 2 held out: nothing can be concluded either way at epsilon 1
    check = split_dp_check(scores_by_attack={"loss": ([5.0, 6.0], [0.0, 1.0])}, delta=1e-5)
    v = three_way_verdict(claimed_epsilon=1.0, eps_lower=check["eps_lower"], ceiling=check["ceiling"],
                          confidence=0.95)
    assert v["verdict"] == INCONCLUSIVE and check["ceiling"] < 1.0


def test_rendering_helpers():
    v = verdict_fields(three_way_verdict(claimed_epsilon=8.0, eps_lower=0.3, ceiling=3.5, confidence=0.95,
                                         to_conclude="about 17000 canaries"))
    assert set(v) >= {"verdict", "colour", "claimed_epsilon", "eps_lower", "ceiling", "confidence",
                      "verdict_reason", "to_conclude"}
    sentence = verdict_sentence(v)
    assert sentence.startswith("INCONCLUSIVE: ") and "To conclude: about 17000 canaries" in sentence
    assert verdict_line("audit", v) == ("audit INCONCLUSIVE (eps_lower 0.3, ceiling 3.5, detects nothing up to 128, "
                                        "claimed 8)")
    w = verdict_fields(three_way_verdict(claimed_epsilon=1.0, eps_lower=0.3, ceiling=3.5, confidence=0.95,
                                         detectable_epsilon=2.0))
    assert verdict_line("mia", w) == "mia PASS (eps_lower 0.3, ceiling 3.5, detects >= 2, claimed 1)"
    probes = {"extraction": {"skipped": "disabled", "verdict": None}, "mia": v, "audit": v}
    assert summary_lines(probes) == ["extraction not run (disabled)", verdict_line("mia", v), verdict_line("audit", v)]
