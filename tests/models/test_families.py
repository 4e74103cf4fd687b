"""SDXL, SD3 and Flux-style denoisers: detection, the families' objectives, exact per-unit gradients.

Tiny random configs (the sizes of diffusers' own tests), built in the tests, no network.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import clip_sum, engine_clipped_sum

from dpdiff.errors import UserError
from dpdiff.models import adapters, tiny
from dpdiff.models.families import FAMILIES, detect_family, latent_ids, pack_latents, unpack_latents
from dpdiff.privacy.randomness import GaussianNoise
from dpdiff.training.loss import DiffusionObjective, FlowMatchingObjective, RowBatch


def objective(family: str):
    sched = tiny.family_scheduler(family)
    fam = FAMILIES[family]
    return FlowMatchingObjective(sched, family=fam) if fam.objective == "flow" else DiffusionObjective(sched,
                                                                                                         family=fam)


def rows_for(family: str, rows_per_unit: list[int], seed: int = 0) -> RowBatch:
    g = torch.Generator().manual_seed(seed)
    r = sum(rows_per_unit)
    text, added = tiny.family_conditioning(family, r, generator=g)
    pos = torch.cat([torch.full((n,), j) for j, n in enumerate(rows_per_unit)]).long()
    w = torch.cat([torch.full((n,), 1.0 / n) for n in rows_per_unit])
    return RowBatch(torch.randn(r, 4, 8, 8, generator=g), torch.randn(r, 4, 8, 8, generator=g),
                    torch.randint(0, 1000, (r,), generator=g), text, pos, w, len(rows_per_unit), added)


def per_unit_loop(model, obj, rows: RowBatch) -> torch.Tensor:
    """Reference: each unit alone, forward + backward of the weighted sum of its rows' losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for u in range(rows.num_units):
        sel = (rows.unit_pos == u).nonzero().flatten()
        sub = rows.select(sel, unit_pos=torch.zeros(len(sel), dtype=torch.long), num_units=1)
        loss = (obj.row_losses(model, sub) * sub.row_weight).sum()
        out.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    return torch.stack(out)


@pytest.mark.parametrize("pipeline,family", [("StableDiffusionPipeline", "sd"),
                                             ("StableDiffusionXLPipeline", "sdxl"),
                                             ("StableDiffusion3Pipeline", "sd3"), ("FluxPipeline", "flux")])
def test_family_is_detected_from_model_index(tmp_path, pipeline, family):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": pipeline, "_diffusers_version": "0.42.1"}))
    assert detect_family(tmp_path).name == family


def test_unknown_or_missing_pipeline_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="no model_index.json"):
        detect_family(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(UserError, match="KandinskyPipeline is not supported"):
        detect_family(tmp_path)


def test_flux_packing_matches_the_flux_pipeline():
    from diffusers import FluxPipeline

    x = torch.randn(3, 4, 8, 8)
    packed = pack_latents(x)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(x, 3, 4, 8, 8))
    torch.testing.assert_close(unpack_latents(packed, 8, 8), x)
    torch.testing.assert_close(latent_ids(8, 8, device="cpu", dtype=torch.float32),
                               FluxPipeline._prepare_latent_image_ids(3, 4, 4, "cpu", torch.float32))


def test_flow_matching_noising_and_target_are_the_schedulers():
    """x_t from the objective equals FlowMatchEulerDiscreteScheduler.scale_noise at the same timestep, and the
    loss is zero exactly when the model predicts noise - x0."""
    sched = tiny.family_scheduler("sd3")
    obj = FlowMatchingObjective(sched, family=FAMILIES["sd3"])
    rows = rows_for("sd3", [1, 1, 1])
    seen = {}

    class Oracle(torch.nn.Module):  # records x_t and answers the exact target
        config = None

        def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, return_dict):
            seen["x_t"], seen["t"] = hidden_states, timestep
            return (rows.noise - rows.latents,)

    loss = obj.row_losses(Oracle(), rows)
    assert float(loss.abs().max()) == 0.0
    for r in range(3):
        want = sched.scale_noise(rows.latents[r : r + 1], seen["t"][r : r + 1], rows.noise[r : r + 1])
        torch.testing.assert_close(seen["x_t"][r : r + 1], want)
    assert float(seen["t"].min()) >= 0 and float(seen["t"].max()) <= 1000


@pytest.mark.parametrize("engine", ["hooks", "bookkeeping_auto", "bookkeeping_always"])
@pytest.mark.parametrize("kind", ["lora", "full"])
@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_per_unit_gradients_match_a_per_unit_loop(family, kind, engine):
    """Each family's denoiser (added conditioning, joint text/image attention, adaptive norms, Flux's packed
    tokens): the clipped sum and the per-unit norms of the engines equal the per-unit loop's, K > 1 and
    units of several rows, split over micro-batches."""
    model = tiny.family_denoiser(family).train()
    if kind == "lora":
        adapters.attach(model, kind="lora", rank=4, target_modules=list(FAMILIES[family].lora_targets))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.05)  # non-zero B: every LoRA weight has a gradient
    else:
        model.requires_grad_(True)
    obj = objective(family)
    rows = rows_for(family, [2, 1, 3])
    ref = per_unit_loop(copy.deepcopy(model), obj, rows)
    C = float(ref.norm(dim=1).median())
    got, eng = engine_clipped_sum(engine, model, obj, rows, C=C, expected=3.0, micro_units=2)
    want = clip_sum(ref, C) / 3.0
    # gradients that are zero in exact arithmetic (a conv bias before a GroupNorm) come out at 1e-8 in another
    # summation order: every element to 1e-5 of the largest, and the whole vector to 1e-5
    assert float((got - want).double().norm() / want.double().norm()) < 1e-5
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    torch.testing.assert_close(torch.tensor(sorted(eng.stats.norms)), ref.double().norm(dim=1).float().sort().values,
                               rtol=1e-5, atol=1e-8)


def test_a_layer_without_a_per_unit_rule_is_refused_in_one_line():
    """SD3.5's query/key RMSNorm is diffusers' own class with a weight: fully fine-tuned, no exact per-unit rule
    exists, so the engine refuses before any step; LoRA on the attention projections is fine."""
    from dpdiff.privacy.engines import DPSGDEngine

    model = tiny.family_denoiser("sd3", qk_norm="rms_norm", dual_attention_layers=(0,))
    model.requires_grad_(True)
    with pytest.raises(ValueError, match="not supported for trainable layers of type RMSNorm"):
        DPSGDEngine(model, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=1.0,
                    noise=GaussianNoise.seeded(0))
    adapters.attach(model, kind="lora", rank=2, target_modules=list(FAMILIES["sd3"].lora_targets))
    DPSGDEngine(model, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=1.0,
                noise=GaussianNoise.seeded(0)).close()


def _pipeline(family: str, denoiser):
    """The family's diffusers pipeline around ``denoiser`` with a tiny VAE; text encoders left out (the
    prompt embeddings are passed directly), as a user's pipeline would be loaded minus its encoders."""
    import diffusers
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    vae_cfg = tiny.vae_config()
    if family in ("sd3", "flux"):
        vae_cfg.update(shift_factor=0.0)
    vae = AutoencoderKL(**vae_cfg)
    cls = getattr(diffusers, FAMILIES[family].pipeline)
    parts = dict(vae=vae, scheduler=tiny.family_scheduler(family), text_encoder=None, tokenizer=None)
    if family == "sdxl":
        parts.update(unet=denoiser, text_encoder_2=None, tokenizer_2=None)
    elif family == "sd3":
        parts.update(transformer=denoiser, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                     tokenizer_3=None)
    else:
        parts.update(transformer=denoiser, text_encoder_2=None, tokenizer_2=None)
    return cls(**parts)


def _generate(pipe, family: str):
    g = torch.Generator().manual_seed(0)
    text, added = tiny.family_conditioning(family, 1, generator=g)
    kw = dict(prompt_embeds=text, num_inference_steps=2, output_type="latent", height=32, width=32,
              generator=torch.Generator().manual_seed(0))
    if family == "sdxl":
        kw.update(pooled_prompt_embeds=added["text_embeds"], negative_prompt_embeds=torch.zeros_like(text),
                  negative_pooled_prompt_embeds=torch.zeros_like(added["text_embeds"]))
    else:
        kw.update(pooled_prompt_embeds=added["pooled_projections"])
        if family == "sd3":
            kw.update(negative_prompt_embeds=torch.zeros_like(text),
                      negative_pooled_prompt_embeds=torch.zeros_like(added["pooled_projections"]))
    with torch.no_grad():
        return pipe(**kw).images


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_saved_lora_loads_into_the_family_pipeline_and_changes_its_output(tmp_path, family):
    """A DP step on LoRA, saved as dpdiff saves it, loads with the family pipeline's load_lora_weights: the loaded
    weights are the trained ones and the pipeline's output changes."""
    from dpdiff.privacy.engines import DPSGDEngine

    model = tiny.family_denoiser(family).train()
    params = adapters.attach(model, kind="lora", rank=4, target_modules=list(FAMILIES[family].lora_targets))
    obj = objective(family)
    rows = rows_for(family, [1, 1, 1, 1])
    opt = torch.optim.SGD(params, lr=10.0)
    eng = DPSGDEngine(model, noise_multiplier=0.5, max_grad_norm=1.0, expected_batch_size=4.0,
                      noise=GaussianNoise.seeded(0), params=params)
    for _ in range(2):
        eng.start_step()
        eng.backward(obj.row_losses(model, rows), unit_pos=rows.unit_pos, row_weight=rows.row_weight,
                     num_units=rows.num_units)
        eng.finalize()
        opt.step()
    eng.close()
    out = adapters.save(model, kind="lora", out_dir=tmp_path, family=FAMILIES[family])
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    base = tiny.family_denoiser(family).eval()  # the same seed: the base weights before fine-tuning
    pipe = _pipeline(family, base)
    before = _generate(pipe, family)
    pipe.load_lora_weights(out)
    loaded = {n: p.detach() for n, p in getattr(pipe, FAMILIES[family].denoiser).named_parameters() if "lora_" in n}
    assert len(loaded) == len(trained) > 0
    for (_, a), (_, b) in zip(sorted(trained.items()), sorted(loaded.items())):
        torch.testing.assert_close(a, b)
    after = _generate(pipe, family)
    assert not torch.allclose(before, after, atol=1e-4)


@pytest.mark.parametrize("pipeline,part", [
    ("StableDiffusionXLPipeline", "text_encoder_2"), ("StableDiffusion3Pipeline", "transformer"),
    ("FluxPipeline", "tokenizer_2")])
def test_an_incomplete_family_dir_is_one_clear_error(tmp_path, pipeline, part):
    """A part model_index.json names but the dir lacks is named in one line, before anything is loaded."""
    from dpdiff.models.loading import resolve_pretrained

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": pipeline, part: ["diffusers", "X"],
                                                           "image_encoder": [None, None]}))
    with pytest.raises(UserError, match=f"not a complete {pipeline} directory: missing {part}/") as e:
        resolve_pretrained(str(tmp_path), allow_download=False)
    assert "\n" not in str(e.value)


def test_flow_steps_are_ordered_as_ddpm_least_noise_first():
    """t = 0 is the least noise and N-1 the most on flow models too, so timestep ranges and probe timesteps mean
    the same on every family."""
    sched = tiny.family_scheduler("sd3")
    obj = FlowMatchingObjective(sched, family=FAMILIES["sd3"])
    x0, noise = torch.zeros(3, 4, 2, 2), torch.ones(3, 4, 2, 2)
    sigmas = obj.noisy(x0, noise, torch.tensor([0, 500, 999]))[:, 0, 0, 0]  # x0 = 0, noise = 1: x_t = sigma
    assert float(sigmas[0]) < 0.01 and float(sigmas[2]) == pytest.approx(1.0) and sigmas[0] < sigmas[1] < sigmas[2]


@pytest.mark.parametrize("size,flip", [((48, 64), False), ((64, 48), False), ((64, 48), True), ((32, 32), True)])
def test_sdxl_crop_ids_are_where_the_training_crop_was_taken(size, flip):
    """SDXL's crop conditioning names the top-left corner of the pixels training saw: cropping the resized (and
    mirrored) image there gives exactly to_pixels' tensor."""
    import numpy as np
    from PIL import Image, ImageOps

    from dpdiff.data.preprocess import crop_top_left, original_size, to_pixels

    w, h = size
    im = Image.fromarray((np.random.default_rng(0).random((h, w, 3)) * 255).astype("uint8"))
    res = 32
    top, left = crop_top_left(im, resolution=res, flip=flip)
    scale = res / min(w, h)
    resized = im.resize((max(res, round(w * scale)), max(res, round(h * scale))), Image.Resampling.BILINEAR) \
        if (w, h) != (res, res) else im
    if flip:
        resized = ImageOps.mirror(resized)
    want = np.asarray(resized.crop((left, top, left + res, top + res)), dtype=np.float32) / 127.5 - 1.0
    got = to_pixels(im, resolution=res, flip=flip).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, want)
    assert original_size(im) == (h, w)
