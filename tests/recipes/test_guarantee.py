"""CI that checks the guarantee, not only the code: a short DP finetune, then

* epsilon recomputed from privacy.json's ledger with Google's dp_accounting (PLD and RDP), independently of
  dpdiff's accountants;
* the noise the trainer actually adds (a step whose per-unit gradients are all zero) against the sigma that
  privacy.json reports;
* the audit catches a run whose noise was switched off after calibration (FAIL), and does not on the same
  run with its noise (white-box gradient canaries: no image generation, seconds).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import dp_accounting
import pytest
import torch
from dp_accounting import pld, rdp
from helpers import write_image_folder

from dpdiff.schema import compose

FAST = ["debug=fast", "train.checkpoint_every=0", "data.holdout_fraction=0", "data.resolution=32"]


def _recipe(run_dir: Path, overrides: list[str]):
    from recipes.finetune import FinetuneRecipe

    cfg = compose(overrides)
    run_dir.mkdir(parents=True)
    return FinetuneRecipe(cfg, run_dir)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("g") / "data", 40)


def test_epsilon_recomputed_independently_and_noise_is_the_reported_sigma(tmp_path, data):
    recipe = _recipe(tmp_path / "run", [*FAST, f"data.path={data}", "train.max_steps=3", "privacy.target_epsilon=3"])
    seen = []
    try:
        recipe.setup()
        # a zero loss: every per-unit gradient is 0, so what reaches the optimizer is the noise alone
        real = recipe.objective.row_losses
        recipe.objective.row_losses = lambda unet, rows: real(unet, rows) * 0.0
        step = recipe.optimizer.step

        def capture(*a, **k):
            seen.append(torch.cat([p.grad.flatten() for p in recipe.params]).clone())
            return step(*a, **k)

        recipe.optimizer.step = capture
        recipe.train()
        recipe.save()
    finally:
        recipe.cleanup()
    priv = json.loads((tmp_path / "run" / "privacy.json").read_text())
    assert priv["steps"] == 3 and len(seen) == 3
    assert priv["sample_rate"] == pytest.approx(8 / 40) and priv["expected_batch_size"] == pytest.approx(8)
    # the noise of the averaged gradient: N(0, (sigma C / B)^2) per coordinate, with privacy.json's numbers
    want = priv["noise_multiplier"] * priv["max_grad_norm"] / priv["expected_batch_size"]
    got = torch.cat(seen)
    # fresh OS noise (the production path), n = 3 x trainable weights (> 10^5): the sample sd's relative error
    # has sd 1/sqrt(2n) < 0.0023, so 2% is > 8.7 sd (false failure < 1e-17); the mean bound at 5.3 sd: < 1.2e-7
    assert got.numel() > 100_000
    assert got.std().item() == pytest.approx(want, rel=0.02)
    assert abs(got.mean().item()) < 5.3 * want / math.sqrt(got.numel())
    # epsilon from the ledger, by Google's accountants (not dpdiff's code)
    events = [dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
        s["sample_rate"], dp_accounting.GaussianDpEvent(s["noise_multiplier"])), s["steps"]) for s in priv["ledger"]]
    event = dp_accounting.ComposedDpEvent(events)
    tight = pld.PLDAccountant(value_discretization_interval=1e-4).compose(event).get_epsilon(priv["delta"])
    loose = rdp.RdpAccountant().compose(event).get_epsilon(priv["delta"])
    assert sum(s["steps"] for s in priv["ledger"]) == 3
    assert tight * (1 - 2e-3) <= priv["epsilon"] <= loose * 1.01  # prv: a certified upper bound, below RDP
    assert priv["epsilon"] <= 3.0


def _audited(run_dir: Path, data: Path, *, noise: bool) -> dict:
    from dpdiff.probes.run import run_probes

    # reproducible noise (from train.seed): the audit of the run with noise is the same draw every time, so its
    # "no FAIL" cannot fail by chance (with fresh noise it would, at the audit's alpha, about 1 run in 20)
    recipe = _recipe(run_dir, [*FAST, f"data.path={data}", "train.max_steps=40", "privacy.target_epsilon=1",
                               "privacy.max_grad_norm=0.01", "probes.audit.gradient_canaries=400", "train.lr=1e-6",
                               "privacy.reproducible_noise=true"])
    try:
        recipe.setup()
        if not noise:
            recipe.engine.noise_multiplier = 0.0  # the bug: the accountant still believes in sigma
        recipe.train()
        recipe.save()
        cfg = recipe.cfg.probes.copy()
        cfg.extraction.enabled, cfg.mia.enabled = False, False
        return run_probes(recipe._probe_context(), cfg)["audit"]
    finally:
        recipe.cleanup()


def test_the_audit_fails_a_run_whose_noise_was_switched_off(tmp_path, data):
    off = _audited(tmp_path / "off", data, noise=False)
    assert off["verdict"] == "FAIL", off
    assert off["eps_lower"] > off["claimed_epsilon"]
    on = _audited(tmp_path / "on", data, noise=True)
    assert on["verdict"] in ("PASS", "INCONCLUSIVE"), on
    assert on["eps_lower"] <= on["claimed_epsilon"]
