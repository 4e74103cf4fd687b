"""Private selection (dpdiff.privacy.selection) against the papers' closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dpdiff.privacy.accountants import MechanismSegment
from dpdiff.privacy.selection import (
    ORDERS,
    TruncatedNegativeBinomial,
    candidate_rdp,
    selection_epsilon,
    selection_rdp,
)


@pytest.mark.parametrize("eta", [-0.5, 0.0, 0.5, 1.0, 2.0])
def test_tnb_pmf_sums_to_one_and_has_the_closed_form_mean(eta):
    d = TruncatedNegativeBinomial(eta, 0.05)
    ks = np.arange(1, 4000)
    p = np.array([d.pmf(int(k)) for k in ks])
    assert (p >= 0).all() and p.sum() == pytest.approx(1.0, abs=1e-9)
    assert float((ks * p).sum()) == pytest.approx(d.mean(), rel=1e-9)  # P&S's E[K] formula


def test_geometric_special_case_and_with_mean():
    g = TruncatedNegativeBinomial(1.0, 0.2)
    assert [g.pmf(k) for k in (1, 2, 3)] == pytest.approx([0.2, 0.2 * 0.8, 0.2 * 0.64])
    assert g.mean() == pytest.approx(5.0)
    assert TruncatedNegativeBinomial.with_mean(5.0, eta=1.0).gamma == pytest.approx(0.2, rel=1e-9)
    assert TruncatedNegativeBinomial.with_mean(10.0, eta=0.0).mean() == pytest.approx(10.0, rel=1e-9)


def test_sampled_mean_matches():
    """20,000 geometric draws (gamma 0.1: mean 10, sd 9.49): the sample mean is within 6 standard errors (0.40)
    of 10 (false failure < 1e-8; the generator is seeded, so the draw is fixed)."""
    d = TruncatedNegativeBinomial(1.0, 0.1)
    rng = np.random.default_rng(12345)
    ks = [d.sample(rng) for _ in range(20_000)]
    assert min(ks) >= 1 and abs(np.mean(ks) - 10.0) < 6 * math.sqrt(0.9 / 0.01 / 20_000)


def test_theorem_2_by_hand():
    """Papernot & Steinke's Theorem 2 at one lambda with the lambda_hat the minimum picks, typed out."""
    rdp = np.array([0.1 * lam for lam in ORDERS])  # a Gaussian mechanism with sigma^2 = 5
    d = TruncatedNegativeBinomial(0.0, 0.1)
    out = selection_rdp(rdp, d)
    lam_i = ORDERS.index(8)
    hats = [(1 - 1 / h) * 0.1 * h + math.log(10) / h for h in ORDERS] + [math.log(10)]  # (1 + eta) = 1
    want = 0.1 * 8 + min(hats) + math.log(d.mean()) / 7
    assert out[lam_i] == pytest.approx(want, rel=1e-12)


def test_geometric_selection_of_pure_dp_candidates_tends_to_three_epsilon():
    """Liu & Talwar (STOC 2019): the best of a geometric number of eps-DP runs is 3 eps-DP. An eps-DP candidate is
    (lambda, eps)-RDP at every order; Theorem 2 with eta = 1 tends to 3 eps as lambda and lambda_hat grow."""
    eps0 = 1.0
    out = selection_rdp(np.full(len(ORDERS), eps0), TruncatedNegativeBinomial(1.0, 0.1))
    assert out[-1] == pytest.approx(3 * eps0, abs=2e-3) and (out >= 3 * eps0 - 1e-9).all()


def test_selection_costs_a_small_multiple_of_one_run_not_the_sum():
    """20 expected candidates of a DP-SGD run (sigma 1, q 0.01, 1000 steps) scored with noise 20: the selection
    costs more than one run and less than composing the 20."""
    seg = [MechanismSegment(noise_multiplier=1.0, sample_rate=0.01, steps=1000)]
    res = selection_epsilon(seg, TruncatedNegativeBinomial.with_mean(20.0), delta=1e-5, score_noise_multiplier=20.0)
    assert res["one_candidate_epsilon"] < res["epsilon"] < res["composed_epsilon"]
    assert res["composed_candidates"] == 20 and res["expected_candidates"] == pytest.approx(20.0)
    with pytest.raises(ValueError):
        candidate_rdp(seg, score_noise_multiplier=0.0)
