"""What the config says about itself: every key's default and the comment above it in the YAML files.

``dpdiff explain KEY``, ``dpdiff finetune --help`` and ``dpdiff probe --help`` read the shipped config files
(``configs/``: the comments are the documentation) with a small line reader, because YAML loaders drop
comments; only the mapping layout these files use is understood (``key: value`` lines, nesting by
indentation, ``# ...`` comment lines directly above a key, a trailing ``# ...`` after a value).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path

from dpdiff.errors import UserError

_KEY = re.compile(r"^(\s*)([A-Za-z_][A-Za-z0-9_]*):(?:\s+(.*?))?\s*$")
_COMMENT = re.compile(r"^\s*#\s?(.*)$")


@dataclass(frozen=True)
class KeyDoc:
    key: str  # dotted, from the config's root (probes.mia.lira.shadows)
    value: str  # the default as written ("" for a mapping)
    doc: str  # the comment lines above it, joined, plus a trailing comment
    source: str  # configs/probes/default.yaml


def _split_value(raw: str) -> tuple[str, str]:
    """``value  # comment`` -> (value, comment); a ``#`` inside quotes is part of the value."""
    quote = None
    for i, ch in enumerate(raw):
        if ch in "'\"":
            quote = None if quote == ch else (quote or ch)
        elif ch == "#" and quote is None and (i == 0 or raw[i - 1].isspace()):
            return raw[:i].rstrip(), raw[i + 1 :].strip()
    return raw.rstrip(), ""


def read_keys(path: Path, prefix: str = "") -> list[KeyDoc]:
    """Every key of one config file, dotted under ``prefix``, with its documentation."""
    out: list[KeyDoc] = []
    stack: list[tuple[int, str]] = []
    pending: list[str] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for line in lines:
        if not line.strip():
            pending = []
            continue
        c = _COMMENT.match(line)
        if c:
            if not c.group(1).startswith("@package"):
                pending.append(c.group(1).strip())
            continue
        m = _KEY.match(line)
        if not m:
            pending = []
            continue
        indent, key, raw = len(m.group(1)), m.group(2), m.group(3) or ""
        while stack and stack[-1][0] >= indent:
            stack.pop()
        value, trailing = _split_value(raw)
        dotted = ".".join([p for p in [prefix] + [k for _, k in stack] + [key] if p])
        doc = " ".join(pending + ([trailing] if trailing else []))
        if not (stack == [] and key in ("defaults", "hydra")) and not any(k in ("defaults", "hydra") for _, k in stack):
            out.append(KeyDoc(dotted, value, doc, str(path)))
        pending = []
        if value == "":
            stack.append((indent, key))
    return out


def _root() -> Path:
    from dpdiff.paths import config_dir

    return config_dir()


def defaults_list(root: Path | None = None) -> dict[str, tuple[str, str]]:
    """The groups of ``finetune.yaml``'s defaults list: group -> (default option, its comment)."""
    root = root or _root()
    out = {}
    in_defaults = False
    for line in (root / "finetune.yaml").read_text(encoding="utf-8").splitlines():
        if line.startswith("defaults:"):
            in_defaults = True
            continue
        if in_defaults:
            if not line.startswith(" "):
                break
            m = re.match(r"^\s*-\s*(optional\s+)?([a-z_]+):\s*([A-Za-z0-9_]+)\s*(?:#\s*(.*))?$", line)
            if m:
                out[m.group(2)] = (m.group(3), (m.group(4) or "").strip())
    return out


def group_options(group: str, root: Path | None = None) -> list[str]:
    d = (root or _root()) / group
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def all_keys(root: Path | None = None) -> list[KeyDoc]:
    """The keys of the default config: each group's default option, at the group's package."""
    root = root or _root()
    keys: list[KeyDoc] = []
    for group, (option, _) in defaults_list(root).items():
        path = root / group / f"{option}.yaml"
        if option != "null" and path.exists():
            keys += read_keys(path, prefix=group)
    keys += read_keys(root / "finetune.yaml")
    return keys


def explain(key: str | None) -> str:
    """A key's default and documentation; a group or mapping lists what is under it; none lists the groups."""
    root = _root()
    groups = defaults_list(root)
    if not key:
        lines = ["config groups (choose with GROUP=OPTION; the default first):"]
        for g, (opt, doc) in groups.items():
            others = [o for o in group_options(g, root) if o != opt]
            lines.append(f"  {g:15s} {opt}" + (f" | {' | '.join(others)}" if others else "")
                         + (f"    # {doc}" if doc else ""))
        lines.append("dpdiff explain GROUP lists a group's keys; dpdiff explain GROUP.KEY explains one")
        return "\n".join(lines)
    keys = all_keys(root)
    exact = [k for k in keys if k.key == key]
    under = [k for k in keys if k.key.startswith(key + ".")]
    if not exact and not under:
        close = difflib.get_close_matches(key, [k.key for k in keys] + list(groups), n=3, cutoff=0.6)
        raise UserError(f"no config key {key!r}" + (f"; did you mean {', '.join(close)}?" if close else
                                                     "; dpdiff explain lists the groups"))
    lines = []
    for k in exact:
        lines.append(f"{k.key} = {k.value or '(a mapping)'}    [{Path(k.source).relative_to(root.parent)}]")
        if k.doc:
            lines.append(_wrap(k.doc, "  "))
    if key in groups:
        opt, doc = groups[key]
        lines.append(f"{key}: config group, default {opt}; options: {', '.join(group_options(key, root))}"
                     + (f" ({doc})" if doc else ""))
    for k in under:
        first = k.doc.split(". ")[0] if k.doc else ""
        lines.append(f"  {k.key} = {k.value or '(mapping)'}" + (f"    # {first}" if first else ""))
    return "\n".join(lines)


def _wrap(text: str, indent: str, width: int = 100) -> str:
    import textwrap

    return textwrap.fill(text, width=width, initial_indent=indent, subsequent_indent=indent)


def finetune_help() -> str:
    return "\n".join([
        "usage: dpdiff finetune [KEY=VALUE ...] [GROUP=OPTION ...] [-m]",
        "",
        "Fine-tune a diffusion model's denoiser under DP-SGD (by default), then sample, probe and report. Every",
        "setting is a Hydra override; the run dir is hydra.run.dir=DIR (default runs/DATE/TIME); -m with",
        "comma-separated values sweeps (dpdiff sweep-report then composes the sweep's privacy).",
        "",
        explain(None),
        "",
        "Keys of the default config (dpdiff explain KEY for the full documentation):",
        *[f"  {k.key} = {k.value}" for k in all_keys() if k.value != ""],
    ])


def probe_help() -> str:
    keys = [k for k in all_keys() if k.key.startswith("probes.") and k.value != ""]
    return "\n".join([
        "usage: dpdiff probe RUN_DIR [probes.KEY=VALUE ...]",
        "",
        "Run the probes on a finished run dir: its own probe settings, merged with the overrides. Each attempt is",
        "counted (probes_history.jsonl) and shares the family-wise error rate; the report is rebuilt.",
        "",
        "Probe keys (dpdiff explain probes.KEY for the full documentation):",
        *[f"  {k.key} = {k.value}" for k in keys],
    ])
