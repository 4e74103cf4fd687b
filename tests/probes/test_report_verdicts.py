"""The report and the sweep report show each probe's three-way verdict in its colour, with the claimed
epsilon, the lower bound and the ceiling; a count is never coloured."""

from __future__ import annotations

import json

from dpdiff.probes.verdict import three_way_verdict, verdict_fields
from dpdiff.report.probes_section import probe_rows
from dpdiff.report.run_report import build_sections, render_html


def _probes(claimed):
    inconclusive = verdict_fields(three_way_verdict(claimed_epsilon=claimed, eps_lower=0.2, ceiling=3.3,
                                                    confidence=0.9, to_conclude="about 400 held-out units"))
    failing = verdict_fields(three_way_verdict(claimed_epsilon=claimed, eps_lower=claimed + 1, ceiling=claimed + 3,
                                               confidence=0.9))
    ex = {**inconclusive, "extracted_count": 3, "rate": 0.3, "rate_upper": 0.6, "training_items_probed": 10,
          "heldout_items_probed": 10, "control_matches": 3, "control_false_match_rate": 0.3,
          "heldout_false_match_rate": 0.87, "heldout_false_match_rate_calibrated": 0.05, "l2_threshold": 0.08,
          "l2_threshold_configured": 0.15, "vae_floor_median": 0.2, "vae_floor_p90": 0.25, "generations": 32,
          "generation_resolution": 32, "captions_probed": 2, "per_caption_generations": 16, "max_clique": 4,
          "clique_size_threshold": 5, "clique_flagged_captions": 0, "warnings": ["the budget is small"]}
    mia = {**inconclusive, "auc": None, "auc_reason": "not estimable: 2 non-members", "auc_p_value": 0.17,
           "primary_attack": "calibrated", "members": 2, "nonmembers": 2, "eps_lower_steinke": 0.1,
           "eps_lower_fdp": 0.2, "eps_lower_gdp": 0.3,
           "attacks": {"calibrated": {"auc": None, "auc_observed": 1.0, "auc_p_value_corrected": 0.5,
                                      "tpr_at_fpr": {}}}}
    audit = {**failing, "m": 1000, "num_guesses": 100, "num_correct": 99, "included": 500,
             "ceiling_steinke": 4.0, "ceiling_fdp": 4.1}
    return {"extraction": ex, "mia": mia, "audit": audit, "seconds": 1.0}


def test_rows_carry_verdict_claim_bound_ceiling_and_what_would_conclude():
    rows = dict(probe_rows(_probes(8.0), {"dp": True, "epsilon": 8.0}))
    assert rows["extraction verdict"].startswith("INCONCLUSIVE: ")
    assert "To conclude: about 400 held-out units" in rows["membership inference verdict"]
    assert rows["one-run audit verdict"].startswith("FAIL: ")
    bound = rows["MIA: epsilon bound from the random member / held-out split"]
    assert "lower bound 0.2" in bound and "claimed epsilon 8" in bound and "ceiling 3.3" in bound
    assert "90% confidence" in bound and "95%" not in bound
    counts = rows["extraction: training images matched (a generation of their caption within L2 0.08 "
                  "(calibrated down from 0.15))"]
    assert counts.startswith("3 of 10") and not counts.startswith(("PASS", "FAIL", "INCONCLUSIVE"))
    assert rows["MIA AUC (calibrated, declared before the run)"].startswith("not estimable")


def test_html_colours_each_verdict_and_nothing_else(tmp_path):
    priv = {"dp": True, "epsilon": 8.0, "delta": 1e-5, "privacy_unit": "example", "num_units": 100,
            "accountant": "pld", "target_epsilon": 8.0, "sample_rate": 0.1, "expected_batch_size": 10,
            "noise_multiplier": 1.0, "max_grad_norm": 1.0, "steps": 10, "augmult": 1}
    (tmp_path / "privacy.json").write_text(json.dumps(priv))
    sections = build_sections(priv=priv, run={}, probes=_probes(8.0), metrics=[])
    page = render_html(sections, run_dir=tmp_path, plots={}, run={}, dp=True)
    assert page.count("class='inconclusive'") == 2 and page.count("class='fail'") == 1
    assert "class='pass'" not in page


def test_sweep_report_has_verdict_and_ceiling_columns(tmp_path):
    from dpdiff.report.sweep import collect

    run = tmp_path / "0"
    run.mkdir()
    (run / "privacy.json").write_text(json.dumps({"dp": True, "epsilon": 8.0, "delta": 1e-5}))
    (run / "data_owner.json").write_text(json.dumps({"dataset_fingerprint": "f" * 64}))
    (run / "probes.json").write_text(json.dumps(_probes(8.0)))
    row = collect(tmp_path)[0]
    assert (row["audit_verdict"], row["mia_verdict"], row["extraction_verdict"]) == ("FAIL", "INCONCLUSIVE",
                                                                                     "INCONCLUSIVE")
    assert row["audit_ceiling"] == 11.0 and row["audit_eps_lower"] == 9.0


def test_an_older_probes_json_still_renders():
    old = {"extraction": {"extracted_count": 3, "rate": 0.1}, "mia": {"auc": 0.9},
           "audit": {"verdict": "PASS: no leakage beyond the claimed epsilon detected", "eps_lower": 0.5}}
    rows = dict(probe_rows(old, {"dp": True, "epsilon": 8.0}))
    assert "re-run dpdiff probe" in rows["extraction"]
    assert not rows["one-run audit verdict"].startswith("PASS")  # an unchecked old green is not shown as green
