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
* PASS (green): no rejection although the test could have rejected (ceiling above the claim,
  no blocker): a leak beyond the claimed epsilon would have shown with the probe's power.

Without a DP claim (a non-private run) the question is whether anything leaks at all: FAIL when
``eps_lower > 0`` (leakage demonstrated), otherwise INCONCLUSIVE; never PASS, because no
guarantee exists that a green could stand for.

Every verdict can come out either way: a test whose ceiling is below the claim is INCONCLUSIVE,
never PASS. This is the hypothesis-testing reading of DP auditing (Jagielski, Ullman, Oprea 2020;
Nasr et al. 2021; Steinke, Nasr, Jagielski 2023): a lower bound below the claim confirms nothing
unless the test was able to exceed it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = ["PASS", "FAIL", "INCONCLUSIVE", "VERDICTS", "COLOURS", "three_way_verdict", "verdict_fields",
           "verdict_line", "verdict_sentence", "summary_lines"]

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


def three_way_verdict(*, claimed_epsilon: float | None, eps_lower: float | None, ceiling: float | None,
                      confidence: float, blockers: Iterable[str] = (), to_conclude: str | None = None,
                      not_estimable: str | None = None) -> dict:
    """The verdict of one probe (module docstring), as a dict for probes.json.

    ``claimed_epsilon``: the accountant's epsilon, None for a run without DP. ``eps_lower`` and
    ``ceiling``: the probe's lower bound and the largest bound it could have shown, both at
    ``confidence``; None when the probe could not compute one (then ``not_estimable`` says why).
    ``blockers``: reasons the probe could not have seen a leak (each prevents a PASS).
    ``to_conclude``: what would make an INCONCLUSIVE conclusive (more canaries, more held-out units).
    Returns ``verdict, colour, claimed_epsilon, eps_lower, ceiling, confidence, reason, to_conclude,
    blockers``.
    """
    claimed = _num(claimed_epsilon, "claimed_epsilon")
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
    else:
        verdict = PASS
        reason = (f"lower bound {_fmt(low)} <= claimed {_fmt(claimed)}, and the test could have shown up to "
                  f"{_fmt(ceil)} ({pct} confidence)")
    if verdict == INCONCLUSIVE and blockers and reason not in blockers:
        reason = reason + "; also: " + "; ".join(blockers)
    return {
        "verdict": verdict,
        "colour": COLOURS[verdict],
        "claimed_epsilon": claimed,
        "eps_lower": low,
        "ceiling": ceil,
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
    """A terminal summary line: ``name VERDICT (eps_lower a / ceiling b vs claimed c)``."""
    if not v or not v.get("verdict"):
        return f"{name} not run"
    return (f"{name} {v['verdict']} (eps_lower {_fmt(v.get('eps_lower'))}, ceiling {_fmt(v.get('ceiling'))}, "
            f"claimed {_fmt(v.get('claimed_epsilon')) if v.get('claimed_epsilon') is not None else 'none (no DP)'})")


def summary_lines(probes: dict) -> list[str]:
    """One line per probe section of probes.json that has a verdict (for logs and terminals)."""
    out = []
    for name in ("extraction", "mia", "audit"):
        sec = probes.get(name) or {}
        if sec.get("skipped"):
            out.append(f"{name} not run ({sec['skipped']})")
        elif sec.get("verdict") in VERDICTS:
            out.append(verdict_line(name, sec))
    return out
