"""What every probe needs: the fine-tuned model, its base, the member/non-member data, and the
denoising loss of chosen images at chosen timesteps under *shared* noise draws."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dpdiff.data.preprocess import to_pixels
from dpdiff.data.records import ImageRecord


@dataclass
class ProbeContext:
    run_dir: Path
    base: object  # dpdiff.models.loading.BaseModel (vae, text encoder, tokenizer, noise scheduler)
    unet: torch.nn.Module  # the fine-tuned UNet
    adapter_kind: str
    records: list[ImageRecord]
    member_records: list[int]  # record indices trained on (one per member unit is enough)
    nonmember_records: list[int]  # held-out record indices, never trained on
    resolution: int
    device: torch.device
    privacy: dict  # the run's privacy.json
    canaries: dict | None = None  # canaries.json of the run, when the audit inserted canaries
    base_unet: torch.nn.Module | None = None  # a separate base UNet (full / attn fine-tuning)
    seed: int = 0
    demo: str | None = None  # the built-in demo's name (dpdiff.data.demos), None for a user's data
    cache: dict = field(default_factory=dict)
    # record index -> privacy unit id (PreparedData.units); None: one unit per user_id when the
    # privacy unit is the user, else one per record
    unit_of_record: dict[int, int] | None = None

    def unit_key(self, record_id: int):
        """The privacy unit of a record, as far as the context knows it."""
        if self.unit_of_record is not None:
            return ("unit", self.unit_of_record[record_id])
        if self.privacy.get("privacy_unit") == "user" and self.records[record_id].user_id is not None:
            return ("user", self.records[record_id].user_id)
        return ("record", record_id)

    def one_record_per_unit(self, record_ids: list[int]) -> list[int]:
        """The lowest-index record of each privacy unit among ``record_ids`` (sorted). The one-run
        analyses count guesses per unit: two records of one unit are one coin, not two."""
        seen, out = set(), []
        for i in sorted(record_ids):
            key = self.unit_key(i)
            if key not in seen:
                seen.add(key)
                out.append(i)
        return out

    @contextlib.contextmanager
    def base_model(self):
        """The UNet before fine-tuning: LoRA adapters disabled (free), or the separately loaded base."""
        if self.adapter_kind == "lora":
            self.unet.disable_adapters()
            try:
                yield self.unet
            finally:
                self.unet.enable_adapters()
        else:
            if self.base_unet is None:
                from dpdiff.models.loading import load_base

                self.base_unet = load_base(self.base.path, device=self.device).unet.eval()
            yield self.base_unet

    def pipeline(self):
        from dpdiff.models.loading import build_pipeline

        return build_pipeline(self.base, unet=self.unet)


@torch.no_grad()
def encode_images(ctx: ProbeContext, images: list, *, batch_size: int = 32) -> torch.Tensor:
    """Deterministic scaled latents (posterior mean) of PIL images or records, [N, C, h, w]."""
    from dpdiff.training.encode import latent_factors

    scale, shift = latent_factors(ctx.base.vae)
    out = []
    for i in range(0, len(images), batch_size):
        chunk = [im.open() if isinstance(im, ImageRecord) else im for im in images[i : i + batch_size]]
        px = torch.stack([to_pixels(im, resolution=ctx.resolution) for im in chunk])
        mean = ctx.base.vae.encode(px.to(ctx.device, ctx.base.vae.dtype)).latent_dist.mean.float()
        out.append(((mean - shift) * scale).cpu())
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def encode_captions(ctx: ProbeContext, captions: list[str]) -> torch.Tensor:
    from dpdiff.training.encode import encode_texts

    return encode_texts(ctx.base.tokenizer, ctx.base.text_encoder, captions, device=ctx.device)


@torch.no_grad()
def denoising_losses(unet, scheduler, latents: torch.Tensor, text: torch.Tensor, *, timesteps: list[int],
                     noises: torch.Tensor, device, batch_size: int = 128) -> torch.Tensor:
    """Per-(image, timestep, noise draw) MSE of the UNet's prediction, shape [N, T, D].

    The same D noise draws are used for every image (shared noise: the per-image differences
    are then due to the model, not to the draw; Carlini et al. 2023, Matsumoto et al. 2023).
    """
    from dpdiff.training.loss import DiffusionObjective

    obj = DiffusionObjective(scheduler)
    n, t_count, d = latents.shape[0], len(timesteps), noises.shape[0]
    idx = torch.cartesian_prod(torch.arange(n), torch.arange(t_count), torch.arange(d))
    out = torch.empty(len(idx))
    ts = torch.tensor(timesteps, dtype=torch.long)
    for s in range(0, len(idx), batch_size):
        b = idx[s : s + batch_size]
        lat = latents[b[:, 0]].to(device)
        noise = noises[b[:, 2]].to(device)
        t = ts[b[:, 1]].to(device)
        noisy = scheduler.add_noise(lat, noise, t)
        pred = unet(noisy, t, text[b[:, 0]].to(device), return_dict=False)[0].float()
        target = obj.target(lat, noise, t)
        out[s : s + len(b)] = (pred - target.float()).pow(2).flatten(1).mean(1).cpu()
    return out.view(n, t_count, d)


def shared_noises(shape: tuple[int, ...], draws: int, seed: int) -> torch.Tensor:
    return torch.randn((draws, *shape), generator=torch.Generator().manual_seed(seed))


def pil_to_float(images) -> np.ndarray:
    """PIL images -> float array [N, H, W, 3] in [0, 1]."""
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
