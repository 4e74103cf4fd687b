"""The run report: ``report.md`` and a self-contained ``report.html`` (images inlined, no network).

Built only from the files of the run dir (privacy.json, data_owner.json, run.json, metrics.jsonl,
probes.json, the PNGs), so ``dpdiff report run_dir=...`` rebuilds it at any time. The report is a
data-owner document: it shows what data_owner.json holds (fingerprints, counts, the planning summary)
next to the public guarantee of privacy.json.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from dpdiff.io import write_text_atomic


def _load(run_dir: Path, name: str):
    p = run_dir / name
    return json.loads(p.read_text()) if p.exists() else None


def _metrics(run_dir: Path) -> list[dict]:
    p = run_dir / "metrics.jsonl"
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line after a crash
    return out


def _fmt(v, nd=4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{nd}g}"
    return str(v)


def guarantee_sentence(priv: dict) -> str:
    if not priv.get("dp"):
        return ("NO PRIVACY GUARANTEE: this model was trained without differential privacy "
                "(privacy=none). Treat it as a copy of its training data.")
    sel = priv.get("selection")
    if sel:  # selected by dpdiff tune: the procedure's guarantee is the weights' (the run alone understates it)
        return (f"The released weights are ({_fmt(sel['epsilon'])}, {_fmt(sel['delta'], 3)})-differentially private "
                f"with respect to adding or removing one {priv['privacy_unit']} of the training set "
                f"({priv['num_units']} units), for the whole tuning procedure that selected them (dpdiff tune: a "
                f"random number of candidates, {_fmt(sel['expected_candidates'], 3)} expected, the best by a noisy "
                "held-out score; Papernot & Steinke 2022, RDP). The run alone, without its selection: "
                f"({_fmt(priv['epsilon'])}, {_fmt(priv['delta'], 3)}), by the {priv['accountant']} accountant.")
    return (f"The released weights are ({_fmt(priv['epsilon'])}, {_fmt(priv['delta'], 3)})-differentially private "
            f"with respect to adding or removing one {priv['privacy_unit']} of the training set "
            f"({priv['num_units']} units), by the {priv['accountant']} accountant.")


def _owner_value(priv: dict, owner: dict | None, key: str, default=None):
    """A data-owner field: from data_owner.json, else from privacy.json (run dirs from before the split)."""
    if owner and key in owner:
        return owner[key]
    return priv.get(key, default)


def mechanism_rows(priv: dict, owner: dict | None = None) -> list[tuple[str, str]]:
    """The mechanism's numbers (privacy.json); ``owner`` (data_owner.json) adds the image count."""
    images = _owner_value(priv, owner, "num_images")
    per_unit = f"{priv['num_units']} units" + (f", {images} images" if images is not None else "")
    if not priv.get("dp"):
        return [("differential privacy", "none"), ("steps", _fmt(priv.get("steps"))),
                ("batch size", _fmt(priv.get("expected_batch_size"))), ("units", _fmt(priv.get("num_units")))]
    sel = priv.get("selection")
    tuned = [("epsilon of the tuning procedure that selected this run (the released guarantee)",
              f"{_fmt(sel['epsilon'])} (delta {_fmt(sel['delta'], 3)}; {_fmt(sel['expected_candidates'], 3)} "
              "candidates expected)")] if sel else []
    return [
        *tuned,
        ("epsilon (reported upper bound)" + (" of this run alone" if sel else ""), _fmt(priv["epsilon"])),
        ("epsilon estimate / lower", f"{_fmt(priv.get('epsilon_estimate'))} / {_fmt(priv.get('epsilon_lower'))}"),
        ("target epsilon", _fmt(priv["target_epsilon"])),
        ("delta", _fmt(priv["delta"], 3)),
        ("accountant", f"{priv['accountant']} ({priv.get('accountant_note', '')})"),
        ("privacy unit", f"{priv['privacy_unit']} ({per_unit})"),
        ("sample rate q", _fmt(priv["sample_rate"])),
        ("expected batch q*N", _fmt(priv["expected_batch_size"])),
        ("noise multiplier sigma", _fmt(priv["noise_multiplier"])),
        ("clipping bound C", _fmt(priv["max_grad_norm"])),
        ("steps (accounted)", _fmt(priv["steps"])),
        ("augmentation multiplicity K", _fmt(priv["augmult"])),
        ("processes", _fmt(priv.get("world_size"))),
        ("noise and sampling randomness", _fmt(priv.get("noise_source"))),
    ]


def _img_tag(path: Path, alt: str, width: int | None = None) -> str:
    if not path.exists():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    w = f' width="{width}"' if width else ""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"{w}>'


def write_run_report(run_dir: Path) -> tuple[Path, Path]:
    run_dir = Path(run_dir)
    priv = _load(run_dir, "privacy.json")
    if priv is None:
        from dpdiff.errors import UserError

        raise UserError(f"{run_dir} has no privacy.json: not a finished dpdiff run dir")
    run = _load(run_dir, "run.json") or {}
    owner = _load(run_dir, "data_owner.json") or {}  # the data owner's statistics (absent in older run dirs)
    probes = _load(run_dir, "probes.json")
    utility = _load(run_dir, "utility.json")
    metrics = _metrics(run_dir)
    from dpdiff.report.plots import write_run_plots

    plots = write_run_plots(run_dir, metrics=metrics, privacy=priv)
    mia = (probes or {}).get("mia") or {}
    if mia.get("attacks"):
        from dpdiff.report.plots import write_mia_roc

        roc = write_mia_roc(run_dir, mia=mia, privacy=priv)
        if roc is not None:
            plots["membership inference ROC (log-log) against the DP region"] = roc
    sections = build_sections(priv=priv, run=run, probes=probes, metrics=metrics, utility=utility, owner=owner)
    md = render_markdown(sections, run_dir=run_dir, plots=plots, run=run)
    page = render_html(sections, run_dir=run_dir, plots=plots, run=run, dp=bool(priv.get("dp")))
    write_text_atomic(run_dir / "report.md", md)
    write_text_atomic(run_dir / "report.html", page)
    return run_dir / "report.html", run_dir / "report.md"


def utility_rows(utility: dict) -> list[tuple[str, str]]:
    rows = []
    for name, res in utility.items():
        if not isinstance(res, dict):
            continue
        if res.get("skipped"):
            rows.append((name, f"not run ({res['skipped']})"))
        elif name == "heldout_loss":
            rows.append(("held-out denoising loss (fine-tuned vs base)",
                         f"{_fmt(res['heldout_loss'])} vs {_fmt(res['heldout_loss_base'])} on {res['images']} images"))
        elif name == "digit_accuracy":
            ft, base = res["finetuned"], res["base"]
            style = res.get("private_style", "private")
            rows.append((f"requested digit in the {style} look (fine-tuned vs base)",
                         f"{ft['accuracy_in_style']:.0%} vs {base['accuracy_in_style']:.0%}"))
            rows.append(("requested digit, any look (fine-tuned vs base)",
                         f"{ft['prompt_accuracy']:.0%} vs {base['prompt_accuracy']:.0%}"))
            rows.append(("retention: the base's own prompts still drawn right (fine-tuned vs base)",
                         f"{ft['retention_accuracy']:.0%} vs {base['retention_accuracy']:.0%} "
                         f"(in the handwritten look: {ft['retention_style_rate']:.0%} vs "
                         f"{base['retention_style_rate']:.0%})"))
            rows.append(("per digit, fine-tuned (right digit in the look)",
                         ", ".join(f"{k}: {v['both']:.0%}" for k, v in ft["per_digit"].items())))
        elif name == "fid":
            rows.append(("FID / KID", f"{_fmt(res['fid'])} / {_fmt(res['kid'])} vs {res['reference']}"))
        else:
            rows.append((name, ", ".join(f"{k}={_fmt(v)}" for k, v in res.items() if not isinstance(v, dict))))
    return rows


def signal_rows(plan: dict | None, metrics: list[dict]) -> list[tuple[str, str]]:
    """The plan's noise-to-signal budget and the signal-to-noise the run measured (non-private statistics)."""
    rows = []
    if plan:
        rows += [("trainable weights", f"{plan['trainable_parameters']:,}"),
                 ("noise std per coordinate of the averaged gradient", _fmt(plan["noise_std_per_coordinate"])),
                 ("noise / largest possible signal: per step, over the run",
                  f"{_fmt(plan['nsr_step'], 3)}, {_fmt(plan['nsr_run'], 3)} (planned; the signal is at most C)")]
        if plan.get("units_per_prompt") is not None:
            rows.append(("units per prompt (median)", _fmt(plan["units_per_prompt"])))
    snr = sorted(m["snr"] for m in metrics if m.get("snr") is not None)
    if snr:
        rows.append(("measured signal / noise per step (median over logged steps)",
                     f"{_fmt(snr[len(snr) // 2], 3)} (signal: the clipped mean gradient; below ~0.1 the updates are "
                     "mostly noise)"))
        groups = sorted({k for m in metrics for k in m if k.startswith("snr/")})
        for g in groups:
            vals = sorted(m[g] for m in metrics if m.get(g) is not None)
            rows.append((f"  {g[4:]}", _fmt(vals[len(vals) // 2], 3)))
    for w in (plan or {}).get("warnings") or []:
        rows.append(("warning", w))
    return rows or [("status", "no signal-to-noise statistics were logged")]


def build_sections(*, priv: dict, run: dict, probes: dict | None, metrics: list[dict],
                   utility: dict | None = None, owner: dict | None = None) -> list[tuple[str, list]]:
    """(title, rows) pairs shared by the markdown and HTML renderers. ``priv`` is privacy.json (public),
    ``owner`` data_owner.json (the statistics of the data: fingerprints, counts, the planning summary)."""
    data = run.get("data", {})

    def own(key, default=None):
        return _owner_value(priv, owner, key, default)

    trained = [
        ("base model", f"{run.get('base_model', 'n/a')} ({run.get('model_family', 'sd')})"),
        ("adapter", run.get("adapter", "n/a")),
        ("dataset", f"{data.get('path', 'n/a')}{' (built-in demo)' if data.get('builtin_demo') else ''}"),
        ("dataset fingerprint (sha256)", own("dataset_fingerprint", "n/a")),
        ("images used / units", f"{own('num_images')} / {priv.get('num_units')} ({priv.get('privacy_unit')})"),
        ("held-out units", _fmt(own("holdout_units"))),
        ("skipped bad files", _fmt(own("skipped_files"))),
        ("duplicate sets", _fmt((own("duplicates") or {}).get("duplicate_sets"))),
        ("wall time (s)", _fmt(run.get("wall_seconds"))),
        ("dpdiff / git", f"{run.get('dpdiff_version')} / {run.get('git_commit') or 'n/a'}"),
    ]
    from dpdiff.report.officer import officer_rows

    out = [("For the privacy officer: the guarantee and the attacks, in plain words",
            officer_rows(priv, owner, probes)),
           ("What was trained on what", trained), ("Mechanism", mechanism_rows(priv, owner))]
    if metrics:
        last = metrics[-1]
        out.append(("Training (non-private statistics)", [
            ("final loss", _fmt(last.get("loss"))),
            ("median per-unit gradient norm (last log)", _fmt(last.get("grad_norm_median"))),
            ("fraction of units clipped (last log)", _fmt(last.get("clip_fraction"))),
            ("units with a non-finite gradient (contributed zero)",
             _fmt(sum(int(m.get("nonfinite_units") or 0) for m in metrics))),
        ]))
    if priv.get("dp"):
        out.append(("Signal and noise: can this run learn?", signal_rows(own("plan"), metrics)))
    if utility:
        out.append(("Utility", utility_rows(utility)))
    if probes:
        from dpdiff.report.probes_section import probe_rows

        out.append(("Probes: what the trained model leaks", probe_rows(probes, priv)))
    else:
        out.append(("Probes: what the trained model leaks",
                    [("status", "not run (probes=none); run them later with dpdiff probe run_dir=...")]))
    notes = list(priv.get("caveats", [])) + [c for c in (owner or {}).get("caveats") or []
                                             if c not in priv.get("caveats", [])]
    out.append(("Caveats", [(str(i + 1), c) for i, c in enumerate(notes)]))
    return out


def render_markdown(sections, *, run_dir: Path, plots: dict, run: dict) -> str:
    lines = ["# dpdiff run report", "", f"Run dir: `{run_dir}`", ""]
    priv = json.loads((run_dir / "privacy.json").read_text())
    lines += ["## Guarantee", "", ("**" + guarantee_sentence(priv) + "**"), ""]
    for title, rows in sections:
        lines += [f"## {title}", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in rows]
        lines.append("")
    lines += ["## Figures", ""]
    for name, path in plots.items():
        lines.append(f"![{name}]({Path(path).name})")
    for img, title in (("samples.png", "Samples from the fine-tuned model"),
                       ("samples_base.png", "Samples from the base model (same prompts and seeds)"),
                       ("probe_extraction.png", "Extraction probe: flagged generations next to their training image")):
        if (run_dir / img).exists():
            lines += ["", f"### {title}", "", f"![{title}]({img})"]
    prompts = run.get("sample_prompts") or []
    if prompts:
        lines += ["", "Sample prompts (one row each): " + "; ".join(f"`{p}`" for p in prompts)]
    return "\n".join(lines) + "\n"


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1000px;margin:2em auto;color:#1b1f24;
line-height:1.45;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}
h2{font-size:1.2em;border-bottom:1px solid #d0d7de;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;width:100%;font-size:.92em}
td{border-bottom:1px solid #eaeef2;padding:.3em .5em;vertical-align:top}
td:first-child{color:#57606a;width:38%}
.banner{padding:1em 1.2em;border-radius:8px;font-size:1.05em;margin:1em 0}
.dp{background:#dafbe1;border:1px solid #4ac26b}
.nodp{background:#ffebe9;border:2px solid #cf222e;font-weight:bold;font-size:1.2em}
.fail{color:#cf222e;font-weight:bold} .pass{color:#1a7f37;font-weight:bold}
.inconclusive{color:#9a6700;font-weight:bold}
figure{margin:1em 0} figcaption{color:#57606a;font-size:.9em} img{max-width:100%;image-rendering:pixelated}
.figs{display:flex;flex-wrap:wrap;gap:1.5em;align-items:flex-start} .figs figure{margin:0;flex:1 1 420px}
.muted{color:#57606a;font-size:.9em}
@media print{body{max-width:none;margin:0;padding:0;font-size:10pt;color:#000}
h2{page-break-after:avoid;break-after:avoid} tr,figure{page-break-inside:avoid;break-inside:avoid}
.banner{border:1px solid #000} .noprint{display:none}
.fail,.pass,.inconclusive{-webkit-print-color-adjust:exact;print-color-adjust:exact}
@page{size:A4;margin:15mm}}
"""


def render_html(sections, *, run_dir: Path, plots: dict, run: dict, dp: bool) -> str:
    priv = json.loads((run_dir / "privacy.json").read_text())
    esc = html.escape
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
             "<meta name='viewport' content='width=device-width, initial-scale=1'>",
             "<title>dpdiff run report</title>", f"<style>{_CSS}</style></head><body>",
             "<h1>dpdiff run report</h1>", f"<div class='muted'>{esc(str(run_dir))}</div>",
             f"<div class='banner {'dp' if dp else 'nodp'}'>{esc(guarantee_sentence(priv))}</div>",
             "<div class='muted noprint'>Printable: the browser's Print (to PDF) lays this page out for A4.</div>"]
    for title, rows in sections:
        parts.append(f"<h2>{esc(title)}</h2><table>")
        for k, v in rows:
            cls = ""
            if isinstance(v, str) and v.startswith("FAIL"):
                cls = " class='fail'"
            elif isinstance(v, str) and v.startswith("PASS"):
                cls = " class='pass'"
            elif isinstance(v, str) and v.startswith("INCONCLUSIVE"):
                cls = " class='inconclusive'"
            parts.append(f"<tr><td>{esc(str(k))}</td><td{cls}>{esc(str(v))}</td></tr>")
        parts.append("</table>")
    parts.append("<h2>Figures</h2><div class='figs'>")
    for name, path in plots.items():
        parts.append(f"<figure>{_img_tag(Path(path), name)}<figcaption>{esc(name)}</figcaption></figure>")
    parts.append("</div>")
    pairs = [("samples.png", "fine-tuned model"), ("samples_base.png", "base model, same prompts and seeds")]
    tags = [(title, _img_tag(run_dir / img, title)) for img, title in pairs]
    tags = [(t, tag) for t, tag in tags if tag]
    if tags:
        parts.append("<h2>Samples</h2><div class='figs'>")
        for title, tag in tags:
            parts.append(f"<figure>{tag}<figcaption>{esc(title)}</figcaption></figure>")
        parts.append("</div>")
    tag = _img_tag(run_dir / "probe_extraction.png", "flagged generations")
    if tag:
        parts.append("<h2>Extraction probe: flagged generations</h2>")
        parts.append(f"<figure>{tag}<figcaption>each pair: generated image | blue (training image) or grey "
                     "(held-out control, never trained on) | the image it matched</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)
