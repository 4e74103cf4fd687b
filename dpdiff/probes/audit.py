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
from scipy import optimize, special

__all__ = [
    "audit_p_value",
    "eps_lower_bound",
    "max_eps_lower",
    "audit_from_scores",
    "default_k_choices",
    "best_k_audit",
    "simulate_gdp_scores",
    "gdp_delta",
    "gdp_epsilon",
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
