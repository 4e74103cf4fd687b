"""Privacy accountants for the Poisson-subsampled Gaussian mechanism of DP-SGD, and calibration.

A run's privacy history is a list of ``MechanismSegment(noise_multiplier, sample_rate, steps)``:
``steps`` compositions of the Poisson-subsampled Gaussian mechanism (Abadi et al. 2016) under
add/remove-one-unit adjacency. Every accountant computes epsilon from that history alone, so the
ledger persisted with each checkpoint is the single source of truth.

Accountants (plug-ins with a small Protocol and a registry, as in opacus ``accountants/registry.py``):

* ``prv``  Opacus' PRV accountant (Gopi, Lee, Wutschitz 2021): numerical composition of privacy
  random variables with a certified error; we report its *upper* bound ``eps_upper`` (estimate +
  ``eps_error``) and keep the estimate and the bound next to it.
* ``rdp``  Opacus' RDP accountant (Mironov 2017; Mironov, Talwar, Zhang 2019): a valid upper bound,
  typically 8-20% looser than PLD/PRV.
* ``pld``  Google's ``dp_accounting`` privacy-loss-distribution accountant (Meiser & Mohammadi 2018;
  Koskela et al. 2020; Doroshenko et al. 2022) with pessimistic discretisation (an upper bound).

GDP/CLT accounting is deliberately absent: it under-estimates epsilon (9-13% below PLD).

Every accountant answers in seconds for any noise multiplier > 0, always with a valid upper bound.
Small noise multipliers make the numerical accountants' discretisations explode (PRV's domain
grows with epsilon, PLD's grid with 1/sigma^2: sigma=0.001 asked Opacus' PRV for 7 TiB, sigma=0.01
kept PLD busy for hours). So RDP, cheap for any sigma, is computed first; above
``EPSILON_LIMIT`` no guarantee is meaningful and its bound is reported as it stands, with a note
saying so (``EpsilonReport.describe()`` prints it in one line). Below, PRV falls back to RDP if its
grid would still be too large, and PLD coarsens its grid (a pessimistic PLD is an upper bound at
any discretisation).

Known value (the PLD accountant on CIFAR-10-like settings), used as a doctest:

>>> seg = [MechanismSegment(noise_multiplier=1.0, sample_rate=256 / 50000, steps=1953)]
>>> round(get_accountant("pld").epsilon(history=seg, delta=1e-5).epsilon, 2)
1.23
>>> round(get_accountant("rdp").epsilon(history=seg, delta=1e-5).epsilon, 2)
1.47
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

#: Above this epsilon a guarantee is vacuous (it bounds a likelihood ratio by e^100): accountants
#: report their cheap RDP upper bound there instead of running a numerical accountant, and say so.
EPSILON_LIMIT = 100.0


@dataclass(frozen=True)
class MechanismSegment:
    """``steps`` consecutive DP-SGD steps with one noise multiplier and sampling rate."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class EpsilonReport:
    """An epsilon with what the accountant can say about its accuracy.

    ``epsilon`` is always an upper bound valid at ``delta`` (what reports quote);
    ``estimate`` and ``lower`` are given by accountants that have them (PRV).
    """

    epsilon: float
    delta: float
    accountant: str
    estimate: float | None = None
    lower: float | None = None
    error_note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def meaningful(self) -> bool:
        """False when epsilon is above ``EPSILON_LIMIT`` (or infinite): no useful guarantee."""
        return self.epsilon <= EPSILON_LIMIT

    def describe(self) -> str:
        """One line for logs and reports, e.g. ``epsilon <= 1.23 at delta 1e-05 (pld; ...)``."""
        eps = "inf" if math.isinf(self.epsilon) else f"{self.epsilon:.4g}"
        note = f"; {self.error_note}" if self.error_note else ""
        return f"epsilon <= {eps} at delta {self.delta:g} ({self.accountant}{note})"


class Accountant(Protocol):
    name: str

    def epsilon(self, *, history: Sequence[MechanismSegment], delta: float) -> EpsilonReport: ...


def _compress(history: Sequence[MechanismSegment]) -> list[MechanismSegment]:
    """Merge consecutive segments of the same mechanism; drop empty ones."""
    out: list[MechanismSegment] = []
    for seg in history:
        if seg.steps <= 0:
            continue
        if out and out[-1].noise_multiplier == seg.noise_multiplier and out[-1].sample_rate == seg.sample_rate:
            out[-1] = MechanismSegment(seg.noise_multiplier, seg.sample_rate, out[-1].steps + seg.steps)
        else:
            out.append(seg)
    return out


def _trivial(history: list[MechanismSegment], delta: float, name: str) -> EpsilonReport | None:
    """Cases no numerical accountant needs to see: nothing spent, or no noise at all."""
    if not history or all(s.sample_rate == 0 for s in history):
        return EpsilonReport(epsilon=0.0, delta=delta, accountant=name, estimate=0.0, lower=0.0)
    if any(s.noise_multiplier <= 0 for s in history if s.sample_rate > 0):
        return EpsilonReport(epsilon=math.inf, delta=delta, accountant=name, error_note="no noise")
    return None


_EXTRA_RDP_ORDERS = [80, 96, 128, 192, 256, 384, 512, 1024]
#: Integer orders only: Opacus computes an integer order in closed form (a binomial sum) and a fractional
#: one by a slowly converging series (about 5 ms each at q=0.14, sigma=1). Any set of orders gives a valid
#: upper bound, so the pre-checks of the numerical accountants (is epsilon beyond EPSILON_LIMIT?) use these
#: and cost milliseconds; a reported RDP epsilon uses all orders (tighter).
_INTEGER_RDP_ORDERS = list(range(2, 64)) + _EXTRA_RDP_ORDERS


def _beyond_limit(rdp: EpsilonReport, name: str) -> EpsilonReport:
    """The RDP report (already above the limit and saying so) as the answer of accountant ``name``."""
    return EpsilonReport(epsilon=rdp.epsilon, delta=rdp.delta, accountant=name,
                         error_note=f"{rdp.error_note}; {name.upper()} not computed")


class RdpAccountant:
    """Opacus' RDP accountant over Opacus' default orders plus orders up to 1024.

    Valid for any sigma > 0 and cheap: 0.1-0.5 s over all orders, milliseconds over the integer orders,
    which is why the numerical accountants ask it first (``_INTEGER_RDP_ORDERS``).
    """

    name = "rdp"

    def __init__(self, orders: Sequence[float] | None = None):
        self.orders = list(orders) if orders is not None else None

    def epsilon(self, *, history: Sequence[MechanismSegment], delta: float) -> EpsilonReport:
        hist = _compress(history)
        if (triv := _trivial(hist, delta, self.name)) is not None:
            return triv
        from opacus.accountants import RDPAccountant

        acc = RDPAccountant()
        acc.history = [(s.noise_multiplier, s.sample_rate, s.steps) for s in hist]
        # Opacus' orders stop at 63, too low for large sigma / small epsilon (it warns "optimal order
        # is the largest alpha"); more orders only tighten the bound (min over valid bounds), as in
        # dp_accounting's default orders which reach 512.
        # (Beyond 1024 the warning is only reached by the huge sigmas a calibration bisection tries; the
        # bound stays valid, merely loose, so it is not shown to users.)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            orders = self.orders or RDPAccountant.DEFAULT_ALPHAS + _EXTRA_RDP_ORDERS
            eps, alpha = acc.get_privacy_spent(delta=delta, alphas=orders)
        eps = float(eps)
        if math.isnan(eps):
            eps = math.inf  # never report less than we know
        for w in caught:
            msg = str(w.message)
            # "smallest alpha": tiny sigma; the bound is then far above EPSILON_LIMIT and flagged as such
            if "largest alpha" in msg or ("smallest alpha" in msg and eps > EPSILON_LIMIT):
                continue
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        note = f"RDP upper bound (best order {alpha:g})"
        if not eps <= EPSILON_LIMIT:
            note = f"above {EPSILON_LIMIT:g}, no meaningful guarantee: {note}"
        return EpsilonReport(epsilon=eps, delta=delta, accountant=self.name, error_note=note)


#: Largest PRV grid (points of Opacus' discretisation domain) computed: a few seconds (3.2e6 points
#: took 4 s on one core). Real runs need 1e5-1e6 points; the grid grows with epsilon and sqrt(steps).
_PRV_MAX_POINTS = 5_000_000


class PrvAccountant:
    """Opacus' PRV accountant; ``epsilon`` is its certified upper bound.

    ``eps_error`` is the half-width of the certified interval; ``delta_error`` defaults to
    delta/1000 as in Opacus.
    """

    name = "prv"

    def __init__(self, eps_error: float = 0.01):
        self.eps_error = eps_error

    def epsilon(self, *, history: Sequence[MechanismSegment], delta: float) -> EpsilonReport:
        hist = _compress(history)
        if (triv := _trivial(hist, delta, self.name)) is not None:
            return triv
        rdp = RdpAccountant(_INTEGER_RDP_ORDERS).epsilon(history=hist, delta=delta)
        if rdp.epsilon > EPSILON_LIMIT:
            return _beyond_limit(rdp, self.name)
        import numpy as np
        from opacus.accountants import PRVAccountant
        from opacus.accountants.analysis.prv import (
            PoissonSubsampledGaussianPRV,
            TruncatedPrivacyRandomVariable,
            compose_heterogeneous,
            discretize,
        )

        acc = PRVAccountant()
        prvs = [PoissonSubsampledGaussianPRV(s.sample_rate, s.noise_multiplier) for s in hist]
        counts = [s.steps for s in hist]
        delta_error = delta / 1000
        try:
            # Opacus' _get_dprv, split so the grid's size is known before it is allocated (Opacus has no
            # such check: sigma=0.001 asked for 7 TiB). Opacus sizes the domain from an RDP bound over its
            # own orders; when that bound is loose (large sigma) it warns "optimal order is the largest
            # alpha": a wider domain, not a wrong epsilon.
            with warnings.catch_warnings(), np.errstate(divide="ignore"):  # log(1 - q) = -inf at q = 1
                warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
                domain = acc._get_domain(prvs=prvs, num_self_compositions=counts, eps_error=self.eps_error,
                                         delta_error=delta_error)
            if domain.size > _PRV_MAX_POINTS:
                return EpsilonReport(epsilon=rdp.epsilon, delta=delta, accountant=self.name,
                                     error_note=f"PRV grid of {domain.size:.3g} points not computed; "
                                                f"{rdp.error_note} reported instead")
            with np.errstate(divide="ignore"):
                dprvs = [discretize(TruncatedPrivacyRandomVariable(prv, domain.t_min, domain.t_max), domain)
                         for prv in prvs]
                dprv = compose_heterogeneous(dprvs=dprvs, num_self_compositions=counts)
                lower, estimate, upper = dprv.compute_epsilon(delta, delta_error, self.eps_error)
        except (RuntimeError, ValueError, OverflowError, MemoryError) as err:
            # PRV's discretisation fails for some extreme settings (opacus #601/#604): fall
            # back to the RDP upper bound, which stays valid, and say so.
            return EpsilonReport(epsilon=rdp.epsilon, delta=delta, accountant=self.name,
                                 error_note=f"PRV failed ({err}); RDP upper bound reported instead")
        if not math.isfinite(upper):
            return EpsilonReport(epsilon=rdp.epsilon, delta=delta, accountant=self.name,
                                 error_note="PRV returned inf; RDP upper bound reported instead")
        return EpsilonReport(epsilon=float(upper), delta=delta, accountant=self.name,
                             estimate=float(estimate), lower=float(lower),
                             error_note=f"certified PRV bound: estimate +/- {self.eps_error}")


#: Largest PLD grid of one step's privacy loss (about 3 s for a 200-step run): sigma >= 0.45 keeps
#: the default interval of 1e-4; smaller sigmas get a coarser one (see ``pld_discretization``).
_PLD_MAX_POINTS = 500_000


def pld_discretization(*, noise_multiplier: float, base: float = 1e-4) -> float:
    """PLD value-discretisation interval for the smallest noise multiplier of a history.

    dp_accounting discretises the Gaussian privacy loss ``L(x) = (x - 1/2) / sigma^2`` over the x
    whose tail mass is above e^-50 (``log_mass_truncation_bound``), |x - mean| <= about 10 sigma: a
    range of about ``(1 + 20 sigma) / sigma^2``, hence ``range / interval`` points, and time. At
    sigma=0.01 and 1e-4 that is 1e8 points and hours. The interval is widened to keep the grid at
    ``_PLD_MAX_POINTS``: the *pessimistic* discretisation (Koskela et al. 2020; Doroshenko et al.
    2022: each loss rounded up to the grid) dominates the true PLD at any interval, so epsilon stays
    an upper bound, looser by up to about ``steps * interval``.
    """
    loss_range = (1 + 20 * noise_multiplier) / noise_multiplier**2
    return max(base, loss_range / _PLD_MAX_POINTS)


class PldAccountant:
    """Google dp_accounting's PLD accountant, pessimistic estimate (an upper bound)."""

    name = "pld"

    def __init__(self, value_discretization_interval: float = 1e-4):
        self.value_discretization_interval = value_discretization_interval

    def epsilon(self, *, history: Sequence[MechanismSegment], delta: float) -> EpsilonReport:
        hist = _compress(history)
        if (triv := _trivial(hist, delta, self.name)) is not None:
            return triv
        rdp = RdpAccountant(_INTEGER_RDP_ORDERS).epsilon(history=hist, delta=delta)
        if rdp.epsilon > EPSILON_LIMIT:
            return _beyond_limit(rdp, self.name)
        import dp_accounting
        from dp_accounting import pld

        events = [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(s.sample_rate, dp_accounting.GaussianDpEvent(s.noise_multiplier)),
                s.steps,
            )
            for s in hist
        ]
        interval = pld_discretization(noise_multiplier=min(s.noise_multiplier for s in hist if s.sample_rate > 0),
                                      base=self.value_discretization_interval)
        acc = pld.PLDAccountant(value_discretization_interval=interval)
        acc.compose(dp_accounting.ComposedDpEvent(events))
        eps = float(acc.get_epsilon(delta))
        if math.isnan(eps):
            return EpsilonReport(epsilon=rdp.epsilon, delta=delta, accountant=self.name,
                                 error_note=f"PLD returned nan; {rdp.error_note} reported instead")
        return EpsilonReport(epsilon=eps, delta=delta, accountant=self.name,
                             error_note=f"pessimistic PLD, discretisation {interval:.3g}")


DEFAULT_ACCOUNTANT = "prv"  # of runs (privacy.accountant) and of every cross-run composition

_REGISTRY: dict[str, Callable[[], Accountant]] = {
    "prv": PrvAccountant,
    "rdp": RdpAccountant,
    "pld": PldAccountant,
}


def register_accountant(name: str, factory: Callable[[], Accountant]) -> None:
    _REGISTRY[name] = factory


def available_accountants() -> list[str]:
    return sorted(_REGISTRY)


def get_accountant(name: str) -> Accountant:
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise ValueError(f"unknown accountant {name!r}; choose one of {', '.join(available_accountants())}") from None


def epsilon_after(*, accountant: Accountant, history: Sequence[MechanismSegment],
                  noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon of ``history`` followed by ``steps`` more steps of the given mechanism."""
    seg = MechanismSegment(noise_multiplier, sample_rate, steps)
    return accountant.epsilon(history=[*history, seg], delta=delta).epsilon


def calibrate_noise_multiplier(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                               accountant: Accountant, history: Sequence[MechanismSegment] = (),
                               rtol: float = 0.005, max_sigma: float = 1e4) -> float:
    """Smallest noise multiplier (to ``rtol``) whose epsilon after ``steps`` steps is <= target.

    Bisection on sigma, as Opacus' ``get_noise_multiplier`` but with a *relative* tolerance
    (Opacus stops at an absolute 0.01, which is 10% at epsilon 0.1). The returned sigma always
    satisfies ``epsilon <= target_epsilon`` and its epsilon is within ``2*rtol`` of the target.
    ``history`` (e.g. of an earlier run being resumed) is composed first.
    """
    if target_epsilon <= 0 or not math.isfinite(target_epsilon):
        raise ValueError(f"target_epsilon must be a positive finite number, got {target_epsilon}")

    def eps(sigma: float) -> float:
        return epsilon_after(accountant=accountant, history=history, noise_multiplier=sigma,
                             sample_rate=sample_rate, steps=steps, delta=delta)

    lo, hi = 0.0, 1.0
    eps_hi = eps(hi)
    while eps_hi > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > max_sigma:
            raise ValueError(
                f"no noise multiplier up to {max_sigma:g} reaches epsilon {target_epsilon:g} at delta {delta:g} "
                f"over {steps} steps at sample rate {sample_rate:.4g}: raise the target or lower steps/batch")
        eps_hi = eps(hi)
    while (target_epsilon - eps_hi) > rtol * target_epsilon and (hi - lo) > 1e-6 * hi:
        mid = 0.5 * (lo + hi)
        e = eps(mid)
        if e <= target_epsilon:
            hi, eps_hi = mid, e
        else:
            lo = mid
    return hi


def max_steps_within(*, target_epsilon: float, delta: float, noise_multiplier: float, sample_rate: float,
                     accountant: Accountant, history: Sequence[MechanismSegment] = (),
                     upper: int = 10**7) -> int:
    """The largest number of further steps whose composed epsilon stays <= ``target_epsilon``.

    Epsilon grows with steps, so a bisection on the step count is exact (up to the
    accountant's own monotonicity). Used to stop training before the target is exceeded.
    """
    def fits(n: int) -> bool:
        return epsilon_after(accountant=accountant, history=history, noise_multiplier=noise_multiplier,
                             sample_rate=sample_rate, steps=n, delta=delta) <= target_epsilon

    if not fits(0):
        return 0
    lo, hi = 0, 1
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > upper:
            return upper
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo
