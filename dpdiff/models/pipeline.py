"""Loading a diffusers Stable Diffusion pipeline directory, and drawing sample grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def image_grid(images: list[Image.Image], rows: int, cols: int, pad: int = 2) -> Image.Image:
    """Tile equally-sized images row-major on a white canvas with ``pad`` pixels between."""
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w + (cols + 1) * pad, rows * h + (rows + 1) * pad), "white")
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(im, (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


@torch.no_grad()
def generate(pipe, prompts: list[str], *, seeds: list[int], steps: int = 20,
             guidance_scale: float = 3.0, batch_size: int = 64, progress: bool = False) -> list[Image.Image]:
    """One image per (prompt, seed) pair, batched, each from its own seeded generator.

    Batches go through one pipeline call each (one UNet batch of 2x``batch_size`` with
    classifier-free guidance); the seed of image i fixes its initial noise alone, so results
    do not depend on the batch size.
    """
    from tqdm.auto import tqdm

    assert len(prompts) == len(seeds)
    out: list[Image.Image] = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="generating", disable=not progress, leave=False):
        p = prompts[start : start + batch_size]
        g = [torch.Generator().manual_seed(int(s)) for s in seeds[start : start + batch_size]]
        res = pipe(p, num_inference_steps=steps, guidance_scale=guidance_scale, generator=g,
                   output_type="np")
        out += [Image.fromarray((np.clip(x, 0, 1) * 255).round().astype(np.uint8)) for x in res.images]
    return out


def label_rows(grid: Image.Image, labels: list[str], *, row_height: float, max_chars: int = 32) -> Image.Image:
    """Add a left margin with one text label per row (the prompt of that row).

    The font scales with the row height, so labels stay readable when the grid is shown
    scaled down (as in the report, where two grids sit side by side).
    """
    from PIL import ImageDraw, ImageFont

    size = max(13, int(row_height * 0.3))
    labels = [t if len(t) <= max_chars else t[: max_chars - 1] + "..." for t in labels]
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed small bitmap font
        font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = max(int(probe.textlength(t, font=font)) for t in labels) + 2 * 8 if labels else 0
    out = Image.new("RGB", (grid.width + width, grid.height), "white")
    out.paste(grid, (width, 0))
    draw = ImageDraw.Draw(out)
    for i, text in enumerate(labels):
        draw.text((8, int((i + 0.5) * row_height - size / 2)), text, fill=(40, 40, 40), font=font)
    return out


def sample_grid(pipe, prompts: list[str], *, per_prompt: int, seed: int, path: Path,
                upscale: int = 2, labels: bool = True, **kwargs) -> Path:
    """A grid with one row per prompt (labelled with it) and ``per_prompt`` seeded samples per row, as PNG.

    The same seeds are used in every row, so rows differ only by their prompt, and grids of two
    models (e.g. fine-tuned and base) compare image by image.
    """
    all_prompts = [p for p in prompts for _ in range(per_prompt)]
    seeds = [seed + j for _ in prompts for j in range(per_prompt)]
    images = generate(pipe, all_prompts, seeds=seeds, **kwargs)
    grid = image_grid(images, rows=len(prompts), cols=per_prompt)
    if upscale > 1:
        grid = grid.resize((grid.width * upscale, grid.height * upscale), Image.Resampling.NEAREST)
    if labels:
        grid = label_rows(grid, prompts, row_height=grid.height / len(prompts))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return Path(path)
