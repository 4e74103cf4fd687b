"""bf16 autocast keeps per-unit norms close to fp32; cached latents give the on-the-fly loss."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import make_tiny_lora_unet

from dpdiff.privacy.engine import DPSGDEngine
from dpdiff.privacy.randomness import GaussianNoise
from dpdiff.training.loss import DiffusionObjective, RowBatch


def _objective():
    from diffusers import DDPMScheduler

    from dpdiff.models import tiny

    return DiffusionObjective(DDPMScheduler(**tiny.scheduler_config()))


def _rows(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return RowBatch(torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 4, 8, 8, generator=g),
                    torch.randint(0, 1000, (n,), generator=g), torch.randn(n, 32, 64, generator=g),
                    torch.arange(n), torch.ones(n), n)


def _norms(model, rows, autocast):
    params = [p for p in model.parameters() if p.requires_grad]
    eng = DPSGDEngine(model, noise_multiplier=0.0, max_grad_norm=1e6, expected_batch_size=1.0,
                      noise=GaussianNoise.seeded(0), params=params)
    eng.start_step()
    obj = _objective()
    if autocast:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = obj.row_losses(model, rows)
    else:
        loss = obj.row_losses(model, rows)
    eng.backward(loss.float(), unit_pos=rows.unit_pos, row_weight=rows.row_weight, num_units=rows.num_units)
    stats = eng.finalize()
    grads = torch.cat([p.grad.flatten() for p in params])
    assert all(p.grad.dtype == torch.float32 for p in params)  # the privatised gradient stays fp32
    eng.close()
    return torch.tensor(eng.stats.norms), grads, stats


def test_bf16_dp_step_norms_match_fp32():
    model = make_tiny_lora_unet(rank=4)
    rows = _rows()
    n32, g32, _ = _norms(copy.deepcopy(model), rows, autocast=False)
    n16, g16, _ = _norms(copy.deepcopy(model), rows, autocast=True)
    torch.testing.assert_close(n16, n32, rtol=0.05, atol=0)
    cos = torch.nn.functional.cosine_similarity(g16, g32, dim=0)
    assert cos > 0.99


def test_cached_posterior_gives_the_on_the_fly_loss():
    """Rows from cached VAE posteriors equal encoding the pixels on the fly with the same draw."""
    from dpdiff.data.demos import builtin_digits_dir
    from dpdiff.data.formats import read_dataset
    from dpdiff.data.preprocess import to_pixels
    from dpdiff.data.records import PrivacyUnits
    from dpdiff.models.loading import load_base
    from dpdiff.training.encode import encode_dataset
    from dpdiff.training.rows import RowBuilder

    base = load_base(None)
    recs = read_dataset(builtin_digits_dir())[:6]
    enc = encode_dataset(recs, base=base,
                         resolution=32, center_crop=True, flips=False, device="cpu", progress=False)
    units = PrivacyUnits("example", tuple((i,) for i in range(6)), tuple(r.key for r in recs))
    builder = RowBuilder(enc, units, augmult=1, random_flip=False, num_train_timesteps=1000, key=bytes(32))
    rows = builder.build([0, 1, 2, 3, 4, 5], step=0)
    # replay the same draws on the fly: each unit's stream gives its latent eps first (RowBuilder's order)
    px = torch.stack([to_pixels(r.open(), resolution=32) for r in recs])
    with torch.no_grad():
        post = base.vae.encode(px).latent_dist
    eps = torch.stack([torch.from_numpy(builder.stream(u, 0).standard_normal(tuple(post.mean.shape[1:]),
                                                                             dtype=np.float32)) for u in range(6)])
    lat = (post.mean + post.std * eps) * base.vae.config.scaling_factor
    torch.testing.assert_close(rows.latents, lat, rtol=1e-5, atol=1e-5)
    obj = DiffusionObjective(base.noise_scheduler)
    with torch.no_grad():
        cached = obj.row_losses(base.denoiser, rows)
        fly = obj.row_losses(base.denoiser, RowBatch(lat, rows.noise, rows.timesteps, rows.encoder_hidden_states,
                                                 rows.unit_pos, rows.row_weight, rows.num_units))
    torch.testing.assert_close(cached, fly, rtol=1e-4, atol=1e-6)


def test_feature_cache_roundtrip_is_user_only(tmp_path):
    import os
    import stat

    from dpdiff.training.encode import EncodedData, load_encoded, save_encoded

    d = EncodedData(torch.randn(3, 1, 4, 2, 2), torch.rand(3, 1, 4, 2, 2), torch.randn(2, 5, 8),
                    torch.tensor([0, 1, 1]), ["a", "b"], 0.5, 0.0)
    p = tmp_path / "cache" / "f.safetensors"
    save_encoded(d, p)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(p.parent).st_mode) == 0o700
    e = load_encoded(p)
    assert e.captions == ["a", "b"] and e.scaling_factor == pytest.approx(0.5)
    torch.testing.assert_close(e.latent_mean, d.latent_mean)
