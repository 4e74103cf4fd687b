"""Accountants against independent references, and calibration.

References, none of them the code under test: Google's dp_accounting called directly (RDP, PLD and
its analytic Gaussian mechanism), Opacus' PRV accountant called directly, the closed form of the
full-batch Gaussian mechanism (Balle & Wang 2018), and published values.
"""

from __future__ import annotations

import contextlib
import doctest
import math
import signal
import threading

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld, rdp
from scipy.optimize import brentq
from scipy.special import log_ndtr

from dpdiff.privacy import accountants as A
from dpdiff.privacy.accountants import (
    EPSILON_LIMIT,
    MechanismSegment,
    calibrate_noise_multiplier,
    get_accountant,
    max_steps_within,
)

GRID = [  # (q, sigma, steps, delta)
    (0.01, 1.0, 1000, 1e-5),
    (0.05, 0.8, 300, 1e-5),
    (0.1, 1.5, 500, 1e-6),
    (0.004, 1.1, 3000, 1e-5),
    (0.25, 2.0, 100, 1e-4),
    (0.02, 0.6, 200, 1e-5),
]


def _event(q, sigma, steps):
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)


def google_pld(history, delta):
    acc = pld.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dp_accounting.ComposedDpEvent([_event(s.sample_rate, s.noise_multiplier, s.steps) for s in history]))
    return acc.get_epsilon(delta)


def google_rdp(history, delta):
    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.ComposedDpEvent([_event(s.sample_rate, s.noise_multiplier, s.steps) for s in history]))
    return acc.get_epsilon(delta)


def opacus_prv(history, delta, eps_error=0.01):
    """Opacus' PRV accountant through its public API: (lower, estimate, upper)."""
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = [(s.noise_multiplier, s.sample_rate, s.steps) for s in history]
    dprv = acc._get_dprv(eps_error=eps_error, delta_error=delta / 1000)
    return dprv.compute_epsilon(delta, delta / 1000, eps_error)


def gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon of the Gaussian mechanism with sensitivity/sigma = mu (Balle & Wang 2018, Theorem 8):
    delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2), solved in log space (any mu)."""
    def log_delta(eps):
        la, lb = log_ndtr(-eps / mu + mu / 2), log_ndtr(-eps / mu - mu / 2)
        return la + np.log1p(-np.exp(eps + lb - la))

    hi = mu * mu / 2 + 10 * mu + 1
    while log_delta(hi) > math.log(delta):
        hi *= 2
    return brentq(lambda e: log_delta(e) - math.log(delta), 0.0, hi, xtol=1e-12, rtol=1e-12)


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging for hours) when the block runs longer than ``seconds``."""
    def expire(*_):
        raise TimeoutError(f"no answer within {seconds} s")

    if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
        yield
        return
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("q,sigma,steps,delta", GRID)
def test_epsilon_agrees_with_independent_implementations(q, sigma, steps, delta):
    seg = [MechanismSegment(sigma, q, steps)]
    ref_pld = google_pld(seg, delta)
    ref_rdp = google_rdp(seg, delta)
    lower, estimate, upper = opacus_prv(seg, delta)
    ours_pld = get_accountant("pld").epsilon(history=seg, delta=delta)
    ours_prv = get_accountant("prv").epsilon(history=seg, delta=delta)
    ours_rdp = get_accountant("rdp").epsilon(history=seg, delta=delta)
    # PLD (Google) vs PRV (Opacus): two numerical methods for the same quantity. Our pessimistic PLD is an upper
    # bound, so it is never below PRV's certified lower bound, and it lies within PRV's +/- 0.01 of its estimate.
    assert ours_pld.epsilon >= lower
    assert abs(ours_pld.epsilon - estimate) <= 0.01 + 2e-3 * estimate
    # PRV (Opacus) vs PLD (Google): the reported PRV value is an upper bound (estimate + 0.01), so it must not fall
    # below PLD by more than PLD's own discretisation slack, and stays within 2% + 0.02 above it.
    assert ours_prv.epsilon >= ref_pld * (1 - 2e-3)
    assert ours_prv.epsilon <= ref_pld * 1.02 + 0.02
    assert ours_prv.lower <= ours_prv.estimate <= ours_prv.epsilon
    # Opacus RDP vs Google RDP: both valid RDP bounds over different order grids.
    assert ours_rdp.epsilon == pytest.approx(ref_rdp, rel=0.03)
    assert ours_rdp.epsilon >= ref_pld  # RDP is looser than PLD, never tighter


@pytest.mark.parametrize("sigma,steps,delta", [(10.0, 100, 1e-5), (4.0, 4, 1e-6), (2.0, 16, 1e-5), (3.0, 1, 1e-5)])
def test_full_batch_equals_the_analytic_gaussian_mechanism(sigma, steps, delta):
    """q = 1: T Gaussian steps compose to one Gaussian mechanism with sigma / sqrt(T), whose epsilon is exact."""
    exact = gaussian_epsilon(math.sqrt(steps) / sigma, delta)
    assert exact == pytest.approx(dp_accounting.get_epsilon_gaussian(sigma / math.sqrt(steps), delta), rel=1e-6)
    seg = [MechanismSegment(sigma, 1.0, steps)]
    ours_pld = get_accountant("pld").epsilon(history=seg, delta=delta).epsilon
    ours_prv = get_accountant("prv").epsilon(history=seg, delta=delta)
    ours_rdp = get_accountant("rdp").epsilon(history=seg, delta=delta).epsilon
    assert exact <= ours_pld <= exact + 1e-3  # pessimistic: above, by the discretisation only
    assert ours_prv.lower <= exact <= ours_prv.epsilon <= exact + 2 * 0.01  # certified interval
    assert exact <= ours_rdp <= 1.15 * exact  # RDP: a valid, looser bound


# Bu, Dong, Long & Su 2020 ("Deep learning with Gaussian differential privacy", HDSR, Fig. 4): DP-SGD on MNIST,
# q = 256/60000, delta = 1e-5, by the moments accountant of Abadi et al. 2016 (RDP with the conversion
# eps = min_a rdp(a) + log(1/delta)/(a-1), over TF Privacy's orders): sigma 1.3, 20 epochs -> 1.34;
# sigma 0.7, 70 epochs -> 8.68. Steps: ceil(epochs * 60000 / 256).
PUBLISHED = [(1.3, 4688, 1.34), (0.7, 16407, 8.68)]
_TF_PRIVACY_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


@pytest.mark.parametrize("sigma,steps,published", PUBLISHED)
def test_published_moments_accountant_values(sigma, steps, published):
    q, delta = 256 / 60000, 1e-5
    seg = [MechanismSegment(sigma, q, steps)]
    # the reference reproduces the publication (Google's RDP curve, the paper's conversion)
    acc = rdp.RdpAccountant(orders=_TF_PRIVACY_ORDERS)
    acc.compose(_event(q, sigma, steps))
    classic = float(np.min(acc.rdp + math.log(1 / delta) / (acc.orders - 1)))
    assert classic == pytest.approx(published, abs=0.015)
    # ours uses the tighter RDP -> DP conversion (Balle et al. 2020): at most the published value, not far below
    ours_rdp = get_accountant("rdp").epsilon(history=seg, delta=delta).epsilon
    assert 0.8 * published <= ours_rdp <= published + 0.005
    for name in ("pld", "prv"):  # tighter still, never above RDP
        assert get_accountant(name).epsilon(history=seg, delta=delta).epsilon <= ours_rdp


def test_heterogeneous_history_matches_independent_implementations():
    """Interleaved mechanisms that _compress cannot merge: each accountant against another library's composition."""
    hist = [MechanismSegment(1.0, 0.02, 150), MechanismSegment(0.8, 0.05, 100), MechanismSegment(1.0, 0.02, 250)]
    assert len(A._compress(hist)) == 3
    delta = 1e-5
    ref_pld, ref_rdp = google_pld(hist, delta), google_rdp(hist, delta)
    lower, estimate, _ = opacus_prv(hist, delta)
    ours_pld = get_accountant("pld").epsilon(history=hist, delta=delta).epsilon
    ours_prv = get_accountant("prv").epsilon(history=hist, delta=delta).epsilon
    ours_rdp = get_accountant("rdp").epsilon(history=hist, delta=delta).epsilon
    assert ours_pld >= lower and abs(ours_pld - estimate) <= 0.01 + 2e-3 * estimate  # vs Opacus PRV
    assert ref_pld * (1 - 2e-3) <= ours_prv <= ref_pld * 1.02 + 0.02  # vs Google PLD
    assert ours_rdp == pytest.approx(ref_rdp, rel=0.03)  # vs Google RDP


def test_no_steps_is_zero_and_no_noise_is_infinite():
    assert get_accountant("prv").epsilon(history=[], delta=1e-5).epsilon == 0
    assert get_accountant("pld").epsilon(history=[MechanismSegment(0.0, 0.1, 10)], delta=1e-5).epsilon == float("inf")


@pytest.mark.parametrize("name", ["prv", "rdp", "pld"])
@pytest.mark.parametrize("sigma", [1e-6, 1e-3, 1e-2, 0.1])
def test_tiny_noise_multipliers_answer_at_once_with_a_flagged_upper_bound(name, sigma):
    """sigma=0.001 once ended in a 7 TiB allocation (PRV) and sigma=0.01 in hours of PLD grid: every accountant
    answers, with an upper bound flagged as meaningless, printable in one line."""
    q, steps, delta = 128 / 720, 200, 1e-5
    with deadline(60):
        rep = get_accountant(name).epsilon(history=[MechanismSegment(sigma, q, steps)], delta=delta)
        full_batch = get_accountant(name).epsilon(history=[MechanismSegment(sigma, 1.0, steps)], delta=delta)
    assert rep.epsilon > EPSILON_LIMIT and not rep.meaningful
    line = rep.describe()
    assert "\n" not in line and "no meaningful guarantee" in line and name in line
    # valid: the same RDP bound as Google's implementation, and never below the exact full-batch epsilon
    assert rep.epsilon >= 0.97 * google_rdp([MechanismSegment(sigma, q, steps)], delta)
    assert full_batch.epsilon >= gaussian_epsilon(math.sqrt(steps) / sigma, delta)


@pytest.mark.parametrize("name", ["prv", "rdp", "pld"])
def test_budget_helpers_with_tiny_noise_answer_at_once(name):
    acc = get_accountant(name)
    with deadline(120):
        n = max_steps_within(target_epsilon=8.0, delta=1e-5, noise_multiplier=0.01, sample_rate=128 / 720,
                             accountant=acc)
        # a huge target sends the bisection through tiny sigmas
        sigma = calibrate_noise_multiplier(target_epsilon=1e4, delta=1e-5, sample_rate=128 / 720, steps=200,
                                           accountant=acc, rtol=0.2)
        eps = acc.epsilon(history=[MechanismSegment(sigma, 128 / 720, 200)], delta=1e-5).epsilon
    assert n == 0
    assert 0.6 * 1e4 <= eps <= 1e4


def test_small_sigma_below_the_limit_keeps_pld_tight_and_fast():
    """sigma=0.2, q=1e-4: epsilon ~14, a 1e-4 grid would take 1.7e6 points; the coarser grid still agrees with PRV."""
    seg = [MechanismSegment(0.2, 1e-4, 10)]
    with deadline(60):
        ours = get_accountant("pld").epsilon(history=seg, delta=1e-5)
    lower, estimate, _ = opacus_prv(seg, 1e-5)
    assert ours.meaningful and ours.epsilon >= lower and abs(ours.epsilon - estimate) <= 0.02
    assert A.pld_discretization(noise_multiplier=0.2) > 1e-4
    assert A.pld_discretization(noise_multiplier=0.45) == 1e-4  # ordinary sigmas keep the default grid


@pytest.mark.parametrize("name", ["prv", "rdp", "pld"])
@pytest.mark.parametrize("target", [0.5, 1.0, 4.0, 8.0])
def test_calibration_hits_target_from_below_within_one_percent(name, target):
    acc = get_accountant(name)
    q, steps, delta = 64 / 900, 300, 1e-5
    sigma = calibrate_noise_multiplier(target_epsilon=target, delta=delta, sample_rate=q, steps=steps, accountant=acc)
    eps = acc.epsilon(history=[MechanismSegment(sigma, q, steps)], delta=delta).epsilon
    assert eps <= target
    assert eps >= 0.99 * target


def test_max_steps_within_is_the_boundary():
    acc = get_accountant("pld")
    n = max_steps_within(target_epsilon=2.0, delta=1e-5, noise_multiplier=1.0, sample_rate=0.05, accountant=acc)
    eps = lambda t: acc.epsilon(history=[MechanismSegment(1.0, 0.05, t)], delta=1e-5).epsilon
    assert eps(n) <= 2.0 < eps(n + 1)


def test_registry_rejects_unknown():
    with pytest.raises(ValueError, match="unknown accountant"):
        get_accountant("gdp")


def test_module_doctest_known_values():
    res = doctest.testmod(A, verbose=False)
    assert res.attempted >= 2 and res.failed == 0
