"""Rebuild the built-in tiny Stable Diffusion base from public data, deterministically.

    python recipes/pretrain_base.py [--out DIR] [--vae-steps N] [--unet-steps N]

Trains, non-privately and on the PUBLIC half of scikit-learn's digits only (0-4):
1. an AutoencoderKL (32x32x3 <-> 8x8x4), reconstruction + a small KL term, as SD's VAE;
2. its latent scale: 1/std of the training latents, written to vae/config.json as
   ``scaling_factor`` (SD's 0.18215 would leave this VAE's latents far from unit variance);
3. the UNet with SD's epsilon objective, 10% empty captions so classifier-free guidance works,
   EMA of the UNet weights for the saved model. The CLIP text encoder stays at its (seeded)
   random initialisation: trained on captions of digits 0-4 only, it learned to map the unseen
   words five..nine to nearly the same features, so no fine-tuning could tell them apart; a
   fixed random encoder keeps every word equally distinct (measured: mean pairwise feature
   distance of the prompts "a handwritten digit five".."nine" 4.0 trained vs 11.0 random).
Then saves a StableDiffusionPipeline directory (safetensors) and a grid of digits 0-9
(``samples.png``): 0-4 should be clear, 5-9 are what the private fine-tuning must teach.

Bit-identical output needs the same torch version and thread count (set here to 2).
"""

from __future__ import annotations

import argparse
import copy
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dpdiff.data import digits
from dpdiff.models import tiny
from dpdiff.paths import TINY_BASE_DIR


def _shifted(batch: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels (white padding), a cheap augmentation."""
    out = torch.empty_like(batch)
    padded = F.pad(batch, (max_shift,) * 4, value=1.0)
    n, _, h, w = batch.shape
    offs = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen)
    for i in range(n):
        dy, dx = offs[i].tolist()
        out[i] = padded[i, :, dy : dy + h, dx : dx + w]
    return out


class PretrainBaseRecipe:
    def __init__(self, out: Path, vae_steps: int, unet_steps: int, batch_size: int, seed: int):
        self.out, self.vae_steps, self.unet_steps = Path(out), vae_steps, unet_steps
        self.batch_size, self.seed = batch_size, seed

    def setup(self) -> None:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        torch.manual_seed(self.seed)
        torch.set_num_threads(2)
        torch.use_deterministic_algorithms(True)
        self.gen = torch.Generator().manual_seed(self.seed)

        images8, labels, _ = digits.load_digits_split(digits.PUBLIC_DIGITS)
        pixels = np.stack([np.asarray(digits.render(im), dtype=np.float32) for im in images8])
        self.pixels = torch.from_numpy(pixels).permute(0, 3, 1, 2) / 127.5 - 1.0
        self.labels = torch.as_tensor(labels)
        print(f"public digits {sorted(set(labels.tolist()))}: {len(labels)} images")

        self.tok_dir = self.out.with_name(self.out.name + ".tokenizer-tmp")
        tiny.write_tokenizer(self.tok_dir)
        self.tokenizer = CLIPTokenizer.from_pretrained(self.tok_dir)
        self.text_encoder = CLIPTextModel(CLIPTextConfig(**tiny.text_encoder_config(len(self.tokenizer))))
        self.vae = AutoencoderKL(**tiny.vae_config())
        self.unet = UNet2DConditionModel(**tiny.unet_config())
        self.noise_scheduler = DDPMScheduler(**tiny.scheduler_config())

    def train_vae(self) -> None:
        opt = torch.optim.AdamW(self.vae.parameters(), lr=1e-3, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.vae_steps)
        self.vae.train()
        for step in range(self.vae_steps):
            idx = torch.randint(0, len(self.pixels), (self.batch_size,), generator=self.gen)
            x = _shifted(self.pixels[idx], self.gen)
            post = self.vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=self.gen)
            rec = self.vae.decode(z).sample
            loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-5 * post.kl().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 200 == 0 or step == self.vae_steps - 1:
                print(f"vae step {step:5d} loss {loss.item():.4f}")
        self.vae.eval()
        self.vae.requires_grad_(False)
        with torch.no_grad():
            post = self.vae.encode(self.pixels).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=self.gen)
            scale = float(1.0 / z.std())
            rec = self.vae.decode(post.mean).sample
        self.vae.register_to_config(scaling_factor=round(scale, 5))
        print(f"vae latent std {z.std():.4f} -> scaling_factor {scale:.5f}; "
              f"reconstruction L2 (pixels in [0,1]) {((rec - self.pixels) / 2).pow(2).mean().sqrt():.4f}")

    @torch.no_grad()
    def _encode_text(self, captions: list[str]) -> torch.Tensor:
        ids = self.tokenizer(captions, padding="max_length", max_length=tiny.MAX_TOKENS,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids)[0]

    def train_unet(self) -> None:
        with torch.no_grad():
            post = self.vae.encode(self.pixels).latent_dist
        self.text_encoder.requires_grad_(False).eval()
        params = list(self.unet.parameters())
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
        warmup = 200
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * s / self.unet_steps))
        )
        ema = copy.deepcopy(self.unet).requires_grad_(False)
        scale = self.vae.config.scaling_factor
        self.unet.train()
        for step in range(self.unet_steps):
            idx = torch.randint(0, len(self.pixels), (self.batch_size,), generator=self.gen)
            mean, std = post.mean[idx], post.std[idx]
            latents = (mean + std * torch.randn(mean.shape, generator=self.gen)) * scale
            captions = [digits.caption(int(d)) for d in self.labels[idx]]
            drop = torch.rand(len(captions), generator=self.gen) < 0.1
            captions = ["" if dr else c for c, dr in zip(captions, drop)]
            noise = torch.randn(latents.shape, generator=self.gen)
            t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(idx),), generator=self.gen)
            noisy = self.noise_scheduler.add_noise(latents, noise, t)
            pred = self.unet(noisy, t, self._encode_text(captions)).sample
            loss = F.mse_loss(pred, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            decay = min(0.999, (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), self.unet.parameters()):
                    pe.lerp_(p, 1 - decay)
            if step % 200 == 0 or step == self.unet_steps - 1:
                print(f"unet step {step:5d} loss {loss.item():.4f}")
        self.unet = ema

    def save(self) -> None:
        from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

        self.unet.eval()
        self.text_encoder.eval()
        sampler = DPMSolverMultistepScheduler.from_config(self.noise_scheduler.config)
        pipe = StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=sampler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        tmp = self.out.with_name(self.out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        pipe.save_pretrained(tmp, safe_serialization=True)
        for name in ("vocab.json", "merges.txt"):  # the slow-tokenizer files, for transformers 4.x readers
            shutil.copy(self.tok_dir / name, tmp / "tokenizer" / name)
        if self.out.exists():
            shutil.rmtree(self.out)
        tmp.rename(self.out)
        shutil.rmtree(self.tok_dir, ignore_errors=True)
        from dpdiff.models.pipeline import sample_grid

        sample_grid(pipe, [digits.caption(d) for d in range(10)], per_prompt=8, seed=0,
                    path=self.out.parent / f"{self.out.name}-samples.png")
        print(f"saved {self.out} and {self.out.name}-samples.png")

    def cleanup(self) -> None:
        shutil.rmtree(self.tok_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=TINY_BASE_DIR)
    ap.add_argument("--vae-steps", type=int, default=1200)
    ap.add_argument("--unet-steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    recipe = PretrainBaseRecipe(args.out, args.vae_steps, args.unet_steps, args.batch_size, args.seed)
    try:
        recipe.setup()
        recipe.train_vae()
        recipe.train_unet()
        recipe.save()
    finally:
        recipe.cleanup()


if __name__ == "__main__":
    main()
