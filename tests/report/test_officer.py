"""The privacy officer's rows: the NIST SP 800-226 facts and the attacks in plain words, from the run's files."""

from __future__ import annotations

from dpdiff.report.officer import officer_rows

PRIV = {"dp": True, "epsilon": 1.0, "delta": 1e-5, "num_units": 4000, "privacy_unit": "example",
        "neighbouring_relation": "add/remove one privacy unit (Poisson-sampled DP-SGD)", "sample_rate": 0.128,
        "expected_batch_size": 512.0, "steps": 75, "max_grad_norm": 0.01, "augmult": 4, "noise_multiplier": 4.8,
        "accountant": "prv", "epsilon_estimate": 0.99, "epsilon_lower": 0.98, "noise_source": "OS entropy"}


def _rows(priv=PRIV, owner=None, probes=None) -> dict:
    return dict(officer_rows(priv, owner, probes))


def test_delta_is_judged_against_one_over_n():
    assert "well below 1" in _rows()["delta against 1/N"]  # 1e-5 x 4000 = 0.04
    loose = _rows({**PRIV, "delta": 1e-3})["delta against 1/N"]  # 1e-3 x 4000 = 4
    assert "NOT well below 1" in loose and "delta << 1/N" in loose


def test_the_facts_come_from_the_run_files():
    rows = _rows(owner={"dataset_ledger": {"runs": 3, "total_epsilon": 2.7, "delta": 1e-5, "accountant": "prv",
                                           "unit": "example"}})
    assert "0.128" in rows["sampling actually used"] and "Poisson" in rows["sampling actually used"]
    assert "upper bound" in rows["accountant and its error"] and "0.98" in rows["accountant and its error"]
    assert "3 DP run(s)" in rows["cost of tuning and of other runs on this data"]
    assert "2.7" in rows["cost of tuning and of other runs on this data"]
    assert "no dataset ledger" in _rows()["cost of tuning and of other runs on this data"]
    assert "privacy.json" in rows["released artifacts (publishable)"]
    assert "data_owner.json" in rows["kept by the data owner (outside the guarantee)"]
    assert _rows({"dp": False})["guarantee"].startswith("none")


def test_attacks_say_what_they_could_have_seen():
    mia = {"verdict": "INCONCLUSIVE", "detectable_epsilon": 8.0, "members": 256, "nonmembers": 256, "auc": 0.51,
           "attacks": {"loss": {}, "calibrated": {}, "pia": {}}}
    audit = {"verdict": "PASS", "detectable_epsilon": 1.8, "m": 30000, "num_correct": 900, "num_guesses": 1000}
    ex = {"verdict": "INCONCLUSIVE", "detectable_epsilon": None, "generations": 512, "training_items_probed": 32,
          "heldout_items_probed": 32, "extracted_count": 0, "control_matches": 0}
    rows = _rows(probes={"mia": mia, "audit": audit, "extraction": ex,
                         "overall": {"verdict": "PASS", "reason": "audit had the power", "attempt": 1}})
    assert "between the claim 1 and 8 could go unseen" in rows["attacks: can membership be inferred?"]
    assert "covers twice the claim" in rows["attacks: canary audit"]
    assert "16x the claim" in rows["attacks: can training images be extracted?"]
    assert rows["attacks: overall"].startswith("PASS")
    assert "did not run" in _rows()["attacks tried"]
