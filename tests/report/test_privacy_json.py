"""privacy.json, data_owner.json, the model card and run.json from explicit inputs: no training run needed."""

from __future__ import annotations

import dp_accounting
import pytest
from dp_accounting import pld
from helpers import write_image_folder

from dpdiff.data.prepare import prepare
from dpdiff.privacy.plan import DatasetIdentity, PrivacyPlan
from dpdiff.privacy.settings import PrivacySettings
from dpdiff.report.privacy_json import (
    N_IS_PUBLIC,
    OWNER_NOTICE_KEY,
    PUBLIC_PRIVACY_KEYS,
    model_card,
    owner_record,
    privacy_record,
    run_record,
    write_model_card,
    write_owner_json,
)
from dpdiff.schema import compose
from dpdiff.settings import DataSettings

CONTRACT = ("epsilon", "delta", "target_epsilon", "accountant", "noise_multiplier", "max_grad_norm", "sample_rate",
            "steps", "expected_batch_size", "num_units", "privacy_unit", "augmult", "world_size", "dp")


def _setup(tmp_path, **privacy):
    root = write_image_folder(tmp_path / "data", 20)
    data = prepare(DataSettings.from_config(compose([f"data.path={root}", "data.holdout_fraction=0.1"]).data),
                   unit="example")
    s = PrivacySettings.from_config({**compose(["privacy.target_epsilon=4", "privacy.max_grad_norm=0.5",
                                                "privacy.accountant=rdp"]).privacy, **privacy})
    plan = PrivacyPlan.build(settings=s, num_units=data.num_train_units, batch_size=6, max_steps=10, seed=0,
                             run_dir=tmp_path / "run",
                             dataset=DatasetIdentity(root=data.root, fingerprint=data.fingerprint,
                                                     source_fingerprint=data.source_fingerprint))
    return data, plan


def test_privacy_record_of_a_dp_plan(tmp_path):
    data, plan = _setup(tmp_path)
    for _ in range(7):
        plan.record_step()
    rec = privacy_record(plan=plan, data=data, world_size=2, train_steps=7, engine="bookkeeping",
                         stopped_for_budget=True)
    assert all(k in rec for k in CONTRACT)
    assert rec["dp"] is True and rec["steps"] == 7 and rec["world_size"] == 2
    assert rec["engine"] == "bookkeeping" and rec["stopped_for_budget"] is True  # what the run did, as told
    n = data.num_train_units  # the units not held out (each held out on its own, by a seeded hash)
    assert rec["num_units"] == n == 20 - len(data.holdout_units) and rec["sample_rate"] == pytest.approx(6 / n)
    assert rec["expected_batch_size"] == pytest.approx(6.0)
    # the epsilon is that of the ledger's 7 steps, recomputed here with Google's accountants directly
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
        rec["sample_rate"], dp_accounting.GaussianDpEvent(rec["noise_multiplier"])), 7)
    tight = pld.PLDAccountant(value_discretization_interval=1e-3).compose(event).get_epsilon(rec["delta"])
    rdp = dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(rec["delta"])
    assert tight * 0.999 <= rec["epsilon"] == pytest.approx(rdp, rel=0.03)
    assert rec["epsilon"] < 4.0  # 7 of the 10 planned steps
    assert rec["reproducible_noise"] is False and "fresh OS entropy" in rec["noise_source"]
    assert rec["ledger"] == [{"noise_multiplier": rec["noise_multiplier"], "sample_rate": rec["sample_rate"],
                              "steps": 7}]
    # the data-dependent fields are the data owner's: fingerprints, counts, ids, paths, the planning summary
    owner = owner_record(plan=plan, data=data, world_size=2, train_steps=7, canaries=None,
                         dataset_total=None, planning={"nsr_run": 1.0})
    assert owner["source_fingerprint"] == data.source_fingerprint
    assert owner["dataset_fingerprint"] == data.fingerprint and owner["plan"] == {"nsr_run": 1.0}
    assert owner["num_images"] == n and owner["holdout_units"] == len(data.holdout_units) >= 1
    assert owner["run_id"] == plan.run_id


MOVED = ("dataset_fingerprint", "source_fingerprint", "duplicates", "num_images", "skipped_files", "holdout_units",
         "canaries", "dataset_ledger", "run_id", "attempt_id", "plan")


def test_privacy_json_holds_the_guarantee_only(tmp_path):
    import json

    data, plan = _setup(tmp_path)
    plan.record_step()
    total = {"path": str(tmp_path / "data" / ".dpdiff-ledger.jsonl"), "runs": 1, "epsilon": 1.0, "delta": 1e-5,
             "unit": "example"}
    rec = privacy_record(plan=plan, data=data, world_size=1, train_steps=1)
    assert set(rec) <= PUBLIC_PRIVACY_KEYS and not set(MOVED) & set(rec)
    assert N_IS_PUBLIC in rec["caveats"]
    text = json.dumps(rec)
    for secret in (data.fingerprint, data.source_fingerprint, str(tmp_path), plan.run_id, plan.attempt_id):
        assert secret not in text
    assert not any(str(len(data.holdout_units)) + " privacy units" in c for c in rec["caveats"])
    owner = owner_record(plan=plan, data=data, canaries={"count": 3}, dataset_total=total,
                         planning={"units_per_prompt": 6.0})
    assert next(iter(owner)) == OWNER_NOTICE_KEY and "not publish" in owner[OWNER_NOTICE_KEY]
    assert set(MOVED) <= set(owner) and owner["dataset_ledger"]["path"] == total["path"]
    assert any(c.startswith(f"{len(data.holdout_units)} privacy units were held out") for c in owner["caveats"])
    path = write_owner_json(tmp_path / "run", owner)
    assert path.stat().st_mode & 0o777 == 0o600
    assert json.loads(path.read_text()) == json.loads(json.dumps(owner))
    write_owner_json(tmp_path / "run", owner)  # rewritten in place: still the owner's only
    assert path.stat().st_mode & 0o777 == 0o600


def test_model_card_holds_the_guarantee_and_a_plain_base_name(tmp_path):
    data, plan = _setup(tmp_path)
    plan.record_step()
    rec = privacy_record(plan=plan, data=data, world_size=1, train_steps=1)
    weights = tmp_path / "run" / "lora"
    weights.mkdir(parents=True)
    card = write_model_card(weights, rec, str(tmp_path / "models" / "sd-base")).read_text()
    head, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert 'base_model: "sd-base"' in head and str(tmp_path) not in card
    assert "- dpdiff\n- differential-privacy\n- lora\n" in head
    assert "differentially private" in body and rec["guarantee"] in body and N_IS_PUBLIC in body
    assert data.fingerprint not in card and "images" not in body.split("## Caveats")[0]
    assert 'base_model: "org/model"' in model_card(rec, base_name="org/model")
    _, plan = _setup(tmp_path / "none", enabled=False)
    card = model_card(privacy_record(plan=plan, data=data, world_size=1, train_steps=1), base_name="/m/x",
                      adapter="full-finetune")
    assert "not-differentially-private" in card and "NO PRIVACY GUARANTEE" in card


def test_privacy_record_flags_reproducible_noise_and_no_dp(tmp_path):
    data, plan = _setup(tmp_path, reproducible_noise=True)
    rec = privacy_record(plan=plan, data=data, world_size=1, train_steps=0)
    assert rec["reproducible_noise"] is True
    assert any("no guarantee across runs" in c for c in rec["caveats"])
    _, plan = _setup(tmp_path / "none", enabled=False)
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


def test_a_tune_winners_record_states_the_procedure_and_its_tuned_keys():
    """The unaccounted-choice caveat is replaced where it stands; a record without it (the built-in demo's) gains
    the tuned-settings caveat; the guarantee becomes the procedure's."""
    from dpdiff.report.privacy_json import UNACCOUNTED_CHOICE, with_selection

    sel = {"epsilon": 11.69, "delta": 1e-5}
    rec = with_selection({"guarantee": "(7.97, 1e-05)-DP", "privacy_unit": "example",
                          "caveats": ["first", UNACCOUNTED_CHOICE, "last"]}, sel, grid_keys=["train.lr"])
    assert rec["caveats"][0] == "first" and rec["caveats"][2] == "last" and UNACCOUNTED_CHOICE not in rec["caveats"]
    assert rec["caveats"][1].startswith("The tuned settings (train.lr) were chosen by dpdiff tune")
    assert rec["guarantee"].startswith("(11.69, 1e-05)-DP for each example") and "(7.97, 1e-05)" in rec["guarantee"]
    demo = with_selection({"guarantee": "g", "caveats": ["demo"]}, sel, grid_keys=["train.lr", "adapter.rank"])
    assert demo["caveats"][0] == "demo" and "(train.lr, adapter.rank)" in demo["caveats"][1]
