"""Image preprocessing as in diffusers' text-to-image LoRA script, without torchvision.

resize (shorter side to ``resolution``, bilinear) -> center or random crop -> optional
horizontal flip -> tensor in [-1, 1]. Flips are applied in pixel space *before* the VAE,
so cached latents of both orientations are exact (a flipped latent is not the latent of
the flipped image).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparent pixels are composited on white."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.float64)
        hi = arr.max() if arr.max() > 0 else 1.0
        return Image.fromarray((arr / hi * 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def crop_box(size: tuple[int, int], resolution: int, *, center: bool, rng: np.random.Generator | None) -> tuple:
    w, h = size
    if center or rng is None:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    else:
        left = int(rng.integers(0, w - resolution + 1))
        top = int(rng.integers(0, h - resolution + 1))
    return left, top, left + resolution, top + resolution


def to_pixels(image: Image.Image, *, resolution: int, center_crop: bool = True, flip: bool = False,
              rng: np.random.Generator | None = None) -> torch.Tensor:
    """A [3, resolution, resolution] float tensor in [-1, 1]."""
    image = ImageOps.exif_transpose(image) if hasattr(image, "getexif") else image
    image = to_rgb(image)
    w, h = image.size
    scale = resolution / min(w, h)
    if (w, h) != (resolution, resolution):
        new = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
        image = image.resize(new, Image.Resampling.BILINEAR)
        image = image.crop(crop_box(image.size, resolution, center=center_crop, rng=rng))
    if flip:
        image = ImageOps.mirror(image)
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def from_pixels(x: torch.Tensor) -> Image.Image:
    """Inverse of ``to_pixels`` for one [3, H, W] tensor in [-1, 1]."""
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def original_size(image: Image.Image) -> tuple[int, int]:
    """(height, width) of the image as ``to_pixels`` sees it (after its EXIF orientation)."""
    image = ImageOps.exif_transpose(image) if hasattr(image, "getexif") else image
    return image.height, image.width


def crop_top_left(image: Image.Image, *, resolution: int, flip: bool = False) -> tuple[int, int]:
    """(top, left) of the center crop ``to_pixels`` takes, in the resized image, as SDXL's crop conditioning reads
    it. A flipped image's left is measured in the mirrored image (``train_text_to_image_sdxl.py`` writes
    ``resolution - left`` there, which is not a crop coordinate; both are 0 for a square image)."""
    h, w = original_size(image)
    if (w, h) == (resolution, resolution):
        return 0, 0
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    left, top, _, _ = crop_box((new_w, new_h), resolution, center=True, rng=None)
    return top, (new_w - resolution - left) if flip else left
