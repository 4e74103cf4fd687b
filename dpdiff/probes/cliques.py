"""Cliques of near-identical generations: Carlini et al. 2023's memorisation signal.

Carlini et al. ("Extracting Training Data from Diffusion Models", USENIX Security 2023, Sec. 4.2.1)
generate many images of one prompt with different seeds and join two generations by an edge when
their tiled L2 distance is at most a threshold. A prompt whose graph has a large clique (the paper
uses size >= 10 out of 500 generations) is one the model reproduces near-verbatim whatever the seed:
a sign that it memorised a training image, found without access to the training set.

The maximum clique is exact: ``networkx.max_weight_clique`` with unit weights (a branch and bound;
networkx is a dependency of torch, so it is always installed). Graphs here have at most a few hundred
vertices and are either sparse (no memorisation) or contain one dense cluster, where it is fast.

Followed: LeakPro's ``leakpro/attacks/extraction_attacks/utils_generative/carlini_graph.py`` and
``carlini.py`` (edge iff distance <= threshold, inclusive; exact maximum clique; the clique's medoid
as its representative, ties broken by the smaller index), with networkx's branch and bound in place
of LeakPro's own bitset search.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

__all__ = ["threshold_graph", "largest_clique", "clique_sizes", "clique_medoid"]


def _check_dist(dist) -> np.ndarray:
    d = np.asarray(dist, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] != d.shape[1]:
        raise ValueError(f"dist must be a square N x N matrix, got shape {d.shape}")
    if not np.all(np.isfinite(d)):
        raise ValueError("dist contains NaN or infinity")
    if not np.allclose(d, d.T, rtol=1e-9, atol=1e-12):
        raise ValueError("dist must be symmetric")
    return d


def _check_threshold(threshold: float) -> float:
    t = float(threshold)
    if not np.isfinite(t) or t < 0:
        raise ValueError(f"threshold must be finite and >= 0, got {threshold!r}")
    return t


def threshold_graph(dist, *, threshold: float):
    """``networkx.Graph`` on ``range(N)``, an edge ``i - j`` (i != j) iff ``dist[i, j] <= threshold``."""
    import networkx as nx

    d = _check_dist(dist)
    t = _check_threshold(threshold)
    g = nx.Graph()
    g.add_nodes_from(range(len(d)))
    rows, cols = np.nonzero(np.triu(d <= t, k=1))
    g.add_edges_from(zip(rows.tolist(), cols.tolist()))
    return g


def largest_clique(dist, *, threshold: float) -> list[int]:
    """Indices (sorted) of a largest set of items whose pairwise distances are all ``<= threshold``.

    Exact. Empty for ``N = 0``; a single item when no pair is close enough. Among several maximum
    cliques the one returned is deterministic (it depends only on ``dist`` and ``threshold``).
    """
    import networkx as nx

    g = threshold_graph(dist, threshold=threshold)
    if g.number_of_nodes() == 0:
        return []
    if g.number_of_edges() == 0:
        return [0]
    clique, _ = nx.max_weight_clique(g, weight=None)
    return sorted(int(i) for i in clique)


def clique_sizes(dists: Iterable, *, threshold: float) -> list[int]:
    """Size of the largest clique of each matrix in ``dists`` (e.g. one matrix per prompt)."""
    return [len(largest_clique(d, threshold=threshold)) for d in dists]


def clique_medoid(dist, clique: list[int]) -> tuple[int, float]:
    """``(medoid, mean pairwise distance)`` of a clique: the member with the smallest mean distance to
    the members (ties: the smaller index), the representative generation of the clique as in LeakPro.
    """
    d = _check_dist(dist)
    idx = np.asarray(sorted(set(int(i) for i in clique)), dtype=np.int64)
    if idx.size == 0:
        raise ValueError("clique must not be empty")
    if idx[0] < 0 or idx[-1] >= len(d):
        raise ValueError(f"clique indices must be in [0, {len(d)})")
    sub = d[np.ix_(idx, idx)]
    medoid = int(idx[int(np.argmin(sub.mean(axis=1)))])  # argmin returns the first, i.e. smallest index
    pairs = idx.size * (idx.size - 1) // 2
    mean_pairwise = float(np.triu(sub, k=1).sum() / pairs) if pairs else 0.0
    return medoid, mean_pairwise
