"""Building the rows of a micro-batch from sampled privacy units (augmentation multiplicity).

For each unit, each of its images (at most ``max_images_per_unit``, a random subset when it
has more) gets K augmentation draws: a horizontal flip (when enabled), a VAE latent sample,
a timestep and a noise vector (DPDM's noise multiplicity, Dockhorn et al. 2023). Every row of
a unit carries weight 1/(images * K), so a unit's gradient is the *mean* over its draws and
the DP engine clips that mean: K costs compute, not privacy.
"""

from __future__ import annotations

import torch

from dpdiff.data.records import PrivacyUnits
from dpdiff.training.encode import EncodedData
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

    def apply(self, text: dict[str, torch.Tensor], caption_index: torch.Tensor, g: torch.Generator
              ) -> dict[str, torch.Tensor]:
        n = len(caption_index)
        u = torch.rand(n, generator=g)
        pool_pick = torch.randint(0, len(self.pool["encoder_hidden_states"]), (n,), generator=g)
        var_pick = torch.randint(0, self.variants["encoder_hidden_states"].shape[1], (n,), generator=g)
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


class RowBuilder:
    def __init__(self, data: EncodedData, units: PrivacyUnits, *, augmult: int, random_flip: bool,
                 num_train_timesteps: int, generator: torch.Generator,
                 max_images_per_unit: int | None = None, caption_dropout: float = 0.0,
                 empty_text: dict[str, torch.Tensor] | None = None, mitigation: CaptionMitigation | None = None,
                 timestep_range: tuple[int, int] | None = None):
        if augmult < 1:
            raise ValueError("augmult must be >= 1")
        if random_flip and data.num_flips < 2:
            raise ValueError("random_flip needs latents encoded in both orientations")
        if caption_dropout > 0 and empty_text is None:
            raise ValueError("caption_dropout needs the empty caption's conditioning")
        self.data, self.units, self.augmult = data, units, augmult
        self.random_flip = random_flip
        self.num_train_timesteps = num_train_timesteps
        lo, hi = timestep_range if timestep_range is not None else (0, num_train_timesteps)
        if not 0 <= lo < hi <= num_train_timesteps:
            raise ValueError(f"timestep_range must satisfy 0 <= lo < hi <= {num_train_timesteps}")
        self.timestep_range = (int(lo), int(hi))
        self.generator = generator
        self.max_images_per_unit = max_images_per_unit
        self.caption_dropout = caption_dropout
        self.empty_text = empty_text  # per key, one row: the empty caption's conditioning
        self.mitigation = mitigation

    def images_of(self, unit: int) -> list[int]:
        members = list(self.units.members[unit])
        m = self.max_images_per_unit
        if m is not None and len(members) > m:
            pick = torch.randperm(len(members), generator=self.generator)[:m].tolist()
            members = [members[i] for i in sorted(pick)]
        return members

    def build(self, unit_ids: list[int]) -> RowBatch:
        """Rows for the given units (positions 0..len(unit_ids)-1 in ``unit_pos``)."""
        img, pos, weight = [], [], []
        for j, u in enumerate(unit_ids):
            members = self.images_of(int(u))
            w = 1.0 / (len(members) * self.augmult)
            for i in members:
                img += [i] * self.augmult
                pos += [j] * self.augmult
                weight += [w] * self.augmult
        n = len(img)
        img_t = torch.tensor(img, dtype=torch.long)
        g = self.generator
        if self.random_flip:
            flip = (torch.rand(n, generator=g) < 0.5).long()
        else:
            flip = torch.zeros(n, dtype=torch.long)
        mean = self.data.latent_mean[img_t, flip]
        std = self.data.latent_std[img_t, flip]
        eps = torch.randn(mean.shape, generator=g)
        latents = (mean + std * eps - self.data.shift_factor) * self.data.scaling_factor
        timesteps = torch.randint(*self.timestep_range, (n,), generator=g)
        noise = torch.randn(mean.shape, generator=g)
        caption = self.data.text_index[img_t]
        text = {k: v[caption] for k, v in self.data.text_conditioning().items()}
        if self.mitigation is not None:
            text = self.mitigation.apply(text, caption, g)
        if self.caption_dropout > 0:
            drop = torch.rand(n, generator=g) < self.caption_dropout
            text = {k: torch.where(drop.view(-1, *[1] * (v.dim() - 1)), self.empty_text[k].reshape(1, *v.shape[1:]),
                                   v) for k, v in text.items()}
        added = {**{k: v for k, v in text.items() if k != "encoder_hidden_states"},
                 **{k: v[img_t, flip] for k, v in self.data.image_added.items()}}
        return RowBatch(latents=latents, noise=noise, timesteps=timesteps,
                        encoder_hidden_states=text["encoder_hidden_states"],
                        unit_pos=torch.tensor(pos, dtype=torch.long),
                        row_weight=torch.tensor(weight, dtype=torch.float32), num_units=len(unit_ids), added=added)
