"""Loading a diffusers pipeline directory: SD 1.x/2.x, SDXL, SD3 or a Flux-style pipeline.

The family is read from ``model_index.json`` (``dpdiff.models.families``) and the pipeline is loaded by its own
diffusers class (``from_pretrained``), so every component is the class the pipeline names and inference later runs
through the same object. Local directories only by default: a hub id is fetched only with
``model.allow_download=true`` (the Hugging Face hub stays offline otherwise). Weights are read from safetensors
only, never from pickled ``.bin`` files of unknown origin; the SD safety checker is never loaded.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from dpdiff.errors import UserError
from dpdiff.models.families import Family, detect_family
from dpdiff.paths import TINY_BASE_DIR

OPTIONAL_PARTS = ("safety_checker", "feature_extractor", "image_encoder")


@dataclass
class BaseModel:
    path: str  # absolute path of the pipeline dir, or the hub id
    family: Family
    pipe: object  # the family's diffusers pipeline: the frozen encoders, the VAE and the (base) denoiser
    noise_scheduler: object  # the training scheduler: DDPMScheduler (sd, sdxl), FlowMatchEulerDiscreteScheduler else

    @property
    def denoiser(self) -> torch.nn.Module:
        """The component that is fine-tuned: the UNet (sd, sdxl) or the transformer (sd3, flux)."""
        return getattr(self.pipe, self.family.denoiser)

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipe.vae

    @property
    def resolution(self) -> int:
        """The native resolution: the denoiser's sample size (the pipeline's default where the denoiser has none,
        as Flux's) times the VAE's downsampling factor."""
        size = getattr(self.denoiser.config, "sample_size", None) or getattr(self.pipe, "default_sample_size", 64)
        return int((size[0] if isinstance(size, (list, tuple)) else size) * self.pipe.vae_scale_factor)

    def check_resolution(self, resolution: int) -> None:
        """Latents must tile the VAE's downsampling, and Flux's 2x2 packing on top of it."""
        patch = self.family.latent_patch
        mult = self.pipe.vae_scale_factor * patch
        if resolution % mult:
            raise UserError(f"data.resolution={resolution}: a {self.family.name} model needs a multiple of {mult} "
                            f"(its VAE downsamples by {self.pipe.vae_scale_factor}"
                            f"{f', then latents are packed {patch}x{patch}' if patch > 1 else ''})")

    def text_parts(self) -> list[str]:
        """The pipeline's text encoders and tokenizers present in its dir (the feature cache depends on them)."""
        return [n for n in ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
                            "tokenizer_3") if getattr(self.pipe, n, None) is not None]


def required_parts(index: Path) -> list[str]:
    """The component folders a pipeline dir's ``model_index.json`` names (optional parts aside)."""
    entries = json.loads(index.read_text())
    return [k for k, v in entries.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None
            and k not in OPTIONAL_PARTS]


def resolve_pretrained(pretrained: str | None, *, allow_download: bool) -> str:
    if pretrained in (None, "", "tiny"):
        return str(TINY_BASE_DIR)
    p = Path(str(pretrained)).expanduser()
    if p.exists():
        if not p.is_dir():
            raise UserError(f"model.pretrained={pretrained} is a file; point it at a diffusers pipeline directory")
        family = detect_family(p)
        missing = [part for part in required_parts(p / "model_index.json") if not (p / part).is_dir()]
        if missing:
            raise UserError(f"model.pretrained={p} is not a complete {family.pipeline} directory: missing "
                            f"{', '.join(f'{m}/' for m in missing)} (model_index.json names them)")
        return str(p.resolve())
    looks_like_hub_id = str(pretrained).count("/") == 1 and not str(pretrained).startswith((".", "/", "~"))
    if looks_like_hub_id and allow_download:
        return str(pretrained)
    if looks_like_hub_id:
        raise UserError(f"model.pretrained={pretrained} is not a local directory; to download it from the "
                        "Hugging Face hub set model.allow_download=true (or pass a local pipeline dir)")
    raise UserError(f"model.pretrained={pretrained} does not exist; pass a diffusers pipeline directory")


def family_of(path: str, *, allow_download: bool) -> Family:
    """The family of a resolved pretrained path (a hub id is fetched as its ``model_index.json`` only)."""
    if Path(path).is_dir():
        return detect_family(path)
    from huggingface_hub import hf_hub_download

    return detect_family(Path(hf_hub_download(path, "model_index.json", local_files_only=not allow_download)).parent)


def training_scheduler(family: Family, sampler_config):
    """The scheduler training draws noise levels from, as the family's diffusers script builds it: a
    ``DDPMScheduler`` from the pipeline's scheduler config (sd, sdxl) or the pipeline's own
    ``FlowMatchEulerDiscreteScheduler`` (sd3, flux: the scripts train on a copy of it)."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if family.objective == "flow":
        return FlowMatchEulerDiscreteScheduler.from_config(sampler_config)
    return DDPMScheduler.from_config(sampler_config)


@contextlib.contextmanager
def _quiet_loading():
    """No per-component progress bars of diffusers and transformers while a pipeline loads."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    d, t = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if d:
            dlog.enable_progress_bar()
        if t:
            tlog.enable_progress_bar()


def load_base(pretrained: str | None, *, device: torch.device | str = "cpu", allow_download: bool = False,
              dtype: torch.dtype = torch.float32) -> BaseModel:
    import diffusers

    path = resolve_pretrained(pretrained, allow_download=allow_download)
    family = family_of(path, allow_download=allow_download)
    cls = getattr(diffusers, family.pipeline)
    extra = dict(family.pipeline_extras)
    try:
        with _quiet_loading():
            pipe = cls.from_pretrained(path, use_safetensors=True, local_files_only=not allow_download, **extra)
    except (OSError, ValueError, TypeError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"cannot load the pipeline at {path}: {msg} (dpdiff loads safetensors weights only; "
                        "convert .bin weights with diffusers' save_pretrained(safe_serialization=True))") from None
    pipe.set_progress_bar_config(disable=True)
    for name, part in pipe.components.items():
        if isinstance(part, torch.nn.Module):
            part.requires_grad_(False).eval()
            if name == family.denoiser:
                part.to(device)  # trainable weights stay fp32; see training/precision
            else:
                part.to(device) if dtype == torch.float32 else part.to(device, dtype=dtype)
    return BaseModel(path=path, family=family, pipe=pipe,
                     noise_scheduler=training_scheduler(family, pipe.scheduler.config))


def build_pipeline(base: BaseModel, denoiser=None):
    """The family's pipeline over the loaded parts (the fine-tuned denoiser if given). SD and SDXL sample with
    DPM-Solver++ (20 steps suffice); SD3 and Flux with their own flow-matching Euler scheduler."""
    import diffusers

    parts = dict(base.pipe.components)
    parts[base.family.denoiser] = denoiser if denoiser is not None else base.denoiser
    if base.family.objective == "ddpm":
        parts["scheduler"] = diffusers.DPMSolverMultistepScheduler.from_config(base.pipe.scheduler.config)
    else:
        parts["scheduler"] = type(base.pipe.scheduler).from_config(base.pipe.scheduler.config)
    parts.update({k: v for k, v in base.family.pipeline_extras if k == "requires_safety_checker"})
    pipe = type(base.pipe)(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class SamplingPipeline:
    """The family's pipeline, called at the training resolution and with the T5 length the model was trained with
    (SD3's and Flux's pipelines default to 1024 px and 256 / 512 T5 tokens otherwise). ``denoiser`` can be swapped
    (the base's, to compare)."""

    def __init__(self, pipe, family: Family, *, resolution: int, max_sequence_length: int | None = None):
        self.pipe, self.family = pipe, family
        self.call = dict(height=int(resolution), width=int(resolution))
        low = {next(m.parameters()).dtype for name, m in pipe.components.items()
               if isinstance(m, torch.nn.Module) and name != family.denoiser} - {torch.float32}
        self.autocast_dtype = low.pop() if low else None  # the frozen parts' dtype (model.frozen_dtype)
        if max_sequence_length is not None:
            self.call["max_sequence_length"] = int(max_sequence_length)

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.family.denoiser)

    @denoiser.setter
    def denoiser(self, model: torch.nn.Module) -> None:
        setattr(self.pipe, self.family.denoiser, model)

    def __call__(self, prompts, **kwargs):
        """Frozen encoders in bf16/fp16 beside a float32 denoiser (``model.frozen_dtype``) hand it half-precision
        latents and embeddings: the call then runs under autocast to that dtype, as diffusers' training scripts
        run their validation."""
        device = next(self.denoiser.parameters()).device
        dtype = self.autocast_dtype
        with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
            return self.pipe(prompts, **self.call, **kwargs)


def sampling_pipeline(base: BaseModel, denoiser=None, *, resolution: int, max_sequence_length: int | None = None
                      ) -> SamplingPipeline:
    return SamplingPipeline(build_pipeline(base, denoiser), base.family, resolution=resolution,
                            max_sequence_length=max_sequence_length)
