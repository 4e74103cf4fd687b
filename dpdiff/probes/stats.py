"""Membership-inference statistics: AUC, TPR at low FPR, bootstrap intervals, the DP consistency check.

Scores are "higher = member". Following Carlini et al. 2022 ("Membership Inference Attacks From
First Principles", IEEE S&P), an attack is judged by its TPR at a low FPR rather than by AUC or
accuracy, with the threshold set so that the FPR does not exceed the target (conservative). With
``n0`` non-members an FPR below ``1 / n0`` cannot be told from 0: such points are reported as not
estimable instead of as a misleading number.

``dp_consistency`` checks an observed (FPR, TPR) against the privacy region of (eps, delta)-DP,
i.e. the hypothesis-testing view of DP (Kairouz, Oh, Viswanath 2015, "The Composition Theorem for
Differential Privacy"; Wasserman & Zhou 2010): every test of "member" vs "non-member"
satisfies ``TPR <= e^eps FPR + delta`` and ``1 - FPR <= e^eps (1 - TPR) + delta``. It flags a
violation only if it survives sampling error: Clopper-Pearson one-sided bounds (a lower bound on TPR,
an upper bound on FPR, each at level ``(1 - confidence) / 2``, so jointly at ``confidence``), as in
jax_privacy's ``epsilon_clopper_pearson`` (``jax_privacy/auditing.py``). The DP bound applies to
rates averaged over the randomness of training and of a random member / non-member split of i.i.d.
data; a threshold or attack chosen after looking at the results makes the check optimistic.

Small samples. An AUC from a handful of non-members is noise: ``mia_summary`` reports it as not
estimable below ``min_nonmembers`` (AUC ``None`` with a reason), and its percentile bootstrap
interval only from that size on (a bootstrap of 2 non-members gives [1.0, 1.0] for a perfect
ordering). What stays valid at any size is the exact permutation test of "members and non-members
have the same score distribution" (``auc_permutation_p_value``: every relabelling enumerated when
few, else a Monte-Carlo permutation test, via ``scipy.stats.permutation_test``): 2 members and 2
non-members ordered perfectly give p = 1/6. The DP check that replaces pointwise intervals is the
one-run analysis of the member / held-out split (``split_dp_check``; ``dpdiff.probes.audit``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats

__all__ = [
    "roc_auc",
    "tpr_at_fpr",
    "bootstrap_ci",
    "mia_summary",
    "clopper_pearson",
    "dp_consistency",
    "min_nonmembers_for_fpr",
    "auc_permutation_p_value",
    "split_dp_check",
    "DEFAULT_MIN_NONMEMBERS",
    "roc_points",
]

DEFAULT_MIN_NONMEMBERS = 20

_FLOOR_TOL = 1e-9  # fpr * n computed in floating point: 0.01 * 300 must allow 3 false positives


def _scores(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{name}: expected a non-empty 1-d array of scores, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: scores contain NaN or infinity")
    return a


def _check_rate(x, name: str) -> float:
    v = float(x)
    if not (0.0 <= v <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {x!r}")
    return v


def _allowed_false_positives(fpr: float, n0: int) -> int:
    return int(math.floor(fpr * n0 + _FLOOR_TOL))


def min_nonmembers_for_fpr(fpr: float) -> int:
    """Fewest non-members for which an FPR of ``fpr`` is resolvable (one false positive allowed)."""
    fpr = _check_rate(fpr, "fpr")
    if fpr == 0.0:
        raise ValueError("an FPR of 0 is never estimable from a finite sample")
    return int(math.ceil(1.0 / fpr - _FLOOR_TOL))


def roc_points(scores_members, scores_nonmembers, *, max_points: int = 400) -> dict:
    """The empirical ROC curve (scikit-learn's ``roc_curve``, collinear points dropped), thinned to at most
    ``max_points`` corners kept evenly along the curve (the first and last always), for a plot: ``fpr``,
    ``tpr`` lists of rates (no scores, no identities)."""
    from sklearn.metrics import roc_curve

    pos, neg = _scores(scores_members, "members"), _scores(scores_nonmembers, "nonmembers")
    fpr, tpr, _ = roc_curve(np.r_[np.ones(pos.size), np.zeros(neg.size)], np.r_[pos, neg], drop_intermediate=True)
    if fpr.size > max_points:
        keep = np.unique(np.r_[np.linspace(0, fpr.size - 1, max_points).round().astype(int), fpr.size - 1])
        fpr, tpr = fpr[keep], tpr[keep]
    return {"fpr": [float(x) for x in fpr], "tpr": [float(x) for x in tpr]}


def roc_auc(scores_members, scores_nonmembers) -> float:
    """Area under the ROC curve: the Mann-Whitney U statistic over ``n1 * n0`` (ties count 1/2)."""
    pos = _scores(scores_members, "scores_members")
    neg = _scores(scores_nonmembers, "scores_nonmembers")
    n1, n0 = pos.size, neg.size
    ranks = stats.rankdata(np.concatenate([pos, neg]))  # average ranks: a tie adds 1/2
    u = float(np.sum(ranks[:n1])) - n1 * (n1 + 1) / 2.0
    return u / (n1 * n0)


def tpr_at_fpr(scores_members, scores_nonmembers, *, fpr: float) -> dict:
    """TPR of the rule "member iff score > threshold" at the threshold with FPR <= ``fpr``, the best such.

    ``threshold`` is the ``(k+1)``-th largest non-member score with ``k = floor(fpr * n0)`` false
    positives allowed (``None``: every score counts as member, when ``k >= n0``). Ties at the threshold
    go to "non-member", so the achieved FPR never exceeds the target. Returns ``tpr, fpr, threshold,
    true_positives, n_members, false_positives, n_nonmembers, target_fpr, estimable`` (``estimable``:
    ``n0 >= 1 / fpr``, else even one false positive overshoots the target).
    """
    pos = _scores(scores_members, "scores_members")
    neg = _scores(scores_nonmembers, "scores_nonmembers")
    target = _check_rate(fpr, "fpr")
    n1, n0 = pos.size, neg.size
    k = _allowed_false_positives(target, n0)
    if k >= n0:
        threshold = None
        tp, fp = n1, n0
    else:
        thr = float(np.sort(neg)[::-1][k])
        threshold = thr
        tp = int(np.count_nonzero(pos > thr))
        fp = int(np.count_nonzero(neg > thr))
    return {
        "target_fpr": target,
        "tpr": tp / n1,
        "fpr": fp / n0,
        "threshold": threshold,
        "true_positives": tp,
        "n_members": n1,
        "false_positives": fp,
        "n_nonmembers": n0,
        "estimable": bool(target > 0.0 and n0 * target >= 1.0 - _FLOOR_TOL),
    }


def _rng(rng) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _check_boot(n_boot: int, alpha: float) -> tuple[int, float]:
    if isinstance(n_boot, bool) or int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    a = float(alpha)
    if not (0.0 < a < 1.0):
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    return int(n_boot), a


def _percentiles(values: np.ndarray, alpha: float) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        raise ValueError("the statistic was not finite on any bootstrap resample")
    lo, hi = np.quantile(finite, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi)


def bootstrap_ci(fn: Callable[[np.ndarray, np.ndarray], float], members, nonmembers, *, n_boot: int = 1000,
                 alpha: float = 0.05, rng) -> tuple[float, float]:
    """Percentile bootstrap ``(1 - alpha)`` interval of ``fn(members, nonmembers)``.

    Members and non-members are resampled independently, with replacement, at their own sizes.
    ``rng``: a ``numpy.random.Generator`` or a seed.
    """
    pos = _scores(members, "members")
    neg = _scores(nonmembers, "nonmembers")
    n_boot, alpha = _check_boot(n_boot, alpha)
    gen = _rng(rng)
    values = np.empty(n_boot)
    for b in range(n_boot):
        values[b] = fn(pos[gen.integers(0, pos.size, pos.size)], neg[gen.integers(0, neg.size, neg.size)])
    return _percentiles(values, alpha)


def clopper_pearson(successes: int, trials: int, *, alpha: float) -> tuple[float, float]:
    """One-sided Clopper-Pearson bounds ``(lower, upper)``, each holding with probability ``>= 1 - alpha``.

    Together they form the exact two-sided ``1 - 2 alpha`` interval.
    """
    k, n = int(successes), int(trials)
    if n < 1 or not (0 <= k <= n):
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1, got {k} of {n}")
    a = float(alpha)
    if not (0.0 < a < 1.0):
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    lower = 0.0 if k == 0 else float(stats.beta.ppf(a, k, n - k + 1))
    upper = 1.0 if k == n else float(stats.beta.ppf(1.0 - a, k + 1, n - k))
    return lower, upper


def _auc_rows(x: np.ndarray, n1: int) -> np.ndarray:
    """AUC of each resample along the last axis, the first ``n1`` entries being the members."""
    ranks = stats.rankdata(x, axis=-1)
    n0 = x.shape[-1] - n1
    return (ranks[..., :n1].sum(axis=-1) - n1 * (n1 + 1) / 2.0) / (n1 * n0)


def auc_permutation_p_value(members, nonmembers, *, n_resamples: int = 1999, seed: int = 0) -> float:
    """One-sided p-value of the AUC under "membership does not change the score distribution".

    ``scipy.stats.permutation_test`` over relabellings of the pooled scores (``independent``): exact
    (every relabelling) when there are at most ``n_resamples`` of them, else a Monte-Carlo test with
    ``n_resamples`` draws (its p-value ``(b + 1) / (n + 1)`` is itself valid). Valid at any sample size.
    """
    pos = _scores(members, "members")
    neg = _scores(nonmembers, "nonmembers")

    def statistic(a, b, axis):
        return _auc_rows(np.concatenate([a, b], axis=axis), a.shape[axis])

    res = stats.permutation_test((pos, neg), statistic, permutation_type="independent", vectorized=True,
                                 alternative="greater", n_resamples=int(n_resamples),
                                 random_state=np.random.default_rng(seed))
    return float(res.pvalue)


def mia_summary(members, nonmembers, *, fprs: Sequence[float] = (0.01, 0.001), n_boot: int = 1000,
                seed: int = 0, alpha: float = 0.05, min_nonmembers: int = DEFAULT_MIN_NONMEMBERS) -> dict:
    """AUC and TPR at each FPR in ``fprs``, with ``1 - alpha`` percentile-bootstrap intervals.

    ``tpr_at_fpr`` maps ``f"{fpr:g}"`` (``"0.01"``, ``"0.001"``) to the ``tpr_at_fpr`` fields plus
    ``tpr_ci`` (bootstrap: members and non-members resampled, the threshold re-chosen each time) and
    ``tpr_ci_clopper_pearson`` (exact, given the threshold). When ``n0 < 1 / fpr`` the entry has
    ``tpr = None``, ``estimable = False`` and ``reason``: a TPR "at 0.1% FPR" from 200 non-members is
    a TPR at 0 false positives, not at 0.1%.
    """
    pos = _scores(members, "members")
    neg = _scores(nonmembers, "nonmembers")
    n_boot, alpha = _check_boot(n_boot, alpha)
    n1, n0 = pos.size, neg.size
    rng = np.random.default_rng(seed)
    boot_pos = pos[rng.integers(0, n1, size=(n_boot, n1))]
    boot_neg = neg[rng.integers(0, n0, size=(n_boot, n0))]

    # AUC of every resample at once: average ranks within each row.
    ranks = stats.rankdata(np.concatenate([boot_pos, boot_neg], axis=1), axis=1)
    boot_auc = (ranks[:, :n1].sum(axis=1) - n1 * (n1 + 1) / 2.0) / (n1 * n0)
    observed = roc_auc(pos, neg)
    estimable = min(n0, n1) >= int(min_nonmembers)
    out: dict = {
        "auc": observed if estimable else None,
        "auc_ci": list(_percentiles(boot_auc, alpha)) if estimable else None,
        "auc_observed": observed,
        "auc_estimable": estimable,
        "auc_reason": None if estimable else (
            f"not estimable: {min(n0, n1)} {'non-members' if n0 <= n1 else 'members'}, fewer than "
            f"{int(min_nonmembers)} (probes.mia.min_nonmembers); the permutation p-value still applies"),
        "auc_p_value": auc_permutation_p_value(pos, neg, seed=seed),
        "n_members": n1,
        "n_nonmembers": n0,
        "confidence": 1.0 - alpha,
        "n_boot": n_boot,
        "tpr_at_fpr": {},
    }
    neg_desc = np.sort(boot_neg, axis=1)[:, ::-1]
    for f in fprs:
        point = tpr_at_fpr(pos, neg, fpr=f)
        key = f"{point['target_fpr']:g}"
        if not point["estimable"]:
            if point["target_fpr"] > 0:
                need = min_nonmembers_for_fpr(point["target_fpr"])
                reason = f"not estimable: an FPR of {key} needs at least {need} non-members, have {n0}"
            else:
                reason = "not estimable: an FPR of 0 cannot be resolved from a finite sample"
            point.update(tpr=None, tpr_ci=None, tpr_ci_clopper_pearson=None, reason=reason)
            out["tpr_at_fpr"][key] = point
            continue
        k = _allowed_false_positives(point["target_fpr"], n0)
        if k >= n0:
            boot_tpr = np.ones(n_boot)
        else:
            thr = neg_desc[:, k]
            boot_tpr = np.count_nonzero(boot_pos > thr[:, None], axis=1) / n1
        point["tpr_ci"] = list(_percentiles(boot_tpr, alpha))
        cp = clopper_pearson(point["true_positives"], n1, alpha=alpha / 2.0)
        point["tpr_ci_clopper_pearson"] = list(cp)
        out["tpr_at_fpr"][key] = point
    return out


def _tpr_bound(fpr: float, epsilon: float, delta: float) -> float:
    """Largest TPR at FPR ``fpr`` inside the (epsilon, delta)-DP privacy region (Kairouz et al. 2015)."""
    if math.isinf(epsilon):
        return 1.0
    e = math.exp(min(epsilon, 700.0))
    return max(0.0, min(1.0, e * fpr + delta, 1.0 - (1.0 - delta - fpr) / e))


def _counts(rate: float, n, name: str) -> int:
    n = int(n)
    if n < 1:
        raise ValueError(f"n_{name} must be >= 1, got {n}")
    k = int(round(rate * n))
    if abs(k / n - rate) > 1e-9:
        raise ValueError(f"{name} rate {rate} is not a count out of {n}")
    return k


def dp_consistency(*, tpr: float, fpr: float, epsilon: float, delta: float, n_members: int | None = None,
                   n_nonmembers: int | None = None, confidence: float = 0.95) -> dict:
    """Is an observed membership-inference point (FPR, TPR) possible under (epsilon, delta)-DP?

    ``tpr_bound`` is the largest TPR at the observed FPR in the privacy region,
    ``min(1, e^eps FPR + delta, 1 - e^-eps (1 - delta - FPR))`` (the first term is the familiar
    ``TPR <= e^eps FPR + delta``; the second binds only at large FPR). ``point_violated`` compares the
    raw point. With the counts behind the rates (``n_members``, ``n_nonmembers``), ``violated`` is
    True only if the Clopper-Pearson lower bound on TPR exceeds the bound evaluated at the upper
    bound on FPR (each one-sided at ``(1 - confidence) / 2``): a DP mechanism is flagged with
    probability at most ``1 - confidence``. Without counts ``violated`` is None (no confidence
    statement is possible). ``eps_lower_from_point`` is the epsilon this point certifies at
    ``confidence`` (0 when none), as jax_privacy's Clopper-Pearson epsilon at a fixed threshold.
    """
    tpr = _check_rate(tpr, "tpr")
    fpr = _check_rate(fpr, "fpr")
    if epsilon is None or delta is None:
        raise ValueError("epsilon and delta are both required")
    eps = float(epsilon)
    if not eps >= 0.0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")
    delta = float(delta)
    if not (0.0 <= delta < 1.0):
        raise ValueError(f"delta must be in [0, 1), got {delta!r}")
    conf = float(confidence)
    if not (0.0 < conf < 1.0):
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    bound = _tpr_bound(fpr, eps, delta)
    out = {
        "epsilon": eps,
        "delta": delta,
        "tpr": tpr,
        "fpr": fpr,
        "tpr_bound": bound,
        "point_violated": bool(tpr > bound + 1e-12),
        "confidence": conf,
        "tpr_lower": None,
        "fpr_upper": None,
        "conservative_tpr_bound": None,
        "violated": None,
        "eps_lower_from_point": None,
    }
    if n_members is None or n_nonmembers is None:
        return out
    tp = _counts(tpr, n_members, "members")
    fp = _counts(fpr, n_nonmembers, "nonmembers")
    a = (1.0 - conf) / 2.0
    tpr_lo, _ = clopper_pearson(tp, int(n_members), alpha=a)
    _, fpr_hi = clopper_pearson(fp, int(n_nonmembers), alpha=a)
    cons = _tpr_bound(fpr_hi, eps, delta)
    candidates = [0.0]
    if tpr_lo > delta and fpr_hi > 0.0:
        candidates.append(math.log((tpr_lo - delta) / fpr_hi))
    if 1.0 - fpr_hi > delta and tpr_lo < 1.0:
        candidates.append(math.log((1.0 - fpr_hi - delta) / (1.0 - tpr_lo)))
    out.update(tpr_lower=tpr_lo, fpr_upper=fpr_hi, conservative_tpr_bound=cons,
               violated=bool(tpr_lo > cons + 1e-12), eps_lower_from_point=max(candidates))
    return out


def split_dp_check(*, scores_by_attack: dict, delta: float, confidence: float = 0.95,
                   choices=None, seed: int = 0) -> dict:
    """The DP check of membership inference as a one-run audit of the member / held-out split.

    ``scores_by_attack[name] = (member_scores, nonmember_scores)``, the same units in the same order
    for every attack, "higher = member". The held-out units were drawn at random with a fixed count,
    so the split is a fixed-count version of the canary coins of Steinke et al. 2023: each attack's
    scores go through ``dpdiff.probes.audit.one_run_audit(fixed_count=True)`` at
    ``1 - (1 - confidence) / A`` for ``A`` attacks (Bonferroni over attacks; within an attack over its
    ``(k_plus, k_minus)`` choices and analyses), so the largest bound over attacks is a valid epsilon
    lower bound at ``confidence``. This needs no assumption of independent trials: the only
    randomness used is the split. Returns ``eps_lower, ceiling, eps_lower_steinke, eps_lower_fdp,
    eps_lower_gdp, best_attack, confidence, confidence_per_attack, attacks`` (each attack's audit).
    """
    from dpdiff.probes.audit import one_run_audit

    if not scores_by_attack:
        raise ValueError("scores_by_attack is empty")
    conf = float(confidence)
    if not (0.0 < conf < 1.0):
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    per_attack = 1.0 - (1.0 - conf) / len(scores_by_attack)
    sizes = {(len(m), len(n)) for m, n in scores_by_attack.values()}
    if len(sizes) != 1:
        raise ValueError(f"every attack must score the same units, got sizes {sorted(sizes)}")
    attacks = {}
    n_units = sum(next(iter(sizes)))
    # Units in a seeded order that does not depend on membership: ties in the scores are broken by
    # position, and "members first" would turn a tie into correct guesses.
    order = np.random.default_rng(seed).permutation(n_units)
    for name, (mem, non) in scores_by_attack.items():
        pos, neg = _scores(mem, f"{name} members"), _scores(non, f"{name} non-members")
        scores = np.concatenate([pos, neg])[order]
        included = np.r_[np.ones(pos.size, bool), np.zeros(neg.size, bool)][order]
        res = one_run_audit(scores=scores, included=included, delta=delta, confidence=per_attack, fixed_count=True,
                            choices=choices)
        res.pop("per_choice", None)
        attacks[name] = res
    best = max(attacks, key=lambda k: attacks[k]["eps_lower"])
    top = attacks[best]
    return {
        "eps_lower": top["eps_lower"],
        "ceiling": max(a["ceiling"] for a in attacks.values()),
        "eps_lower_steinke": max(a["eps_lower_steinke"] for a in attacks.values()),
        "eps_lower_fdp": max(a["eps_lower_fdp"] for a in attacks.values()),
        "eps_lower_gdp": max(a["eps_lower_gdp"] for a in attacks.values()),
        "best_attack": best,
        "confidence": conf,
        "confidence_per_attack": per_attack,
        "choices_tried": top["choices_tried"],
        "units": top["m"],
        "attacks": attacks,
    }
