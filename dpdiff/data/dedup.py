"""Exact and near-duplicate images, and what to do with them (``data.dedup``).

Duplicated training images are what extraction attacks recover first (Carlini et al. 2023),
and a duplicated image counted as several privacy units silently weakens the guarantee for
that image. Detection: exact = identical decoded pixels (sha256); near = perceptual hash
(imagehash's pHash, 64 bits) within ``max_hash_distance`` bits AND a small pixel distance
on 32x32 grayscale thumbnails (RMS in [0,1] units <= ``max_pixel_rms``), the pixel check
removing pHash collisions of merely similar images. Pairs are joined into duplicate sets
(union-find).

Search. Comparing every pHash with every other is quadratic (10^12 comparisons at 10^6 images). Candidates
come instead from multi-index hashing (Norouzi, Punjani, Fleet 2012): the 64 bits are cut into
``max_hash_distance + 1`` bands, and by the pigeonhole principle two hashes within that many bits agree
exactly on at least one band; so only hashes sharing a band value are compared. The result is exactly the
exhaustive search's (tested against it), at a cost that grows with the number of colliding pairs (about
N^2 (d+1) / 2^(64/(d+1)) for spread-out hashes) rather than N^2. Chosen over a sorted-bucket scheme, which
finds only neighbours adjacent in one ordering and would miss pairs.

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


def _signature(r: ImageRecord) -> tuple[str, int]:
    import imagehash

    from dpdiff.data.preprocess import to_rgb

    im = to_rgb(r.open())
    sha = hashlib.sha256(im.tobytes() + repr(im.size).encode()).hexdigest()
    bits = imagehash.phash(im).hash.flatten()
    return sha, int("".join("1" if b else "0" for b in bits), 2)


def image_signatures(records: list[ImageRecord]) -> tuple[list[str], np.ndarray]:
    """(sha256 of RGB pixels, pHash bits as uint64) of every record, one image open at a time
    (``parallel_map``: on threads where ``DPDIFF_DATA_WORKERS`` asks)."""
    from dpdiff.data.validate import parallel_map

    sigs = parallel_map(_signature, records)
    return [s for s, _ in sigs], np.array([h for _, h in sigs], dtype=np.uint64)


def _thumbnail(record: ImageRecord) -> np.ndarray:
    """32x32 grayscale thumbnail in [0, 1] (the pixel check of a candidate pair)."""
    from PIL import Image

    from dpdiff.data.preprocess import to_rgb

    im = to_rgb(record.open()).convert("L").resize((32, 32), Image.Resampling.BILINEAR)
    return np.asarray(im, dtype=np.float32) / 255


def find_duplicate_sets(records: list[ImageRecord], *, max_hash_distance: int = 4,
                        max_pixel_rms: float = 0.06) -> list[list[int]]:
    """Sets (size >= 2) of record indices that are exact or near duplicates of each other. Thumbnails are made
    only for the images of candidate pairs (memory follows the candidates, not N)."""
    n = len(records)
    if n < 2:
        return []
    shas, hashes = image_signatures(records)
    uf = _UnionFind(n)
    first: dict[str, int] = {}
    for i, s in enumerate(shas):
        if s in first:
            uf.union(first[s], i)
        else:
            first[s] = i
    a, b = near_hash_pairs(hashes, max_distance=max_hash_distance)
    thumbs: dict[int, np.ndarray] = {}
    for x, y in zip(a.tolist(), b.tolist()):
        if uf.find(x) == uf.find(y):
            continue  # already in one set (e.g. exact duplicates): no pixel check needed
        for i in (x, y):
            if i not in thumbs:
                thumbs[i] = _thumbnail(records[i])
        if float(np.sqrt(np.mean((thumbs[x] - thumbs[y]) ** 2))) <= max_pixel_rms:
            uf.union(x, y)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(uf.find(i), []).append(i)
    return sorted([g for g in groups.values() if len(g) > 1], key=lambda g: g[0])


def near_hash_pairs(hashes: np.ndarray, *, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Every pair ``a < b`` with Hamming distance ``<= max_distance`` between 64-bit hashes, by multi-index
    hashing (module docstring): candidates share one of ``max_distance + 1`` bands exactly, then the full
    distance is checked."""
    h = np.asarray(hashes, dtype=np.uint64)
    n = len(h)
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    bands = max(1, int(max_distance) + 1)
    if bands > 64:
        return exhaustive_hash_pairs(h, max_distance=max_distance)
    edges = np.linspace(0, 64, bands + 1).round().astype(int)
    found = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        key = (h >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)
        order = np.argsort(key, kind="stable")
        ks = key[order]
        starts = np.flatnonzero(np.r_[True, ks[1:] != ks[:-1]])
        sizes = np.diff(np.r_[starts, n])
        for st, sz in zip(starts[sizes > 1], sizes[sizes > 1]):
            idx = order[st : st + sz]
            rows = max(1, (1 << 22) // int(sz))  # a block of rows x sz distances: memory bounded for any bucket
            for r0 in range(0, int(sz) - 1, rows):
                r1 = min(r0 + rows, int(sz))
                dist = np.bitwise_count(h[idx[r0:r1], None] ^ h[None, idx])  # [rows, sz]
                ii, jj = np.nonzero(dist <= max_distance)
                ii = ii + r0
                keep = ii < jj
                a, b = idx[ii[keep]], idx[jj[keep]]
                found.append(np.stack([np.minimum(a, b), np.maximum(a, b)]))
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pairs = np.unique(np.concatenate(found, axis=1).astype(np.int64), axis=1)  # a pair may share several bands
    return pairs[0], pairs[1]


def exhaustive_hash_pairs(hashes: np.ndarray, *, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """The quadratic reference: every pair ``a < b`` within ``max_distance`` bits, in blocks of 1024 rows."""
    h = np.asarray(hashes, dtype=np.uint64)
    out_a, out_b = [], []
    for start in range(0, len(h), 1024):
        dist = np.bitwise_count(h[start : start + 1024, None] ^ h[None, :])
        ii, jj = np.nonzero(dist <= max_distance)
        ii = ii + start
        keep = ii < jj
        out_a.append(ii[keep])
        out_b.append(jj[keep])
    if not out_a:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(out_a).astype(np.int64), np.concatenate(out_b).astype(np.int64)


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
