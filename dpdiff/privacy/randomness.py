"""Where the privacy-relevant randomness of a run comes from: the Gaussian noise and the Poisson masks.

The accountant composes runs (a sweep, retries, resumes, every run in the dataset ledger) as
*independent* mechanisms. That holds only if every run, and every rank of a run, draws its noise
and its sampling masks from fresh entropy: two runs seeded alike would otherwise draw identical
masks and proportional noise (z2 = (sigma2/sigma1) z1), and the difference of their first updates
would reveal the clipped gradient sum with no noise at all; anyone holding a run's config could
also regenerate and subtract its noise. So by default both streams are seeded from the operating
system's CSPRNG (``os.urandom``), per run and per rank, and their state is never saved with a
checkpoint: a resumed run draws fresh entropy too (Poisson sampling is memoryless, so a resumed
run continues the same mechanism; nothing can be replayed).

``reproducible=True`` (``privacy.reproducible_noise``) derives both streams from the run's seed
instead, for debugging and bit-exact tests only. Such a run has no guarantee across runs; the
report, privacy.json and the dataset ledger say so. Streams are then keyed by (seed, rank,
world size, the ledger step at which this process starts), so a resume on another number of
processes never replays earlier masks.

``train.seed`` keeps its role for what is not privacy-relevant (LoRA init, augmentation draws,
timesteps, the held-out split): the guarantee holds for any such choice, since clipping bounds
every unit's contribution whatever function computes it.

Caveat (as in every DP-SGD library sampling Gaussians in floating point): torch's generator is a
Mersenne Twister seeded from the CSPRNG, not a CSPRNG itself, and floating-point Gaussian samples
are open in principle to Mironov's (CCS 2012) least-significant-bit attack; the guarantee is that
of the idealised real-valued mechanism.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

_NOISE_STREAM = 0x4E01
_SAMPLING_STREAM = 0x5A3D


def fresh_entropy() -> int:
    """128 bits from the OS CSPRNG."""
    return int.from_bytes(os.urandom(16), "little")


@dataclass(frozen=True, kw_only=True)
class PrivacyRandomness:
    """Factories of the noise generator and the sampling RNG of one process of one run."""

    reproducible: bool
    seed: int
    rank: int = 0
    world_size: int = 1
    start_step: int = 0

    def _seed_sequence(self, stream: int) -> np.random.SeedSequence:
        if self.reproducible:
            return np.random.SeedSequence(self.seed, spawn_key=(self.rank, self.world_size, self.start_step, stream))
        return np.random.SeedSequence(fresh_entropy(), spawn_key=(self.rank, stream))

    def sampling_rng(self) -> np.random.Generator:
        """The RNG of this rank's Poisson inclusion bits."""
        return np.random.Generator(np.random.PCG64(self._seed_sequence(_SAMPLING_STREAM)))

    def noise_generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """The torch generator of the Gaussian noise (drawn on rank 0 only)."""
        seed = int(self._seed_sequence(_NOISE_STREAM).generate_state(1, dtype=np.uint64)[0]) & ((1 << 63) - 1)
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        return gen

    @property
    def description(self) -> str:
        if self.reproducible:
            return (f"derived from train.seed={self.seed} (privacy.reproducible_noise=true): for debugging only; "
                    "no guarantee across runs, and anyone with the config can regenerate the noise")
        return "fresh OS entropy per run and per process (never saved, never reused)"
