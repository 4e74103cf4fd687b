"""Building the rows of a micro-batch from sampled privacy units (augmentation multiplicity).

For each unit, each of its images (at most ``max_images_per_unit``, a random subset when it
has more) gets K augmentation draws: a horizontal flip (when enabled), a VAE latent sample,
a timestep and a noise vector (DPDM's noise multiplicity, Dockhorn et al. 2023). Every row of
a unit carries weight 1/(images * K), so a unit's gradient is the *mean* over its draws and
the DP engine clips that mean: K costs compute, not privacy.

Every draw of a unit comes from that unit's own stream, ``randomness.unit_stream(key, step, unit name)``, in a
fixed order: which images of a large user, then per row the flip, the latent sample, the timestep, the diffusion
noise, the caption mitigation and dropout. A unit's rows therefore depend on the unit alone (its data, its
name, the step and the run's key), never on which other units were sampled or where it sits in the batch:
adding or removing one unit leaves every other unit's rows, hence its clipped contribution, bit-identical, so
the sum's sensitivity is C as the accountant assumes, even for an adversary who knows every seed. (A single
stream over the batch, as training scripts use, shifts every later unit's draws when one unit is added.) The
key is fresh per run (``PrivacyRandomness.augmentation_key``), derived from ``train.seed`` only for
reproducible-noise and non-private runs.
"""

from __future__ import annotations

import numpy as np
import torch

from dpdiff.data.records import PrivacyUnits
from dpdiff.privacy.randomness import unit_stream
from dpdiff.training.encode import EncodedData, in_fixed_chunks
from dpdiff.training.loss import RowBatch

PUBLIC_INSERT_WORDS = ("photo", "image", "picture", "small", "large", "style", "sample", "scan", "drawing", "on",
                       "with", "and", "the", "in", "of", "by", "a", "view", "detail", "old", "new", "bright", "dark")
PUBLIC_CAPTIONS = ("a photo", "an image", "a picture", "a drawing", "a sample image", "a scan")


class CaptionMitigation:
    """Caption mitigations against memorisation (Somepalli et al. 2023): random caption replacement and
    random word insertion, each with a probability per draw.

    Under DP a unit's gradient may depend on that unit alone: replacing a caption by *another training
    caption* (Somepalli's version) would make unit u's gradient depend on unit v's data and void the
    add/remove-one guarantee. So replacements come from a public caption pool and inserted words from a
    public word list; neither reads the dataset. Variants are encoded once (``variants`` per caption).
    Conditioning is a dict of per-row tensors (token and pooled embeddings): a replaced caption replaces all of them.
    """

    def __init__(self, *, caption_variants: dict[str, torch.Tensor], pool: dict[str, torch.Tensor],
                 replace_prob: float, insert_prob: float):
        self.variants = caption_variants  # [M captions, V, ...] per key: each caption with a random word inserted
        self.pool = pool  # [P, ...] per key: public replacement captions
        self.replace_prob, self.insert_prob = replace_prob, insert_prob

    def draw(self, g: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        """One unit's draws for its n rows (from the unit's own stream)."""
        return {"u": g.random(n), "pool": g.integers(0, len(self.pool["encoder_hidden_states"]), n),
                "variant": g.integers(0, self.variants["encoder_hidden_states"].shape[1], n)}

    def apply(self, text: dict[str, torch.Tensor], caption_index: torch.Tensor, draws: dict[str, np.ndarray]
              ) -> dict[str, torch.Tensor]:
        u = torch.from_numpy(draws["u"])
        pool_pick, var_pick = torch.from_numpy(draws["pool"]), torch.from_numpy(draws["variant"])
        rep = u < self.replace_prob
        ins = (~rep) & (u < self.replace_prob + self.insert_prob)
        out = {}
        for k, v in text.items():
            out[k] = v.clone()
            out[k][rep] = self.pool[k][pool_pick[rep]]
            out[k][ins] = self.variants[k][caption_index[ins], var_pick[ins]]
        return out


def insert_random_word(caption: str, rng) -> str:
    words = caption.split()
    pos = int(rng.integers(0, len(words) + 1))
    word = PUBLIC_INSERT_WORDS[int(rng.integers(0, len(PUBLIC_INSERT_WORDS)))]
    return " ".join(words[:pos] + [word] + words[pos:])


#: captions encoded per text-encoder call when they are encoded on the fly (``RowBuilder._text_rows``)
TEXT_CHUNK = 16


class RowBuilder:
    def __init__(self, data: EncodedData, units: PrivacyUnits, *, augmult: int, random_flip: bool,
                 num_train_timesteps: int, key: bytes,
                 max_images_per_unit: int | None = None, caption_dropout: float = 0.0,
                 empty_text: dict[str, torch.Tensor] | None = None, mitigation: CaptionMitigation | None = None,
                 timestep_range: tuple[int, int] | None = None, text_encoder=None):
        if augmult < 1:
            raise ValueError("augmult must be >= 1")
        if random_flip and data.num_flips < 2:
            raise ValueError("random_flip needs latents encoded in both orientations")
        if caption_dropout > 0 and empty_text is None:
            raise ValueError("caption_dropout needs the empty caption's conditioning")
        if data.text_emb is None and text_encoder is None:
            raise ValueError("the features hold no text rows: captions need a text_encoder (encoded per batch)")
        if data.text_emb is None and mitigation is not None:
            raise ValueError("caption mitigation needs cached text features (its variants are encoded ahead)")
        if len(units.names) != len(units) or len(set(units.names)) != len(units):
            raise ValueError("every privacy unit needs a distinct name (its augmentation stream is keyed by it)")
        self.data, self.units, self.augmult = data, units, augmult
        self.random_flip = random_flip
        self.num_train_timesteps = num_train_timesteps
        lo, hi = timestep_range if timestep_range is not None else (0, num_train_timesteps)
        if not 0 <= lo < hi <= num_train_timesteps:
            raise ValueError(f"timestep_range must satisfy 0 <= lo < hi <= {num_train_timesteps}")
        self.timestep_range = (int(lo), int(hi))
        self.key = bytes(key)
        self.max_images_per_unit = max_images_per_unit
        self.caption_dropout = caption_dropout
        self.empty_text = empty_text  # per key, one row: the empty caption's conditioning
        self.mitigation = mitigation
        # captions -> {key: [n, ...] float32}: the frozen text encoders, when the store holds no text rows. A row's
        # conditioning is a function of its own caption alone either way (no other unit's data enters it).
        self.text_encoder = text_encoder

    def stream(self, unit: int, step: int) -> np.random.Generator:
        """Unit ``unit``'s augmentation stream at ``step`` (module docstring)."""
        return unit_stream(self.key, step=step, unit=self.units.names[unit])

    def images_of(self, unit: int, g: np.random.Generator) -> list[int]:
        members = list(self.units.members[unit])
        m = self.max_images_per_unit
        if m is not None and len(members) > m:
            pick = g.permutation(len(members))[:m]
            members = [members[i] for i in sorted(pick.tolist())]
        return members

    def _unit_draws(self, unit: int, step: int, latent_shape: tuple[int, ...]) -> dict:
        """All of one unit's draws, in a fixed order, from its own stream."""
        g = self.stream(unit, step)
        members = self.images_of(unit, g)
        n = len(members) * self.augmult
        lo, hi = self.timestep_range
        return {
            "img": np.repeat(np.asarray(members, dtype=np.int64), self.augmult),
            "flip": (g.random(n) < 0.5) if self.random_flip else np.zeros(n, dtype=bool),
            "eps": g.standard_normal((n, *latent_shape), dtype=np.float32),
            "timesteps": g.integers(lo, hi, n),
            "noise": g.standard_normal((n, *latent_shape), dtype=np.float32),
            "mitigation": self.mitigation.draw(g, n) if self.mitigation is not None else None,
            "drop": g.random(n) < self.caption_dropout if self.caption_dropout > 0 else None,
            "weight": 1.0 / n,
        }

    def _text_rows(self, caption: torch.Tensor) -> dict[str, torch.Tensor]:
        """The text conditioning of each row's caption: gathered from the store, or each distinct caption of the
        batch encoded once (on the fly)."""
        if self.data.text_emb is not None:
            return {k: v[caption].float() for k, v in self.data.text_conditioning().items()}
        if len(caption) == 0:
            width = self.text_encoder([""])
            return {k: v[:0].float() for k, v in width.items()}
        uniq, inverse = torch.unique(caption, return_inverse=True)
        # in chunks of a fixed size (training.encode.in_fixed_chunks): each caption's conditioning is the same
        # whichever other units share the step (one unit's presence changes no other unit's rows)
        enc = in_fixed_chunks(self.text_encoder, [self.data.captions[int(i)] for i in uniq], chunk=TEXT_CHUNK)
        return {k: v.float()[inverse] for k, v in enc.items()}

    def build(self, unit_ids: list[int], *, step: int) -> RowBatch:
        """Rows for the given units at training step ``step`` (positions 0..len(unit_ids)-1 in ``unit_pos``)."""
        latent_shape = tuple(self.data.latent_mean.shape[2:])
        draws = [self._unit_draws(int(u), step, latent_shape) for u in unit_ids]
        counts = [len(d["img"]) for d in draws]
        n = sum(counts)

        def cat(key, dtype=None):
            arr = np.concatenate([d[key] for d in draws]) if draws else np.zeros((0,), dtype=dtype)
            return torch.from_numpy(np.ascontiguousarray(arr))

        img_t = cat("img", np.int64).long()
        flip = cat("flip", bool).long()
        # the feature store may hold float16 / bfloat16 (memory-mapped): the gathered rows are computed in float32
        mean = self.data.latent_mean[img_t, flip].float()
        std = self.data.latent_std[img_t, flip].float()
        eps = cat("eps").view(mean.shape) if n else torch.zeros(mean.shape)
        noise = cat("noise").view(mean.shape) if n else torch.zeros(mean.shape)
        latents = (mean + std * eps.to(mean.dtype) - self.data.shift_factor) * self.data.scaling_factor
        timesteps = cat("timesteps", np.int64).long()
        caption = self.data.text_index[img_t]
        text = self._text_rows(caption)
        if self.mitigation is not None and n:
            text = self.mitigation.apply(text, caption, {k: np.concatenate([d["mitigation"][k] for d in draws])
                                                          for k in draws[0]["mitigation"]})
        if self.caption_dropout > 0 and n:
            drop = cat("drop", bool)
            text = {k: torch.where(drop.view(-1, *[1] * (v.dim() - 1)), self.empty_text[k].reshape(1, *v.shape[1:]),
                                   v) for k, v in text.items()}
        added = {**{k: v for k, v in text.items() if k != "encoder_hidden_states"},
                 **{k: v[img_t, flip] for k, v in self.data.image_added.items()}}
        pos = torch.repeat_interleave(torch.arange(len(unit_ids)), torch.tensor(counts, dtype=torch.long))
        weight = torch.tensor([d["weight"] for d, c in zip(draws, counts) for _ in range(c)], dtype=torch.float32)
        return RowBatch(latents=latents, noise=noise.to(mean.dtype), timesteps=timesteps,
                        encoder_hidden_states=text["encoder_hidden_states"], unit_pos=pos, row_weight=weight,
                        num_units=len(unit_ids), added=added, caption=caption)
