"""LoRA/full/attn adapters: targets, saved format, and loading into a diffusers pipeline."""

from __future__ import annotations

import pytest
import torch

from dpdiff.errors import UserError
from dpdiff.models import adapters
from dpdiff.models.loading import build_pipeline, load_base


@pytest.fixture(scope="module")
def base():
    return load_base(None)


def _unet_out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    e = torch.randn(2, 32, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), e).sample


def test_unknown_target_is_a_user_error(base):
    with pytest.raises(UserError, match="matches no module"):
        adapters.attach(load_base(None).denoiser, kind="lora", rank=4, target_modules=["to_qq"])


def test_unknown_kind_is_a_user_error():
    with pytest.raises(UserError, match="adapter must be one of"):
        adapters.attach(load_base(None).denoiser, kind="dora")


@pytest.mark.parametrize("kind,expect", [("full", "all"), ("attn", "attn")])
def test_trainable_sets(kind, expect):
    unet = load_base(None).denoiser
    params = adapters.attach(unet, kind=kind)
    names = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert len(params) == len(names) > 0
    if expect == "all":
        assert len(names) == len(list(unet.parameters()))
    else:
        assert all(any(t in n for t in ("to_q", "to_k", "to_v", "to_out.0")) for n in names)


def test_saved_lora_loads_with_diffusers_and_reproduces_the_trained_unet(tmp_path):
    """alpha != rank: the saved metadata must give the loaded LoRA its trained scale."""
    trained = load_base(None)
    adapters.attach(trained.denoiser, kind="lora", rank=4, alpha=8)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in trained.denoiser.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    want = _unet_out(trained.denoiser)
    out = adapters.save(trained.denoiser, kind="lora", out_dir=tmp_path)
    assert (out / "pytorch_lora_weights.safetensors").exists()

    fresh = load_base(None)
    base_out = _unet_out(fresh.denoiser)
    pipe = build_pipeline(fresh)
    pipe.load_lora_weights(str(out))
    got = _unet_out(pipe.unet)
    assert not torch.allclose(base_out, got, atol=1e-4), "LoRA did not change the output"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_full_finetune_saves_a_loadable_unet(tmp_path):
    from diffusers import UNet2DConditionModel

    m = load_base(None)
    adapters.attach(m.denoiser, kind="full")
    with torch.no_grad():
        next(iter(m.denoiser.parameters())).add_(0.1)
    want = _unet_out(m.denoiser)
    out = adapters.save(m.denoiser, kind="full", out_dir=tmp_path)
    loaded = UNet2DConditionModel.from_pretrained(out)
    torch.testing.assert_close(_unet_out(loaded), want)


def test_sampling_with_bf16_frozen_parts_beside_an_fp32_denoiser():
    """model.frozen_dtype=bfloat16 keeps the trained denoiser in fp32: sampling runs under autocast (without it the
    bf16 latents reach fp32 weights and the call fails)."""
    import numpy as np

    from dpdiff.models.loading import sampling_pipeline

    base = load_base(None, dtype=torch.bfloat16)
    assert next(base.denoiser.parameters()).dtype == torch.float32
    pipe = sampling_pipeline(base, resolution=32)
    assert pipe.autocast_dtype == torch.bfloat16
    out = pipe(["a digit seven"], num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()
