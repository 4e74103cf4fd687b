"""Printed digits in the format of scikit-learn's handwritten digits: the built-in demo's private domain.

The UCI optical-recognition digits (what scikit-learn bundles) were made by scanning handwritten forms
into 32x32 bitmaps and counting the ink pixels in each 4x4 block: 8x8 images of values 0..16. This
module renders *printed* digits the same way, from the fonts matplotlib ships (DejaVu Sans/Serif/Mono,
STIX, Computer Modern; regular, bold, italic), each with a random size, rotation (+-12 degrees) and
offset: a second domain of the same content, in a look the tiny base model has never drawn. Rendering
is deterministic for a seed (fonts, FreeType and Pillow being the pinned versions).

Used for the demo's private images (seed 1) and, from disjoint seeds, for the evaluation classifier's
reference printed digits (``dpdiff.report.utility``), which never enter training.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

FONT_FAMILIES = ("DejaVuSans", "DejaVuSerif", "STIXGeneral", "cmr10", "cmss10", "cmtt10", "cmb10")


@functools.lru_cache(maxsize=1)
def font_files() -> tuple[str, ...]:
    import matplotlib

    folder = Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf"
    files = sorted(str(p) for p in folder.glob("*.ttf")
                   if p.name.startswith(FONT_FAMILIES) and "Display" not in p.name)
    if not files:
        raise RuntimeError(f"no fonts found in {folder}: the printed-digits demo needs matplotlib's bundled fonts")
    return tuple(files)


def render_printed(digit: int, rng: np.random.Generator) -> np.ndarray:
    """One printed digit as an 8x8 array of ink counts 0..16 (the UCI format)."""
    from PIL import Image, ImageDraw, ImageFont

    fonts = font_files()
    font = ImageFont.truetype(fonts[int(rng.integers(len(fonts)))], size=int(rng.integers(22, 34)))
    im = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(im).text((32, 32), str(int(digit)), fill=255, font=font, anchor="mm")
    im = im.rotate(float(rng.uniform(-12, 12)), resample=Image.Resampling.BILINEAR)
    ink = np.asarray(im) > 100
    ys, xs = np.nonzero(ink)
    crop = ink[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    h, w = crop.shape
    scale = 32 / max(h, w) * rng.uniform(0.85, 1.0)
    nh, nw = max(1, int(h * scale)), max(1, int(w * scale))
    small = np.asarray(Image.fromarray((crop * 255).astype(np.uint8)).resize((nw, nh), Image.Resampling.BILINEAR))
    canvas = np.zeros((32, 32), bool)
    oy = int(np.clip((32 - nh) // 2 + int(rng.integers(-1, 2)), 0, 32 - nh))
    ox = int(np.clip((32 - nw) // 2 + int(rng.integers(-1, 2)), 0, 32 - nw))
    canvas[oy:oy + nh, ox:ox + nw] = small > 100
    return canvas.reshape(8, 4, 8, 4).sum((1, 3)).astype(np.float64)


def printed_set(digits, per_digit: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(images [n, 8, 8], labels [n]) of ``per_digit`` printed digits per class, deterministic for ``seed``."""
    rng = np.random.default_rng([int(seed), 0x9817])
    images, labels = [], []
    for d in digits:
        for _ in range(per_digit):
            images.append(render_printed(int(d), rng))
            labels.append(int(d))
    return np.stack(images), np.asarray(labels)


def materialize(directory: Path, *, digits, per_digit: int, seed: int, caption) -> Path:
    """Write the printed digits as an image folder with ``metadata.jsonl`` (user-only files, atomic)."""
    import json

    from dpdiff.data.digits import render

    directory = Path(directory)
    if (directory / "metadata.jsonl").exists():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(directory.name + f".tmp-{os.getpid()}")
    tmp.mkdir(mode=0o700)
    images, labels = printed_set(digits, per_digit, seed)
    lines = []
    for i, (img, label) in enumerate(zip(images, labels)):
        name = f"printed{int(label)}_{i:05d}.png"
        render(img).save(tmp / name)
        os.chmod(tmp / name, 0o600)
        lines.append(json.dumps({"file_name": name, "text": caption(int(label))}))
    (tmp / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    os.chmod(tmp / "metadata.jsonl", 0o600)
    try:
        tmp.rename(directory)
    except OSError:  # another process won the race; its copy is identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return directory
