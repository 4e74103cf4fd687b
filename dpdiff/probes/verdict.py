"""Three-way probe verdicts: PASS, FAIL or INCONCLUSIVE, each with the numbers behind it.

A probe turns what it measured into an epsilon *lower bound* at a stated confidence: with
probability at least ``confidence`` the mechanism's true epsilon is at least ``eps_lower``. Its
*ceiling* is the largest lower bound the same test could have produced with its sample sizes
(every guess right). The claimed epsilon is the accountant's upper bound. Then:

* FAIL (red): ``eps_lower > claimed``. The claim is rejected at level ``1 - confidence``: the
  implementation or its accounting leaks more than it says. A FAIL needs no further condition;
  what blocks a PASS (a weak probe) cannot make a rejection invalid.
* INCONCLUSIVE (amber): no rejection, and the test could not have rejected: its ceiling is at or
  below the claim, or a blocker says the probe could not see a leak (e.g. the base VAE cannot
  reconstruct the images within the extraction threshold). ``to_conclude`` says what would help.
* PASS (green): no rejection, no blocker, and the test has *power*: its ``detectable_epsilon``, the
  smallest true epsilon that the optimal attacker (a Gaussian-DP mechanism scored by its likelihood ratio,
  ``dpdiff.probes.audit.detectable_epsilon``) refutes with at least 80% probability at the test's sizes,
  corrections and confidence, is at most twice the claim. A leak at twice the claim would have shown most of
  the time; real attacks are weaker, so a PASS is a statement about the test's reach, never a certificate.
  A test whose ceiling merely exceeds the claim is not enough (256 + 256 units at claim 1: ceiling 3.9, yet a
  true epsilon of 4 is refuted in no simulated trial): INCONCLUSIVE, with the epsilon it does detect.

Without a DP claim (a non-private run) the question is whether anything leaks at all: FAIL when
``eps_lower > 0`` (leakage demonstrated), otherwise INCONCLUSIVE; never PASS, because no
guarantee exists that a green could stand for.

One run, many tests. Every probe that runs, and every re-run of the probes on the same run dir (``dpdiff
probe``), is one more chance of a false FAIL. ``attempt_alpha`` gives attempt j the error rate ``alpha 6 /
(pi^2 j^2)`` (summing to ``alpha = 1 - probes.confidence`` over any number of attempts), split evenly over
the probes that run in it; ``overall_verdict`` combines them, earlier attempts' FAILs included.

Every verdict can come out either way: a test whose ceiling is below the claim is INCONCLUSIVE,
never PASS. This is the hypothesis-testing reading of DP auditing (Jagielski, Ullman, Oprea 2020;
Nasr et al. 2021; Steinke, Nasr, Jagielski 2023): a lower bound below the claim confirms nothing
unless the test was able to exceed it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = ["PASS", "FAIL", "INCONCLUSIVE", "VERDICTS", "COLOURS", "three_way_verdict", "verdict_fields",
           "verdict_line", "verdict_sentence", "summary_lines", "attempt_alpha", "overall_verdict", "PROBES"]

PASS, FAIL, INCONCLUSIVE = "PASS", "FAIL", "INCONCLUSIVE"
VERDICTS = (PASS, FAIL, INCONCLUSIVE)
COLOURS = {PASS: "green", FAIL: "red", INCONCLUSIVE: "amber"}


def _num(v, name: str, *, allow_none: bool = True) -> float | None:
    if v is None:
        if allow_none:
            return None
        raise ValueError(f"{name} is required")
    x = float(v)
    if math.isnan(x) or x < 0:
        raise ValueError(f"{name} must be >= 0, got {v!r}")
    return x


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


#: the probe sections of probes.json, in the order they run
PROBES = ("extraction", "mia", "audit")


def attempt_alpha(family_alpha: float, attempt: int) -> float:
    """The error rate attempt ``attempt`` (1, 2, ...) of the probes on one run may spend: ``family_alpha * 6 /
    (pi^2 attempt^2)``. The series sums to ``family_alpha`` over any number of attempts, so every FAIL ever shown
    on a run, re-runs with other settings included, is wrong with probability at most ``family_alpha`` (alpha
    spending; a Bonferroni split over a number of attempts fixed in advance would break when a user runs one
    more). The first attempt gets 61% of it, the second 15%."""
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    return float(family_alpha) * 6.0 / (math.pi ** 2 * attempt ** 2)


def overall_verdict(sections: dict, *, family_confidence: float, attempt: int,
                    earlier_fails: Iterable[str] = ()) -> dict:
    """One verdict across the probes of this attempt and the FAILs of earlier attempts on the same run.

    Each probe ran at its share of this attempt's error rate (``attempt_alpha``, Bonferroni over the probes
    that ran), so: FAIL when any probe of any attempt failed (the family-wise error over every attempt is at most
    ``1 - family_confidence``); PASS when none failed and at least one probe passed (that probe had the power to
    see a leak at twice the claim); INCONCLUSIVE otherwise. ``detectable_epsilon``: the smallest over the probes.
    """
    ran = {k: v for k, v in sections.items() if (v or {}).get("verdict") in VERDICTS}
    fails = [f"{k} (attempt {attempt})" for k, v in ran.items() if v["verdict"] == FAIL] + list(earlier_fails)
    dets = [float(v["detectable_epsilon"]) for v in ran.values() if v.get("detectable_epsilon") is not None]
    pct = f"{100 * float(family_confidence):.4g}%"
    if fails:
        verdict = FAIL
        reason = (f"failed: {', '.join(fails)}; family-wise {pct} confidence over every probe and attempt on this run")
    elif any(v["verdict"] == PASS for v in ran.values()):
        verdict = PASS
        passed = [k for k, v in ran.items() if v["verdict"] == PASS]
        reason = (f"no probe refuted the claim, and {', '.join(passed)} had the power to see a leak at "
                  f"{POWER_FACTOR:g}x it; family-wise {pct} confidence over every probe and attempt on this run")
    elif ran:
        verdict = INCONCLUSIVE
        reason = ("no probe refuted the claim, and none had the power to see a leak at "
                  f"{POWER_FACTOR:g}x it (each probe's verdict says what would)")
    else:
        verdict, reason = None, "no probe ran"
    return {"verdict": verdict, "colour": COLOURS.get(verdict), "reason": reason, "attempt": int(attempt),
            "family_confidence": float(family_confidence),
            "detectable_epsilon": min(dets) if dets else None, "probes": sorted(ran)}


#: a PASS needs the test to detect (80% power, optimal attacker) a true epsilon of at most this multiple of the claim
POWER_FACTOR = 2.0


def to_detect_twice_the_claim(*, claimed_epsilon: float, delta: float, confidence: float, fixed_count: bool,
                              now: int, what: str, choices_for=None, seed: int = 0) -> str:
    """The ``to_conclude`` advice of an underpowered test: how many ``what`` (canaries, or held-out units and as
    many members) would let the optimal attacker refute ``claimed_epsilon`` with 80% power when the truth is
    twice it (``dpdiff.probes.audit.units_for_power``, at the level each test ran at)."""
    from dpdiff.probes.audit import default_k_choices, units_for_power

    claim = float(claimed_epsilon)
    need = units_for_power(claimed_epsilon=claim, delta=delta, confidence=confidence, fixed_count=fixed_count,
                           choices_for=choices_for or default_k_choices, seed=seed)
    if need is None:
        return (f"no number of {what} up to 131072 lets this test detect epsilon {2 * claim:.3g} (twice the claim) "
                f"at delta {delta:g}: one-run analyses are too weak there; audit with more canaries per run or a "
                "larger claim")
    count = need // 2 if fixed_count else need
    return (f"about {count} {what} (now {now}) would let this test detect epsilon {2 * claim:.3g} (twice the claim) "
            f"with 80% power against the optimal attacker; more with a real one")


def three_way_verdict(*, claimed_epsilon: float | None, eps_lower: float | None, ceiling: float | None,
                      confidence: float, blockers: Iterable[str] = (), to_conclude: str | None = None,
                      not_estimable: str | None = None, detectable_epsilon: float | None = None,
                      leak_p_value: float | None = None) -> dict:
    """The verdict of one probe (module docstring), as a dict for probes.json.

    ``claimed_epsilon``: the accountant's epsilon, None for a run without DP. ``eps_lower`` and
    ``ceiling``: the probe's lower bound and the largest bound it could have shown, both at
    ``confidence``; None when the probe could not compute one (then ``not_estimable`` says why).
    ``blockers``: reasons the probe could not have seen a leak (each prevents a PASS).
    ``to_conclude``: what would make an INCONCLUSIVE conclusive (more canaries, more held-out units).
    ``detectable_epsilon``: the smallest true epsilon the test refutes with 80% power (None: not shown, or
    beyond 16x the claim); a PASS needs it at most ``POWER_FACTOR`` x the claim.
    ``leak_p_value``: for a run without DP, the p-value of an exact test of "no leak at all" (e.g. a
    permutation test of matches on a random split), already corrected for its family: FAIL below ``1 -
    confidence``. Ignored with a claim (refuting epsilon 0 does not refute a positive claim).
    Returns ``verdict, colour, claimed_epsilon, eps_lower, ceiling, detectable_epsilon, confidence, reason,
    to_conclude, blockers``.
    """
    claimed = _num(claimed_epsilon, "claimed_epsilon")
    detectable = _num(detectable_epsilon, "detectable_epsilon")
    low = _num(eps_lower, "eps_lower")
    ceil = _num(ceiling, "ceiling")
    conf = float(confidence)
    if not (0.0 < conf < 1.0):
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    blockers = [str(b) for b in blockers if b]
    pct = f"{100 * conf:.4g}%"
    target = 0.0 if claimed is None else claimed

    if low is None:
        verdict = INCONCLUSIVE
        reason = not_estimable or "no lower bound could be computed"
    elif low > target:
        verdict = FAIL
        if claimed is None:
            reason = (f"leakage demonstrated: epsilon >= {_fmt(low)} at {pct} confidence, and the run has no "
                      "DP guarantee")
        else:
            reason = (f"measured epsilon >= {_fmt(low)} at {pct} confidence exceeds the claimed epsilon "
                      f"{_fmt(claimed)}: the run leaks more than its guarantee allows (a privacy bug)")
    elif claimed is None and leak_p_value is not None and float(leak_p_value) < 1.0 - conf:
        verdict = FAIL
        reason = (f"leakage demonstrated: training images were matched more often than held-out ones (exact "
                  f"permutation test, p = {float(leak_p_value):.2g} < {1.0 - conf:.2g}), and the run has no DP "
                  "guarantee")
    elif claimed is None:
        verdict = INCONCLUSIVE
        reason = ("no leakage detected, but the run has no DP guarantee: nothing is certified "
                  f"(lower bound {_fmt(low)}, ceiling {_fmt(ceil)})")
    elif ceil is None or ceil <= claimed:
        verdict = INCONCLUSIVE
        reason = (f"the test could certify at most epsilon {_fmt(ceil)} with its sample sizes, not above the "
                  f"claimed {_fmt(claimed)}: a FAIL was unreachable, so no PASS either")
    elif blockers:
        verdict = INCONCLUSIVE
        reason = "; ".join(blockers)
    elif detectable is None or detectable > POWER_FACTOR * claimed:
        verdict = INCONCLUSIVE
        reach = (f"detects only epsilon >= {_fmt(detectable)}" if detectable is not None else
                 f"detects no epsilon up to 16x the claim ({_fmt(16 * claimed)})")
        reason = (f"no leak shown (lower bound {_fmt(low)} <= claimed {_fmt(claimed)}), but this test {reach} "
                  f"(the optimal attacker, 80% power): a leak at {POWER_FACTOR:g}x the claim could have gone unseen")
    else:
        verdict = PASS
        reason = (f"lower bound {_fmt(low)} <= claimed {_fmt(claimed)}, and the optimal attacker would have "
                  f"refuted a true epsilon of {_fmt(detectable)} (<= {POWER_FACTOR:g}x the claim) in at least 80% "
                  f"of runs of this test ({pct} confidence)")
    if verdict == INCONCLUSIVE and blockers and reason not in blockers:
        reason = reason + "; also: " + "; ".join(blockers)
    return {
        "verdict": verdict,
        "colour": COLOURS[verdict],
        "claimed_epsilon": claimed,
        "eps_lower": low,
        "ceiling": ceil,
        "detectable_epsilon": detectable,
        "confidence": conf,
        "reason": reason,
        "to_conclude": to_conclude if verdict == INCONCLUSIVE else None,
        "blockers": blockers,
    }


def verdict_fields(v: dict) -> dict:
    """The verdict dict as flat probes.json fields of a probe section: ``verdict``, ``colour``,
    ``claimed_epsilon``, ``eps_lower``, ``ceiling``, ``confidence``, ``verdict_reason``, ``to_conclude``,
    ``blockers``."""
    out = dict(v)
    out["verdict_reason"] = out.pop("reason")
    return out


def verdict_sentence(v: dict | None) -> str:
    """``"PASS: ..."`` / ``"FAIL: ..."`` / ``"INCONCLUSIVE: ... To conclude: ..."`` (one line)."""
    if not v or not v.get("verdict"):
        return "not run"
    s = f"{v['verdict']}: {v.get('reason') or v.get('verdict_reason') or ''}"
    if v.get("to_conclude"):
        s += f". To conclude: {v['to_conclude']}"
    return s


def verdict_line(name: str, v: dict | None) -> str:
    """A terminal summary line: ``name VERDICT (eps_lower a, ceiling b, detects d, claimed c)``; ``detects``: the
    smallest epsilon the test refutes with 80% power against the optimal attacker (shown only with a claim)."""
    if not v or not v.get("verdict"):
        return f"{name} not run"
    claimed = v.get("claimed_epsilon")
    if claimed is None:
        return (f"{name} {v['verdict']} (eps_lower {_fmt(v.get('eps_lower'))}, ceiling {_fmt(v.get('ceiling'))}, "
                "claimed none (no DP))")
    det = v.get("detectable_epsilon")
    detects = f">= {_fmt(det)}" if det is not None else f"nothing up to {_fmt(16 * float(claimed))}"
    return (f"{name} {v['verdict']} (eps_lower {_fmt(v.get('eps_lower'))}, ceiling {_fmt(v.get('ceiling'))}, "
            f"detects {detects}, claimed {_fmt(claimed)})")


def summary_lines(probes: dict) -> list[str]:
    """One line per probe section of probes.json that has a verdict (for logs and terminals)."""
    out = []
    overall = probes.get("overall") or {}
    if overall.get("verdict") in VERDICTS:
        out.append(f"overall {overall['verdict']} (attempt {overall.get('attempt')}, family-wise "
                   f"{100 * float(overall.get('family_confidence') or 0):.4g}%)")
    for name in PROBES:
        sec = probes.get(name) or {}
        if sec.get("skipped"):
            out.append(f"{name} not run ({sec['skipped']})")
        elif sec.get("verdict") in VERDICTS:
            out.append(verdict_line(name, sec))
    return out
