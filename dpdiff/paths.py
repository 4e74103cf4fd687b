"""Where dpdiff finds its own files (configs, the tiny base) and keeps caches."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS_DIR = PACKAGE_DIR / "assets"
TINY_BASE_DIR = ASSETS_DIR / "tiny-sd-digits"


def config_dir() -> Path:
    """The Hydra config tree: ``configs/`` of a source checkout, or the copy in the wheel. Its group options
    extend the schemas of ``dpdiff.schema`` (compose with ``dpdiff.schema.compose``, which registers them)."""
    for candidate in (PACKAGE_DIR.parent / "configs", PACKAGE_DIR / "configs"):
        if (candidate / "finetune.yaml").exists():
            return candidate
    raise FileNotFoundError("dpdiff's configs/ directory is missing from this installation")


def home() -> Path:
    """dpdiff's cache root: $DPDIFF_HOME, else $XDG_CACHE_HOME/dpdiff, else ~/.cache/dpdiff."""
    if os.environ.get("DPDIFF_HOME"):
        return Path(os.environ["DPDIFF_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "dpdiff"
