"""Poisson sampling of privacy units: Binomial batch sizes, inclusion rate q, rank shards."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dpdiff.privacy.sampling import PoissonSampler, ShuffleSampler


def test_batch_sizes_are_binomial_and_inclusion_is_q():
    n, q, steps = 100, 0.1, 5000
    s = PoissonSampler(n, q, seed=0)
    sizes, counts = [], np.zeros(n)
    for _ in range(steps):
        b = s.sample()
        assert b == sorted(set(b))
        sizes.append(len(b))
        counts[b] += 1
    sizes = np.array(sizes)
    mean, var = n * q, n * q * (1 - q)
    assert abs(sizes.mean() - mean) < 5 * math.sqrt(var / steps)
    assert abs(sizes.var() / var - 1) < 5 * math.sqrt(2 / steps) * 1.2
    freq = counts / steps
    assert np.all(np.abs(freq - q) < 5 * math.sqrt(q * (1 - q) / steps))
    assert s.expected_batch_size == pytest.approx(n * q)  # exact, not int(n*q)


def test_empty_batches_are_yielded():
    s = PoissonSampler(5, 0.05, seed=1)
    sizes = [len(s.sample()) for _ in range(200)]
    assert sizes.count(0) > 100


def test_rank_shards_partition_the_units_and_step_in_lockstep():
    n, q, w = 37, 0.3, 3
    samplers = [PoissonSampler(n, q, seed=5, rank=r, world_size=w) for r in range(w)]
    owned = [set(s.local_units.tolist()) for s in samplers]
    assert set().union(*owned) == set(range(n)) and sum(map(len, owned)) == n
    counts = np.zeros(n)
    steps = 3000
    for _ in range(steps):
        batches = [s.sample() for s in samplers]  # exactly one (possibly empty) batch per rank
        flat = [u for b in batches for u in b]
        assert len(flat) == len(set(flat))
        counts[flat] += 1
    assert np.all(np.abs(counts / steps - q) < 5 * math.sqrt(q * (1 - q) / steps))


def test_sampling_stream_differs_per_rank_and_from_the_shared_seed():
    a = PoissonSampler(1000, 0.5, seed=0, rank=0, world_size=1).sample()
    b = PoissonSampler(1000, 0.5, seed=0, rank=0, world_size=1).sample()
    assert a == b  # reproducible from the seed
    r0 = PoissonSampler(1000, 0.5, seed=0, rank=0, world_size=2)
    r1 = PoissonSampler(1000, 0.5, seed=0, rank=1, world_size=2)
    m0 = [u // 2 for u in r0.sample()]
    m1 = [u // 2 for u in r1.sample()]
    assert m0 != m1  # ranks do not draw the same mask
    rng = np.random.default_rng(0)  # not numpy's default stream of the shared seed
    assert (np.flatnonzero(rng.random(1000) < 0.5)).tolist() != a


def test_secure_sampler_is_not_reproducible():
    """Two fresh-entropy masks of 1000 units at q = 0.5 coincide with probability 2^-1000 (the false failure)."""
    a = PoissonSampler(1000, 0.5, seed=0, secure=True).sample()
    b = PoissonSampler(1000, 0.5, seed=0, secure=True).sample()
    assert a != b


def test_state_roundtrip_continues_the_same_process():
    s = PoissonSampler(50, 0.2, seed=3)
    for _ in range(10):
        s.sample()
    state = s.state_dict()
    want = [s.sample() for _ in range(5)]
    t = PoissonSampler(50, 0.2, seed=99)
    t.load_state_dict(state)
    assert [t.sample() for _ in range(5)] == want


def test_shuffle_sampler_covers_every_unit_each_epoch():
    s = ShuffleSampler(10, 5, seed=0)
    assert sorted(s.sample() + s.sample()) == list(range(10))
