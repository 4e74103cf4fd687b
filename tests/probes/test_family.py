"""One verdict across the probes and across re-runs of them on one run dir (family-wise error control)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from dpdiff.probes.verdict import attempt_alpha, overall_verdict
from dpdiff.schema import compose


def test_attempts_never_spend_more_than_the_family_error_rate():
    spent = sum(attempt_alpha(0.05, j) for j in range(1, 100_001))
    assert spent <= 0.05 and spent == pytest.approx(0.05, rel=1e-4)
    assert attempt_alpha(0.05, 1) == pytest.approx(0.05 * 6 / math.pi ** 2)
    assert attempt_alpha(0.05, 2) == pytest.approx(attempt_alpha(0.05, 1) / 4)
    with pytest.raises(ValueError):
        attempt_alpha(0.05, 0)


def _sec(verdict, det=None):
    return {"verdict": verdict, "detectable_epsilon": det}


def test_overall_verdict_rules():
    both = dict(family_confidence=0.95, attempt=1)
    assert overall_verdict({"mia": _sec("INCONCLUSIVE"), "audit": _sec("PASS", 1.5)}, **both)["verdict"] == "PASS"
    v = overall_verdict({"mia": _sec("FAIL"), "audit": _sec("PASS", 1.5)}, **both)
    assert v["verdict"] == "FAIL" and "mia (attempt 1)" in v["reason"]
    v = overall_verdict({"mia": _sec("INCONCLUSIVE", 9.0), "extraction": _sec("INCONCLUSIVE", 12.0)}, **both)
    assert v["verdict"] == "INCONCLUSIVE" and v["detectable_epsilon"] == 9.0
    # an earlier attempt's FAIL stays: re-running until green does not erase it
    v = overall_verdict({"mia": _sec("PASS", 1.0)}, family_confidence=0.95, attempt=3,
                        earlier_fails=["extraction (attempt 1)"])
    assert v["verdict"] == "FAIL" and "extraction (attempt 1)" in v["reason"]
    assert overall_verdict({}, **both)["verdict"] is None


def test_each_attempt_is_counted_and_spends_its_share(monkeypatch, tmp_path):
    """Three attempts with stand-in probes: each sees its own level, the history keeps every attempt, and a FAIL
    of attempt 1 keeps the overall verdict red on attempt 3 although attempt 3's probes pass."""
    import dpdiff.probes.extraction as extraction
    import dpdiff.probes.mia as mia
    from dpdiff.probes.run import probe_history, run_probes

    seen, verdicts = [], iter(["FAIL", "PASS", "PASS", "PASS"])

    def fake(ctx, cfg, *, confidence, **kw):
        seen.append(confidence)
        return {"verdict": next(verdicts) if len(seen) % 2 else "INCONCLUSIVE", "eps_lower": 0.0, "ceiling": 1.0,
                "detectable_epsilon": 2.0, "claimed_epsilon": 1.0, "confidence": confidence,
                "extracted_count": 0, "rate": 0.0, "auc": None}

    monkeypatch.setattr(extraction, "run_extraction", fake)
    monkeypatch.setattr(mia, "run_mia", fake)
    ctx = SimpleNamespace(run_dir=tmp_path, seed=0, denoiser=SimpleNamespace(eval=lambda: None), canaries=None)
    cfg = OmegaConf.merge(compose([]).probes, {"confidence": 0.9, "extraction": {"enabled": True},
                                                "mia": {"enabled": True}})
    outs = [run_probes(ctx, cfg) for _ in range(3)]
    for j, out in enumerate(outs, start=1):
        per = 1 - attempt_alpha(0.1, j) / 2  # two probes ran
        assert seen[2 * (j - 1)] == seen[2 * j - 1] == pytest.approx(per)
        assert out["overall"]["attempt"] == j and out["overall"]["confidence_per_probe"] == pytest.approx(per)
    assert [o["overall"]["verdict"] for o in outs] == ["FAIL", "FAIL", "FAIL"]
    assert "extraction (attempt 1)" in outs[2]["overall"]["reason"]
    history = probe_history(tmp_path)
    assert [h["event"] for h in history] == ["started", "finished"] * 3
    assert history[-1]["verdicts"]["extraction"]["verdict"] == "PASS"
    # an attempt that never finished still counts
    (tmp_path / "probes_history.jsonl").open("a").write('{"event": "started", "attempt": 4}\n{"torn')
    assert run_probes(ctx, cfg)["overall"]["attempt"] == 5


def test_dpdiff_probe_refuses_data_that_is_not_what_the_run_trained_on(tmp_path):
    import json

    from dpdiff.errors import UserError
    from recipes.probe import ProbeRecipe

    recipe = ProbeRecipe(tmp_path, [])
    recipe.cfg = OmegaConf.create({"data": {"path": "/data/scans"}})
    (tmp_path / "data_owner.json").write_text(json.dumps({"dataset_fingerprint": "a" * 64}))
    recipe._check_same_data("a" * 64)  # the same data: fine
    with pytest.raises(UserError, match="not the data this run trained on"):
        recipe._check_same_data("b" * 64)  # one file added since: another fingerprint
