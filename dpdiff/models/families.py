"""Model families: which denoiser a pipeline dir holds, how it is called, what its LoRA targets by default.

A family is detected from the pipeline dir's ``model_index.json`` (``_class_name``), never guessed
from weights. The calls follow diffusers' own training scripts, so that a model fine-tuned here is
what those scripts would have produced:

* ``sd``    SD 1.x/2.x ``UNet2DConditionModel``: ``unet(noisy, t, text)`` (``train_text_to_image_lora.py``);
* ``sdxl``  SDXL ``UNet2DConditionModel`` with ``addition_embed_type="text_time"``: the pooled embedding of
            the second text encoder and six size/crop ids as added conditioning
            (``train_dreambooth_lora_sdxl.py``: ``added_cond_kwargs={"text_embeds", "time_ids"}``);
* ``sd3``   ``SD3Transformer2DModel`` (MMDiT, joint text/image attention): flow matching, the timestep on
            the 0..1000 scale, pooled projections (``train_dreambooth_lora_sd3.py``);
* ``flux``  ``FluxTransformer2DModel``: flow matching on 2x2-packed latents with position ids, the timestep
            and guidance passed /1000 (the model multiplies them back), pooled projections
            (``train_dreambooth_lora_flux.py``).

Rows must stay independent through the denoiser (per-unit gradients assume it): these calls share
only the position ids between rows, never activations.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from dpdiff.errors import UserError


@dataclass(frozen=True)
class Family:
    """A model family as a strategy: what differs between SD, SDXL, SD3 and Flux lives in these classes (how the
    denoiser is called, how prompts and images condition it, the latent layout, the pipeline's extras), so no code
    outside them branches on a family's name."""

    name: str
    pipeline: str  # diffusers pipeline class in model_index.json
    denoiser: str  # "unet" | "transformer": the component that is fine-tuned
    objective: str  # "ddpm" (epsilon / v) | "flow" (rectified flow, target = noise - x0)
    lora_targets: tuple[str, ...]  # diffusers' training scripts' defaults
    added: tuple[str, ...] = ()  # per-row conditioning besides the text embedding
    image_added: tuple[str, ...] = ()  # the part of ``added`` that depends on the image (not the caption)
    # one CLIP text encoder whose input embeddings a learned token can extend (``adapter=embedding``)
    single_clip_text: bool = False
    t5_text: bool = False  # a T5 encoder whose token count ``model.max_sequence_length`` sets
    latent_patch: int = 1  # latents are packed in patch x patch tiles (Flux: 2)
    pipeline_extras: tuple[tuple[str, object], ...] = ()  # from_pretrained keywords the pipeline class needs

    def call(self, model, noisy, timesteps, encoder_hidden_states, added, guidance):
        """The denoiser's prediction in the latents' layout (``predict`` checks ``added`` first)."""
        raise NotImplementedError

    def encode_chunk(self, pipe, chunk: list[str], *, device, msl: dict):
        """(token embeddings, added per-caption conditioning) of one chunk of captions."""
        raise NotImplementedError

    def image_conditioning(self, *, original_size: tuple[int, int], crop_top_left: tuple[int, int],
                           resolution: int) -> dict[str, torch.Tensor]:
        """Per-image added conditioning (none but SDXL's)."""
        return {}


@dataclass(frozen=True)
class SDFamily(Family):
    def call(self, model, noisy, timesteps, encoder_hidden_states, added, guidance):
        return model(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]

    def encode_chunk(self, pipe, chunk, *, device, msl):
        # one CLIP's last hidden state, padded to model_max_length (train_text_to_image_lora.py)
        ids = pipe.tokenizer(chunk, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(device)
        return pipe.text_encoder(ids)[0], {}


@dataclass(frozen=True)
class SDXLFamily(Family):
    def call(self, model, noisy, timesteps, encoder_hidden_states, added, guidance):
        return model(noisy, timesteps, encoder_hidden_states, return_dict=False,
                     added_cond_kwargs={"text_embeds": added["text_embeds"], "time_ids": added["time_ids"]})[0]

    def encode_chunk(self, pipe, chunk, *, device, msl):
        emb, _, pooled, _ = pipe.encode_prompt(prompt=chunk, device=device, do_classifier_free_guidance=False)
        return emb, {"text_embeds": pooled}

    def image_conditioning(self, *, original_size, crop_top_left, resolution):
        """The six micro-conditioning ids (original height and width, crop top and left, target height and width:
        ``compute_time_ids`` of ``train_text_to_image_sdxl.py``)."""
        h, w = original_size
        top, left = crop_top_left
        return {"time_ids": torch.tensor([h, w, top, left, resolution, resolution], dtype=torch.float32)}


@dataclass(frozen=True)
class SD3Family(Family):
    def call(self, model, noisy, timesteps, encoder_hidden_states, added, guidance):
        return model(hidden_states=noisy, encoder_hidden_states=encoder_hidden_states,
                     pooled_projections=added["pooled_projections"], timestep=timesteps, return_dict=False)[0]

    def encode_chunk(self, pipe, chunk, *, device, msl):
        emb, _, pooled, _ = pipe.encode_prompt(prompt=chunk, prompt_2=None, prompt_3=None, device=device,
                                               do_classifier_free_guidance=False, **msl)
        return emb, {"pooled_projections": pooled}


@dataclass(frozen=True)
class FluxFamily(Family):
    def call(self, model, noisy, timesteps, encoder_hidden_states, added, guidance):
        r, _, h, w = noisy.shape
        g = None
        if getattr(model.config, "guidance_embeds", False):
            g = torch.full((r,), float(guidance), device=noisy.device, dtype=noisy.dtype)
        out = model(hidden_states=pack_latents(noisy), encoder_hidden_states=encoder_hidden_states,
                    pooled_projections=added["pooled_projections"], timestep=timesteps / 1000, guidance=g,
                    img_ids=latent_ids(h, w, device=noisy.device, dtype=noisy.dtype),
                    txt_ids=torch.zeros(encoder_hidden_states.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
                    return_dict=False)[0]
        return unpack_latents(out, h, w)

    def encode_chunk(self, pipe, chunk, *, device, msl):
        emb, pooled, _ = pipe.encode_prompt(prompt=chunk, prompt_2=None, device=device, **msl)
        return emb, {"pooled_projections": pooled}


FAMILIES = {f.name: f for f in (
    SDFamily("sd", "StableDiffusionPipeline", "unet", "ddpm", ("to_q", "to_k", "to_v", "to_out.0"),
             single_clip_text=True,
             pipeline_extras=(("safety_checker", None), ("feature_extractor", None),
                              ("requires_safety_checker", False))),
    SDXLFamily("sdxl", "StableDiffusionXLPipeline", "unet", "ddpm", ("to_q", "to_k", "to_v", "to_out.0"),
               added=("text_embeds", "time_ids"), image_added=("time_ids",)),
    SD3Family("sd3", "StableDiffusion3Pipeline", "transformer", "flow",
              ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),
              added=("pooled_projections",), t5_text=True),
    FluxFamily("flux", "FluxPipeline", "transformer", "flow",
               ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"),
               added=("pooled_projections",), t5_text=True, latent_patch=2),
)}
_BY_PIPELINE = {f.pipeline: f for f in FAMILIES.values()}


def detect_family(pretrained: str | Path) -> Family:
    """The family of a local pipeline dir, from its ``model_index.json``; one clear error otherwise."""
    index = Path(pretrained) / "model_index.json"
    if not index.is_file():
        raise UserError(f"model.pretrained={pretrained}: no model_index.json (a diffusers pipeline directory, "
                        "as save_pretrained writes it, is needed)")
    try:
        name = json.loads(index.read_text())["_class_name"]
    except (ValueError, KeyError) as e:
        raise UserError(f"{index}: not a diffusers model_index.json ({e})") from None
    for prefix in ("", "Diffusers"):
        if name.removeprefix(prefix) in _BY_PIPELINE:
            return _BY_PIPELINE[name.removeprefix(prefix)]
    known = ", ".join(sorted(_BY_PIPELINE))
    raise UserError(f"{index}: pipeline {name} is not supported (supported: {known})")


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """Flux's 2x2 patch packing (``FluxPipeline._pack_latents``): [B, C, H, W] -> [B, H/2 * W/2, 4C]."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` (``FluxPipeline._unpack_latents`` at latent size h x w)."""
    b, _, d = x.shape
    c = d // 4
    return x.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def latent_ids(h: int, w: int, *, device, dtype) -> torch.Tensor:
    """Flux's image position ids (``FluxPipeline._prepare_latent_image_ids``): [(h/2)(w/2), 3] = (0, row, col)."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device, dtype=dtype)
    ids[..., 1] += torch.arange(h // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] += torch.arange(w // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


def predict(model: torch.nn.Module, *, family: Family, noisy: torch.Tensor, timesteps: torch.Tensor,
            encoder_hidden_states: torch.Tensor, added: dict[str, torch.Tensor], guidance: float = 3.5
            ) -> torch.Tensor:
    """The denoiser's prediction for ``noisy`` latents [R, C, H, W] at ``timesteps`` (DDPM: integer steps; flow:
    the scheduler's timesteps, 0..1000), in the latents' layout."""
    missing = [k for k in family.added if k not in added]
    if missing:
        raise ValueError(f"{family.name} needs the added conditioning {', '.join(missing)}")
    return family.call(model, noisy, timesteps, encoder_hidden_states, added, guidance)


@torch.no_grad()
def encode_prompts(pipe, family: Family, captions: list[str], *, device, max_sequence_length: int | None = None,
                   batch_size: int = 64) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Text conditioning of ``captions`` by the family's frozen text encoders: the token embeddings [M, T, D] and the
    per-caption added conditioning (SDXL's pooled ``text_embeds``; SD3's and Flux's ``pooled_projections``), float32
    on the CPU. ``pipe`` is the family's diffusers pipeline holding the encoders: its own ``encode_prompt`` is used
    (SDXL's two CLIPs' penultimate layers concatenated; SD3's CLIP-L+G padded to T5's width and joined with T5's
    tokens; Flux's T5 tokens and CLIP pooled), so training sees what the pipeline conditions on at inference.
    ``max_sequence_length`` caps T5's tokens (the pipeline's default when None). SD 1.x/2.x keeps its one CLIP's
    last hidden state, padded to ``model_max_length`` (``train_text_to_image_lora.py``)."""
    msl = {} if max_sequence_length is None else {"max_sequence_length": int(max_sequence_length)}
    embs: list[torch.Tensor] = []
    added: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(captions), batch_size):
        chunk = list(captions[i : i + batch_size])
        emb, extra = family.encode_chunk(pipe, chunk, device=device, msl=msl)
        embs.append(emb.float().cpu())
        for k, v in extra.items():
            added.setdefault(k, []).append(v.float().cpu())
    if not embs:
        return torch.empty(0), {}
    return torch.cat(embs), {k: torch.cat(v) for k, v in added.items()}


def image_conditioning(family: Family, *, original_size: tuple[int, int], crop_top_left: tuple[int, int],
                       resolution: int) -> dict[str, torch.Tensor]:
    """Per-image added conditioning: SDXL's six micro-conditioning ids (original height and width, crop top and
    left, target height and width: ``compute_time_ids`` of ``train_text_to_image_sdxl.py``); none for the others."""
    return family.image_conditioning(original_size=original_size, crop_top_left=crop_top_left,
                                     resolution=resolution)
