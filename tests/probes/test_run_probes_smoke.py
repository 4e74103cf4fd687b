"""run_probes end to end on the shipped tiny base (its untrained UNet as "the fine-tuned model"), at a
training resolution other than the base's native one, with data and gradient canaries.

Slow (about 20 s, most of it loading the base): `make test-slow`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from dpdiff.schema import compose

pytestmark = pytest.mark.slow


def test_every_probe_writes_a_three_way_verdict(tmp_path):
    from dpdiff.data.demos import builtin_digits_dir
    from dpdiff.data.formats import read_dataset
    from dpdiff.io import write_json_atomic
    from dpdiff.models.loading import load_base
    from dpdiff.privacy.gradient_canaries import GradientCanaries
    from dpdiff.probes.canaries import canary_caption, canary_image, load_canaries
    from dpdiff.probes.context import ProbeContext
    from dpdiff.probes.run import REQUIRED, probe_history, run_probes

    base = load_base(None)
    records = read_dataset(builtin_digits_dir())[:40]
    run = tmp_path / "run"
    (run / "canaries").mkdir(parents=True)
    rng = np.random.default_rng(0)
    meta = []
    for i in range(24):
        key = f"canary-{i:04d}"
        canary_image(rng, 48).save(run / "canaries" / f"{key}.png")
        meta.append({"key": key, "caption": canary_caption(rng), "included": bool(rng.random() < 0.5)})
    write_json_atomic(run / "canaries.json", {"count": 24, "canaries": meta})
    grad = GradientCanaries(count=200, num_params=1000, seed=0)
    for _ in range(3):
        grad.observe(torch.randn(1000), noise_multiplier=1.0, sample_rate=0.5, clip_norm=1.0, rng=rng)
    grad.save(run)

    cfg = OmegaConf.merge(compose([]).probes, OmegaConf.from_dotlist([
        "confidence=0.9", "budget_images=null", "extraction.captions=4", "extraction.per_caption=2",
        "extraction.steps=2", "extraction.units=3", "extraction.vae_floor_images=4", "mia.members=8",
        "mia.timesteps=[200]", "mia.noise_draws=1", "mia.bootstrap=20",
        "mia.lira.steps=3", "mia.lira.batch_size=4", "audit.canaries=24",
        "audit.timesteps=[200]", "audit.noise_draws=1"]))
    ctx = ProbeContext(run_dir=run, base=base, denoiser=base.denoiser, adapter_kind="full", records=records,
                       member_records=list(range(0, 40, 2)), nonmember_records=list(range(1, 40, 2)), resolution=48,
                       device=torch.device("cpu"), privacy={"dp": True, "epsilon": 8.0, "delta": 1e-5},
                       canaries=load_canaries(run), base_denoiser=base.denoiser)
    out = run_probes(ctx, cfg)
    saved = json.loads((run / "probes.json").read_text())
    for section, keys in REQUIRED.items():
        assert set(keys) <= set(saved[section])
        assert saved[section]["verdict"] in ("PASS", "FAIL", "INCONCLUSIVE")
        # three probes share attempt 1's error rate 0.1 * 6 / pi^2 (family-wise 90%)
        assert saved[section]["claimed_epsilon"] == 8.0
        assert saved[section]["confidence"] == pytest.approx(1 - 0.1 * 6 / np.pi ** 2 / 3)
        assert saved[section]["ceiling"] is not None
    ex = out["extraction"]
    assert ex["generation_resolution"] == 48  # the training resolution, not the base's 32
    assert ex["vae_floor_median"] is not None and ex["rate_upper"] is not None
    # tiny samples against epsilon 8: nothing can be concluded either way
    assert {out[s]["verdict"] for s in REQUIRED} == {"INCONCLUSIVE"}
    assert out["mia"]["auc"] is None and "not estimable" in out["mia"]["auc_reason"]
    assert {"data_canaries", "gradient_canaries"} <= set(out["audit"])
    lira = out["mia"]["lira"]  # shadows are copies of the base with every weight trainable (adapter "full")
    assert lira["shadows"] == 4 and lira["pool_images"] == 24 and lira["shadow_adapter"] == "full", lira
    assert set(out["mia"]["attacks"]) == {"loss", "calibrated", "pia", "lira"}
    assert len(out["summary"]) == 4 and out["summary"][0].startswith("overall INCONCLUSIVE (attempt 1")
    assert out["overall"]["verdict"] == "INCONCLUSIVE" and out["overall"]["probes"] == ["audit", "extraction", "mia"]
    history = probe_history(run)
    assert [h["event"] for h in history] == ["started", "finished"] and history[1]["overall"] == "INCONCLUSIVE"
