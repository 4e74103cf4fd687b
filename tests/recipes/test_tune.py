"""dpdiff tune: private selection among candidates, its guarantee computed before training and published with
the winner (dpdiff.privacy.selection is checked against the papers' closed forms in tests/privacy)."""

from __future__ import annotations

import json
import os

import pytest
from helpers import run_cli, write_image_folder


def test_tune_runs_a_random_number_of_candidates_and_publishes_the_procedures_guarantee(tmp_path):
    data = write_image_folder(tmp_path / "imgs", n=16)
    out = tmp_path / "tune"
    # E[K] = 1.5 (geometric): K > 5 with probability (1/3)^5 = 0.4%, which costs time, never a failure
    res = run_cli("tune", str(out), "--grid", "train.lr=0.01,0.02", "--mean-candidates", "1.5",
                  "--score-units", "8", "debug=fast", f"data.path={data}", "data.holdout_fraction=0.4",
                  "privacy.target_epsilon=2")
    assert res.returncode == 0, res.stderr[-3000:]
    sel = json.loads((out / "selection.json").read_text())
    assert sel["one_candidate_epsilon"] < sel["epsilon"] and sel["delta"] > 0 and sel["grid_points"] == 2
    assert sel["expected_candidates"] == pytest.approx(1.5) and sel["best_overrides"][0].startswith("train.lr=")
    owner = json.loads((out / "tuning_owner.json").read_text())
    assert oct(os.stat(out / "tuning_owner.json").st_mode & 0o777) == "0o600"
    cands = sorted(p.name for p in out.glob("candidate-*"))
    assert len(cands) == len(owner["candidates"]) >= 1
    assert "candidates" not in sel and "k" not in sel  # K stays with the data owner
    best = out / "best"
    assert best.is_symlink() and (best / "privacy.json").exists()
    priv = json.loads((best / "privacy.json").read_text())
    assert priv["selection"]["epsilon"] == pytest.approx(sel["epsilon"]) and "tuning procedure" in priv["guarantee"]
    assert priv["epsilon"] <= 2 and priv["epsilon"] < sel["epsilon"]  # the run alone vs the procedure
    # the model card published with the weights states the procedure's guarantee, not the run's alone, and no
    # longer says the hyperparameters were chosen without accounting
    card = (best / "lora" / "README.md").read_text()
    headline = next(line for line in card.splitlines() if line.startswith("**The released weights"))
    assert f"({sel['epsilon']:.4g}, " in headline and "tuning procedure" in headline
    assert "settings (train.lr) were chosen by dpdiff tune" in card and "choice of hyperparameters read" not in card
    assert any(c.startswith("The tuned settings (train.lr) were chosen") for c in priv["caveats"])
    assert f"({sel['epsilon']:.4g}, " in (best / "report.md").read_text()
    # the dataset ledger: each candidate charged its training records, the scores their held-out records
    from dpdiff.privacy.dataset_ledger import DatasetLedger, ledger_location

    entries = DatasetLedger(ledger_location(data_root=data)).entries()
    score = [e for e in entries if e.attempt_id.startswith("tune-score-")]
    runs = [e for e in entries if not e.attempt_id.startswith("tune-score-")]
    assert len(score) == 1 and len(runs) == len(cands) and score[0].status == "finished"
    (seg,) = score[0].segments
    assert (seg.noise_multiplier, seg.sample_rate, seg.steps) == (4.0, 1.0, len(cands))
    trained = runs[0].record_set["records"]
    assert score[0].record_set["records"] == min(16 - trained, 8) > 0  # every held-out record, at most 8 units
    # ... as one private selection: the procedure's bound (for a training record without its score), fixed
    # before K was drawn, between the winner's own epsilon and selection.json's
    proc = score[0].procedure
    assert proc["kind"] == "private_selection" and proc["gamma"] == pytest.approx(sel["gamma"])
    assert sorted(proc["candidates"]) == cands
    charged = owner["dataset_ledger"]
    assert charged["selection_procedures"] == 1 and charged["records"] == trained + score[0].record_set["records"]
    assert priv["epsilon"] < charged["epsilon"] < sel["epsilon"]


def test_tune_refuses_before_training_what_would_pass_the_dataset_budget(tmp_path):
    """A budget the procedure alone fits in, an earlier run plus the procedure does not: refused before any
    candidate trains, nothing charged, nothing left in the way of a retry."""
    import numpy as np

    from dpdiff.privacy.dataset_ledger import DatasetLedger, ledger_location
    from dpdiff.privacy.selection import TruncatedNegativeBinomial, rdp_of, rdp_to_epsilon, selection_rdp
    from recipes.tune import build_parser, grid_mechanisms, parse_grid

    data = write_image_folder(tmp_path / "imgs", n=16)
    args = ["--grid", "train.lr=0.01,0.02", "--mean-candidates", "1.5", "--score-units", "8", "debug=fast",
            f"data.path={data}", "data.holdout_fraction=0.4", "privacy.target_epsilon=2"]
    earlier = run_cli("finetune", "debug=fast", "probes=none", "eval=none", f"data.path={data}",
                      "data.holdout_fraction=0.4", "privacy.target_epsilon=2", f"hydra.run.dir={tmp_path / 'r'}")
    assert earlier.returncode == 0, earlier.stderr[-3000:]
    ns = build_parser().parse_intermixed_args([str(tmp_path / "x"), *args])
    segments, delta, _, _ = grid_mechanisms([*ns.overrides, "probes=none", "eval=none"], parse_grid(ns.grid))
    dist = TruncatedNegativeBinomial.with_mean(1.5)
    one = np.max([rdp_of([g]) for g in segments], axis=0)
    with_score = rdp_to_epsilon(selection_rdp(one + rdp_of([type(segments[0])(4.0, 1.0, 1)]), dist), delta=delta)[0]
    combined = rdp_to_epsilon(rdp_of([segments[0]]) + selection_rdp(one, dist), delta=delta)[0]
    budget = (with_score + combined) / 2
    assert with_score < budget < combined
    out = tmp_path / "t"
    res = run_cli("tune", str(out), *args, f"privacy.dataset_budget={budget}")
    assert res.returncode == 2 and "most-charged training record" in res.stderr, res.stderr[-2000:]
    assert not out.exists()  # nothing trained, and a retry is not blocked by a half-made directory
    assert not [e for e in DatasetLedger(ledger_location(data_root=data)).entries() if e.procedure]


def test_score_sensitivity_is_the_clip_range():
    """The score's noise is calibrated to clip - floor: replacing one scored unit moves the sum by at most that,
    adding or removing one by at most half (checked on losses inside, below and above the range; deterministic)."""
    import numpy as np

    from recipes.tune import score_sum

    rng = np.random.default_rng(0)
    floor, clip = 0.1, 0.25
    for _ in range(200):
        loss = rng.uniform(-0.2, 0.6, size=int(rng.integers(2, 30)))
        other = rng.uniform(-0.2, 0.6)
        s = score_sum(loss, floor=floor, clip=clip)
        replaced = score_sum(np.r_[loss[:-1], other], floor=floor, clip=clip)
        removed = score_sum(loss[:-1], floor=floor, clip=clip)
        assert abs(s - replaced) <= clip - floor + 1e-12 and abs(s - removed) <= (clip - floor) / 2 + 1e-12
    # the bound is attained: a unit at the floor replaced by one at the clip
    assert score_sum([0.0, 1.0], floor=floor, clip=clip) - score_sum([0.0, 0.0], floor=floor, clip=clip) == \
        pytest.approx(clip - floor)
    # centring changes no ranking: two candidates on the same units keep their order
    a, b = rng.uniform(0.1, 0.25, 50), rng.uniform(0.1, 0.25, 50)
    assert (score_sum(a, floor=floor, clip=clip) < score_sum(b, floor=floor, clip=clip)) == (a.sum() < b.sum())


def test_tune_refuses_a_tracker_that_would_publish_how_many_candidates_ran(tmp_path):
    res = run_cli("tune", str(tmp_path / "t"), "--grid", "train.lr=0.01,0.02", "debug=fast", "tracker=wandb")
    assert res.returncode == 2 and "tracker=local" in res.stderr and "how many candidates ran" in res.stderr
    assert not (tmp_path / "t").exists()


def test_tune_refuses_a_grid_over_the_privacy_settings(tmp_path):
    res = run_cli("tune", str(tmp_path / "t"), "--grid", "privacy.target_epsilon=1,2", "debug=fast")
    assert res.returncode == 2 and "only train.* and adapter.*" in res.stderr
    assert not (tmp_path / "t").exists()
