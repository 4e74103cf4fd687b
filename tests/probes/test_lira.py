"""LiRA (offline, OUT shadows): its score against a direct computation, the shadow pool's independence of the
probed split, shadows that leave the target untouched, and its place among the MIA's attacks."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import make_tiny_lora_unet, probe_section
from scipy import stats

from dpdiff.errors import UserError
from dpdiff.probes.context import ProbeContext
from dpdiff.probes.lira import LiraSettings, ShadowRecipe, _shadow_denoiser, lira_scores, shadow_pool
from dpdiff.schema import compose


def _ctx(n_members=30, n_held=20, users=None, denoiser=None):
    recs = [SimpleNamespace(text=f"t{i}", user_id=None if users is None else f"u{i % users}")
            for i in range(n_members + n_held)]
    return ProbeContext(run_dir=None, base=None, denoiser=denoiser, adapter_kind="lora", records=recs,
                        member_records=list(range(n_members)), nonmember_records=list(range(n_members, len(recs))),
                        resolution=8, device="cpu", privacy={"dp": True, "epsilon": 8.0, "delta": 1e-5,
                                                             "privacy_unit": "user" if users else "example"})


def test_scores_are_the_gaussian_standardised_log_loss_gap():
    """Against a direct computation: per image and timestep, (mean_k log L_k - log L) / sd, averaged over the
    timesteps; sd per image from 16 shadows on (ddof 1), pooled over images below."""
    g = torch.Generator().manual_seed(0)
    target = torch.rand(5, 3, 2, generator=g) + 0.1
    for k, per_example in ((4, False), (16, True)):
        shadows = torch.rand(k, 5, 3, 2, generator=g) + 0.1
        got, info = lira_scores(target, shadows, per_example_variance_from=16)
        obs = np.log(target.double().mean(-1).numpy())
        out = np.log(shadows.double().mean(-1).numpy())
        mu = out.mean(0)
        if per_example:
            sd = out.std(0, ddof=1)
        else:
            sd = np.array([np.sqrt(((out[:, :, j] - mu[:, j]) ** 2).sum() / (5 * (k - 1))) for j in range(3)])
        want = ((mu - obs) / sd).mean(1)
        np.testing.assert_allclose(got, want, rtol=1e-10)
        assert info["variance"].startswith("per image" if per_example else "pooled")
    # a lower loss than every shadow's means "member": the score orders it first
    shadows = torch.ones(4, 3, 1, 1) + torch.tensor([0.0, 0.1, -0.1, 0.05]).view(4, 1, 1, 1)
    s, _ = lira_scores(torch.tensor([0.5, 1.0, 1.5]).view(3, 1, 1), shadows)
    assert s[0] > s[1] > s[2] and s[0] > 0 > s[2]
    with pytest.raises(ValueError):
        lira_scores(target, torch.rand(1, 5, 3, 2))


def test_with_gaussian_out_losses_the_score_is_calibrated():
    """Non-members whose loss is one more draw from their OUT distribution get scores whose share above
    z = 2.33 is about 1% (the Gaussian tail). 4000 images x 32 shadows: the binomial count has sd 6.3 at 40;
    the bounds at +-6 sd give a false-failure probability < 1e-8."""
    rng = np.random.default_rng(1)
    n, k = 4000, 32
    mu = rng.normal(0, 1, size=(n, 1))  # per-image difficulty, which LiRA removes
    out = np.exp(mu[None] + 0.2 * rng.standard_normal((k, n, 1)))[..., None]
    obs = np.exp(mu + 0.2 * rng.standard_normal((n, 1)))[..., None]
    s, _ = lira_scores(torch.from_numpy(obs), torch.from_numpy(out), per_example_variance_from=64)
    # the score of a fresh draw standardised by k shadows is Student-t-like with k - 1 dof, scaled by
    # sqrt(1 + 1/k); its 1% tail
    thr = stats.t.ppf(0.99, k - 1) * np.sqrt(1 + 1 / k)
    assert abs(np.count_nonzero(s > thr) - 40) < 6 * np.sqrt(4000 * 0.01 * 0.99)


def test_shadow_pool_holds_no_probed_unit():
    ctx = _ctx(users=10)  # 50 records of 10 users: probing a record probes its user
    probed = [0, 31]  # users u0 and u1
    pool = shadow_pool(ctx, probed, size=100, seed=0)
    assert pool and all(ctx.records[i].user_id not in ("u0", "u1") for i in pool)
    assert len(pool) == 40
    small = shadow_pool(ctx, probed, size=7, seed=0)
    assert len(small) == 7 and set(small) <= set(pool) and small == shadow_pool(ctx, probed, size=7, seed=0)
    plain = _ctx()
    assert set(shadow_pool(plain, [0, 1, 40], size=100, seed=0)) == set(range(50)) - {0, 1, 40}


def test_a_lora_shadow_trains_its_own_adapter_and_leaves_the_target_as_it_was():
    unet = make_tiny_lora_unet(seed=0).eval()
    ctx = _ctx(denoiser=unet)
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    assert any(flags.values())
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 500])
    h = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y0 = unet(x, t, encoder_hidden_states=h).sample
    recipe = ShadowRecipe.shipped(rank=2)
    with _shadow_denoiser(ctx, recipe) as (model, params):
        assert model is unet and params and all("dpdiff_lira_shadow" in n for n, p in unet.named_parameters()
                                                if p.requires_grad)
        with torch.no_grad():  # the target's adapter is off: a fresh LoRA (B = 0) is the base model
            with ctx.base_model():
                y_base = unet(x, t, encoder_hidden_states=h).sample
        with torch.no_grad():
            y_fresh = unet(x, t, encoder_hidden_states=h).sample
        torch.testing.assert_close(y_fresh, y_base)
        opt = torch.optim.SGD(params, lr=1.0)
        for _ in range(2):
            unet(x, t, encoder_hidden_states=h).sample.pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            assert not torch.allclose(unet(x, t, encoder_hidden_states=h).sample, y_base)
    after = dict(unet.named_parameters())
    assert set(after) == set(before)  # the shadow adapter is gone
    for n, p in after.items():
        assert torch.equal(p, before[n]), n
        assert p.requires_grad == flags[n], n
    with torch.no_grad():
        assert torch.equal(unet(x, t, encoder_hidden_states=h).sample, y0)


def test_settings_refuse_typos_and_a_single_shadow():
    lira = dict(compose([]).probes.mia.lira)
    assert LiraSettings.from_config({**lira, "shadows": 8}).shadows == 8
    with pytest.raises(UserError, match="unknown key 'shadow'"):
        LiraSettings.from_config({**lira, "shadow": 8})
    with pytest.raises(UserError, match="at least|>= 2"):
        LiraSettings.from_config({**lira, "shadows": 1})
    with pytest.raises(UserError, match="shadow_fraction"):
        LiraSettings.from_config({**lira, "shadow_fraction": 0})
    with pytest.raises(UserError, match="config key 'pool_units' is missing"):
        LiraSettings.from_config({k: v for k, v in lira.items() if k != "pool_units"})
    r = ShadowRecipe.from_config(compose(["adapter.rank=8", "adapter.target_modules=[to_q]", "train.lr=1e-3",
                                          "train.max_steps=30", "train.batch_size=16"]))
    assert (r.rank, r.target_modules, r.lr, r.steps, r.batch_size) == (8, ("to_q",), 1e-3, 30, 16)


def _fake_mia(monkeypatch, leak_loss, leak_lira):
    import dpdiff.probes.lira as lira
    import dpdiff.probes.mia as mia

    def fake_loss_scores(ctx, ids, keep=None, **kw):
        rng = np.random.default_rng(len(ids) + ids[0])
        is_member = np.array([i in set(ctx.member_records) for i in ids])
        if keep is not None:
            keep.update(latents=torch.zeros(len(ids), 1), cond={"encoder_hidden_states": torch.zeros(len(ids), 1)},
                        noises=torch.zeros(1), losses=torch.from_numpy(is_member.astype(float)))
        return {"loss": rng.standard_normal(len(ids)) + leak_loss * is_member,
                "calibrated": rng.standard_normal(len(ids)) + leak_loss * is_member}

    seen = {}

    def fake_run_lira(ctx, settings, recipe, *, probed, target_losses, **kw):
        seen["probed"], seen["recipe"] = probed, recipe
        pool = lira.shadow_pool(ctx, probed, size=settings.pool_units, seed=ctx.seed)
        assert not set(pool) & set(probed)
        rng = np.random.default_rng(7)
        return rng.standard_normal(len(probed)) + leak_lira * target_losses.numpy(), {"shadows": settings.shadows}

    monkeypatch.setattr(mia, "loss_scores", fake_loss_scores)
    monkeypatch.setattr(mia, "pia_scores", lambda ctx, ids, **kw: (-np.arange(len(ids), dtype=float),
                                                                    np.full(len(ids), 1.0)))
    monkeypatch.setattr(lira, "run_lira", fake_run_lira)
    return seen


def test_lira_is_the_declared_headline_and_one_more_attack_in_the_verdict(monkeypatch):
    """LiRA's scores enter the split audit beside the other attacks (Bonferroni over four) and are the headline
    under primary_attack=auto; a leak only LiRA sees makes the verdict FAIL."""
    import dpdiff.probes.mia as mia

    seen = _fake_mia(monkeypatch, leak_loss=0.0, leak_lira=8.0)
    ctx = _ctx(n_members=600, n_held=400)
    ctx.privacy["epsilon"] = 1.0
    out = mia.run_mia(ctx, probe_section("mia", {"bootstrap": 50, "members": 200}), confidence=0.95)
    assert set(out["attacks"]) == {"loss", "calibrated", "pia", "lira"} and out["primary_attack"] == "lira"
    assert out["split_audit"]["best_attack"] == "lira" and out["verdict"] == "FAIL", out["verdict_reason"]
    assert out["split_audit"]["confidence_per_attack"] == pytest.approx(1 - 0.05 / 4)
    assert out["attacks"]["lira"]["auc"] > 0.99 and out["lira"]["shadows"] == 4
    assert len(seen["probed"]) == 400 and isinstance(seen["recipe"], ShadowRecipe)
    off = mia.run_mia(ctx, probe_section("mia", {"bootstrap": 50, "members": 200, "lira": {"shadows": 0}}),
                      confidence=0.95)
    assert "lira" not in off["attacks"] and off["primary_attack"] == "calibrated" and off["lira"] is None


def test_a_headline_attack_that_does_not_run_or_does_not_exist_is_refused(monkeypatch):
    import dpdiff.probes.mia as mia

    _fake_mia(monkeypatch, 0.0, 0.0)
    ctx = _ctx(n_members=60, n_held=40)
    with pytest.raises(UserError, match="primary_attack must be auto or one of"):
        mia.run_mia(ctx, probe_section("mia", {"primary_attack": "calbrated"}))
    with pytest.raises(UserError, match="does not run"):
        mia.run_mia(ctx, probe_section("mia", {"primary_attack": "lira", "lira": {"shadows": 0}}))
    assert mia.run_mia(ctx, probe_section("mia", {"primary_attack": "pia", "bootstrap": 20}))["primary_attack"] == "pia"


def test_too_few_unprobed_images_for_shadows_skip_lira_with_the_reason(monkeypatch):
    import dpdiff.probes.mia as mia

    _fake_mia(monkeypatch, 0.0, 0.0)
    ctx = _ctx(n_members=12, n_held=12)  # every unit probed: nothing left to train shadows on
    out = mia.run_mia(ctx, probe_section("mia", {"bootstrap": 20}))
    assert "lira" not in out["attacks"] and out["primary_attack"] == "calibrated"
    assert "only 0 images outside the 24 probed units" in out["lira"]["skipped"]
    with pytest.raises(UserError, match="does not run"):
        mia.run_mia(ctx, probe_section("mia", {"primary_attack": "lira"}))


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_train_shadow_moves_only_the_shadow_adapter(precision):
    """A real shadow training on the tiny base (as the run would: its objective and optimizer, its autocast)."""
    from dpdiff.data.demos import builtin_digits_dir
    from dpdiff.data.formats import read_dataset
    from dpdiff.models.adapters import attach
    from dpdiff.models.loading import load_base
    from dpdiff.probes.context import encode_images
    from dpdiff.probes.lira import train_shadow

    base = load_base(None)
    attach(base.denoiser, kind="lora", rank=2)  # the "target" adapter
    recs = read_dataset(builtin_digits_dir())[:6]
    ctx = ProbeContext(run_dir=None, base=base, denoiser=base.denoiser, adapter_kind="lora", records=recs,
                       member_records=[0, 1, 2], nonmember_records=[3, 4, 5], resolution=32, device="cpu",
                       privacy={"dp": False})
    before = {n: p.detach().clone() for n, p in base.denoiser.named_parameters()}
    recipe = ShadowRecipe.shipped(rank=2, lr=1e-2, warmup_steps=0, micro_batch_size=2, mixed_precision=precision)
    with _shadow_denoiser(ctx, recipe) as (model, params):
        init = {n: p.detach().clone() for n, p in model.named_parameters()}
        curve = train_shadow(ctx, model, params, latents=encode_images(ctx, recs[:4]), records=[0, 1, 2, 3],
                             recipe=recipe, steps=3, batch_size=4, lr=1e-2, seed=0)
        moved = {n for n, p in model.named_parameters() if not torch.equal(p, init[n])}
    assert len(curve) == 3 and all(np.isfinite(curve))
    assert any("lora_B" in n for n in moved) and all("dpdiff_lira_shadow" in n for n in moved)
    for n, p in base.denoiser.named_parameters():  # the adapter is gone and the target untouched
        assert torch.equal(p, before[n]), n
