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

    _, hashes, _ = image_signatures(read_dataset(builtin_digits_dir()))
    for d in (4, 8):
        assert _pairs(*near_hash_pairs(hashes, max_distance=d)) == _pairs(*exhaustive_hash_pairs(hashes,
                                                                                                max_distance=d))


def test_no_pairs_among_fewer_than_two():
    assert len(near_hash_pairs(np.zeros(1, np.uint64), max_distance=4)[0]) == 0
