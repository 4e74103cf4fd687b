"""The DP path learns what the non-private path learns once its noise is switched off.

The guarantee's cost must come from the noise alone: clipping and Poisson sampling of privacy units, the
per-unit gradients and the engine's bookkeeping must not stop the model from learning. Two short runs of
the finetune recipe on the same printed digits (a look the base has never drawn): ``privacy=none``, and DP
whose engine noise is set to 0 after setup (the accountant still believes in sigma, so the run is not
private; a test-only patch). Both must lower the held-out denoising loss of the private look by a
comparable amount; a DP path that learned nothing (wrong gradients, clipping all signal away, a silent
no-update) fails. A real DP run at epsilon 1 on so few images must learn less: the test also checks the
noise is what makes the difference.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import trained_recipe

COMMON = ["train.max_steps=60", "train.batch_size=32", "train.micro_batch_size=32", "train.lr=3e-3",
          "train.lr_warmup_steps=0", "train.sample.per_prompt=1", "train.sample.steps=2", "train.progress=false",
          "train.checkpoint_every=0", "probes=none", "eval=default", "eval.metrics=[heldout_loss]",
          "eval.heldout_images=100", "eval.noise_draws=2", "data.holdout_fraction=0.2", "adapter.rank=4",
          # noise and sampling masks from train.seed: each run is the same every time, so the comparisons below
          # cannot fail by the luck of a draw (fresh noise would make the last one fail now and then)
          "privacy.reproducible_noise=true"]


@pytest.fixture(scope="module")
def printed(tmp_path_factory) -> Path:
    from dpdiff.data.demos import PRINTED
    from dpdiff.data.printed import materialize

    return materialize(tmp_path_factory.mktemp("data") / "printed", digits=(0, 1, 2, 3, 4), per_digit=100, seed=7,
                       caption=PRINTED.caption)


def _gain(run_dir: Path, overrides: list[str], patch=None) -> float:
    """(base - fine-tuned) held-out denoising loss after training."""
    with trained_recipe(run_dir, [*COMMON, *overrides], patch) as recipe:
        util = recipe.evaluate()["heldout_loss"]
    return util["heldout_loss_base"] - util["heldout_loss"]


def test_dp_path_without_noise_learns_what_non_private_learns(tmp_path, printed):
    def no_noise(recipe):
        recipe.engine.noise_multiplier = 0.0

    nonprivate = _gain(tmp_path / "none", [f"data.path={printed}", "privacy=none"])
    noiseless = _gain(tmp_path / "dp0", [f"data.path={printed}", "privacy.target_epsilon=8"], patch=no_noise)
    private = _gain(tmp_path / "dp", [f"data.path={printed}", "privacy.target_epsilon=1"])
    assert nonprivate > 0.004, nonprivate  # the look is learnable in 60 steps
    assert noiseless >= 0.7 * nonprivate, (noiseless, nonprivate)
    assert private < 0.7 * noiseless, (private, noiseless)
