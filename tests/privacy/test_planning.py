"""`dpdiff plan`: the noise-to-signal arithmetic, the trainable-weight count and the command."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import run_cli

from dpdiff.models.adapters import count_trainable
from dpdiff.privacy.planning import assess, noise_to_signal, plan_grid
from dpdiff.privacy.randomness import GaussianNoise


def test_noise_norm_matches_the_engine():
    """nsr_step * C is the norm of the noise the DP engine adds to the averaged gradient (zero gradients)."""
    from dpdiff.privacy.engines import DPSGDEngine

    lin = torch.nn.Linear(300, 100)
    d = sum(p.numel() for p in lin.parameters())
    sigma, c, b = 1.3, 0.5, 40.0
    eng = DPSGDEngine(lin, noise_multiplier=sigma, max_grad_norm=c, expected_batch_size=b,
                      noise=GaussianNoise.seeded(0))
    eng.start_step()
    eng.finalize()
    measured = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in lin.parameters()))
    step, run = noise_to_signal(noise_multiplier=sigma, batch_size=b, steps=100, trainable=d)
    assert measured == pytest.approx(step * c, rel=0.02)
    assert run == pytest.approx(step / 10)
    eng.close()


def test_trainable_count_matches_peft(tmp_path):
    """The count from an empty UNet equals the parameters peft actually attaches."""
    from dpdiff.models import adapters
    from dpdiff.models.loading import load_base

    for rank, targets in ((4, None), (2, ["attn2.to_k", "attn2.to_v"])):
        unet = load_base(None).denoiser
        params = adapters.attach(unet, kind="lora", rank=rank, target_modules=targets)
        assert count_trainable(pretrained=None, kind="lora", rank=rank, target_modules=targets) == \
            sum(p.numel() for p in params)
    unet = load_base(None).denoiser
    assert count_trainable(pretrained=None, kind="full", rank=None, target_modules=None) == \
        sum(p.numel() for p in unet.parameters())


def test_grid_keeps_compute_and_epsilon():
    grid = plan_grid(num_units=2000, target_epsilon=4.0, delta=1e-5, rows_budget=64 * 400, trainable=10_000,
                     accountant="rdp")
    assert grid == sorted(grid, key=lambda r: r.nsr_run)
    for r in grid:
        assert r.rows <= 64 * 400 and r.steps >= 50
        assert r.epsilon <= 4.0 * 1.001


@pytest.mark.parametrize("scale", [2, 3, 8, 16])
def test_search_plan_keeps_sigma_over_batch_and_steps(scale):
    """TAN's scaling: the search batch is B // k, its sigma follows the rounded batch exactly (sigma'/B' = sigma/B),
    steps unchanged; the search run's own epsilon on the same units is far above the full run's (it does not
    protect), computed by the same accountant."""
    from dpdiff.privacy.accountants import MechanismSegment, get_accountant
    from dpdiff.privacy.planning import candidate, search_plan

    full = candidate(num_units=3612, batch_size=512, steps=75, target_epsilon=8.0, delta=1e-5, accountant="rdp",
                     trainable=20_000, max_grad_norm=0.01, augmult=1)
    sp = search_plan(full, scale=scale, num_units=3612, delta=1e-5, accountant="rdp")
    assert sp.search_batch_size == 512 // scale
    assert sp.search_noise_multiplier / sp.search_batch_size == pytest.approx(full.noise_multiplier / 512, rel=1e-12)
    assert sp.compute_ratio == sp.search_batch_size / 512
    want = get_accountant("rdp").epsilon(history=[MechanismSegment(sp.search_noise_multiplier,
                                                                   sp.search_batch_size / 3612, 75)], delta=1e-5)
    assert sp.search_epsilon == pytest.approx(want.epsilon) and sp.search_epsilon > 2 * full.epsilon
    assert f"train.max_steps={full.steps}" in sp.search_overrides() and "privacy.target_epsilon=null" in \
        sp.search_overrides()


def test_assess_warns_in_plain_words():
    assert any(w.startswith("cannot learn") for w in assess(nsr_run=2.0, units_per_prompt=None))
    assert any("few units per prompt" in w for w in assess(nsr_run=0.01, units_per_prompt=20))
    assert assess(nsr_run=0.01, units_per_prompt=5000) == []


def test_plan_command(tmp_path):
    """One real subprocess (the rest of the command's behaviour is tested in-process in tests/test_cli.py)."""
    r = run_cli("plan", "--units", "5000", "--trainable", "20000", "train.max_steps=100", "train.batch_size=128",
                "privacy.target_epsilon=4", "privacy.accountant=rdp")
    assert r.returncode == 0, r.stderr
    assert "recommended: train.batch_size=" in r.stdout and "sigma" in r.stdout
    r = run_cli("plan", "--units", "5000", "--minutes", "-1")
    assert r.returncode == 2 and "must be positive" in r.stderr


@pytest.mark.parametrize("n, batch", [(3612, 512), (3600, 512), (900, 512), (800, 256), (100, 32), (20, 8),
                                     (3, 1), (10**6, 512)])
def test_auto_schedule_keeps_the_demos_batch_and_steps_within_the_data(n, batch):
    from dpdiff.privacy.planning import AUTO_STEPS, auto_schedule

    s = auto_schedule(num_units=n)
    assert s["batch_size"] == batch and s["max_steps"] == AUTO_STEPS == 75 and f"N={n}" in s["rule"]


def test_train_settings_resolve_auto_and_keep_explicit_values():
    from omegaconf import OmegaConf

    from dpdiff.schema import compose
    from dpdiff.settings import TrainSettings

    base = compose([]).train
    auto = TrainSettings.from_config(base, privacy_enabled=True)
    assert auto.batch_size is None and auto.max_steps is None  # the shipped defaults are auto
    t, rec = auto.resolved(num_units=900)
    assert (t.batch_size, t.max_steps) == (512, 75) and rec["auto"] == ["batch_size", "max_steps"]
    assert "N=900" in rec["rule"]
    fixed = TrainSettings.from_config(OmegaConf.merge(base, {"batch_size": 64, "max_steps": 10}), privacy_enabled=True)
    t, rec = fixed.resolved(num_units=900)
    assert (t.batch_size, t.max_steps) == (64, 10) and rec == {"batch_size": 64, "max_steps": 10, "auto": [],
                                                               "rule": None}
