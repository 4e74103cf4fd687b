"""Exact and near-duplicate images, and what to do with them (``data.dedup``).

Duplicated training images are what extraction attacks recover first (Carlini et al. 2023),
and a duplicated image counted as several privacy units silently weakens the guarantee for
that image. Detection: exact = identical decoded pixels (sha256); near = perceptual hash
(imagehash's pHash, 64 bits) within ``max_hash_distance`` bits AND a small pixel distance
on 32x32 grayscale thumbnails (RMS in [0,1] units <= ``max_pixel_rms``), the pixel check
removing pHash collisions of merely similar images. Pairs are joined into duplicate sets
(union-find).

Modes: ``report`` (count them; default), ``drop`` (keep the first image of each set),
``group`` (each set becomes ONE privacy unit: the honest unit when the same image appears
several times).
"""

from __future__ import annotations

import hashlib

import numpy as np

from dpdiff.data.records import ImageRecord
from dpdiff.errors import UserError

MODES = ("report", "drop", "group")


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def image_signatures(records: list[ImageRecord]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(sha256 of RGB pixels, pHash bits as uint64, 32x32 grayscale thumbnails in [0,1])."""
    import imagehash
    from PIL import Image

    from dpdiff.data.preprocess import to_rgb

    shas, hashes, thumbs = [], [], []
    for r in records:
        im = to_rgb(r.open())
        shas.append(hashlib.sha256(im.tobytes() + repr(im.size).encode()).hexdigest())
        bits = imagehash.phash(im).hash.flatten()
        hashes.append(int("".join("1" if b else "0" for b in bits), 2))
        thumbs.append(np.asarray(im.convert("L").resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float32) / 255)
    return shas, np.array(hashes, dtype=np.uint64), np.stack(thumbs) if thumbs else np.zeros((0, 32, 32), np.float32)


def find_duplicate_sets(records: list[ImageRecord], *, max_hash_distance: int = 4,
                        max_pixel_rms: float = 0.06) -> list[list[int]]:
    """Sets (size >= 2) of record indices that are exact or near duplicates of each other."""
    n = len(records)
    if n < 2:
        return []
    shas, hashes, thumbs = image_signatures(records)
    uf = _UnionFind(n)
    first: dict[str, int] = {}
    for i, s in enumerate(shas):
        if s in first:
            uf.union(first[s], i)
        else:
            first[s] = i
    flat = thumbs.reshape(n, -1)
    chunk = 1024
    for start in range(0, n, chunk):
        block = hashes[start : start + chunk]
        dist = np.bitwise_count(block[:, None] ^ hashes[None, :])  # Hamming distances
        ii, jj = np.nonzero(dist <= max_hash_distance)
        for a, b in zip(ii + start, jj):
            if a < b:
                rms = float(np.sqrt(np.mean((flat[a] - flat[b]) ** 2)))
                if rms <= max_pixel_rms:
                    uf.union(int(a), int(b))
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(uf.find(i), []).append(i)
    return sorted([g for g in groups.values() if len(g) > 1], key=lambda g: g[0])


def apply_dedup(records: list[ImageRecord], *, mode: str, max_hash_distance: int = 4,
                max_pixel_rms: float = 0.06) -> tuple[list[ImageRecord], list[list[int]] | None, dict]:
    """Return (records to use, duplicate sets to group as units or None, summary for reports)."""
    if mode not in MODES:
        raise UserError(f"data.dedup={mode}: must be one of {', '.join(MODES)}")
    sets = find_duplicate_sets(records, max_hash_distance=max_hash_distance, max_pixel_rms=max_pixel_rms)
    info = {"mode": mode, "duplicate_sets": len(sets), "images_in_sets": sum(len(s) for s in sets),
            "largest_set": max((len(s) for s in sets), default=0),
            "examples": [[records[i].key for i in s[:5]] for s in sets[:10]]}
    if mode == "report" or not sets:
        return records, None, info
    if mode == "drop":
        drop = {i for s in sets for i in s[1:]}
        info["dropped"] = len(drop)
        return [r for i, r in enumerate(records) if i not in drop], None, info
    return records, sets, info
