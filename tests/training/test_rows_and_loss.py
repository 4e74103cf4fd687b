"""Rows of a micro-batch (augmentation multiplicity, user units, caption mitigations) and the loss targets."""

from __future__ import annotations

import numpy as np
import torch

from dpdiff.data.records import PrivacyUnits
from dpdiff.training.encode import EncodedData
from dpdiff.training.loss import DiffusionObjective
from dpdiff.training.rows import PUBLIC_CAPTIONS, CaptionMitigation, RowBuilder, insert_random_word

KEY = bytes(range(32))


def _data(n_images=10, captions=3):
    g = torch.Generator().manual_seed(0)
    return EncodedData(latent_mean=torch.randn(n_images, 2, 4, 2, 2, generator=g),
                       latent_std=torch.rand(n_images, 2, 4, 2, 2, generator=g) * 0.1,
                       text_emb=torch.randn(captions, 5, 8, generator=g),
                       text_index=torch.arange(n_images) % captions, captions=[f"c{i}" for i in range(captions)],
                       scaling_factor=0.5, shift_factor=0.0)


def test_augmult_and_user_units_weights():
    units = PrivacyUnits("user", ((0, 1, 2), (3,), (4, 5, 6, 7, 8, 9)), ("a", "b", "c"))
    rb = RowBuilder(_data(), units, augmult=3, random_flip=True, num_train_timesteps=1000,
                    key=KEY, max_images_per_unit=4)
    rows = rb.build([0, 1, 2], step=0)
    counts = torch.bincount(rows.unit_pos, minlength=3).tolist()
    assert counts == [9, 3, 12]  # 3 images x K, 1 x K, min(6, 4) x K
    for u in range(3):  # the rows of a unit weigh 1 in total: the unit gradient is their mean
        assert float(rows.row_weight[rows.unit_pos == u].sum()) == __import__("pytest").approx(1.0)
    assert rows.num_units == 3 and len(rows) == 24


def test_max_images_per_user_draws_a_random_subset():
    units = PrivacyUnits("user", (tuple(range(10)),), ("a",))
    rb = RowBuilder(_data(), units, augmult=1, random_flip=False, num_train_timesteps=1000,
                    key=KEY, max_images_per_unit=3)
    seen = set()
    for step in range(30):  # a fresh subset per step (30 steps miss one of 10 images with p < 10 * 0.7^30 = 2e-4;
        imgs = rb.images_of(0, rb.stream(0, step))  # the key is fixed: deterministic)
        assert len(imgs) == 3 and len(set(imgs)) == 3
        seen |= set(imgs)
    assert len(seen) == 10


def test_timestep_range_bounds_the_draws():
    units = PrivacyUnits("example", tuple((i,) for i in range(10)), tuple(str(i) for i in range(10)))
    rb = RowBuilder(_data(), units, augmult=50, random_flip=False, num_train_timesteps=1000,
                    key=KEY, timestep_range=(300, 1000))
    t = rb.build(list(range(10)), step=0).timesteps
    assert int(t.min()) >= 300 and int(t.max()) <= 999 and int(t.max()) > 900  # 500 draws cover the range
    full = RowBuilder(_data(), units, augmult=50, random_flip=False, num_train_timesteps=1000,
                      key=KEY).build(list(range(10)), step=0).timesteps
    assert int(full.min()) < 300
    import pytest

    with pytest.raises(ValueError):
        RowBuilder(_data(), units, augmult=1, random_flip=False, num_train_timesteps=1000,
                   key=KEY, timestep_range=(500, 1001))


def test_caption_mitigation_uses_public_material_only():
    """Every row keeps its own caption, a variant of its own caption, or a public one, and the pooled embedding
    (SDXL/SD3/Flux) always goes with the token embeddings it was encoded with."""
    data = _data()
    variants = {"encoder_hidden_states": torch.randn(3, 4, 5, 8), "pooled": torch.randn(3, 4, 6)}
    p = len(PUBLIC_CAPTIONS)
    pool = {"encoder_hidden_states": torch.randn(p, 5, 8), "pooled": torch.randn(p, 6)}
    mit = CaptionMitigation(caption_variants=variants, pool=pool, replace_prob=0.4, insert_prob=0.4)
    text = {"encoder_hidden_states": data.text_emb[data.text_index], "pooled": torch.randn(3, 6)[data.text_index]}
    out = mit.apply(text, data.text_index, mit.draw(np.random.default_rng(0), len(data.text_index)))
    n_pool = n_var = n_same = 0
    emb, pooled = out["encoder_hidden_states"], out["pooled"]
    for i in range(len(emb)):
        c = int(data.text_index[i])
        if any(torch.equal(emb[i], p) for p in pool["encoder_hidden_states"]):
            j = next(j for j, p in enumerate(pool["encoder_hidden_states"]) if torch.equal(emb[i], p))
            assert torch.equal(pooled[i], pool["pooled"][j])
            n_pool += 1
        elif any(torch.equal(emb[i], v) for v in variants["encoder_hidden_states"][c]):
            j = next(j for j, v in enumerate(variants["encoder_hidden_states"][c]) if torch.equal(emb[i], v))
            assert torch.equal(pooled[i], variants["pooled"][c, j])
            n_var += 1  # a variant of the row's OWN caption, never another unit's
        else:
            assert torch.equal(emb[i], text["encoder_hidden_states"][i]) and torch.equal(pooled[i], text["pooled"][i])
            n_same += 1
    assert n_pool + n_var + n_same == len(emb) and n_pool > 0 and n_var > 0
    s = insert_random_word("a photo of a dog", np.random.default_rng(0))
    assert len(s.split()) == 6


def test_v_prediction_target_follows_the_scheduler():
    from diffusers import DDPMScheduler

    from dpdiff.models import tiny

    cfg = tiny.scheduler_config()
    eps_obj = DiffusionObjective(DDPMScheduler(**cfg))
    v_obj = DiffusionObjective(DDPMScheduler(**{**cfg, "prediction_type": "v_prediction"}))
    lat, noise = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    t = torch.tensor([10, 900])
    assert torch.equal(eps_obj.target(lat, noise, t), noise)
    sched = v_obj.scheduler
    a = sched.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - sched.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(v_obj.target(lat, noise, t), a * noise - s * lat)


def test_removing_a_unit_leaves_every_other_units_rows_bit_identical():
    """Each unit's draws (images of a large user, flips, latent samples, timesteps, noise, caption mitigation and
    dropout) come from its own stream: the rows of units 0, 2, 3 are the same whether unit 1 is in the batch or not,
    and wherever they sit in it. A single stream over the batch (the old design) fails this."""
    data = _data()
    units = PrivacyUnits("user", ((0, 1, 2), (3,), (4, 5, 6, 7), (8, 9)), ("u0", "u1", "u2", "u3"))
    p = len(PUBLIC_CAPTIONS)
    mit = CaptionMitigation(caption_variants={"encoder_hidden_states": torch.randn(3, 4, 5, 8)},
                            pool={"encoder_hidden_states": torch.randn(p, 5, 8)}, replace_prob=0.3, insert_prob=0.3)
    rb = RowBuilder(data, units, augmult=3, random_flip=True, num_train_timesteps=1000, key=KEY,
                    max_images_per_unit=2, mitigation=mit, caption_dropout=0.2,
                    empty_text={"encoder_hidden_states": torch.zeros(1, 5, 8)})

    def rows_of(batch, unit):
        rows = rb.build(batch, step=7)
        sel = rows.unit_pos == batch.index(unit)
        return [rows.latents[sel], rows.noise[sel], rows.timesteps[sel], rows.encoder_hidden_states[sel],
                rows.row_weight[sel]]

    for unit in (0, 2, 3):
        with_1, without_1 = rows_of([0, 1, 2, 3], unit), rows_of([0, 2, 3], unit)
        reordered = rows_of([3, 2, 0], unit)
        assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(with_1, without_1, reordered))
    # and the draws do change with the step and the key (so they are draws, not constants)
    other_step = rb.build([0], step=8)
    assert not torch.equal(other_step.noise, rb.build([0], step=7).noise)
    other_key = RowBuilder(data, units, augmult=3, random_flip=True, num_train_timesteps=1000, key=bytes(32),
                           max_images_per_unit=2)
    assert not torch.equal(other_key.build([0], step=7).noise, rb.build([0], step=7).noise)


def test_caption_dropout_swaps_in_the_empty_caption_at_its_rate():
    """train.caption_dropout=p: each row's text conditioning is the empty caption's with probability p, else its
    own caption's, per unit stream. 2,000 single-image units at p = 0.3: the dropped share within 6 standard errors
    (0.061) of 0.3 (seeded key: deterministic; with another key a false failure has probability < 2e-9); p = 0
    drops none; only the text changes."""
    n = 2000
    data = _data(n_images=n)
    units = PrivacyUnits("example", tuple((i,) for i in range(n)), tuple(str(i) for i in range(n)))
    empty = {"encoder_hidden_states": torch.full((1, 5, 8), 7.0)}  # no caption embedding equals it
    kw = dict(augmult=1, random_flip=False, num_train_timesteps=1000, key=KEY, empty_text=empty)
    rows = RowBuilder(data, units, caption_dropout=0.3, **kw).build(list(range(n)), step=3)
    dropped = (rows.encoder_hidden_states == 7.0).flatten(1).all(1)
    kept = ~dropped
    assert abs(float(dropped.float().mean()) - 0.3) < 6 * (0.3 * 0.7 / n) ** 0.5
    own = data.text_emb[data.text_index[rows.unit_pos]]
    torch.testing.assert_close(rows.encoder_hidden_states[kept], own[kept], rtol=0, atol=0)
    plain = RowBuilder(data, units, caption_dropout=0.0, **kw).build(list(range(n)), step=3)
    torch.testing.assert_close(plain.encoder_hidden_states, own, rtol=0, atol=0)
    torch.testing.assert_close(plain.latents, rows.latents, rtol=0, atol=0)  # the images' draws do not move


def test_snr_gamma_weights_each_row_by_min_snr_over_snr():
    """train.snr_gamma (Hang et al. 2023, Min-SNR; diffusers' train_text_to_image.py): row loss x min(SNR_t,
    gamma) / SNR_t for epsilon prediction, / (SNR_t + 1) for v-prediction, SNR_t = alpha_bar_t / (1 - alpha_bar_t)
    from the scheduler's own table (an independent formula, not diffusers' compute_snr)."""
    from diffusers import DDPMScheduler

    from dpdiff.models import tiny
    from dpdiff.training.loss import RowBatch

    cfg = tiny.scheduler_config()
    unet = lambda noisy, t, ehs, return_dict=False: (torch.zeros_like(noisy),)  # noqa: E731 (a fixed prediction)
    t = torch.tensor([5, 100, 500, 950])
    g = torch.Generator().manual_seed(1)
    lat, noise = torch.randn(4, 4, 2, 2, generator=g), torch.randn(4, 4, 2, 2, generator=g)
    rows = RowBatch(latents=lat, noise=noise, timesteps=t, encoder_hidden_states=torch.zeros(4, 5, 8),
                    unit_pos=torch.arange(4), row_weight=torch.ones(4), num_units=4)
    for pred_type, denom in (("epsilon", 0.0), ("v_prediction", 1.0)):
        sched = DDPMScheduler(**{**cfg, "prediction_type": pred_type})
        plain = DiffusionObjective(sched).row_losses(unet, rows)
        weighted = DiffusionObjective(sched, snr_gamma=5.0).row_losses(unet, rows)
        ab = sched.alphas_cumprod[t].double()
        snr = ab / (1 - ab)
        want = plain.double() * torch.clamp(snr, max=5.0) / (snr + denom)
        torch.testing.assert_close(weighted.double(), want, rtol=1e-5, atol=0)
        assert bool((snr > 5).any() and (snr < 5).any())  # both sides of gamma are exercised
