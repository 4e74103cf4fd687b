"""Frozen-encoder features of the training images: VAE posteriors and text conditioning.

The VAE and the text encoder are frozen, so their outputs are computed once and reused
at every step (as DP-LDM and DPDM do). The VAE *posterior* (mean and std) is kept, not a
sample, so every augmentation draw samples a fresh latent ``mean + std * eps`` exactly as
diffusers' ``latent_dist.sample()`` would (then shifted and scaled by the VAE's factors, as SD3's and
Flux's scripts do). With flips on, both orientations are encoded. The text conditioning is the
family's (``models.families.encode_prompts``): token embeddings plus the pooled embeddings SDXL, SD3
and Flux condition on; SDXL's per-image size and crop ids are kept per image and orientation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from dpdiff.data.preprocess import crop_top_left, original_size, to_pixels
from dpdiff.data.records import ImageRecord
from dpdiff.models.families import encode_prompts, image_conditioning


@dataclass
class EncodedData:
    latent_mean: torch.Tensor  # [N, F, C, h, w]; F = 2 (original, flipped) with flips, else 1
    latent_std: torch.Tensor  # [N, F, C, h, w]
    text_emb: torch.Tensor  # [M, T, D], one row per distinct caption
    text_index: torch.Tensor  # [N] long: image -> caption row
    captions: list[str]  # the M distinct captions
    scaling_factor: float
    shift_factor: float
    text_added: dict[str, torch.Tensor] = field(default_factory=dict)  # [M, ...] per caption: pooled embeddings
    image_added: dict[str, torch.Tensor] = field(default_factory=dict)  # [N, F, ...] per image: SDXL's time ids

    @property
    def num_flips(self) -> int:
        return int(self.latent_mean.shape[1])

    def text_conditioning(self) -> dict[str, torch.Tensor]:
        """Everything that depends on the caption alone, one row per caption: the token embeddings
        (``encoder_hidden_states``) and the pooled ones."""
        return {"encoder_hidden_states": self.text_emb, **self.text_added}


def latent_factors(vae) -> tuple[float, float]:
    scale = float(vae.config.scaling_factor)
    shift = getattr(vae.config, "shift_factor", None)
    return scale, float(shift) if shift is not None else 0.0


def encode_captions(base, captions: list[str], *, device, max_sequence_length: int | None = None
                    ) -> dict[str, torch.Tensor]:
    """The text conditioning of ``captions`` by the base pipeline's frozen encoders, as
    :meth:`EncodedData.text_conditioning` lays it out ([M, ...] per key, float32 on the CPU)."""
    emb, added = encode_prompts(base.pipe, base.family, captions, device=device,
                                max_sequence_length=max_sequence_length)
    return {"encoder_hidden_states": emb, **added}


def image_added(family, image, *, resolution: int, flip: bool = False) -> dict[str, torch.Tensor]:
    """The per-image added conditioning of ``image`` as training sees it at ``resolution`` (SDXL's size and crop ids
    of the center crop ``to_pixels`` takes, in the mirrored image when flipped); empty for the other families."""
    if not family.image_added:
        return {}
    return image_conditioning(family, original_size=original_size(image),
                              crop_top_left=crop_top_left(image, resolution=resolution, flip=flip),
                              resolution=resolution)


@torch.no_grad()
def encode_dataset(records: list[ImageRecord], *, base, resolution: int, center_crop: bool, flips: bool, device,
                   batch_size: int = 32, progress: bool = True, max_sequence_length: int | None = None
                   ) -> EncodedData:
    vae, family = base.vae, base.family
    scale, shift = latent_factors(vae)
    orientations = (False, True) if flips else (False,)
    means, stds, per_image = [], [], []
    it = range(0, len(records), batch_size)
    for i in tqdm(it, desc="encoding images", disable=not progress, leave=False):
        batch = records[i : i + batch_size]
        images = [r.open() for r in batch]
        per_flip_mean, per_flip_std = [], []
        for flip in orientations:
            px = torch.stack([to_pixels(im, resolution=resolution, center_crop=center_crop, flip=flip)
                              for im in images])
            post = vae.encode(px.to(device=device, dtype=vae.dtype)).latent_dist
            per_flip_mean.append(post.mean.float().cpu())
            per_flip_std.append(post.std.float().cpu())
        means.append(torch.stack(per_flip_mean, 1))
        stds.append(torch.stack(per_flip_std, 1))
        per_image += [[image_added(family, im, resolution=resolution, flip=flip) for flip in orientations]
                      for im in images]
    captions = sorted({r.text for r in records})
    index = {c: j for j, c in enumerate(captions)}
    text = encode_captions(base, captions, device=device, max_sequence_length=max_sequence_length)
    keys = per_image[0][0].keys() if per_image else ()
    return EncodedData(
        latent_mean=torch.cat(means), latent_std=torch.cat(stds), text_emb=text.pop("encoder_hidden_states"),
        text_index=torch.tensor([index[r.text] for r in records], dtype=torch.long),
        captions=captions, scaling_factor=scale, shift_factor=shift, text_added=text,
        image_added={k: torch.stack([torch.stack([f[k] for f in per]) for per in per_image]) for k in keys},
    )


# --- the on-disk cache ------------------------------------------------------------------------
def cache_key(*, records: list[ImageRecord], base_path: str, parts: list[str], resolution: int, center_crop: bool,
              flips: bool, dtype: str, max_sequence_length: int | None = None) -> str:
    """Names what the cached features depend on: the images and captions, the frozen encoders, the transform."""
    import hashlib
    import json
    from pathlib import Path

    from dpdiff.data.records import fingerprint

    h = hashlib.sha256()
    h.update(fingerprint(records).encode())
    h.update(json.dumps([r.key for r in records]).encode())
    for part in ("vae", *parts):
        d = Path(base_path) / part
        if d.is_dir():
            for f in sorted(d.iterdir()):
                st = f.stat()
                h.update(f"{part}/{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
        else:
            h.update(f"{base_path}/{part}".encode())
    h.update(json.dumps([resolution, center_crop, flips, dtype] + ([max_sequence_length] if max_sequence_length
                                                                   else [])).encode())
    return h.hexdigest()[:24]


def save_encoded(data: EncodedData, path) -> None:
    """Write the features as a user-only safetensors file (they are derived from private images)."""
    import json
    import os
    from pathlib import Path

    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tensors = {"latent_mean": data.latent_mean, "latent_std": data.latent_std, "text_emb": data.text_emb,
               "text_index": data.text_index, **{f"text_added.{k}": v for k, v in data.text_added.items()},
               **{f"image_added.{k}": v for k, v in data.image_added.items()}}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"captions": json.dumps(data.captions), "scaling_factor": repr(data.scaling_factor),
                        "shift_factor": repr(data.shift_factor)})
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def load_encoded(path) -> EncodedData | None:
    import json
    from pathlib import Path

    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            t = {k: f.get_tensor(k) for k in f.keys()}
        return EncodedData(latent_mean=t["latent_mean"], latent_std=t["latent_std"], text_emb=t["text_emb"],
                           text_index=t["text_index"], captions=json.loads(meta["captions"]),
                           scaling_factor=float(meta["scaling_factor"]), shift_factor=float(meta["shift_factor"]),
                           text_added={k.split(".", 1)[1]: v for k, v in t.items() if k.startswith("text_added.")},
                           image_added={k.split(".", 1)[1]: v for k, v in t.items() if k.startswith("image_added.")})
    except (OSError, KeyError, ValueError, RuntimeError):
        return None  # a damaged cache is recomputed
