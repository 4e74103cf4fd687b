"""The finetune recipe as a user runs it: `dpdiff finetune ...` in a fresh process."""

from __future__ import annotations

import json

import pytest
from helpers import run_cli, run_cli_subprocess

FAST = ["debug=fast"]  # configs/debug/fast.yaml: 2 steps of 8, probes and eval off

PRIVACY_KEYS = {"epsilon", "delta", "target_epsilon", "accountant", "noise_multiplier", "max_grad_norm",
                "sample_rate", "steps", "expected_batch_size", "num_units", "privacy_unit", "augmult",
                "world_size", "dp"}


def _check_run_dir(run_dir):
    for f in ("privacy.json", "metrics.jsonl", "run.json", "report.html", "report.md", "samples.png",
              ".hydra/config.yaml"):
        assert (run_dir / f).exists(), f"missing {f}"
    run = json.loads((run_dir / "run.json").read_text())
    assert {"base_model", "dpdiff_version", "git_commit", "wall_seconds"} <= set(run)
    priv = json.loads((run_dir / "privacy.json").read_text())
    assert PRIVACY_KEYS <= set(priv)
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    return priv, run


def test_dp_finetune_two_steps(tmp_path):
    """The README's command as a user runs it: its own process through the console entry point."""
    run_dir = tmp_path / "run"
    res = run_cli_subprocess("finetune", *FAST, "privacy.target_epsilon=2", f"hydra.run.dir={run_dir}")
    assert res.returncode == 0, res.stderr[-3000:]
    priv, run = _check_run_dir(run_dir)
    assert (run_dir / "lora" / "pytorch_lora_weights.safetensors").exists()
    assert priv["dp"] is True and priv["steps"] == 2
    assert priv["engine"] == "hooks" and priv["stopped_for_budget"] is False
    assert 0 < priv["epsilon"] <= priv["target_epsilon"] == 2
    assert priv["noise_multiplier"] > 0 and priv["accountant"] == "prv"
    assert priv["expected_batch_size"] == pytest.approx(8.0)
    assert priv["sample_rate"] == pytest.approx(8 / priv["num_units"])
    assert "DP per example" in res.stdout and "report" in res.stdout
    assert "differentially private" in (run_dir / "report.md").read_text()


def test_non_private_finetune_is_labelled(tmp_path):
    run_dir = tmp_path / "run"
    res = run_cli("finetune", *FAST, "privacy=none", f"hydra.run.dir={run_dir}")
    assert res.returncode == 0, res.stderr[-3000:]
    priv, _ = _check_run_dir(run_dir)
    assert priv["dp"] is False and priv["epsilon"] is None and priv["engine"] == "none"
    assert "NO PRIVACY GUARANTEE" in (run_dir / "report.html").read_text()
    assert "NO PRIVACY GUARANTEE" in res.stdout


def test_full_finetune_saves_unet(tmp_path):
    run_dir = tmp_path / "run"
    res = run_cli("finetune", *FAST, "adapter=full", "privacy.augmult=1", f"hydra.run.dir={run_dir}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (run_dir / "unet" / "config.json").exists()


@pytest.mark.parametrize("override,needle", [
    ("data.path=/no/such/dir", "does not exist"),
    ("model.pretrained=/no/such/model", "does not exist"),
    ("privacy.target_epsilon=0", "privacy.target_epsilon=0"),
    ("privacy.target_epsilon=-1", "positive"),
    ("privacy.delta=0.5", "privacy.delta"),
    ("adapter.target_modules=[to_qq]", "matches no module"),
    ("privacy.max_grad_norm=0", "max_grad_norm"),
    ("privacy.augmult=0", "augmult"),
    ("train.batch_size=100000", "batch_size"),
    ("privacy.accountant=gdp", "accountant"),
    ("train.gradient_checkpointing=true", "gradient_checkpointing"),
    ("data.caption_replace_prob=0.8 data.caption_insert_prob=0.5", "caption"),
    ("train.timestep_range=[900,100]", "timestep_range"),
])
def test_bad_input_is_one_clear_line_and_leaves_nothing(tmp_path, override, needle):
    run_dir = tmp_path / "run"
    res = run_cli("finetune", *FAST, *override.split(), f"hydra.run.dir={run_dir}")
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("dpdiff: error:"), res.stderr[-2000:]
    assert needle in lines[-1]
    assert "Traceback" not in res.stderr
    assert not run_dir.exists(), "a failed run left its run dir behind"


@pytest.mark.slow  # ~5 min on 2 cores (training, all probes, eval, then `dpdiff probe` on the run): make test-slow
def test_probes_and_eval_run_after_training_and_on_an_existing_run(tmp_path):
    """probes=default writes probes.json with the contract keys; `dpdiff probe` reruns them."""
    run_dir = tmp_path / "run"
    small = ["probes=default", "eval=default", "probes.extraction.captions=2", "probes.extraction.per_caption=4",
             "probes.mia.members=24", "probes.mia.bootstrap=50", "probes.mia.timesteps=[100,300]",
             "probes.mia.noise_draws=1", "probes.audit.canaries=20", "eval.per_digit=2", "eval.heldout_images=16",
             "data.holdout_fraction=0.03", "probes.mia.min_nonmembers=10"]
    base = [a for a in FAST if not a.startswith(("probes=", "eval="))]
    res = run_cli("finetune", *base, *small, f"hydra.run.dir={run_dir}")
    assert res.returncode == 0, res.stderr[-3000:]
    probes = json.loads((run_dir / "probes.json").read_text())
    assert {"extracted_count", "rate"} <= set(probes["extraction"])
    assert probes["mia"]["auc"] is not None and 0 <= probes["mia"]["auc"] <= 1
    assert {"eps_lower", "verdict"} <= set(probes["audit"])
    assert probes["audit"]["verdict"] in ("PASS", "FAIL", "INCONCLUSIVE")
    canaries = json.loads((run_dir / "canaries.json").read_text())
    owner = json.loads((run_dir / "data_owner.json").read_text())  # the canaries' draw is the data owner's
    assert owner["canaries"]["included"] == sum(c["included"] for c in canaries["canaries"])
    util = json.loads((run_dir / "utility.json").read_text())
    assert {"accuracy_in_style", "retention_accuracy"} <= set(util["digit_accuracy"]["finetuned"])
    assert "Probes" in (run_dir / "report.html").read_text()
    (run_dir / "probes.json").unlink()
    res = run_cli("probe", f"run_dir={run_dir}", "probes.extraction.enabled=false", "probes.mia.members=16",
                  "probes.mia.bootstrap=20", "probes.mia.timesteps=[200]", "probes.mia.noise_draws=1")
    assert res.returncode == 0, res.stderr[-3000:]
    again = json.loads((run_dir / "probes.json").read_text())
    assert again["extraction"]["extracted_count"] is None and again["mia"]["auc"] is not None
    assert again["audit"]["eps_lower"] is not None
    assert again["overall"]["attempt"] == 2 and again["overall"]["earlier_attempts"] == 1  # the re-run is counted


def test_embedding_adapter_both_mechanisms_end_to_end(tmp_path):
    """adapter=embedding through the CLI: DP-SGD on the token and the noisy aggregation (one Gaussian mechanism,
    q = 1, one step, its epsilon checked against Google's dp_accounting), the diffusers textual-inversion file, and
    the dataset ledger composing both runs on the same images."""
    import re

    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant
    from helpers import write_image_folder

    data = write_image_folder(tmp_path / "imgs", n=12)
    eps = {}
    for mech in ("dpsgd", "aggregate"):
        run_dir = tmp_path / mech
        res = run_cli("finetune", *FAST, "experiment=private_look", f"adapter.mechanism={mech}", f"data.path={data}",
                      "adapter.unit_steps=2", "train.max_steps=2", "train.batch_size=4", "privacy.target_epsilon=2",
                      f"hydra.run.dir={run_dir}")
        assert res.returncode == 0, res.stderr[-3000:]
        priv = json.loads((run_dir / "privacy.json").read_text())
        assert priv["dp"] and priv["engine"] == "unit_vectors" and 0 < priv["epsilon"] <= 2
        assert (run_dir / "embedding" / "learned_embeds.safetensors").exists() and (run_dir / "samples.png").exists()
        assert "<private-look>" in json.loads((run_dir / "run.json").read_text())["sample_prompts"][0]
        eps[mech] = priv["epsilon"]
    agg = json.loads((tmp_path / "aggregate" / "privacy.json").read_text())
    assert agg["schedule"]["max_steps"] == 1 and agg["schedule"]["batch_size"] == agg["num_units"]
    assert agg["sample_rate"] == 1.0 and agg["steps"] == 1 and agg["ledger"] == [
        {"noise_multiplier": agg["noise_multiplier"], "sample_rate": 1.0, "steps": 1}]
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dp_event.GaussianDpEvent(agg["noise_multiplier"]))
    assert acc.get_epsilon(agg["delta"]) == pytest.approx(agg["epsilon"], abs=0.02)
    r = run_cli("budget", str(data))
    assert r.returncode == 0 and r.stdout.count("finished") == 2, r.stdout
    total = float(re.search(r"worst-charged record: epsilon ([0-9.]+)", r.stdout).group(1))
    assert total > max(eps.values())  # the two mechanisms compose in the dataset ledger
    # user-level units: a user's images are one unit (4 users of 4 images); the aggregate releases one offset per user
    users = write_image_folder(tmp_path / "users", n=16, users=4)
    run_dir = tmp_path / "user_aggregate"
    res = run_cli("finetune", *FAST, "experiment=private_look", "adapter.mechanism=aggregate", "privacy.unit=user",
                  f"data.path={users}", "data.holdout_fraction=0", "adapter.unit_steps=2", "privacy.target_epsilon=2",
                  f"hydra.run.dir={run_dir}")
    assert res.returncode == 0, res.stderr[-3000:]
    priv = json.loads((run_dir / "privacy.json").read_text())
    assert priv["privacy_unit"] == "user" and priv["num_units"] == 4 and priv["sample_rate"] == 1.0
    assert "for each user" in priv["guarantee"] and 0 < priv["epsilon"] <= 2
    bad = run_cli("finetune", *FAST, "adapter=embedding", "adapter.template='{caption} only'", f"data.path={data}",
                  f"hydra.run.dir={tmp_path / 'bad'}")
    assert bad.returncode == 2 and "adapter.template" in bad.stderr and not (tmp_path / "bad").exists()
    bad = run_cli("finetune", *FAST, "adapter=embedding", "train.caption_dropout=0.1", f"data.path={data}",
                  f"hydra.run.dir={tmp_path / 'bad2'}")
    assert bad.returncode == 2 and "caption_dropout" in bad.stderr and not (tmp_path / "bad2").exists()
