"""The sweep report: one row per run of a Hydra multirun, the privacy-utility frontier, and the
total privacy spent by the sweep (every run composed: a sweep over epsilons spends their sum,
roughly, not their maximum)."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from dpdiff.io import write_text_atomic
from dpdiff.privacy.accountants import DEFAULT_ACCOUNTANT, MechanismSegment
from dpdiff.privacy.dataset_ledger import compose_runs

#: the dataset key of runs whose data_owner.json is missing (e.g. a copy of the published files only)
UNKNOWN_DATASET = "(unknown: no data_owner.json)"


def find_runs(root: Path) -> list[Path]:
    return sorted({p.parent for p in Path(root).rglob("privacy.json")}, key=lambda p: str(p))


def _load(p: Path):
    return json.loads(p.read_text()) if p.exists() else None


def _overrides(run: Path) -> str:
    p = run / ".hydra" / "overrides.yaml"
    if not p.exists():
        return ""
    lines = [ln.strip()[2:] for ln in p.read_text().splitlines() if ln.strip().startswith("- ")]
    return " ".join(x for x in lines if not x.startswith("hydra."))


def utility_value(util: dict | None) -> tuple[str, float | None]:
    """The headline utility of a run: the demo's right-digit-in-the-private-look rate, else held-out loss."""
    if not util:
        return "", None
    acc = (util.get("digit_accuracy") or {}).get("finetuned", {}).get("accuracy_in_style")
    if acc is not None:
        return "digit accuracy in the private look", float(acc)
    hl = (util.get("heldout_loss") or {}).get("heldout_loss")
    if hl is not None:
        return "held-out loss (lower is better)", float(hl)
    return "", None


def collect(root: Path) -> list[dict]:
    rows = []
    for run in find_runs(root):
        priv = _load(run / "privacy.json")
        owner = _load(run / "data_owner.json") or {}  # the fingerprint is data-owner information
        probes = _load(run / "probes.json") or {}
        util = _load(run / "utility.json")
        name, value = utility_value(util)
        rows.append({
            "run": str(run.relative_to(root)) if run != root else ".",
            "overrides": _overrides(run),
            "dp": priv.get("dp"),
            "epsilon": priv.get("epsilon"),
            "target_epsilon": priv.get("target_epsilon"),
            "delta": priv.get("delta"),
            "steps": priv.get("steps"),
            "noise_multiplier": priv.get("noise_multiplier"),
            "utility_name": name,
            "utility": value,
            "extraction_rate": (probes.get("extraction") or {}).get("rate"),
            "extracted": (probes.get("extraction") or {}).get("extracted_count"),
            "mia_auc": (probes.get("mia") or {}).get("auc"),
            "audit_eps_lower": (probes.get("audit") or {}).get("eps_lower"),
            "audit_ceiling": (probes.get("audit") or {}).get("ceiling"),
            "audit_detectable": (probes.get("audit") or {}).get("detectable_epsilon"),
            "audit_verdict": (probes.get("audit") or {}).get("verdict"),
            "mia_verdict": (probes.get("mia") or {}).get("verdict"),
            "extraction_verdict": (probes.get("extraction") or {}).get("verdict"),
            "ledger": priv.get("ledger") or [],
            "privacy_unit": priv.get("privacy_unit"),
            "reproducible_noise": bool(priv.get("reproducible_noise")),
            "fingerprint": owner.get("dataset_fingerprint", priv.get("dataset_fingerprint")),
        })
    return rows


class _SweepRun:
    """A sweep row as ``compose_runs`` sees it: the run's whole ledger."""

    def __init__(self, row: dict):
        self.dp = bool(row["dp"])
        self.segments = [MechanismSegment(**s) for s in row["ledger"]]
        self.privacy_unit = row["privacy_unit"] or "example"
        self.reproducible_noise = row.get("reproducible_noise", False)


def sweep_total(rows: list[dict], *, accountant: str = DEFAULT_ACCOUNTANT) -> dict:
    """Composition of every run of the sweep, per dataset fingerprint (dpdiff's one cross-run composer; the
    fingerprints come from each run's data_owner.json: runs without one are composed together, as
    ``UNKNOWN_DATASET``, the conservative choice)."""
    out = {}
    for fp in sorted({r["fingerprint"] or UNKNOWN_DATASET for r in rows}):
        rs = [r for r in rows if (r["fingerprint"] or UNKNOWN_DATASET) == fp]
        delta = max((r["delta"] for r in rs if r["delta"]), default=1e-5)
        out[fp] = compose_runs([_SweepRun(r) for r in rs], delta=delta, accountant=accountant)
    return out


#: the DP score a private selection would use: a held-out loss clipped per unit, noised at this multiplier
SELECTION_SCORE_NOISE = 4.0  # dpdiff tune's default


def selection_alternative(rows: list[dict]) -> dict:
    """Per dataset: what the best of this sweep's candidates would cost as a private selection (a random number
    of candidates with the sweep's size as its mean, a DP score; ``dpdiff.privacy.selection``), beside the
    composition. The sweep as run kept its runs' outputs and scored them without noise: composition is its cost,
    and choosing a run by a metric on private data is not covered by it."""
    from dpdiff.privacy.selection import TruncatedNegativeBinomial, selection_epsilon

    out = {}
    for fp in sorted({r["fingerprint"] or UNKNOWN_DATASET for r in rows}):
        rs = [r for r in rows if (r["fingerprint"] or UNKNOWN_DATASET) == fp]
        dp = [r for r in rs if r["dp"] and r.get("ledger") and r.get("epsilon") is not None]
        if not dp or len(dp) != len(rs) or len(rs) < 2:
            continue  # a non-private run, or a single run: nothing to select privately
        worst = max(dp, key=lambda r: r["epsilon"])
        delta = max((r["delta"] for r in rs if r["delta"]), default=1e-5)
        out[fp] = selection_epsilon([MechanismSegment(**g) for g in worst["ledger"]],
                                    TruncatedNegativeBinomial.with_mean(float(len(rs))), delta=delta,
                                    score_noise_multiplier=SELECTION_SCORE_NOISE)
    return out


def _selection_line(sel: dict) -> str:
    return (f"As a private selection instead (Papernot & Steinke 2022: a random number of candidates, geometric "
            f"with mean {sel['expected_candidates']:.0f}, each as costly as this sweep's costliest run, scored by a "
            f"held-out loss clipped per unit with noise x{SELECTION_SCORE_NOISE:g}, only the best released): epsilon "
            f"{sel['epsilon']:.3g} at delta {sel['delta']:.2g}, against {sel['composed_epsilon']:.3g} for composing "
            f"{sel['composed_candidates']} such runs and {sel['one_candidate_epsilon']:.3g} for one. Picking this "
            "sweep's best run by a metric computed on private data, as the table allows, is covered by neither.")


def frontier(rows: list[dict]) -> list[dict]:
    """Runs not dominated in (lower epsilon, better utility)."""
    pts = [r for r in rows if r["dp"] and r["utility"] is not None and r["epsilon"] is not None]
    higher_better = not any("loss" in r["utility_name"] for r in pts)
    sign = 1 if higher_better else -1
    keep = []
    for r in pts:
        dominated = any(o is not r and o["epsilon"] <= r["epsilon"] and sign * o["utility"] >= sign * r["utility"]
                        and (o["epsilon"] < r["epsilon"] or sign * o["utility"] > sign * r["utility"]) for o in pts)
        if not dominated:
            keep.append(r)
    return sorted(keep, key=lambda r: r["epsilon"])


def _fp(fp: str) -> str:
    return fp if fp == UNKNOWN_DATASET else fp[:12]


def _f(v, nd=3):
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.{nd}g}"
    return str(v)


def write_sweep_report(root: Path) -> tuple[Path, Path]:
    from dpdiff.errors import UserError

    root = Path(root)
    rows = collect(root)
    if not rows:
        raise UserError(f"{root}: no run dirs with privacy.json below it")
    totals = sweep_total(rows)
    front = frontier(rows)
    plot = _frontier_plot(root, rows, front)
    cols = ["run", "overrides", "epsilon", "target_epsilon", "steps", "utility", "extraction_rate",
            "extraction_verdict", "mia_auc", "mia_verdict", "audit_eps_lower", "audit_ceiling", "audit_detectable",
            "audit_verdict"]
    uname = next((r["utility_name"] for r in rows if r["utility_name"]), "utility")
    head = [c if c != "utility" else uname for c in cols]
    md = ["# dpdiff sweep report", "", f"{len(rows)} runs under `{root}`.", ""]
    for fp, t in totals.items():
        md.append(f"**Total privacy spent by this sweep on dataset {_fp(fp)}: epsilon {_f(t['epsilon'])}"
                  f"{' at delta ' + _f(t.get('delta')) if t.get('delta') else ''} over {t['runs']} runs** "
                  "(every run trained on the same data: their guarantees compose)."
                  + (f" {t['note']}" if t.get("note") else ""))
    selection = selection_alternative(rows)
    for sel in selection.values():
        md.append("")
        md.append(_selection_line(sel))
    md += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        md.append("| " + " | ".join(("NO DP" if c == "epsilon" and not r["dp"] else _f(r[c])) for c in cols) + " |")
    md += ["", "Privacy-utility frontier (not dominated): " + ", ".join(f"{r['run']} (eps {_f(r['epsilon'])}, "
                                                                       f"{_f(r['utility'])})" for r in front), ""]
    if plot:
        md.append(f"![frontier]({plot.name})")
    write_text_atomic(root / "sweep_report.md", "\n".join(md) + "\n")
    import base64

    esc = html.escape
    h = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>dpdiff sweep report</title>",
         "<style>body{font-family:Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
         "table{border-collapse:collapse;font-size:.9em}td,th{border-bottom:1px solid #ddd;padding:.3em .6em;"
         "text-align:left}.total{background:#fff8c5;padding:.8em;border-radius:6px;border:1px solid #d4a72c}"
         ".nodp{color:#cf222e;font-weight:bold}.v-FAIL{color:#cf222e;font-weight:bold}"
         ".v-PASS{color:#1a7f37;font-weight:bold}.v-INCONCLUSIVE{color:#9a6700;font-weight:bold}</style></head><body>",
         "<h1>dpdiff sweep report</h1>", f"<p>{len(rows)} runs under {esc(str(root))}</p>"]
    for fp, t in totals.items():
        h.append(f"<div class='total'>Total privacy spent by this sweep on dataset {esc(_fp(fp))}: "
                 f"<b>epsilon {_f(t['epsilon'])}</b>{' at delta ' + _f(t.get('delta')) if t.get('delta') else ''} "
                 f"over {t['runs']} runs (runs on the same data compose).</div>")
    for sel in selection.values():
        h.append(f"<p>{esc(_selection_line(sel))}</p>")
    h.append("<table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in head) + "</tr>")
    for r in rows:
        cells = []
        for c in cols:
            if c == "epsilon" and not r["dp"]:
                cells.append("<td class='nodp'>NO DP</td>")
            elif c.endswith("_verdict") and r[c] in ("PASS", "FAIL", "INCONCLUSIVE"):
                cells.append(f"<td class='v-{r[c]}'>{esc(r[c])}</td>")
            else:
                cells.append(f"<td>{esc(_f(r[c]))}</td>")
        h.append("<tr>" + "".join(cells) + "</tr>")
    h.append("</table>")
    if plot:
        data = base64.b64encode(plot.read_bytes()).decode()
        h.append(f"<h2>Privacy-utility frontier</h2><img alt='frontier' src='data:image/png;base64,{data}'>")
    h.append("</body></html>")
    write_text_atomic(root / "sweep_report.html", "\n".join(h))
    return root / "sweep_report.html", root / "sweep_report.md"


def _frontier_plot(root: Path, rows: list[dict], front: list[dict]) -> Path | None:
    pts = [r for r in rows if r["dp"] and r["utility"] is not None and r["epsilon"] is not None]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=110)
    ax.scatter([r["epsilon"] for r in pts], [r["utility"] for r in pts], color="#0969da", zorder=3)
    for r in pts:
        ax.annotate(r["run"], (r["epsilon"], r["utility"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if front:
        ax.plot([r["epsilon"] for r in front], [r["utility"] for r in front], color="#cf222e", lw=1.5,
                label="frontier", zorder=2)
        ax.legend()
    base = [r for r in rows if not r["dp"] and r["utility"] is not None]
    for r in base:
        ax.axhline(r["utility"], color="#57606a", ls=":", lw=1)
        ax.annotate("non-private", (ax.get_xlim()[0], r["utility"]), fontsize=7)
    ax.set_xlabel("epsilon")
    ax.set_ylabel(pts[0]["utility_name"] or "utility")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = root / "sweep_frontier.png"
    fig.savefig(path)
    plt.close(fig)
    return path
