"""One-run privacy audit: Steinke, Nasr, Jagielski, "Privacy Auditing with One (1) Training Run",
NeurIPS 2023 (arXiv:2305.08846).

Setting. ``m`` canaries are each included in the training set independently with probability 1/2
(``S_i`` uniform on {in, out}); everything else about the training run is fixed. After training, the
auditor scores every canary from the trained model alone (higher = more likely a member), abstains on
all but the ``k_plus`` highest and ``k_minus`` lowest scores, guesses "in" for the top ``k_plus`` and
"out" for the bottom ``k_minus``: ``r = k_plus + k_minus`` guesses, ``v`` of them correct.

Test. If training is (eps, delta)-DP with respect to one canary, the paper's main theorem bounds

    P[v' >= v] <= f(v) + 2 m delta * max_{1 <= i <= v} (f(v - i) - f(v)) / i,
    f(u) = P[Binomial(r, q) >= u],   q = e^eps / (1 + e^eps),

(for delta = 0, a randomized-response coin per guess: ``v`` is dominated by Binomial(r, q)). The
right-hand side is the p-value of the claim "(eps, delta)-DP"; the epsilon lower bound at confidence
``1 - alpha`` is the largest eps whose claim is rejected at level alpha, so with probability at least
``1 - alpha`` over the canary coins the mechanism's true epsilon (at that delta) is at least it.

Computation. Follows the paper's own code (its Appendix D: ``p_value_DP_audit`` / ``get_eps_audit``)
and jax_privacy's ``jax_privacy/auditing.py`` (``_one_run_p_value`` / ``_epsilon_one_run``: the
same p-value, vectorised, then a root search in eps). One deliberate difference: the p-value is
written as ``max_i [(1 - c/i)_+ f(v) + (c/i) f(v - i)]`` with ``c = 2 m delta``; for ``c <= 1`` (any
sensible delta, ``delta <= 1/(2m)``) this is exactly the paper's expression, and for ``c > 1`` it is a
slightly larger, still valid bound. Written so, every term is non-decreasing in eps and
non-increasing in v, hence the p-value is monotone in both: the returned bound is the *first*
eps at which the claim can no longer be rejected (the paper's bisection and jax_privacy's brentq
assume this monotonicity), and it is non-decreasing in the number of correct guesses.

The f-DP analysis. Mahloujifar, Melis, Chaudhuri, "Auditing f-Differential Privacy in One Run"
(ICML 2025, arXiv:2410.22235) bound the probability of ``v`` correct guesses out of ``r`` by a
recursion over the trade-off curve ``f`` of the hypothesised guarantee instead of Steinke et al.'s
randomized-response coupling; it is tighter, most of all for curves that are not (eps, delta)
shaped. ``fdp_rejects`` follows the paper's recursion as implemented in PrivacyGuard's
``FDPAnalysisNode.rh_with_cap`` / ``audit_rh_with_cap`` (alphabet k = 2: membership), in terms of
the inverse "blow-up" of f: the smallest FPR at which a test reaches TPR ``y``. Two families:

* ``(eps, delta)``-DP, ``x(y) = max(0, (y - delta) e^-eps, 1 - delta - e^eps (1 - y))``: tests exactly
  the claim the accountant makes, so its bound (``fdp_eps_lower_bound``) may decide a verdict.
* mu-GDP, ``x(y) = Phi(Phi^-1(y) - mu)``: the paper's "empirical privacy" (``fdp_gdp_mu_lower_bound``,
  converted to epsilon at delta). DP-SGD's trade-off curve is close to Gaussian but not exactly, so
  this number is reported for comparison, not used for a verdict.

Fixed-count splits. Steinke et al. and Mahloujifar et al. need each canary's coin drawn
independently with probability 1/2. A member / held-out split that draws a fixed number of
held-out units uniformly at random is the i.i.d. design *conditioned on* the count, so a test of
level ``a`` under i.i.d. coins has level at most ``a / P[Binomial(m, 1/2) = count]`` on the split
(``P[reject | C = c] <= P[reject] / P[C = c]``). ``one_run_audit(fixed_count=True)`` therefore runs
every test at ``alpha * P[Binomial(m, 1/2) = count]``: valid for a random split, at some loss of power
(about a factor ``sqrt(pi m / 2)`` in alpha for a balanced split).

Choosing (k_plus, k_minus). The guarantee holds for (k_plus, k_minus) fixed before the scores are
seen. ``best_k_audit`` tries a fixed list of K choices and divides alpha by K (Bonferroni, as
jax_privacy's default threshold strategy does over all thresholds), so its maximum stays a valid
lower bound at the stated confidence. Taking the best of several uncorrected bounds would not be.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Sequence

import numpy as np
from scipy import optimize, special, stats

__all__ = [
    "audit_p_value",
    "eps_lower_bound",
    "max_eps_lower",
    "audit_from_scores",
    "default_k_choices",
    "gradient_canary_k_choices",
    "best_k_audit",
    "simulate_gdp_scores",
    "gdp_delta",
    "gdp_epsilon",
    "eps_delta_blow_up_inverse",
    "gdp_blow_up_inverse",
    "fdp_rejects",
    "fdp_eps_lower_bound",
    "fdp_gdp_mu_lower_bound",
    "fixed_count_alpha",
    "one_run_audit",
    "units_needed",
    "detectable_epsilon",
    "power_to_refute",
    "gdp_mu_for_epsilon",
    "units_for_power",
]

_XTOL = 1e-10


def _count(value, name: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        out = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None
    if out < 0:
        raise ValueError(f"{name} must be >= 0, got {out}")
    return out


def _check_counts(m, num_guesses, num_correct=None) -> tuple[int, int, int | None]:
    m = _count(m, "m")
    r = _count(num_guesses, "num_guesses")
    if m < 1:
        raise ValueError("m (number of canaries) must be >= 1")
    if r > m:
        raise ValueError(f"num_guesses={r} exceeds the number of canaries m={m}")
    v = None
    if num_correct is not None:
        v = _count(num_correct, "num_correct")
        if v > r:
            raise ValueError(f"num_correct={v} exceeds num_guesses={r}")
    return m, r, v


def _check_delta(delta) -> float:
    if delta is None:
        raise ValueError("delta is required (use 0.0 for pure epsilon-DP)")
    d = float(delta)
    if not (0.0 <= d < 1.0):
        raise ValueError(f"delta must be in [0, 1), got {delta!r}")
    return d


def _check_confidence(confidence) -> float:
    c = float(confidence)
    if not (0.0 < c < 1.0):
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return c


def _p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The one-run p-value (module docstring); arguments already validated."""
    if v == 0:
        return 1.0
    q = float(special.expit(eps))
    # special.bdtrc(k, r, q) = P[Binomial(r, q) > k]: scipy.stats.binom.sf without its overhead.
    beta = float(special.bdtrc(v - 1, r, q))  # f(v) = P[Binomial(r, q) >= v]
    if delta == 0.0 or beta >= 1.0:
        return min(beta, 1.0)
    c = 2.0 * m * delta
    i = np.arange(1, v + 1)
    f_shift = special.bdtrc(v - i - 1, r, q)  # f(v - i), i = 1..v
    terms = np.maximum(0.0, 1.0 - c / i) * beta + (c / i) * f_shift
    return float(min(1.0, max(beta, float(np.max(terms)))))


def audit_p_value(*, m: int, num_guesses: int, num_correct: int, epsilon: float, delta: float) -> float:
    """p-value of the claim "(epsilon, delta)-DP" after ``num_correct`` of ``num_guesses`` correct guesses
    on ``m`` canaries (an upper bound on P[at least that many correct] under the claim).
    """
    m, r, v = _check_counts(m, num_guesses, num_correct)
    delta = _check_delta(delta)
    eps = float(epsilon)
    if not (eps >= 0.0 and math.isfinite(eps)):
        raise ValueError(f"epsilon must be finite and >= 0, got {epsilon!r}")
    return _p_value(m, r, v, eps, delta)


def eps_lower_bound(*, m: int, num_guesses: int, num_correct: int, delta: float,
                    confidence: float = 0.95) -> float:
    """Epsilon lower bound of the one-run audit at ``confidence`` (Steinke, Nasr, Jagielski 2023).

    The largest eps such that every claim "(eps', delta)-DP" with ``eps' <= eps`` is rejected at level
    ``alpha = 1 - confidence``; 0.0 when not even eps = 0 is rejected. Monotone in ``num_correct``;
    with ``delta = 0`` it solves ``P[Binomial(num_guesses, e^eps / (1 + e^eps)) >= num_correct] = alpha``.
    """
    m, r, v = _check_counts(m, num_guesses, num_correct)
    delta = _check_delta(delta)
    alpha = 1.0 - _check_confidence(confidence)

    def gap(eps: float) -> float:
        return _p_value(m, r, v, eps, delta) - alpha

    if v == 0 or gap(0.0) >= 0.0:
        return 0.0
    lo, hi = 0.0, 1.0
    while gap(hi) < 0.0:  # p -> 1 as eps grows (q -> 1), so this stops; expit(eps) == 1.0 past eps ~ 37
        lo, hi = hi, 2.0 * hi
    root = optimize.brentq(gap, lo, hi, xtol=_XTOL)
    # Report an eps that is itself rejected (p < alpha): the conservative side of the root.
    for step in range(1, 8):
        cand = max(lo, root - step * _XTOL)
        if gap(cand) < 0.0:
            return float(cand)
    return float(lo)


def max_eps_lower(*, m: int, num_guesses: int, delta: float, confidence: float = 0.95) -> float:
    """The bound when every guess is correct: the most this audit can certify with ``m`` canaries and
    ``num_guesses`` guesses (about 3.49 for 100 guesses at delta = 0 and 95% confidence).
    """
    m, r, _ = _check_counts(m, num_guesses)
    return _ceiling(m, r, _check_delta(delta), _check_confidence(confidence))


@functools.lru_cache(maxsize=256)
def _ceiling(m: int, r: int, delta: float, confidence: float) -> float:
    return eps_lower_bound(m=m, num_guesses=r, num_correct=r, delta=delta, confidence=confidence)


def _scores_and_membership(scores, included) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"scores must be a non-empty 1-d array, got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinity")
    inc = np.asarray(included)
    if inc.shape != s.shape:
        raise ValueError(f"included has shape {inc.shape}, scores {s.shape}")
    if inc.dtype != np.bool_:
        if not np.issubdtype(inc.dtype, np.integer) or not np.all((inc == 0) | (inc == 1)):
            raise ValueError("included must be boolean (or 0/1 integers)")
        inc = inc.astype(bool)
    return s, inc


def audit_from_scores(*, scores, included, k_plus: int, k_minus: int, delta: float,
                      confidence: float = 0.95) -> dict:
    """Run the one-run audit on canary scores with fixed ``k_plus`` / ``k_minus``.

    ``scores[i]`` is canary i's score (higher = member), ``included[i]`` whether it was trained on; the
    ``included`` coins must have been drawn independently with probability 1/2, as the theorem
    requires, and the scores computed from the trained model without looking at ``included``. Ties
    in the scores are broken by canary index (a fixed order, independent of the coins).

    Returns ``eps_lower, num_guesses, num_correct, k_plus, k_minus, m, delta, confidence`` and
    ``eps_ceiling`` (the bound had every guess been correct).
    """
    s, inc = _scores_and_membership(scores, included)
    m = s.size
    kp, km = _count(k_plus, "k_plus"), _count(k_minus, "k_minus")
    if kp + km > m:
        raise ValueError(f"k_plus + k_minus = {kp + km} exceeds the number of canaries m = {m}")
    delta = _check_delta(delta)
    confidence = _check_confidence(confidence)
    order = np.argsort(-s, kind="stable")  # descending score, ties by index
    top, bottom = order[:kp], order[m - km :]
    correct = int(np.count_nonzero(inc[top]) + np.count_nonzero(~inc[bottom]))
    r = kp + km
    eps = eps_lower_bound(m=m, num_guesses=r, num_correct=correct, delta=delta, confidence=confidence)
    return {
        "eps_lower": eps,
        "num_guesses": r,
        "num_correct": correct,
        "k_plus": kp,
        "k_minus": km,
        "m": m,
        "delta": delta,
        "confidence": confidence,
        "eps_ceiling": _ceiling(m, r, delta, confidence),
    }


def default_k_choices(m: int) -> list[tuple[int, int]]:
    """A fixed list of ``(k_plus, k_minus)``: symmetric guesses on 2%, 5%, 10%, 20%, 50%, 100% of ``m``.

    Depends on ``m`` only, never on the scores, so it may be used by ``best_k_audit``.
    """
    m = _count(m, "m")
    out: list[tuple[int, int]] = []
    for frac in (0.02, 0.05, 0.1, 0.2, 0.5, 1.0):
        r = max(2, int(round(frac * m)))
        if r > m:
            continue
        choice = ((r + 1) // 2, r // 2)
        if choice not in out:
            out.append(choice)
    return out


def gradient_canary_k_choices(m: int) -> list[tuple[int, int]]:
    """Guess families for many, cheap canaries (white-box gradient canaries): 100 to 2000 guesses (at
    most half of ``m``; ``m // 10`` when that is fewer than 100), each both symmetric and "in" only.
    Only the most extreme scores carry the signal, so the counts are absolute, not fractions of m;
    the subsampled Gaussian's likelihood ratio has a heavy right tail for included canaries (the
    steps that sampled them), so confident "in" guesses are the more accurate ones. Depends on
    ``m`` only."""
    m = _count(m, "m")
    sizes = [r for r in (100, 250, 500, 1000, 2000) if r <= m // 2] or [max(2, m // 10)]
    out: list[tuple[int, int]] = []
    for r in sizes:
        for choice in (((r + 1) // 2, r // 2), (r, 0)):
            if choice not in out:
                out.append(choice)
    return out


def best_k_audit(*, scores, included, delta: float, confidence: float = 0.95,
                 choices: Sequence[tuple[int, int]] | None = None) -> dict:
    """The best of several fixed ``(k_plus, k_minus)`` audits, Bonferroni-corrected.

    Each of the ``K = len(choices)`` audits runs at confidence ``1 - (1 - confidence) / K``; by the
    union bound the probability that *any* of them overstates epsilon is at most ``1 - confidence``,
    so the maximum is a valid lower bound at ``confidence``. ``choices`` must be fixed in advance
    (default: ``default_k_choices(m)``). Returns the best audit's dict plus ``choices_tried``,
    ``confidence_per_choice`` and ``all`` (every choice's k's, correct count and bound).
    """
    s, inc = _scores_and_membership(scores, included)
    confidence = _check_confidence(confidence)
    delta = _check_delta(delta)
    ks = list(default_k_choices(s.size) if choices is None else choices)
    if not ks:
        raise ValueError("choices must not be empty")
    per = 1.0 - (1.0 - confidence) / len(ks)
    results = [audit_from_scores(scores=s, included=inc, k_plus=kp, k_minus=km, delta=delta, confidence=per)
               for kp, km in ks]
    best = max(results, key=lambda res: res["eps_lower"])  # the first of equal bounds
    return {
        **best,
        "confidence": confidence,
        "confidence_per_choice": per,
        "choices_tried": len(ks),
        "all": [{k: res[k] for k in ("k_plus", "k_minus", "num_correct", "eps_lower")} for res in results],
    }


def simulate_gdp_scores(*, m: int, mu: float, rng) -> tuple[np.ndarray, np.ndarray]:
    """Canary scores of an exactly mu-GDP mechanism: ``(scores, included)``.

    Each canary is included with probability 1/2; its score is N(mu, 1) if included, N(0, 1) if not,
    independently. Changing one canary's inclusion shifts one coordinate's mean by mu, so the score
    vector is mu-GDP (Dong, Roth, Su 2019) and hence ``(gdp_epsilon(mu, delta), delta)``-DP for all delta.
    ``rng``: a ``numpy.random.Generator`` or a seed.
    """
    m = _count(m, "m")
    mu = float(mu)
    if not (mu >= 0.0 and math.isfinite(mu)):
        raise ValueError(f"mu must be finite and >= 0, got {mu!r}")
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    included = gen.random(m) < 0.5
    scores = gen.standard_normal(m) + mu * included
    return scores, included


def _log_gdp_delta(mu: float, eps: float) -> float:
    a = -eps / mu + mu / 2.0
    b = -eps / mu - mu / 2.0
    log_a = float(special.log_ndtr(a))
    ratio = math.exp(eps + float(special.log_ndtr(b)) - log_a)
    if ratio >= 1.0:  # only through rounding, where delta(eps) underflows anyway
        return -math.inf
    return log_a + math.log1p(-ratio)


def gdp_delta(mu: float, epsilon: float) -> float:
    """delta(eps) of mu-GDP (Dong, Roth, Su 2019, Corollary 2.13).

    ``Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)``, evaluated in log space.
    """
    mu, eps = float(mu), float(epsilon)
    if not (mu > 0.0 and math.isfinite(mu)):
        raise ValueError(f"mu must be finite and > 0, got {mu!r}")
    if not (eps >= 0.0 and math.isfinite(eps)):
        raise ValueError(f"epsilon must be finite and >= 0, got {epsilon!r}")
    return math.exp(_log_gdp_delta(mu, eps))


def gdp_epsilon(mu: float, delta: float) -> float:
    """The epsilon of mu-GDP at ``delta``: the root of ``gdp_delta(mu, eps) = delta`` (Dong, Roth, Su 2019,
    "Gaussian Differential Privacy", JRSS-B 2022, Corollary 2.13); 0.0 if ``delta >= 2 Phi(mu/2) - 1``.
    Computed in log space (as jax_privacy's ``epsilon_from_gdp``) so tiny deltas stay accurate.
    """
    mu = float(mu)
    if not (mu > 0.0 and math.isfinite(mu)):
        raise ValueError(f"mu must be finite and > 0, got {mu!r}")
    d = float(delta)
    if not (0.0 < d < 1.0):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    target = math.log(d)

    def gap(eps: float) -> float:
        return _log_gdp_delta(mu, eps) - target

    if gap(0.0) <= 0.0:
        return 0.0
    lo, hi = 0.0, 1.0
    while gap(hi) > 0.0:
        lo, hi = hi, 2.0 * hi
    if not math.isfinite(gap(hi)):  # keep brentq away from -inf: bisect down to a finite end
        while not math.isfinite(gap(hi)):
            mid = 0.5 * (lo + hi)
            if gap(mid) > 0.0:
                lo = mid
            else:
                hi = mid
    return float(optimize.brentq(gap, lo, hi, xtol=1e-12))


# ------------------------------------------------------------------------------------ f-DP analysis
def eps_delta_blow_up_inverse(epsilon, delta: float):
    """``y -> `` the smallest FPR at which an (epsilon, delta)-DP mechanism allows TPR ``y``.

    ``epsilon`` may be an array (one curve per entry, evaluated together, as ``fdp_rejects`` does)."""
    e = np.exp(np.minimum(np.asarray(epsilon, dtype=np.float64), 700.0))
    d = float(delta)

    def inverse(y):
        return np.maximum(0.0, np.maximum((y - d) / e, 1.0 - d - e * (1.0 - y)))

    return inverse


def gdp_blow_up_inverse(mu):
    """``y -> Phi(Phi^-1(y) - mu)``: the smallest FPR at which a mu-GDP mechanism allows TPR ``y``
    (``mu`` may be an array)."""
    mu = np.asarray(mu, dtype=np.float64)

    def inverse(y):
        return special.ndtr(special.ndtri(np.clip(y, 0.0, 1.0)) - mu)

    return inverse


def _fdp_rejects(m: int, r: int, v: int, inverse, alpha: float) -> np.ndarray:
    """Mahloujifar et al.'s test (module docstring), for every curve of ``inverse`` at once: True
    where ``v`` correct of ``r`` guesses on ``m`` canaries has probability below ``alpha`` under
    every mechanism with that trade-off curve."""
    probe = np.asarray(inverse(np.float64(0.5)))
    if v == 0 or r == 0:
        return np.zeros(probe.shape, dtype=bool)
    scaled = alpha * r / m
    right = np.full(probe.shape, scaled * v / r)
    wrong = np.full(probe.shape, scaled * (r - v) / r)
    for i in range(v - 1, -1, -1):
        wrong_next = np.maximum(wrong, inverse(np.minimum(right, 1.0)))  # alphabet k = 2: (k - 1) * inverse
        right = right + (i / (r - i)) * (wrong_next - wrong)
        wrong = wrong_next
    return right + wrong > r / m


def fdp_rejects(*, m: int, num_guesses: int, num_correct: int, blow_up_inverse, confidence: float) -> bool:
    """Does ``num_correct`` of ``num_guesses`` reject "the mechanism is f-DP" at ``confidence``?

    ``blow_up_inverse(y)``: the smallest FPR at which f allows TPR ``y`` (``eps_delta_blow_up_inverse``,
    ``gdp_blow_up_inverse``). Mahloujifar, Melis, Chaudhuri 2025 (arXiv:2410.22235).
    """
    m, r, v = _check_counts(m, num_guesses, num_correct)
    return bool(np.all(_fdp_rejects(m, r, v, blow_up_inverse, 1.0 - _check_confidence(confidence))))


def _largest_rejected(rejects_grid, *, upper: float, rounds: int = 2, points: int = 65) -> float:
    """Largest parameter p in [0, upper] with ``rejects_grid(p)`` True, assuming rejection is monotone
    (rejected below a point, not above): 0.0 when p = 0 is not rejected, ``upper`` when everything is.
    A grid of ``points`` values is tested at once and refined ``rounds`` times (resolution about
    ``upper / (points - 1)^rounds`` after a geometric first grid); the rejected side is returned."""
    grid = np.concatenate([[0.0], upper * np.geomspace(1e-4, 1.0, points - 1)])
    for _ in range(rounds):
        rej = rejects_grid(grid)
        if not rej[0]:
            return 0.0
        last = int(np.flatnonzero(rej)[-1]) if rej.all() else int(np.argmin(rej)) - 1
        if last == len(grid) - 1:
            return float(grid[-1])
        lo, hi = float(grid[last]), float(grid[last + 1])
        grid = np.linspace(lo, hi, points)
    rej = rejects_grid(grid)
    return float(grid[int(np.argmin(rej)) - 1]) if not rej.all() else float(grid[-1])


def fdp_eps_lower_bound(*, m: int, num_guesses: int, num_correct: int, delta: float,
                        confidence: float = 0.95) -> float:
    """Epsilon lower bound of the f-DP one-run analysis with the (eps, delta) trade-off curve: the
    largest epsilon (rejected side, to about 1e-3) whose "(eps, delta)-DP" is rejected at ``confidence``."""
    m, r, v = _check_counts(m, num_guesses, num_correct)
    delta = _check_delta(delta)
    alpha = 1.0 - _check_confidence(confidence)
    return _largest_rejected(lambda eps: _fdp_rejects(m, r, v, eps_delta_blow_up_inverse(eps, delta), alpha),
                             upper=64.0)


def fdp_gdp_mu_lower_bound(*, m: int, num_guesses: int, num_correct: int, confidence: float = 0.95) -> float:
    """The largest mu whose "mu-GDP" is rejected at ``confidence`` (Mahloujifar et al.'s empirical
    privacy with the Gaussian family); ``gdp_epsilon(mu, delta)`` turns it into an epsilon."""
    m, r, v = _check_counts(m, num_guesses, num_correct)
    alpha = 1.0 - _check_confidence(confidence)
    return _largest_rejected(lambda mu: _fdp_rejects(m, r, v, gdp_blow_up_inverse(mu), alpha), upper=40.0)


def fixed_count_alpha(*, alpha: float, m: int, included: int) -> float:
    """The level to run an i.i.d.-coin test at so that it has level ``alpha`` on a split that fixed
    ``included`` of ``m`` at random: ``alpha * P[Binomial(m, 1/2) = included]`` (module docstring)."""
    m = _count(m, "m")
    c = _count(included, "included")
    if c > m:
        raise ValueError(f"included={c} exceeds m={m}")
    return float(alpha) * float(stats.binom.pmf(c, m, 0.5))


def _gdp_eps(mu: float, delta: float) -> float:
    return gdp_epsilon(mu, delta) if mu > 0.0 and delta > 0.0 else (0.0 if mu <= 0.0 else math.inf)


def one_run_audit(*, scores, included, delta: float, confidence: float = 0.95, fixed_count: bool = False,
                  choices: Sequence[tuple[int, int]] | None = None) -> dict:
    """Every one-run analysis of canary (or member / held-out) scores, corrected for every choice made.

    Tests: Steinke et al.'s bound and the f-DP bound with the (eps, delta) curve, for each fixed
    ``(k_plus, k_minus)`` of ``choices`` (default ``default_k_choices(m)``): ``2 K`` tests, each at
    ``alpha / (2 K)`` (Bonferroni), so ``eps_lower``, their maximum, is a lower bound on epsilon at
    ``confidence``. ``ceiling``: the largest ``eps_lower`` these tests could give (every guess right).
    The GDP-family bound (``gdp_mu_lower``, ``eps_lower_gdp``, ``ceiling_gdp``) is reported beside
    them at ``alpha / K``. ``fixed_count``: the membership was a random split of fixed size, not
    independent coins; every level is multiplied by ``P[Binomial(m, 1/2) = included]``.
    """
    s, inc = _scores_and_membership(scores, included)
    delta = _check_delta(delta)
    confidence = _check_confidence(confidence)
    m = s.size
    n_in = int(inc.sum())
    alpha = 1.0 - confidence
    alpha_eff = fixed_count_alpha(alpha=alpha, m=m, included=n_in) if fixed_count else alpha
    ks = list(default_k_choices(m) if choices is None else choices)
    if not ks:
        raise ValueError("choices must not be empty")
    conf_rigorous = 1.0 - alpha_eff / (2 * len(ks))
    conf_gdp = 1.0 - alpha_eff / len(ks)
    order = np.argsort(-s, kind="stable")
    per_choice = []
    for kp, km in ks:
        kp, km = _count(kp, "k_plus"), _count(km, "k_minus")
        if kp + km > m or kp + km == 0:
            raise ValueError(f"k_plus + k_minus = {kp + km} must be in [1, m = {m}]")
        correct = int(np.count_nonzero(inc[order[:kp]]) + np.count_nonzero(~inc[order[m - km:]]))
        r = kp + km
        row = {"k_plus": kp, "k_minus": km, "num_guesses": r, "num_correct": correct}
        row["eps_lower_steinke"] = eps_lower_bound(m=m, num_guesses=r, num_correct=correct, delta=delta,
                                                   confidence=conf_rigorous)
        row["ceiling_steinke"] = _ceiling(m, r, delta, conf_rigorous)
        row["eps_lower_fdp"] = fdp_eps_lower_bound(m=m, num_guesses=r, num_correct=correct, delta=delta,
                                                   confidence=conf_rigorous)
        row["ceiling_fdp"] = _fdp_ceiling(m, r, delta, conf_rigorous)
        row["gdp_mu_lower"] = fdp_gdp_mu_lower_bound(m=m, num_guesses=r, num_correct=correct, confidence=conf_gdp)
        row["gdp_mu_ceiling"] = _gdp_ceiling(m, r, conf_gdp)
        per_choice.append(row)
    best = max(per_choice, key=lambda row: max(row["eps_lower_steinke"], row["eps_lower_fdp"]))
    mu_low = max(row["gdp_mu_lower"] for row in per_choice)
    mu_ceil = max(row["gdp_mu_ceiling"] for row in per_choice)
    gdp_delta_used = delta if delta > 0 else 1e-5
    eps_steinke = max(row["eps_lower_steinke"] for row in per_choice)
    eps_fdp = max(row["eps_lower_fdp"] for row in per_choice)
    return {
        "eps_lower": max(eps_steinke, eps_fdp),
        "ceiling": max(max(row["ceiling_steinke"], row["ceiling_fdp"]) for row in per_choice),
        "eps_lower_steinke": eps_steinke,
        "ceiling_steinke": max(row["ceiling_steinke"] for row in per_choice),
        "eps_lower_fdp": eps_fdp,
        "ceiling_fdp": max(row["ceiling_fdp"] for row in per_choice),
        "gdp_mu_lower": mu_low,
        "eps_lower_gdp": _gdp_eps(mu_low, gdp_delta_used),
        "ceiling_gdp": _gdp_eps(mu_ceil, gdp_delta_used),
        "k_plus": best["k_plus"],
        "k_minus": best["k_minus"],
        "num_guesses": best["num_guesses"],
        "num_correct": best["num_correct"],
        "m": m,
        "included": n_in,
        "delta": delta,
        "confidence": confidence,
        "fixed_count": bool(fixed_count),
        "alpha_effective": alpha_eff,
        "choices_tried": len(ks),
        "confidence_per_test": conf_rigorous,
        "per_choice": per_choice,
    }


def gdp_mu_for_epsilon(epsilon: float, delta: float) -> float:
    """The mu whose mu-GDP curve is (``epsilon``, ``delta``)-DP (the inverse of :func:`gdp_epsilon` in mu)."""
    eps, d = float(epsilon), float(delta)
    if not (eps > 0.0 and math.isfinite(eps)):
        raise ValueError(f"epsilon must be finite and > 0, got {epsilon!r}")
    lo, hi = 1e-6, 1.0
    while gdp_epsilon(hi, d) < eps:
        lo, hi = hi, 2.0 * hi
    return float(optimize.brentq(lambda mu: gdp_epsilon(mu, d) - eps, lo, hi, xtol=1e-10))


# ------------------------------------------------------------------------------------ power
# A verdict's PASS is worth something only if the test would have refuted a real leak. Power is measured
# against the *optimal* attacker of the mechanism family DP-SGD belongs to: a mu-GDP mechanism whose
# (eps, delta) curve has the true epsilon, scored by its likelihood ratio (N(mu, 1) in, N(0, 1) out; the
# Neyman-Pearson test, so no real attack does better against that mechanism). No published auditing code
# reports power (jax_privacy and PrivacyGuard return the bound only); Steinke et al.'s Figure 2 and
# Mahloujifar et al.'s experiments simulate exactly this attacker to show how far below the truth one-run
# bounds sit, which is the quantity a verdict needs.
#
# Computation. Each of one_run_audit's 2K tests rejects the claim iff its correct-guess count reaches a
# threshold (both tests are monotone in the count, module docstring), so a test's rejection region is
# "some choice c has v_c >= t_c": the thresholds are found once (bisection on v) and each simulated trial only
# sorts scores and counts. Exactly one_run_audit's decision on the same scores (a test checks it against the
# full analysis), at the cost of a sort: power for 10^5 units takes seconds, not hours.

def _rejects_claim(m: int, r: int, v: int, claim: float, delta: float, confidence: float) -> bool:
    """Would one choice of one_run_audit (both tests, each at ``confidence``) put its bound above ``claim``?"""
    if v == 0:
        return False
    if _p_value(m, r, v, claim, delta) < 1.0 - confidence:
        return True
    return bool(_fdp_rejects(m, r, v, eps_delta_blow_up_inverse(claim, delta), 1.0 - confidence)[()])


@functools.lru_cache(maxsize=4096)
def _reject_threshold(m: int, r: int, claim: float, delta: float, confidence: float) -> int:
    """Fewest correct of ``r`` guesses on ``m`` that make one choice of one_run_audit refute ``claim``
    (``r + 1``: none does)."""
    if not _rejects_claim(m, r, r, claim, delta, confidence):
        return r + 1
    lo, hi = 0, r  # lo does not reject, hi does
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _rejects_claim(m, r, mid, claim, delta, confidence):
            hi = mid
        else:
            lo = mid
    return hi


def _audit_level(m: int, included: int | None, confidence: float, fixed_count: bool, n_choices: int) -> float:
    """The confidence each of one_run_audit's ``2 K`` tests runs at (its ``confidence_per_test``)."""
    alpha = 1.0 - confidence
    if fixed_count:
        alpha = fixed_count_alpha(alpha=alpha, m=m, included=int(included))
    return 1.0 - alpha / (2 * n_choices)


class _Refuter:
    """one_run_audit's decision "eps_lower > claim" for one design (sizes, level, choices), as thresholds on the
    correct-guess counts: ``refutes(scores, included)`` sorts and counts (section comment)."""

    def __init__(self, *, claimed_epsilon: float, m: int, included: int | None, delta: float, confidence: float,
                 fixed_count: bool, choices: Sequence[tuple[int, int]] | None):
        self.m = _count(m, "m")
        ks = list(default_k_choices(self.m) if choices is None else choices)
        level = _audit_level(self.m, included, confidence, fixed_count, len(ks))
        claim, delta = float(claimed_epsilon), _check_delta(delta)
        self.thresholds = np.array([_reject_threshold(self.m, kp + km, claim, delta, level) for kp, km in ks])
        self.k_plus = np.array([kp for kp, _ in ks])
        self.k_minus = np.array([km for _, km in ks])
        self.possible = bool(np.any(self.thresholds <= self.k_plus + self.k_minus))

    def refutes(self, scores, included) -> bool:
        inc = np.asarray(included, dtype=bool)
        ranked = inc[np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")]
        top = np.concatenate([[0], np.cumsum(ranked)])  # members among the k highest
        out_low = np.concatenate([[0], np.cumsum(~ranked[::-1])])  # non-members among the k lowest
        return bool(np.any(top[self.k_plus] + out_low[self.k_minus] >= self.thresholds))


def power_to_refute(*, true_epsilon: float, claimed_epsilon: float, m: int, included: int | None, delta: float,
                    confidence: float, fixed_count: bool, choices: Sequence[tuple[int, int]] | None = None,
                    trials: int = 200, seed: int = 0) -> float:
    """How often :func:`one_run_audit` at these sizes, this ``confidence`` and these ``choices`` refutes
    ``claimed_epsilon`` (``eps_lower > claimed_epsilon``) when the mechanism is mu-GDP with true epsilon
    ``true_epsilon`` at ``delta`` and the attacker is optimal (scores N(mu, 1) in, N(0, 1) out; section comment).

    Membership: ``included`` of ``m`` by a uniformly random split when ``fixed_count`` (member / held-out
    units), else a fair coin per canary. ``confidence``: the level the real test ran at (already divided among
    the attacks it was one of). Seeded (deterministic); the estimate's standard error is at most
    ``0.5 / sqrt(trials)``."""
    test = _Refuter(claimed_epsilon=claimed_epsilon, m=m, included=included, delta=delta, confidence=confidence,
                    fixed_count=fixed_count, choices=choices)
    if not test.possible:  # not even every guess right refutes the claim
        return 0.0
    m = test.m
    mu = gdp_mu_for_epsilon(true_epsilon, delta)
    rng = np.random.default_rng([int(seed), 0x90E7])
    hits = 0
    for _ in range(int(trials)):
        if fixed_count:
            inc = np.zeros(m, dtype=bool)
            inc[rng.permutation(m)[: int(included)]] = True
        else:
            inc = rng.random(m) < 0.5
        hits += test.refutes(rng.standard_normal(m) + mu * inc, inc)
    return hits / int(trials)


#: multiples of the claim at which the detectable epsilon is searched (the first with enough power is reported)
DETECTABLE_GRID = (1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)
#: the power a PASS asks of a test against twice the claim
TARGET_POWER = 0.8


def detectable_epsilon(*, claimed_epsilon: float, m: int, included: int | None, delta: float, confidence: float,
                       fixed_count: bool, choices: Sequence[tuple[int, int]] | None = None,
                       power: float = TARGET_POWER, trials: int = 200, seed: int = 0) -> dict:
    """The smallest true epsilon (on ``claim x DETECTABLE_GRID``) that the optimal attacker refutes with at least
    ``power`` (:func:`power_to_refute`): a PASS means something only when this is at most twice the claim.

    Returns ``detectable_epsilon`` (None when even 16x the claim is refuted less often than ``power``: the test
    cannot see any leak that matters), ``power_at_2x`` (the power against twice the claim), ``power`` (the
    target) and ``trials``."""
    claim = float(claimed_epsilon)
    kw = dict(claimed_epsilon=claim, m=int(m), included=included, delta=delta, confidence=confidence,
              fixed_count=fixed_count, choices=choices, trials=trials, seed=seed)
    found, at_2x = None, None
    for factor in DETECTABLE_GRID:
        pw = power_to_refute(true_epsilon=claim * factor, **kw)
        if factor == 2.0:
            at_2x = pw
        if pw >= power:
            found = claim * factor
            break
    if at_2x is None:  # found below 2x: power only grows with epsilon
        at_2x = power_to_refute(true_epsilon=2.0 * claim, **kw)
    return {"detectable_epsilon": found, "power_at_2x": at_2x, "power": float(power), "trials": int(trials)}


def units_for_power(*, claimed_epsilon: float, delta: float, confidence: float, fixed_count: bool,
                    choices_for=default_k_choices, power: float = TARGET_POWER, start: int = 64,
                    limit: int = 1 << 17, trials: int = 100, seed: int = 0) -> int | None:
    """Fewest canaries (coins) or balanced member + held-out units (``fixed_count``) with which the optimal
    attacker refutes ``claimed_epsilon`` with ``power`` when the truth is twice the claim: what "to detect 2x
    the claim" costs. ``choices_for(m)`` gives the guess families at m (the probe's own rule). Doubling from
    ``start``, then bisection to 10%; None beyond ``limit``: one-run analyses need more units than that, or
    cannot reach the claim at all (with delta > 0 the 2 m delta term grows with m)."""
    claim = float(claimed_epsilon)

    def enough(m: int) -> bool:
        return power_to_refute(true_epsilon=2.0 * claim, claimed_epsilon=claim, m=m,
                               included=m // 2 if fixed_count else None, delta=delta, confidence=confidence,
                               fixed_count=fixed_count, choices=choices_for(m), trials=trials, seed=seed) >= power

    m = max(2, int(start))
    while not enough(m):
        m *= 2
        if m > limit:
            return None
    lo, hi = m // 2, m
    while hi - lo > max(1, hi // 10):  # advice, not a bound
        mid = (lo + hi) // 2
        if enough(mid):
            hi = mid
        else:
            lo = mid
    return int(hi)


@functools.lru_cache(maxsize=256)
def _fdp_ceiling(m: int, r: int, delta: float, confidence: float) -> float:
    return fdp_eps_lower_bound(m=m, num_guesses=r, num_correct=r, delta=delta, confidence=confidence)


@functools.lru_cache(maxsize=256)
def _gdp_ceiling(m: int, r: int, confidence: float) -> float:
    return fdp_gdp_mu_lower_bound(m=m, num_guesses=r, num_correct=r, confidence=confidence)


def units_needed(*, claimed_epsilon: float, delta: float, confidence: float = 0.95, fixed_count: bool = False,
                 choices_tried: int = 6, limit: int = 1 << 18) -> int | None:
    """Fewest canaries (or balanced member + held-out units) for which a perfect attack could reject
    ``claimed_epsilon``: the smallest m whose all-correct f-DP (eps, delta) test, at the Bonferroni
    level of ``one_run_audit`` (and its fixed-count correction for a balanced split), rejects the
    claim. None when no m up to ``limit`` can (with delta > 0 the 2 m delta term eventually wins).
    A perfect attack is an idealisation: a real one needs more.
    """
    claim = float(claimed_epsilon)
    delta = _check_delta(delta)
    alpha = 1.0 - _check_confidence(confidence)

    e = math.exp(min(claim, 700.0))

    def can_reject(m: int) -> bool:  # the all-correct recursion of _fdp_rejects, scalar (fast for large m)
        a = fixed_count_alpha(alpha=alpha, m=m, included=m // 2) if fixed_count else alpha
        scaled = a / (2 * choices_tried)  # r = m: alpha * r / m = alpha
        right, wrong = scaled, 0.0
        for i in range(m - 1, -1, -1):
            y = min(right, 1.0)
            wrong_next = max(wrong, (y - delta) / e, 1.0 - delta - e * (1.0 - y))
            right += (i / (m - i)) * (wrong_next - wrong)
            wrong = wrong_next
        return right + wrong > 1.0

    m = 2
    while not can_reject(m):
        m *= 2
        if m > limit:
            return None
    lo, hi = m // 2, m
    while hi - lo > max(1, hi // 50):  # to 2%: this is advice, not a bound
        mid = (lo + hi) // 2
        if can_reject(mid):
            hi = mid
        else:
            lo = mid
    return int(hi)
