"""Loading the parts of a Stable Diffusion pipeline directory (SD 1.x / 2.x layout).

Local directories only by default: a hub id is fetched only with ``model.allow_download=true``
(the Hugging Face hub stays offline otherwise). Weights are read from safetensors only, never
from pickled ``.bin`` files of unknown origin.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dpdiff.errors import UserError
from dpdiff.paths import TINY_BASE_DIR

REQUIRED_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class BaseModel:
    path: str  # absolute path of the pipeline dir, or the hub id
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    noise_scheduler: object  # a DDPMScheduler built from the pipeline's scheduler config

    @property
    def resolution(self) -> int:
        """The native resolution: UNet sample size times the VAE's downsampling factor."""
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        size = self.unet.config.sample_size
        return int((size[0] if isinstance(size, (list, tuple)) else size) * factor)


def resolve_pretrained(pretrained: str | None, *, allow_download: bool) -> str:
    if pretrained in (None, "", "tiny"):
        return str(TINY_BASE_DIR)
    p = Path(str(pretrained)).expanduser()
    if p.exists():
        if not p.is_dir():
            raise UserError(f"model.pretrained={pretrained} is a file; point it at a diffusers pipeline directory")
        if (p / "model_index.json").is_file():
            from dpdiff.models.families import detect_family

            family = detect_family(p)
            if family.name != "sd":
                raise UserError(
                    f"model.pretrained={p} holds a {family.pipeline} ({family.name}): the finetune recipe trains SD "
                    "1.x/2.x pipelines only so far; DP training of its denoiser is available from Python "
                    "(dpdiff.models.families, dpdiff.training.loss, the clipping engines)")
        missing = [part for part in REQUIRED_PARTS if not (p / part).is_dir()]
        if missing:
            raise UserError(f"model.pretrained={p} is not a Stable Diffusion pipeline directory: missing "
                            f"{', '.join(missing)}/ (expected model_index.json with unet, vae, text_encoder, "
                            "tokenizer, scheduler subfolders)")
        return str(p.resolve())
    looks_like_hub_id = str(pretrained).count("/") == 1 and not str(pretrained).startswith((".", "/", "~"))
    if looks_like_hub_id and allow_download:
        return str(pretrained)
    if looks_like_hub_id:
        raise UserError(f"model.pretrained={pretrained} is not a local directory; to download it from the "
                        "Hugging Face hub set model.allow_download=true (or pass a local pipeline dir)")
    raise UserError(f"model.pretrained={pretrained} does not exist; pass a diffusers pipeline directory")


def load_base(pretrained: str | None, *, device: torch.device | str = "cpu", allow_download: bool = False,
              dtype: torch.dtype = torch.float32) -> BaseModel:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = resolve_pretrained(pretrained, allow_download=allow_download)
    kw = dict(local_files_only=not allow_download)
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", use_safetensors=True, **kw)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", use_safetensors=True, **kw)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", use_safetensors=True, **kw)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)
        noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
    except (OSError, ValueError) as err:
        msg = str(err).splitlines()[0]
        raise UserError(f"cannot load the pipeline at {path}: {msg} (dpdiff loads safetensors weights only; "
                        "convert .bin weights with diffusers' save_pretrained(safe_serialization=True))") from None
    vae.requires_grad_(False).eval().to(device, dtype=dtype)
    text_encoder.requires_grad_(False).eval().to(device, dtype=dtype)
    unet.requires_grad_(False).to(device)  # trainable weights stay fp32; see training/precision
    return BaseModel(path=path, unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                     noise_scheduler=noise_scheduler)


def build_pipeline(base: BaseModel, unet=None):
    """A StableDiffusionPipeline over the loaded parts (the fine-tuned UNet if given)."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    sampler = DPMSolverMultistepScheduler.from_config(base.noise_scheduler.config)
    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                   unet=unet if unet is not None else base.unet, scheduler=sampler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
