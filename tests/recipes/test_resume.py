"""Checkpoint/resume keeps the privacy ledger: same epsilon as an uninterrupted run, never less."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import ROOT, run_cli
from safetensors.torch import load_file

FAST = ["debug=fast", "privacy.augmult=2", "data.holdout_fraction=0"]


def _priv(run_dir):
    return json.loads((run_dir / "privacy.json").read_text())


@pytest.mark.slow  # 3 runs; the resume's ledger arithmetic is covered fast in tests/privacy/test_plan.py
def test_resume_equals_uninterrupted_run(tmp_path):
    """With reproducible (seeded) noise, a debugging mode, resume is bit-exact, the EMA of the weights included
    (train.ema.enabled: the saved weights are the EMA's; a resume that restarted the EMA from the checkpoint's
    weights would save others)."""
    fixed = ["privacy.noise_multiplier=1.0", "privacy.target_epsilon=50", "privacy.reproducible_noise=true",
             "train.ema.enabled=true", "train.ema.decay=0.9"]
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    r = run_cli("finetune", *FAST, *fixed, "train.max_steps=3", f"hydra.run.dir={a}")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("finetune", *FAST, *fixed, "train.max_steps=6", f"train.resume_from={a}", f"hydra.run.dir={b}")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("finetune", *FAST, *fixed, "train.max_steps=6", f"hydra.run.dir={c}")
    assert r.returncode == 0, r.stderr[-3000:]
    pb, pc = _priv(b), _priv(c)
    assert pb["steps"] == pc["steps"] == 6
    assert pb["epsilon"] == pytest.approx(pc["epsilon"], rel=1e-9)
    assert pb["ledger"] == pc["ledger"]
    # the whole state was restored (sampler, draws, noise, optimizer): the weights agree too
    wb = load_file(str(b / "lora" / "pytorch_lora_weights.safetensors"))
    wc = load_file(str(c / "lora" / "pytorch_lora_weights.safetensors"))
    assert wb.keys() == wc.keys()
    for k in wb:
        torch.testing.assert_close(wb[k], wc[k], rtol=1e-4, atol=1e-6)
    ema = torch.load(next(iter(sorted(a.glob("checkpoint-*")))) / "optim.pt", weights_only=False)["ema"]
    assert ema is not None and ema["optimization_step"] == 3  # the checkpoint carries the EMA's state


@pytest.mark.slow  # one more run; the bf16 step's norms against fp32 are tested fast in tests/training
def test_bf16_autocast_trains_through_the_recipe(tmp_path):
    """train.mixed_precision=bf16 through the recipe and trainer on the CPU: the run trains (finite losses, the
    LoRA's zero-initialised up-projections moved) under the precision its saved config names; fp16 without a GPU is
    refused before any data is read."""
    run = tmp_path / "bf16"
    r = run_cli("finetune", *FAST, "train.mixed_precision=bf16", "train.max_steps=3", "train.lr=0.05",
                f"hydra.run.dir={run}")
    assert r.returncode == 0, r.stderr[-3000:]
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()
              if x.strip() and json.loads(x).get("loss") is not None]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    w = load_file(str(run / "lora" / "pytorch_lora_weights.safetensors"))
    assert any(float(v.abs().max()) > 0 for k, v in w.items() if "lora_B" in k or "lora.up" in k)
    assert "mixed_precision: bf16" in (run / ".hydra" / "config.yaml").read_text()
    r = run_cli("finetune", *FAST, "train.mixed_precision=fp16", f"hydra.run.dir={tmp_path / 'fp16'}")
    assert r.returncode == 2 and "fp16 needs a GPU" in r.stderr
    assert "setup done" not in r.stderr and not (tmp_path / "fp16" / "privacy.json").exists()


@pytest.mark.slow  # 4 runs; the streams' independence by default is tested fast in tests/privacy/test_plan.py
def test_runs_with_one_seed_draw_independent_noise_and_masks(tmp_path):
    """The default: noise and Poisson masks from fresh entropy, so two runs with the same config and seed are
    independent mechanisms (as the dataset ledger and sweep totals compose them); reproducible_noise=true
    (debugging) makes them identical and is flagged as having no guarantee across runs."""
    def lora(run):
        return load_file(str(run / "lora" / "pytorch_lora_weights.safetensors"))

    runs = {}
    for name, extra in (("a", []), ("b", []), ("ra", ["privacy.reproducible_noise=true"]),
                        ("rb", ["privacy.reproducible_noise=true"])):
        runs[name] = tmp_path / name
        r = run_cli("finetune", *FAST, "train.max_steps=2", "train.seed=7", "privacy.noise_multiplier=1.0",
                    "privacy.target_epsilon=null",
                    "train.lr=0.05", *extra, f"hydra.run.dir={runs[name]}")
        assert r.returncode == 0, r.stderr[-3000:]
    wa, wb, ra, rb = (lora(runs[n]) for n in ("a", "b", "ra", "rb"))
    # nothing that regenerates the noise or the masks is saved with a default run's checkpoint
    state = json.loads(next(runs["a"].glob("checkpoint-*/state.json")).read_text())
    assert state["noise"] is None and all(r["sampler"] is None for r in state["ranks"])
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)
    assert all(torch.equal(ra[k], rb[k]) for k in ra)
    assert _priv(runs["a"])["reproducible_noise"] is False
    priv = _priv(runs["ra"])
    assert priv["reproducible_noise"] is True and any("no guarantee across runs" in c for c in priv["caveats"])


@pytest.mark.slow  # the refusal and its message are covered fast in tests/privacy/test_plan.py
def test_raising_steps_past_the_target_is_refused(tmp_path):
    a = tmp_path / "a"
    r = run_cli("finetune", *FAST, "privacy.target_epsilon=2", "train.max_steps=3", f"hydra.run.dir={a}")
    assert r.returncode == 0, r.stderr[-3000:]
    b = tmp_path / "b"
    r = run_cli("finetune", *FAST, "privacy.target_epsilon=2", "train.max_steps=300", f"train.resume_from={a}",
                f"hydra.run.dir={b}")
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("dpdiff: error:") and "at most 3 steps fit" in last
    assert not b.exists()


@pytest.mark.slow  # a killed 400-step run: 25-180 s on 2 busy cores; the correction's arithmetic is fast in test_plan
def test_a_crash_after_the_last_checkpoint_is_still_counted(tmp_path):
    a = tmp_path / "a"
    cmd = [sys.executable, "-m", "dpdiff.cli", "finetune", *FAST, "privacy.noise_multiplier=1.0",
           "privacy.target_epsilon=1000", "train.max_steps=400", "train.checkpoint_every=3",
           "train.checkpoints_total_limit=1", f"hydra.run.dir={a}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    ledger = a / "privacy_ledger.json"
    deadline = time.time() + 600
    try:
        while time.time() < deadline:
            if ledger.exists() and list(a.glob("checkpoint-*")):
                steps = json.loads(ledger.read_text())["steps"]
                ckpt = max(int(p.name.split("-")[1]) for p in a.glob("checkpoint-*"))
                if steps % 3 != 0 and steps > ckpt:
                    break
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    spent = json.loads(ledger.read_text())["steps"]
    ckpt = max(int(p.name.split("-")[1]) for p in a.glob("checkpoint-*") if (p / "state.json").exists())
    assert spent > ckpt, (spent, ckpt)
    b = tmp_path / "b"
    r = run_cli("finetune", *FAST, "privacy.noise_multiplier=1.0", "privacy.target_epsilon=1000",
                f"train.max_steps={ckpt + 2}", f"train.resume_from={a}", f"hydra.run.dir={b}")
    assert r.returncode == 0, r.stderr[-3000:]
    # every step ever taken is accounted: the discarded ones after the checkpoint, then 2 more
    assert _priv(b)["steps"] == spent + 2


def test_a_run_dir_holding_a_run_is_not_reused(tmp_path):
    """A second fresh run into a run dir is refused before Hydra writes anything there; resuming is the way."""
    a = tmp_path / "a"
    r = run_cli("finetune", *FAST, "train.max_steps=2", "privacy.target_epsilon=50", f"hydra.run.dir={a}")
    assert r.returncode == 0, r.stderr[-3000:]
    before = {p.name: p.read_bytes() for p in (a / ".hydra").iterdir()} | {"m": (a / "metrics.jsonl").read_bytes()}
    r = run_cli("finetune", *FAST, "train.max_steps=3", "privacy.target_epsilon=40", f"hydra.run.dir={a}")
    assert r.returncode == 2 and "already holds a run" in r.stderr.strip().splitlines()[-1]
    assert "train.resume_from=latest" in r.stderr
    after = {p.name: p.read_bytes() for p in (a / ".hydra").iterdir()} | {"m": (a / "metrics.jsonl").read_bytes()}
    assert after == before
