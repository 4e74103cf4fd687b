"""privacy.json and run.json from explicit inputs: no training run needed."""

from __future__ import annotations

from dataclasses import replace

import dp_accounting
import pytest
from dp_accounting import pld
from helpers import write_image_folder

from dpdiff.data.prepare import prepare
from dpdiff.privacy.plan import DatasetIdentity, PrivacyPlan
from dpdiff.privacy.settings import PrivacySettings
from dpdiff.report.privacy_json import privacy_record, run_record
from dpdiff.settings import DataSettings

CONTRACT = ("epsilon", "delta", "target_epsilon", "accountant", "noise_multiplier", "max_grad_norm", "sample_rate",
            "steps", "expected_batch_size", "num_units", "privacy_unit", "augmult", "world_size", "dp")


def _setup(tmp_path, **privacy):
    root = write_image_folder(tmp_path / "data", 20)
    data = prepare(DataSettings.from_config({"path": str(root), "holdout_fraction": 0.1}), unit="example")
    s = PrivacySettings.from_config({"enabled": True, "target_epsilon": 4.0, "max_grad_norm": 0.5,
                                     "accountant": "rdp", **privacy})
    plan = PrivacyPlan.build(settings=s, num_units=data.num_train_units, batch_size=6, max_steps=10, seed=0,
                             run_dir=tmp_path / "run",
                             dataset=DatasetIdentity(root=data.root, fingerprint=data.fingerprint,
                                                     source_fingerprint=data.source_fingerprint))
    return data, plan


def test_privacy_record_of_a_dp_plan(tmp_path):
    data, plan = _setup(tmp_path)
    for _ in range(7):
        plan.record_step()
    rec = privacy_record(plan=plan, data=data, world_size=2, train_steps=7)
    assert all(k in rec for k in CONTRACT)
    assert rec["dp"] is True and rec["steps"] == 7 and rec["world_size"] == 2
    assert rec["num_units"] == 18 and rec["sample_rate"] == pytest.approx(6 / 18)
    assert rec["expected_batch_size"] == pytest.approx(6.0)
    # the epsilon is that of the ledger's 7 steps, recomputed here with Google's accountants directly
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
        rec["sample_rate"], dp_accounting.GaussianDpEvent(rec["noise_multiplier"])), 7)
    tight = pld.PLDAccountant(value_discretization_interval=1e-3).compose(event).get_epsilon(rec["delta"])
    rdp = dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(rec["delta"])
    assert tight * 0.999 <= rec["epsilon"] == pytest.approx(rdp, rel=0.03)
    assert rec["epsilon"] < 4.0  # 7 of the 10 planned steps
    assert rec["reproducible_noise"] is False and "fresh OS entropy" in rec["noise_source"]
    assert rec["source_fingerprint"] == data.source_fingerprint


def test_privacy_record_flags_reproducible_noise_and_no_dp(tmp_path):
    data, plan = _setup(tmp_path, reproducible_noise=True)
    rec = privacy_record(plan=plan, data=data, world_size=1, train_steps=0)
    assert rec["reproducible_noise"] is True
    assert any("no guarantee across runs" in c for c in rec["caveats"])
    plan.settings = replace(plan.settings, enabled=False)
    plan.mechanism, plan.ledger = None, None
    rec = privacy_record(plan=plan, data=data, world_size=1, train_steps=5)
    assert rec["dp"] is False and rec["epsilon"] is None and rec["steps"] == 5
    assert rec["caveats"][0].startswith("This model was trained WITHOUT differential privacy")


def test_run_record_names_the_contract(tmp_path):
    data, _ = _setup(tmp_path)
    rec = run_record(version="9.9", base_model="/abs/base", model_family="sd", data=data, adapter="lora", resolution=32,
                     weights="lora", samples="samples.png", samples_base=None, sample_prompts=["a"],
                     wall_seconds=1.234, train_steps=3, resumed_from=None, device="cpu", world_size=1)
    for key in ("base_model", "dpdiff_version", "git_commit", "wall_seconds"):
        assert key in rec
    assert rec["base_model"] == "/abs/base" and rec["wall_seconds"] == 1.23
