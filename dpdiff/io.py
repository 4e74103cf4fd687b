"""Atomic file writes: a reader (or a crash) never sees half a file."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def sanitize(obj):
    """JSON-safe copy: non-finite floats become None, numpy/torch scalars plain numbers, paths str."""
    if isinstance(obj, dict):
        return {str(k): sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [sanitize(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_bytes_atomic(path: Path, data: bytes, *, mode: int | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if mode is not None:
        os.chmod(tmp, mode)
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str, *, mode: int | None = None) -> None:
    write_bytes_atomic(path, text.encode("utf-8"), mode=mode)


def write_json_atomic(path: Path, obj, *, mode: int | None = None) -> None:
    write_text_atomic(path, json.dumps(sanitize(obj), indent=2, allow_nan=False) + "\n", mode=mode)


def append_jsonl(path: Path, obj) -> None:
    """Append one JSON line (a whole line per write; a crash loses at most the last line)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(sanitize(obj), allow_nan=False) + "\n")
