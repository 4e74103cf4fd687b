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

Entropy of the noise, device by device (the adversary knows every seed in the config):

* CPU: numpy's ``PCG64DXSM`` seeded from a ``SeedSequence`` of 256 bits of OS entropy (its 128-bit state and
  128-bit increment are the key), one child stream per chunk and thread (``SeedSequence.spawn``). Not torch's
  CPU generator: its ``manual_seed`` keeps only the low 32 bits of a seed, so every run's noise would be one of
  2^32 streams, which an adversary with two consecutive checkpoints can enumerate and subtract.
* CUDA: torch's Philox generator, seeded with 64 bits from such a ``SeedSequence`` (Philox keeps all 64,
  which is also the most its seed takes: 2^64 streams, far beyond enumeration from checkpoints in practice;
  ``secure=True`` for more).
* ``secure=True`` (``privacy.secure_rng``, any device): a ChaCha20 keystream (``randomgen.ChaCha``, 20
  rounds, a cryptographically secure generator; Opacus' ``secure_mode`` plays this role with torchcsprng,
  which no longer builds for current torch) keyed by 256 bits of OS entropy; on a GPU the noise is drawn
  on the CPU and copied (slower: for users whose adversary has compute to attack a statistical generator).

What the augmentation draws use (timesteps, diffusion noise, flips, latent samples, which images of a
large user) is keyed per unit: :func:`unit_stream` (see ``dpdiff.training.rows``), so one unit's presence
changes no other unit's draws.

Caveat (as in every DP-SGD library sampling Gaussians in floating point): floating-point Gaussian samples
are open in principle to Mironov's (CCS 2012) least-significant-bit attack; the guarantee is that of the
idealised real-valued mechanism.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch

_NOISE_STREAM = 0x4E01
_SAMPLING_STREAM = 0x5A3D
_AUGMENT_STREAM = 0xA061
_CANARY_STREAM = 0xCA7A


def fresh_entropy() -> int:
    """256 bits from the OS CSPRNG (a SeedSequence keeps them all in its pool)."""
    return int.from_bytes(os.urandom(32), "little")


def secure_bit_generator(seed_seq: np.random.SeedSequence) -> np.random.BitGenerator:
    """A ChaCha20 keystream keyed by 256 bits of ``seed_seq`` (randomgen, the ``secure`` extra)."""
    try:
        from randomgen import ChaCha
    except ImportError:
        from dpdiff.errors import UserError

        raise UserError("privacy.secure_rng=true needs the randomgen package (a ChaCha20 bit generator): "
                        "pip install 'dpdiff[secure]'") from None
    return ChaCha(seed_seq, rounds=20)


class GaussianNoise:
    """The Gaussian noise of one process: ``fill_(tensor, std)`` overwrites a float32 tensor with N(0, std^2).

    Seeded once from a ``SeedSequence`` of at least 128 bits of entropy (module docstring: what each device
    and mode gives). ``children(k)`` gives k independent noise sources (``SeedSequence.spawn``: a new set on
    every call), for drawing chunks on several threads; numpy's fills release the GIL.
    """

    def __init__(self, seed_seq: np.random.SeedSequence, *, device: torch.device | str = "cpu", secure: bool = False):
        self.seed_seq, self.device, self.secure = seed_seq, torch.device(device), bool(secure)
        self._numpy: np.random.Generator | None = None
        self._torch: torch.Generator | None = None
        if self.device.type != "cpu" and not self.secure:
            # Philox keeps the whole 64-bit seed (torch's CPU generator would keep 32 of them)
            self._torch = torch.Generator(device=self.device)
            self._torch.manual_seed(int(seed_seq.generate_state(1, dtype=np.uint64)[0]))
        else:
            bits = secure_bit_generator(seed_seq) if self.secure else np.random.PCG64DXSM(seed_seq)
            self._numpy = np.random.Generator(bits)

    @classmethod
    def seeded(cls, seed: int, *, device: torch.device | str = "cpu", secure: bool = False) -> GaussianNoise:
        """A reproducible source (tests, ``privacy.reproducible_noise``): anyone with ``seed`` can regenerate it."""
        return cls(np.random.SeedSequence(int(seed), spawn_key=(_NOISE_STREAM,)), device=device, secure=secure)

    @property
    def parallel(self) -> bool:
        """True when chunks may be drawn on several threads (CPU draws; a CUDA generator is one stream)."""
        return self._numpy is not None

    def children(self, k: int) -> list[GaussianNoise]:
        return [GaussianNoise(c, device=self.device, secure=self.secure) for c in self.seed_seq.spawn(k)]

    def fill_(self, out: torch.Tensor, std: float) -> torch.Tensor:
        if out.dtype != torch.float32 or not out.is_contiguous():
            raise ValueError("noise is drawn into contiguous float32 tensors")
        if self._torch is not None:
            return out.normal_(0.0, std, generator=self._torch)
        if out.device.type == "cpu":
            self._numpy.standard_normal(out=out.numpy(), dtype=np.float32)
        else:  # secure mode on an accelerator: drawn on the CPU, copied
            host = np.empty(out.numel(), dtype=np.float32)
            self._numpy.standard_normal(out=host, dtype=np.float32)
            out.copy_(torch.from_numpy(host).view(out.shape))
        return out.mul_(std)

    def state_dict(self) -> dict:
        """The stream's position, for the bit-exact resume of a reproducible-noise run only (never saved otherwise:
        a checkpoint that regenerates the noise voids the guarantee)."""
        if self._torch is not None:
            return {"torch": self._torch.get_state().tolist()}
        return {"bit_generator": self._numpy.bit_generator.state, "children": self.seed_seq.n_children_spawned}

    def load_state_dict(self, state: dict) -> None:
        if self._torch is not None:
            self._torch.set_state(torch.tensor(state["torch"], dtype=torch.uint8))
            return
        self._numpy.bit_generator.state = state["bit_generator"]
        self.seed_seq = np.random.SeedSequence(self.seed_seq.entropy, spawn_key=self.seed_seq.spawn_key,
                                               pool_size=self.seed_seq.pool_size,
                                               n_children_spawned=int(state["children"]))

    def uniform(self, n: int) -> np.ndarray:
        """n uniforms in [0, 1) from this source's stream (CPU sources)."""
        if self._numpy is None:
            return torch.rand(n, generator=self._torch, device=self.device).cpu().numpy()
        return self._numpy.random(n)


@dataclass(frozen=True, kw_only=True)
class PrivacyRandomness:
    """Factories of the noise, the sampling RNG, the augmentation key and the audit coins of one process."""

    reproducible: bool
    seed: int
    rank: int = 0
    world_size: int = 1
    start_step: int = 0
    secure: bool = False

    def _seed_sequence(self, stream: int) -> np.random.SeedSequence:
        if self.reproducible:
            return np.random.SeedSequence(self.seed, spawn_key=(self.rank, self.world_size, self.start_step, stream))
        return np.random.SeedSequence(fresh_entropy(), spawn_key=(self.rank, stream))

    def sampling_rng(self) -> np.random.Generator:
        """The RNG of this rank's Poisson inclusion bits."""
        seq = self._seed_sequence(_SAMPLING_STREAM)
        return np.random.Generator(secure_bit_generator(seq) if self.secure else np.random.PCG64DXSM(seq))

    def noise(self, device: torch.device | str = "cpu") -> GaussianNoise:
        """The Gaussian noise of this process (drawn on rank 0 only)."""
        return GaussianNoise(self._seed_sequence(_NOISE_STREAM), device=device, secure=self.secure)

    def canary_rng(self) -> np.random.Generator:
        """The coins of the gradient canaries' Poisson inclusion (a stream of its own)."""
        return np.random.Generator(np.random.PCG64DXSM(self._seed_sequence(_CANARY_STREAM)))

    def augmentation_key(self) -> bytes:
        """The 32-byte key of the per-unit augmentation streams (:func:`unit_stream`). Derived from the seed alone in a
        reproducible run (the step is in the stream, so a resume continues the same draws); fresh per process
        otherwise (a unit is drawn on one rank per step, so ranks need not agree)."""
        if self.reproducible:
            seq = np.random.SeedSequence(self.seed, spawn_key=(_AUGMENT_STREAM,))
        else:
            seq = np.random.SeedSequence(fresh_entropy(), spawn_key=(self.rank, _AUGMENT_STREAM))
        return seq.generate_state(8, dtype=np.uint32).tobytes()

    @property
    def description(self) -> str:
        if self.reproducible:
            return (f"derived from train.seed={self.seed} (privacy.reproducible_noise=true): for debugging only; "
                    "no guarantee across runs, and anyone with the config can regenerate the noise")
        if self.secure:
            return ("ChaCha20 keystream keyed from 256 bits of fresh OS entropy per run and per process "
                    "(privacy.secure_rng=true; never saved, never reused)")
        return ("fresh OS entropy per run and per process (PCG64DXSM with a 128-bit state on the CPU, Philox with a "
                "64-bit seed on CUDA; never saved, never reused)")


def unit_stream(key: bytes, *, step: int, unit: str) -> np.random.Generator:
    """The generator of one unit's augmentation draws at one step: Philox keyed by BLAKE2b(key, unit), the step in
    the counter's highest word (so steps never share counter values: 2^192 draws each). It depends on the unit's
    stable name alone, never on which other units share the batch or on their order, so adding or removing a unit
    leaves every other unit's draws, hence its clipped contribution, unchanged (the add/remove-one sensitivity the
    noise is calibrated to)."""
    digest = hashlib.blake2b(unit.encode(), key=key, digest_size=16).digest()
    philox_key = int.from_bytes(digest, "little")
    counter = np.zeros(4, dtype=np.uint64)
    counter[3] = np.uint64(step)
    return np.random.Generator(np.random.Philox(key=philox_key, counter=counter))
