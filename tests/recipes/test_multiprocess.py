"""`dpdiff finetune launcher.num_processes=2`: two gloo processes, one guarantee."""

from __future__ import annotations

import json

import pytest
from helpers import run_cli_subprocess as run_cli  # several processes: each run in a process of its own

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

FAST = ["debug=fast", "train.max_steps=4", "train.batch_size=16", "privacy.augmult=2", "privacy.target_epsilon=3",
        "train.checkpoint_every=2"]


def test_two_processes_same_guarantee_and_resume(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = run_cli("finetune", *FAST, f"hydra.run.dir={one}")
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = run_cli("finetune", *FAST, "launcher.num_processes=2", f"hydra.run.dir={two}")
    assert r2.returncode == 0, r2.stdout[-2000:] + r2.stderr[-15000:]
    p1 = json.loads((one / "privacy.json").read_text())
    p2 = json.loads((two / "privacy.json").read_text())
    assert p2["world_size"] == 2 and p1["world_size"] == 1
    assert p2["epsilon"] == pytest.approx(p1["epsilon"], rel=1e-9)
    assert p2["expected_batch_size"] == pytest.approx(p1["expected_batch_size"])
    assert p2["noise_multiplier"] == pytest.approx(p1["noise_multiplier"])
    assert (two / "lora" / "pytorch_lora_weights.safetensors").exists()
    # only rank 0 wrote: one metrics line per logged step
    steps = [json.loads(x)["step"] for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    # resume the 2-process run with 2 processes: the ledger continues
    three = tmp_path / "three"
    r3 = run_cli("finetune", *[a for a in FAST if not a.startswith("train.max_steps")], "train.max_steps=6",
                 "privacy.target_epsilon=10", "privacy.noise_multiplier=" + str(p2["noise_multiplier"]),
                 "launcher.num_processes=2", f"train.resume_from={two}", f"hydra.run.dir={three}")
    assert r3.returncode == 0, r3.stderr[-3000:]
    p3 = json.loads((three / "privacy.json").read_text())
    assert p3["steps"] == 6 and p3["ledger"][0]["steps"] == 6
    from pathlib import Path

    from diffusers import StableDiffusionPipeline

    from dpdiff.paths import TINY_BASE_DIR

    pipe = StableDiffusionPipeline.from_pretrained(str(TINY_BASE_DIR), safety_checker=None)
    pipe.load_lora_weights(str(Path(three) / "lora"))
