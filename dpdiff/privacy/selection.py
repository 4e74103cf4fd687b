"""Private selection among tuning candidates: what picking the best of several private runs costs.

Keeping the best of K private runs by a score computed on private data leaks more than one run's epsilon,
and for a fixed K composition charges all K runs. Papernot & Steinke (ICLR 2022, "Hyperparameter tuning with
Renyi differential privacy", Theorem 2) run a *random* number of candidates K from a truncated negative
binomial TNB(eta, gamma) and release only the best; if each candidate (training and its score together) is
(lambda, eps(lambda))-RDP, the procedure is (lambda, eps'(lambda))-RDP with, for any lambda_hat >= 1,

    eps'(lambda) = eps(lambda) + (1 + eta) (1 - 1/lambda_hat) eps(lambda_hat)
                   + (1 + eta) log(1/gamma) / lambda_hat + log(E[K]) / (lambda - 1),

    E[K] = eta (1 - gamma) / (gamma (1 - gamma^eta))   (eta != 0),   (1/gamma - 1) / log(1/gamma)   (eta = 0).

eta = 1 is the geometric distribution (Liu & Talwar 2019: for pure eps-DP candidates, 3 eps in total; the
bound above tends to that as lambda, lambda_hat grow, tested), eta = 0 the logarithmic one. The total does not
grow with E[K] except through log(E[K]) / (lambda - 1): tuning over tens of candidates costs a small multiple
of one run, not tens of runs. K itself must stay unpublished (the bound averages over it); only the winner and
its score are released.

Each candidate's RDP is its DP-SGD ledger (Poisson-subsampled Gaussian, Opacus' ``compute_rdp``, the analysis
dpdiff's RDP accountant uses) plus its score's Gaussian mechanism (lambda / (2 sigma_s^2)), added: composition,
valid whichever units the score reads (with a unit-wise held-out split, max would also be valid; the sum is the
conservative choice). The conversion to (eps, delta) is Opacus' ``get_privacy_spent``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dpdiff.privacy.accountants import MechanismSegment

#: RDP orders: dense at small orders, then up to 10^4 (the bound's best lambda_hat grows with log(1/gamma))
ORDERS = tuple([1.0 + x / 10 for x in range(1, 100)] + list(range(11, 64)) + [64, 80, 96, 128, 192, 256, 384, 512,
                                                                                768, 1024, 2048, 4096, 10000])


@dataclass(frozen=True)
class TruncatedNegativeBinomial:
    """TNB(eta, gamma) on {1, 2, ...}: P[K = k] proportional to (1 - gamma)^k prod_{l<k} (l + eta) / (l + 1)
    (eta > -1, 0 < gamma < 1); eta = 0 is the logarithmic distribution, eta = 1 the geometric."""

    eta: float
    gamma: float

    def __post_init__(self):
        if not self.eta > -1:
            raise ValueError(f"eta must be > -1, got {self.eta}")
        if not 0 < self.gamma < 1:
            raise ValueError(f"gamma must be in (0, 1), got {self.gamma}")

    @classmethod
    def with_mean(cls, mean: float, *, eta: float = 1.0) -> TruncatedNegativeBinomial:
        """The distribution with E[K] = ``mean`` (> 1) for this eta (gamma by bisection: E[K] falls with gamma)."""
        if not mean > 1:
            raise ValueError(f"the mean number of candidates must be > 1, got {mean}")
        lo, hi = 1e-12, 1 - 1e-12
        for _ in range(200):
            mid = (lo + hi) / 2
            if cls(eta, mid).mean() > mean:
                lo = mid
            else:
                hi = mid
        return cls(eta, (lo + hi) / 2)

    def mean(self) -> float:
        g, e = self.gamma, self.eta
        if e == 0:
            return (1 / g - 1) / math.log(1 / g)
        return e * (1 - g) / (g * (1 - g**e))

    def pmf(self, k: int) -> float:
        if k < 1:
            return 0.0
        g, e = self.gamma, self.eta
        if e == 0:
            return (1 - g) ** k / (k * math.log(1 / g))
        # prod_{l<k} (l + eta) / (l + 1) = Gamma(k + eta) / (Gamma(eta) k!), in logs (eta in (-1, 0) has Gamma < 0)
        log_prod = sum(math.log(abs((ell + e) / (ell + 1))) for ell in range(k))
        sign = -1.0 if e < 0 else 1.0
        return sign * math.exp(k * math.log(1 - g) + log_prod) / (g**-e - 1)

    def sample(self, rng: np.random.Generator, *, max_k: int = 100_000) -> int:
        """One draw by inverting the CDF (``rng``: fresh entropy; K must not be derived from a published seed)."""
        u, acc = float(rng.random()), 0.0
        for k in range(1, max_k + 1):
            acc += self.pmf(k)
            if u < acc:
                return k
        return max_k


def rdp_of(segments: Sequence[MechanismSegment], *, orders: Sequence[float] = ORDERS) -> np.ndarray:
    """RDP at ``orders`` of the composed Poisson-subsampled Gaussian ``segments`` (Opacus' ``compute_rdp``)."""
    rdp = np.zeros(len(orders))
    for s in segments:
        if s.steps > 0:
            rdp += _one_step_rdp(float(s.sample_rate), float(s.noise_multiplier), tuple(orders)) * s.steps
    return np.where(np.isnan(rdp), np.inf, rdp)


@functools.lru_cache(maxsize=1024)
def _one_step_rdp(q: float, sigma: float, orders: tuple[float, ...]) -> np.ndarray:
    """One step's RDP (composition is linear in the steps): the dataset ledger evaluates the same few mechanisms
    for every charge signature, and Opacus' series at fractional orders is slow."""
    from opacus.accountants.analysis.rdp import compute_rdp

    out = np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(orders)), dtype=float)
    out.setflags(write=False)
    return out


def candidate_rdp(segments: Sequence[MechanismSegment], *, score_noise_multiplier: float | None = None,
                  orders: Sequence[float] = ORDERS) -> np.ndarray:
    """RDP of one candidate at ``orders``: its DP-SGD ledger plus its score's Gaussian mechanism (sensitivity 1 in
    units of the score's clip, noise ``score_noise_multiplier`` times it; None: a score that reads no private
    data)."""
    rdp = rdp_of(segments, orders=orders)
    if score_noise_multiplier is not None:
        if not score_noise_multiplier > 0:
            raise ValueError("a score read from private data needs noise (score_noise_multiplier > 0)")
        rdp += np.asarray(orders, dtype=float) / (2 * score_noise_multiplier**2)
    return np.where(np.isnan(rdp), np.inf, rdp)  # an order whose bound overflowed bounds nothing


def selection_rdp(rdp: Sequence[float], dist: TruncatedNegativeBinomial, *, orders: Sequence[float] = ORDERS
                  ) -> np.ndarray:
    """Papernot & Steinke's Theorem 2 at every order lambda > 1, minimised over lambda_hat in ``orders``."""
    rdp = np.asarray(rdp, dtype=float)
    rdp = np.where(np.isnan(rdp), np.inf, rdp)
    lam = np.asarray(orders, dtype=float)
    if np.any(lam <= 1):
        raise ValueError("orders must be > 1")
    e = dist.eta
    # the lambda_hat-dependent part, one value per lambda_hat (lambda_hat = 1 adds (1 + eta) log(1/gamma) alone)
    hat = (1 + e) * (1 - 1 / lam) * rdp + (1 + e) * math.log(1 / dist.gamma) / lam
    best_hat = min(float(hat.min()), (1 + e) * math.log(1 / dist.gamma))
    return rdp + best_hat + math.log(dist.mean()) / (lam - 1)


def rdp_to_epsilon(rdp: Sequence[float], *, delta: float, orders: Sequence[float] = ORDERS) -> tuple[float, float]:
    """(epsilon, best order) at ``delta`` (Opacus' conversion, as dpdiff's RDP accountant)."""
    from opacus.accountants.analysis.rdp import get_privacy_spent

    eps, order = get_privacy_spent(orders=list(orders), rdp=np.asarray(rdp, dtype=float), delta=delta)
    return float(eps), float(order)


def selection_from_rdp(rdp: Sequence[float], dist: TruncatedNegativeBinomial, *, delta: float) -> dict:
    """The (epsilon, delta) of releasing the best of K ~ ``dist`` candidates whose RDP is at most ``rdp`` (at
    ``ORDERS``); beside it one candidate's epsilon and the composition of ceil(E[K]) candidates (what a fixed sweep
    of that size costs)."""
    one = np.asarray(rdp, dtype=float)
    eps, order = rdp_to_epsilon(selection_rdp(one, dist), delta=delta)
    single, _ = rdp_to_epsilon(one, delta=delta)
    k = math.ceil(dist.mean() - 1e-9)
    composed, _ = rdp_to_epsilon(k * one, delta=delta)
    return {"epsilon": eps, "delta": delta, "order": order, "eta": dist.eta, "gamma": dist.gamma,
            "expected_candidates": dist.mean(), "one_candidate_epsilon": single,
            "composed_epsilon": composed, "composed_candidates": k,
            "method": "Papernot & Steinke 2022, Theorem 2 (RDP), truncated negative binomial number of candidates"}


def selection_epsilon(segments: Sequence[MechanismSegment], dist: TruncatedNegativeBinomial, *, delta: float,
                      score_noise_multiplier: float | None = None) -> dict:
    """``selection_from_rdp`` for candidates trained as ``segments`` say (the worst candidate's ledger when they
    differ) and scored with ``score_noise_multiplier``."""
    return selection_from_rdp(candidate_rdp(segments, score_noise_multiplier=score_noise_multiplier), dist,
                              delta=delta)
