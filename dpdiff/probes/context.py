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
    base: object  # dpdiff.models.loading.BaseModel (family, pipeline with the frozen encoders, noise scheduler)
    denoiser: torch.nn.Module  # the fine-tuned UNet or transformer
    adapter_kind: str
    records: list[ImageRecord]
    member_records: list[int]  # record indices trained on (one per member unit is enough)
    nonmember_records: list[int]  # held-out record indices, never trained on
    resolution: int
    device: torch.device
    privacy: dict  # the run's privacy.json
    canaries: dict | None = None  # canaries.json of the run, when the audit inserted canaries
    base_denoiser: torch.nn.Module | None = None  # a separate base denoiser (full / attn fine-tuning)
    seed: int = 0
    demo: str | None = None  # the built-in demo's name (dpdiff.data.demos), None for a user's data
    cache: dict = field(default_factory=dict)
    # record index -> privacy unit id (PreparedData.units); None: one unit per user_id when the
    # privacy unit is the user, else one per record
    unit_of_record: object | None = None  # record index -> unit id (an array, or any mapping)
    max_sequence_length: int | None = None  # T5 tokens of SD3 / Flux prompts, as trained
    shadow_recipe: object | None = None  # dpdiff.probes.lira.ShadowRecipe: how the run trained (LiRA's shadows)
    # an embedding adapter's prompt template ({token}, {caption}): captions are probed and generated as trained
    prompt_template: str | None = None

    def prompt(self, caption: str) -> str:
        """A caption as the run conditioned on it (with an embedding adapter's token; else itself)."""
        return caption if self.prompt_template is None else self.prompt_template.format(caption=caption)

    def unit_key(self, record_id: int):
        """The privacy unit of a record, as far as the context knows it."""
        if self.unit_of_record is not None:
            return ("unit", int(self.unit_of_record[record_id]))
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
        """The denoiser before fine-tuning: LoRA adapters disabled (free), or the separately loaded base."""
        if self.adapter_kind == "lora":
            self.denoiser.disable_adapters()
            try:
                yield self.denoiser
            finally:
                self.denoiser.enable_adapters()
        elif self.adapter_kind == "embedding":  # the denoiser was never trained (plain captions reach the base)
            yield self.denoiser
        else:
            if self.base_denoiser is None:
                from dpdiff.models.loading import load_base

                self.base_denoiser = load_base(self.base.path, device=self.device).denoiser.eval()
            yield self.base_denoiser

    def pipeline(self):
        """The family's pipeline over the fine-tuned denoiser, generating at the training resolution."""
        from dpdiff.models.loading import sampling_pipeline

        return sampling_pipeline(self.base, self.denoiser, resolution=self.resolution,
                                 max_sequence_length=self.max_sequence_length)

    def objective(self):
        """The family's training objective (no min-SNR weighting: probes compare raw denoising errors)."""
        from dpdiff.training.loss import make_objective

        return make_objective(self.base.family, self.base.noise_scheduler)


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
def encode_captions(ctx: ProbeContext, captions: list[str], images: list) -> dict[str, torch.Tensor]:
    """The family's conditioning of ``captions`` ([N, ...] per key), with the per-image conditioning of ``images``
    (records or PIL images, one per caption: SDXL's size and crop ids) as training computed it."""
    from dpdiff.training.encode import encode_captions as encode
    from dpdiff.training.encode import image_added

    cond = encode(ctx.base, [ctx.prompt(c) for c in captions], device=ctx.device,
                  max_sequence_length=ctx.max_sequence_length)
    if not ctx.base.family.image_added or not captions:
        return cond
    per_image = [image_added(ctx.base.family, im.open() if isinstance(im, ImageRecord) else im,
                             resolution=ctx.resolution) for im in images]
    for k in per_image[0]:
        cond[k] = torch.stack([p[k] for p in per_image])
    return cond


@torch.no_grad()
def denoising_losses(model, objective, latents: torch.Tensor, cond: dict[str, torch.Tensor], *,
                     timesteps: list[int], noises: torch.Tensor, device, batch_size: int = 128) -> torch.Tensor:
    """Per-(image, timestep, noise draw) loss of the denoiser under the family's training objective, [N, T, D].

    The same D noise draws are used for every image (shared noise: the per-image differences
    are then due to the model, not to the draw; Carlini et al. 2023, Matsumoto et al. 2023).
    Timesteps are 0 (least noise) .. N-1 on every family (``FlowMatchingObjective`` orders them as DDPM).
    """
    from dpdiff.training.loss import RowBatch

    n, t_count, d = latents.shape[0], len(timesteps), noises.shape[0]
    idx = torch.cartesian_prod(torch.arange(n), torch.arange(t_count), torch.arange(d))
    out = torch.empty(len(idx))
    ts = torch.tensor(timesteps, dtype=torch.long)
    for s in range(0, len(idx), batch_size):
        b = idx[s : s + batch_size]
        img = b[:, 0]
        rows = RowBatch(latents=latents[img], noise=noises[b[:, 2]], timesteps=ts[b[:, 1]],
                        encoder_hidden_states=cond["encoder_hidden_states"][img],
                        unit_pos=torch.arange(len(b)), row_weight=torch.ones(len(b)), num_units=len(b),
                        added={k: v[img] for k, v in cond.items() if k != "encoder_hidden_states"}).to(device)
        out[s : s + len(b)] = objective.row_losses(model, rows).float().cpu()
    return out.view(n, t_count, d)


def shared_noises(shape: tuple[int, ...], draws: int, seed: int) -> torch.Tensor:
    return torch.randn((draws, *shape), generator=torch.Generator().manual_seed(seed))


def pil_to_float(images) -> np.ndarray:
    """PIL images -> float array [N, H, W, 3] in [0, 1]."""
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])


def record_losses(ctx: ProbeContext, ids: list[int], *, timesteps: list[int], noise_draws: int,
                  models: dict | None = None) -> dict[str, torch.Tensor]:
    """Each record's denoising loss, averaged over ``timesteps`` and ``noise_draws`` shared noise draws (public,
    the same for every model and every run: seed 4242), under each of ``models`` (name -> denoiser; default the
    context's fine-tuned one as ``"model"``): one [len(ids)] tensor per model. The held-out loss of the utility
    metrics and of ``dpdiff tune``'s score. The models are scored one after the other inside this call: pass the
    base from ``ctx.base_model()`` in a call of its own (for LoRA it is the fine-tuned module, adapter off)."""
    recs = [ctx.records[i] for i in ids]
    lat = encode_images(ctx, recs)
    cond = encode_captions(ctx, [r.text for r in recs], recs)
    noises = shared_noises(tuple(lat.shape[1:]), int(noise_draws), 4242)
    obj = ctx.objective()
    out = {}
    for name, model in (models or {"model": ctx.denoiser}).items():
        loss = denoising_losses(model, obj, lat, cond, timesteps=[int(t) for t in timesteps], noises=noises,
                                device=ctx.device)
        out[name] = loss.reshape(len(ids), -1).mean(dim=1)
    return out
