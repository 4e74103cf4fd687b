"""Largest cliques: planted near-duplicates, random images, and brute force on small graphs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dpdiff.probes.cliques import clique_medoid, clique_sizes, largest_clique, threshold_graph
from dpdiff.probes.metrics import pairwise_tiled_l2


def _brute_force_max_clique_size(dist, threshold):
    n = len(dist)
    for size in range(n, 0, -1):
        for sub in itertools.combinations(range(n), size):
            if all(dist[i, j] <= threshold for i, j in itertools.combinations(sub, 2)):
                return size
    return 0


def test_planted_near_duplicates_form_the_largest_clique():
    rng = np.random.default_rng(0)
    images = rng.random((40, 16, 16, 3))
    base = rng.random((16, 16, 3))
    planted = sorted(rng.choice(40, size=6, replace=False).tolist())
    for i in planted:
        images[i] = np.clip(base + 0.02 * rng.standard_normal(base.shape), 0, 1)
    dist = pairwise_tiled_l2(images, grid=4)
    assert largest_clique(dist, threshold=0.15) == planted


def test_random_images_give_cliques_of_size_one():
    rng = np.random.default_rng(1)
    dist = pairwise_tiled_l2(rng.random((30, 16, 16, 3)), grid=4)
    assert len(largest_clique(dist, threshold=0.15)) == 1
    assert clique_sizes([dist, dist[:5, :5]], threshold=0.15) == [1, 1]


@pytest.mark.parametrize("seed", range(6))
def test_exact_maximum_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = 11
    upper = np.triu(rng.random((n, n)), k=1)
    dist = upper + upper.T
    for threshold in (0.2, 0.5, 0.7):
        clique = largest_clique(dist, threshold=threshold)
        assert len(clique) == _brute_force_max_clique_size(dist, threshold)
        assert all(dist[i, j] <= threshold for i, j in itertools.combinations(clique, 2))
        assert clique == sorted(clique)


def test_threshold_is_inclusive_and_degenerate_sizes():
    dist = np.array([[0.0, 0.15, 0.3], [0.15, 0.0, 0.15], [0.3, 0.15, 0.0]])
    assert len(largest_clique(dist, threshold=0.15)) == 2
    assert largest_clique(dist, threshold=0.3) == [0, 1, 2]
    assert largest_clique(np.zeros((0, 0)), threshold=0.1) == []
    assert largest_clique(np.zeros((1, 1)), threshold=0.1) == [0]
    assert threshold_graph(dist, threshold=0.15).number_of_edges() == 2


def test_clique_medoid():
    dist = np.array([
        [0.0, 0.1, 0.2, 0.9],
        [0.1, 0.0, 0.1, 0.9],
        [0.2, 0.1, 0.0, 0.9],
        [0.9, 0.9, 0.9, 0.0],
    ])
    medoid, mean_pairwise = clique_medoid(dist, [2, 0, 1])
    assert medoid == 1
    assert mean_pairwise == pytest.approx((0.1 + 0.2 + 0.1) / 3)
    assert clique_medoid(dist, [3]) == (3, 0.0)


def test_invalid_matrices_are_rejected():
    with pytest.raises(ValueError, match="symmetric"):
        largest_clique(np.array([[0.0, 0.1], [0.2, 0.0]]), threshold=0.15)
    with pytest.raises(ValueError, match="NaN"):
        largest_clique(np.array([[0.0, np.nan], [np.nan, 0.0]]), threshold=0.15)
    with pytest.raises(ValueError, match="square"):
        largest_clique(np.zeros((2, 3)), threshold=0.15)
    with pytest.raises(ValueError, match="threshold"):
        largest_clique(np.zeros((2, 2)), threshold=-1.0)
