"""Frozen-encoder features of the training images: VAE posteriors and text embeddings.

The VAE and the text encoder are frozen, so their outputs are computed once and reused
at every step (as DP-LDM and DPDM do). The VAE *posterior* (mean and std) is kept, not a
sample, so every augmentation draw samples a fresh latent ``mean + std * eps`` exactly as
diffusers' ``latent_dist.sample()`` would. With flips on, both orientations are encoded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from dpdiff.data.preprocess import to_pixels
from dpdiff.data.records import ImageRecord


@dataclass
class EncodedData:
    latent_mean: torch.Tensor  # [N, F, C, h, w]; F = 2 (original, flipped) with flips, else 1
    latent_std: torch.Tensor  # [N, F, C, h, w]
    text_emb: torch.Tensor  # [M, T, D], one row per distinct caption
    text_index: torch.Tensor  # [N] long: image -> caption row
    captions: list[str]  # the M distinct captions
    scaling_factor: float
    shift_factor: float

    @property
    def num_flips(self) -> int:
        return int(self.latent_mean.shape[1])


def latent_factors(vae) -> tuple[float, float]:
    scale = float(vae.config.scaling_factor)
    shift = getattr(vae.config, "shift_factor", None)
    return scale, float(shift) if shift is not None else 0.0


@torch.no_grad()
def encode_texts(tokenizer, text_encoder, captions: list[str], *, device, batch_size: int = 64) -> torch.Tensor:
    out = []
    for i in range(0, len(captions), batch_size):
        ids = tokenizer(captions[i : i + batch_size], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        out.append(text_encoder(ids)[0].float().cpu())
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def encode_dataset(records: list[ImageRecord], *, vae, tokenizer, text_encoder, resolution: int,
                   center_crop: bool, flips: bool, device, batch_size: int = 32,
                   progress: bool = True) -> EncodedData:
    scale, shift = latent_factors(vae)
    orientations = (False, True) if flips else (False,)
    means, stds = [], []
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
    captions = sorted({r.text for r in records})
    index = {c: j for j, c in enumerate(captions)}
    text_emb = encode_texts(tokenizer, text_encoder, captions, device=device)
    return EncodedData(
        latent_mean=torch.cat(means), latent_std=torch.cat(stds), text_emb=text_emb,
        text_index=torch.tensor([index[r.text] for r in records], dtype=torch.long),
        captions=captions, scaling_factor=scale, shift_factor=shift,
    )


# --- the on-disk cache ------------------------------------------------------------------------
def cache_key(*, records: list[ImageRecord], base_path: str, resolution: int, center_crop: bool, flips: bool,
              dtype: str) -> str:
    """Names what the cached features depend on: the images and captions, the frozen encoders, the transform."""
    import hashlib
    import json
    from pathlib import Path

    from dpdiff.data.records import fingerprint

    h = hashlib.sha256()
    h.update(fingerprint(records).encode())
    h.update(json.dumps([r.key for r in records]).encode())
    for part in ("vae", "text_encoder", "tokenizer"):
        d = Path(base_path) / part
        if d.is_dir():
            for f in sorted(d.iterdir()):
                st = f.stat()
                h.update(f"{part}/{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
        else:
            h.update(f"{base_path}/{part}".encode())
    h.update(json.dumps([resolution, center_crop, flips, dtype]).encode())
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
    save_file({"latent_mean": data.latent_mean.contiguous(), "latent_std": data.latent_std.contiguous(),
               "text_emb": data.text_emb.contiguous(), "text_index": data.text_index.contiguous()}, str(tmp),
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
                           scaling_factor=float(meta["scaling_factor"]), shift_factor=float(meta["shift_factor"]))
    except (OSError, KeyError, ValueError, RuntimeError):
        return None  # a damaged cache is recomputed
