"""The built-in demo data: scikit-learn's bundled handwritten digits (no download).

scikit-learn ships the 1,797 8x8 digits of the UCI optical-recognition set. dpdiff splits
them by class: digits 0-4 are the *public* half the tiny base model is pretrained on,
digits 5-9 the *sensitive* half that the demo fine-tunes on under DP. Each 8x8 image is
rendered as dark ink on white paper at 32x32 RGB (bicubic upsampling), with a caption
"a handwritten digit five". The source set records no writer, so the demo assigns
each image a synthetic ``user_id`` (one of 40 pseudo-writers, fixed by a seeded
permutation) purely to exercise user-level privacy; it says nothing about real writers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from dpdiff.models.tiny import NUMBER_WORDS

PUBLIC_DIGITS = (0, 1, 2, 3, 4)
PRIVATE_DIGITS = (5, 6, 7, 8, 9)
RESOLUTION = 32
NUM_PSEUDO_WRITERS = 40


def caption(digit: int) -> str:
    return f"a handwritten digit {NUMBER_WORDS[digit]}"


def render(image8: np.ndarray, resolution: int = RESOLUTION) -> Image.Image:
    """An 8x8 digit (values 0..16, high = ink) as an RGB image, dark ink on white."""
    gray = (255.0 * (1.0 - np.asarray(image8, dtype=np.float64) / 16.0)).clip(0, 255)
    small = Image.fromarray(gray.astype(np.uint8))
    return small.resize((resolution, resolution), Image.Resampling.BICUBIC).convert("RGB")


def load_digits_split(digits: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (images8x8, labels, original indices) of the given classes, in source order."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    keep = np.isin(bunch.target, digits)
    return bunch.images[keep], bunch.target[keep], np.flatnonzero(keep)


def pseudo_writer(index: int) -> str:
    perm = np.random.default_rng(1234).permutation(2000)
    return f"writer-{int(perm[index]) % NUM_PSEUDO_WRITERS:02d}"


def materialize(directory: Path, digits: tuple[int, ...] = PRIVATE_DIGITS) -> Path:
    """Write the digits of ``digits`` as an image folder with ``metadata.jsonl``.

    The layout is the one diffusers' training examples read (``file_name``, ``text``,
    plus ``user_id``). Written once, atomically (a temp dir renamed into place), so a
    crash never leaves a half-written dataset behind. Files are user-only (0o700/0o600):
    this folder stands in for private data.
    """
    directory = Path(directory)
    if (directory / "metadata.jsonl").exists():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(directory.name + f".tmp-{os.getpid()}")
    tmp.mkdir(mode=0o700)
    images, labels, indices = load_digits_split(digits)
    lines = []
    for img, label, idx in zip(images, labels, indices):
        name = f"digit{int(label)}_{int(idx):04d}.png"
        render(img).save(tmp / name)
        os.chmod(tmp / name, 0o600)
        lines.append(
            json.dumps({"file_name": name, "text": caption(int(label)), "user_id": pseudo_writer(int(idx))})
        )
    (tmp / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    os.chmod(tmp / "metadata.jsonl", 0o600)
    try:
        tmp.rename(directory)
    except OSError:  # another process won the race; its copy is identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return directory
