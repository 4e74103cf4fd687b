"""Image similarity metrics for the extraction probe (pure numpy / scikit-image / imagehash).

Images are float arrays ``H x W x C`` with values in [0, 1] (C = 3), or batches ``N x H x W x C``.

* ``l2``: Carlini et al. 2023 ("Extracting Training Data from Diffusion Models", USENIX Security,
  Sec. 4) normalised L2, i.e. the root-mean-square pixel difference
  ``sqrt(mean((a - b)^2))``. Identical images give 0 and two independent uniform-noise images about
  ``sqrt(1/6) = 0.41``; the paper calls a generation *extracted* when it is within ``delta = 0.15``
  of a training image on this scale.
* ``tiled_l2``: the paper's tiled L2 (Sec. 4.2.1): both images are cut into a ``grid x grid`` set of
  tiles and the distance is the *largest* per-tile RMS difference, so two images count as near
  duplicates only if every region matches (a plain L2 is dominated by large flat backgrounds).
* ``pairwise_tiled_l2`` / ``cross_tiled_l2`` / ``cross_l2``: the same distances for all pairs,
  vectorised with the Gram identity ``|x - y|^2 = |x|^2 + |y|^2 - 2 <x, y>`` in float64 and chunked so
  memory stays bounded for training sets of thousands of images.
* ``ssim`` (Wang et al. 2004, via scikit-image) and ``phash_distance`` (perceptual hash, imagehash).

Followed: LeakPro's ``leakpro/attacks/extraction_attacks/utils_generative/image_metrics.py``
(``normalized_l2_pairwise`` and ``tiled_l2_pairwise``: RMS over pixels and channels, maximum over a
4 x 4 tile grid, zero diagonal). Differed: LeakPro rejects sizes that the grid does not divide; here
``np.array_split`` tiles them (tiles differ by at most one pixel per side), and distances use the
float64 Gram identity instead of explicit differences (absolute error of order 1e-7 at distance 0,
far below any threshold in use; the scalar ``l2`` / ``tiled_l2`` are exact).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = [
    "l2",
    "tiled_l2",
    "pairwise_tiled_l2",
    "cross_tiled_l2",
    "cross_l2",
    "ssim",
    "phash_distance",
    "min_over_flips",
    "to_float_images",
    "tile_slices",
]

# Values slightly outside [0, 1] (rounding in a decoder) are tolerated; a uint8 0-255 image is not.
_RANGE_TOL = 1e-4
# Elements of one float64 chunk of images in the vectorised distances (32 MiB).
_CHUNK_ELEMENTS = 1 << 22


def _as_image(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 3:
        raise ValueError(f"{name}: expected one image H x W x C, got shape {a.shape}")
    return _check_float01(a, name)


def _as_batch(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4:
        raise ValueError(f"{name}: expected images N x H x W x C, got shape {a.shape}")
    return _check_float01(a, name)


def _check_float01(a: np.ndarray, name: str) -> np.ndarray:
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{name}: expected float images in [0, 1], got {a.dtype} (uint8: divide by 255)")
    if a.size:
        lo, hi = float(np.min(a)), float(np.max(a))
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError(f"{name}: images contain NaN or infinity")
        if lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
            raise ValueError(f"{name}: values must be in [0, 1], got [{lo:.4g}, {hi:.4g}]")
    return a


def _check_same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[-3:] != b.shape[-3:]:
        raise ValueError(f"image shapes differ: {a.shape[-3:]} vs {b.shape[-3:]}")


def _check_grid(grid: int, height: int, width: int) -> None:
    if not isinstance(grid, (int, np.integer)) or isinstance(grid, bool) or grid < 1:
        raise ValueError(f"grid must be a positive integer, got {grid!r}")
    if grid > min(height, width):
        raise ValueError(f"grid={grid} is larger than the image ({height} x {width}): tiles would be empty")


def tile_slices(height: int, width: int, *, grid: int = 4) -> list[tuple[slice, slice]]:
    """The ``grid * grid`` (row, column) slices of the tiles, as ``np.array_split`` cuts each axis.

    When ``grid`` does not divide a side, the first ``side % grid`` tiles along it are one pixel larger.
    """
    _check_grid(grid, height, width)

    def cuts(n: int) -> list[slice]:
        sizes = [len(part) for part in np.array_split(np.arange(n), grid)]
        ends = np.cumsum(sizes)
        return [slice(int(e - s), int(e)) for s, e in zip(sizes, ends)]

    return [(r, c) for r in cuts(height) for c in cuts(width)]


def l2(a, b) -> float:
    """Carlini et al. 2023 normalised L2: the RMS difference ``sqrt(mean((a - b)^2))`` of two images."""
    a = _as_image(a, "a")
    b = _as_image(b, "b")
    _check_same_shape(a, b)
    d = a.astype(np.float64) - b.astype(np.float64)
    return float(np.sqrt(np.mean(d * d)))


def tiled_l2(a, b, *, grid: int = 4) -> float:
    """Carlini et al. 2023 tiled L2: the largest tile RMS difference over a ``grid x grid`` set of tiles."""
    a = _as_image(a, "a")
    b = _as_image(b, "b")
    _check_same_shape(a, b)
    d = a.astype(np.float64) - b.astype(np.float64)
    d *= d
    return float(np.sqrt(max(np.mean(d[rs, cs]) for rs, cs in tile_slices(*a.shape[:2], grid=grid))))


def _chunk_rows(num_rows: int, row_elements: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        return int(chunk_size)
    return max(1, min(num_rows, _CHUNK_ELEMENTS // max(row_elements, 1)))


def _flat_regions(images: np.ndarray, regions: list[tuple[slice, slice]]) -> list[tuple[np.ndarray, ...]]:
    """Each region of each image as a float64 row, with the rows' squared norms."""
    out = []
    for rs, cs in regions:
        x = np.ascontiguousarray(images[:, rs, cs, :], dtype=np.float64).reshape(len(images), -1)
        out.append((x, np.einsum("ij,ij->i", x, x)))
    return out


def _cross(gen: np.ndarray, train: np.ndarray, regions: list[tuple[slice, slice]],
           chunk_size: int | None) -> np.ndarray:
    """``max`` over regions of the RMS difference between every gen image and every train image.

    Both sets are processed in chunks of ``chunk_size`` images (default: about 32 MiB of float64 per
    chunk), so the memory beyond the ``[len(gen), len(train)]`` result is bounded.
    """
    n, m = len(gen), len(train)
    out = np.zeros((n, m), dtype=np.float64)
    if n == 0 or m == 0:
        return out
    rows = _chunk_rows(max(n, m), int(np.prod(train.shape[1:])), chunk_size)
    for g0 in range(0, n, rows):
        gen_parts = _flat_regions(gen[g0 : g0 + rows], regions)
        for t0 in range(0, m, rows):
            train_parts = _flat_regions(train[t0 : t0 + rows], regions)
            best = out[g0 : g0 + rows, t0 : t0 + rows]  # a view: filled in place
            for (g, g_sq), (t, t_sq) in zip(gen_parts, train_parts):
                sq = g_sq[:, None] + t_sq[None, :] - 2.0 * (g @ t.T)
                np.maximum(best, sq / g.shape[1], out=best)
    np.maximum(out, 0.0, out=out)  # rounding can leave tiny negatives for identical images
    np.sqrt(out, out=out)
    return out


def cross_l2(gen, train, *, chunk_size: int | None = None) -> np.ndarray:
    """``[len(gen), len(train)]`` matrix of ``l2`` distances, vectorised and chunked over ``train``.

    ``chunk_size`` (images per chunk of either set) defaults to about 32 MiB of float64 per chunk.
    """
    gen = _as_batch(gen, "gen")
    train = _as_batch(train, "train")
    _check_same_shape(gen, train)
    h, w = gen.shape[1:3]
    return _cross(gen, train, [(slice(0, h), slice(0, w))], chunk_size)


def cross_tiled_l2(gen, train, *, grid: int = 4, chunk_size: int | None = None) -> np.ndarray:
    """``[len(gen), len(train)]`` matrix of ``tiled_l2`` distances, vectorised and chunked over ``train``."""
    gen = _as_batch(gen, "gen")
    train = _as_batch(train, "train")
    _check_same_shape(gen, train)
    return _cross(gen, train, tile_slices(*gen.shape[1:3], grid=grid), chunk_size)


def pairwise_tiled_l2(images, *, grid: int = 4, chunk_size: int | None = None) -> np.ndarray:
    """Symmetric ``N x N`` matrix of ``tiled_l2`` distances, zero diagonal (the clique graph's input)."""
    images = _as_batch(images, "images")
    d = _cross(images, images, tile_slices(*images.shape[1:3], grid=grid), chunk_size)
    d = np.maximum(d, d.T)  # exact symmetry (the Gram products are symmetric only up to rounding)
    np.fill_diagonal(d, 0.0)
    return d


def ssim(a, b) -> float:
    """Structural similarity (Wang et al. 2004) via ``skimage.metrics.structural_similarity``.

    ``channel_axis=-1, data_range=1.0`` and scikit-image's default 7 x 7 uniform window, shrunk to the
    largest odd size that fits for images smaller than 7 pixels on a side (at least 3 x 3 is needed).
    """
    from skimage.metrics import structural_similarity

    a = _as_image(a, "a")
    b = _as_image(b, "b")
    _check_same_shape(a, b)
    side = min(a.shape[0], a.shape[1])
    win = min(7, side if side % 2 else side - 1)
    if win < 3:
        raise ValueError(f"ssim needs images of at least 3 x 3 pixels, got {a.shape[:2]}")
    return float(structural_similarity(a.astype(np.float64), b.astype(np.float64), win_size=win,
                                       channel_axis=-1, data_range=1.0))


def _to_pil(a: np.ndarray):
    from PIL import Image

    u8 = np.clip(np.rint(a.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    if u8.shape[-1] == 1:
        return Image.fromarray(u8[..., 0], "L")
    if u8.shape[-1] != 3:
        raise ValueError(f"expected 1 or 3 channels, got {u8.shape[-1]}")
    return Image.fromarray(u8, "RGB")


def phash_distance(a, b, *, hash_size: int = 8) -> int:
    """Hamming distance between the perceptual hashes (``imagehash.phash``, 64 bits by default) of a and b."""
    import imagehash

    a = _as_image(a, "a")
    b = _as_image(b, "b")
    ha = imagehash.phash(_to_pil(a), hash_size=hash_size)
    hb = imagehash.phash(_to_pil(b), hash_size=hash_size)
    return int(ha - hb)


def min_over_flips(fn: Callable, a, b):
    """``min(fn(a, b), fn(a, flip(b)))`` with ``flip`` the horizontal mirror of ``b``.

    The width axis is ``-2`` for both one image (H x W x C) and a batch (N x H x W x C), so this works
    for the scalar metrics and, elementwise, for the matrices of ``cross_l2`` / ``cross_tiled_l2``
    (Carlini et al. 2023 count a mirrored copy as a copy; training pipelines often random-flip).
    """
    b = np.asarray(b)
    best = np.minimum(fn(a, b), fn(a, b[..., ::-1, :]))
    return best.item() if np.ndim(best) == 0 else best


def to_float_images(pil_images) -> np.ndarray:
    """PIL images (same size) -> float32 array N x H x W x 3 in [0, 1]."""
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in pil_images]
    if not arrays:
        raise ValueError("to_float_images: no images")
    shapes = {x.shape for x in arrays}
    if len(shapes) > 1:
        raise ValueError(f"to_float_images: images differ in size: {sorted(shapes)}")
    return np.stack(arrays)
