"""Batch samplers over privacy units.

``PoissonSampler`` is what the accountant assumes (docs/privacy.md): at every logical step each
unit joins the batch independently with probability q, so batch sizes are Binomial(N, q) and
may be 0. Across W ranks, rank r owns the units ``r, r+W, r+2W, ...`` and draws only their
inclusion bits, with the same q: the union over ranks is exactly one Poisson sample of all N
units, every rank yields exactly one (possibly empty) batch per step, and no unit can appear on
two ranks (unlike Opacus' distributed sampler, which skips empty local batches, or accelerate's
batch-sampler sharding, which hands each rank every W-th batch). The sampling RNG is its own
stream, passed in by the run's ``PrivacyRandomness`` (fresh OS entropy per run and rank by
default); it is never the shared training seed.

``ShuffleSampler`` (fixed-size batches, epoch-wise reshuffling) serves non-private baselines only.
"""

from __future__ import annotations

import os

import numpy as np

_SAMPLING_STREAM = 0x5A3D  # separates this RNG stream from every other use of the seed


def _rng(seed: int, rank: int, secure: bool) -> np.random.Generator:
    if secure:
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence(int.from_bytes(os.urandom(16), "little"))))
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(rank, _SAMPLING_STREAM))))


class PoissonSampler:
    def __init__(self, num_units: int, sample_rate: float, *, rng: np.random.Generator | None = None,
                 seed: int | None = None, rank: int = 0, world_size: int = 1, secure: bool = False):
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.num_units, self.sample_rate = num_units, float(sample_rate)
        self.rank, self.world_size = rank, world_size
        self.local_units = np.arange(rank, num_units, world_size)
        if rng is None and seed is None and not secure:
            raise ValueError("PoissonSampler needs an rng (or a seed, for tests)")
        self.rng = rng if rng is not None else _rng(seed or 0, rank, secure)

    @property
    def expected_batch_size(self) -> float:
        """Exactly q*N (Opacus' DPDataLoader truncates this to an int)."""
        return self.sample_rate * self.num_units

    def sample(self) -> list[int]:
        """This rank's share of the next logical batch (sorted unit ids; may be empty)."""
        mask = self.rng.random(len(self.local_units)) < self.sample_rate
        return self.local_units[mask].tolist()

    def state_dict(self) -> dict:
        return {"bit_generator": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["bit_generator"]


class ShuffleSampler:
    """Fixed-size batches without replacement, reshuffled every epoch (non-private runs)."""

    def __init__(self, num_units: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1):
        self.num_units, self.batch_size = num_units, int(batch_size)
        self.rank, self.world_size = rank, world_size
        self.rng = _rng(seed, 0, False)  # same permutation on every rank; each takes its slice
        self._perm: list[int] = []

    @property
    def expected_batch_size(self) -> float:
        return float(self.batch_size)

    def sample(self) -> list[int]:
        if len(self._perm) < self.batch_size:
            self._perm += self.rng.permutation(self.num_units).tolist()
        batch, self._perm = self._perm[: self.batch_size], self._perm[self.batch_size :]
        return sorted(batch[self.rank :: self.world_size])

    def state_dict(self) -> dict:
        return {"bit_generator": self.rng.bit_generator.state, "perm": list(self._perm)}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["bit_generator"]
        self._perm = list(state["perm"])
