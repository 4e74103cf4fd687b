"""The sub-quadratic near-duplicate search finds exactly the pairs the exhaustive search finds."""

from __future__ import annotations

import numpy as np
import pytest

from dpdiff.data.dedup import exhaustive_hash_pairs, near_hash_pairs


def _pairs(a, b) -> set[tuple[int, int]]:
    return set(zip(a.tolist(), b.tolist()))


def _planted(n: int, seed: int) -> np.ndarray:
    """Random 64-bit hashes, a fifth of them copies of another with 0-6 bits flipped (near pairs at every
    distance around the threshold), and a block of identical hashes (a giant bucket)."""
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) ^ (rng.integers(0, 2, n).astype(np.uint64) << 63)
    for i in rng.choice(n, n // 5, replace=False):
        j = int(rng.integers(n))
        bits = rng.choice(64, int(rng.integers(0, 7)), replace=False)
        h[i] = h[j] ^ np.uint64(sum(1 << int(b) for b in bits))
    h[:40] = h[0]
    return h


@pytest.mark.parametrize("d", [0, 2, 4, 7])
def test_banded_search_equals_the_exhaustive_search(d):
    h = _planted(3000, seed=d)
    got = _pairs(*near_hash_pairs(h, max_distance=d))
    want = _pairs(*exhaustive_hash_pairs(h, max_distance=d))
    assert got == want and len(want) >= 40 * 39 // 2  # the planted pairs are there, none missed, none extra
    assert all(a < b for a, b in got)


def test_the_demo_has_the_same_duplicate_sets_either_way():
    from dpdiff.data.dedup import image_signatures
    from dpdiff.data.demos import builtin_digits_dir
    from dpdiff.data.formats import read_dataset

    _, hashes = image_signatures(read_dataset(builtin_digits_dir()))
    for d in (4, 8):
        assert _pairs(*near_hash_pairs(hashes, max_distance=d)) == _pairs(*exhaustive_hash_pairs(hashes,
                                                                                                max_distance=d))


def test_no_pairs_among_fewer_than_two():
    assert len(near_hash_pairs(np.zeros(1, np.uint64), max_distance=4)[0]) == 0


def test_duplicate_sets_equal_the_exhaustive_reference_on_the_demo():
    """The whole rule (pHash within 4 bits and thumbnail RMS <= 0.06, joined into sets) against a plain exhaustive
    implementation of it over every pair: the same sets on the demo data (which has duplicate sets)."""
    from dpdiff.data.dedup import _thumbnail, find_duplicate_sets, image_signatures
    from dpdiff.data.demos import get_demo
    from dpdiff.data.formats import read_dataset

    recs = read_dataset(get_demo("printed").directory())  # the 4,000-image demo: it has duplicate sets
    shas, hashes = image_signatures(recs)
    thumbs = np.stack([_thumbnail(r) for r in recs]).reshape(len(recs), -1)
    parent = list(range(len(recs)))

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i

    def join(i, j):
        parent[max(find(i), find(j))] = min(find(i), find(j))

    for i in range(len(recs)):
        near = np.bitwise_count(hashes[i] ^ hashes[i + 1:]) <= 4
        for j in np.flatnonzero(near) + i + 1:
            if np.sqrt(np.mean((thumbs[i] - thumbs[j]) ** 2)) <= 0.06:
                join(i, int(j))
    by_sha = {}
    for i, sha in enumerate(shas):  # exact duplicates, whatever their hashes
        by_sha.setdefault(sha, []).append(i)
    for same in by_sha.values():
        for j in same[1:]:
            join(same[0], j)
    groups = {}
    for i in range(len(recs)):
        groups.setdefault(find(i), []).append(i)
    want = sorted([g for g in groups.values() if len(g) > 1], key=lambda g: g[0])
    got = find_duplicate_sets(recs)
    assert got == want and len(got) >= 1
