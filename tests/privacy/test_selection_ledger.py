"""A tuning procedure in the dataset ledger: once it finished, its candidates and scores are charged as one private
selection (order by order the smaller of Papernot & Steinke's bound and the composition of what ran); a procedure
that ended early, a candidate continued later and a run that merely sits in a candidate dir are charged as runs.

The expected values are computed here from Opacus' RDP of each mechanism and ``dpdiff.privacy.selection`` (itself
checked against the papers' closed forms in test_selection.py): what is tested is which mechanisms the ledger
groups, and how."""

from __future__ import annotations

import numpy as np
import pytest
from privacy.test_record_ledger import DELTA, SIGMA, B, N, charges, ids, ledger, run

from dpdiff.errors import UserError
from dpdiff.privacy.accountants import MechanismSegment, get_accountant
from dpdiff.privacy.dataset_ledger import (
    SELECTION,
    charge_attempt,
    compose_runs,
    make_entry,
    worst_with_curve,
)
from dpdiff.privacy.selection import TruncatedNegativeBinomial, rdp_of, rdp_to_epsilon, selection_rdp
from dpdiff.runtime import RunDirLock

STEPS = 20
SCORE_NOISE = 4.0
DIST = TruncatedNegativeBinomial.with_mean(3.0)  # geometric, E[K] = 3
TRAIN, SCORED = ids(range(0, 100)), ids(range(100, 120))


def seg(steps: int = STEPS) -> MechanismSegment:
    return MechanismSegment(SIGMA, B / N, steps)


def procedure(tmp_path, status: str, k: int, *, grid_steps=(STEPS,), attempt_id: str = "tune-score-1"):
    """The procedure's own line (as ``dpdiff tune`` writes it): k score releases on the scored records."""
    (tmp_path / "data").mkdir(exist_ok=True)
    led = ledger(tmp_path)
    out = tmp_path / "tune"
    out.mkdir(exist_ok=True)
    spec = {"kind": SELECTION, "eta": DIST.eta, "gamma": DIST.gamma, "grid": [[seg(t).to_dict()] for t in grid_steps]}

    def make(record_set):
        return make_entry(attempt_id=attempt_id, run_id=attempt_id, run_dir=str(out.resolve()), fingerprint="p",
                          source_fingerprint="p", status=status, dp=True, privacy_unit="example", delta=DELTA,
                          accountant="rdp", segments=[MechanismSegment(SCORE_NOISE, 1.0, k)],
                          record_set=record_set or make.rs, procedure=spec)

    make.rs = None
    charge_attempt(led, make, SCORED, delta=DELTA, accountant="rdp", unit="example", planned=True, budget=None)
    make.rs = next(e for e in led.entries() if e.attempt_id == attempt_id).record_set
    if status != "planned":
        led.record(make(None))
    return out


def candidates(tmp_path, k: int, steps: int = STEPS) -> None:
    for i in range(k):
        run(tmp_path, f"tune/candidate-{i:03d}", TRAIN, steps=steps)


def worst(tmp_path, records) -> float:
    return charges(tmp_path, records).worst.epsilon


def composed(*segments) -> float:
    return get_accountant("rdp").epsilon(history=list(segments), delta=DELTA).epsilon


def expected(one, comp) -> float:
    return rdp_to_epsilon(np.minimum(selection_rdp(one, DIST), comp), delta=DELTA)[0]


def test_a_finished_procedure_charges_its_training_records_the_selection_not_the_sum(tmp_path):
    k = 8
    procedure(tmp_path, "planned", k)
    candidates(tmp_path, k)
    procedure(tmp_path, "finished", k)
    one = rdp_of([seg()])
    sel = expected(one, k * one)
    got = worst(tmp_path, TRAIN)
    assert got == pytest.approx(min(sel, composed(*[seg()] * k)), rel=1e-9)
    # eight candidates compose to far more than their selection; the selection to more than one run
    assert got < 0.7 * composed(*[seg()] * k) and got > composed(seg())
    # the scored records: the selection of one score release each (never the training's epsilon)
    release = rdp_of([MechanismSegment(SCORE_NOISE, 1.0, 1)])
    assert worst(tmp_path, SCORED) == pytest.approx(
        min(expected(release, k * release), composed(MechanismSegment(SCORE_NOISE, 1.0, k))), rel=1e-9)


def test_few_candidates_are_charged_their_composition(tmp_path):
    procedure(tmp_path, "planned", 1)
    candidates(tmp_path, 1)
    procedure(tmp_path, "finished", 1)
    # K = 1: the selection bound exceeds one run, so the realised composition (one run) is the charge
    assert worst(tmp_path, TRAIN) == pytest.approx(composed(seg()), rel=1e-9)


def test_a_procedure_that_ended_early_charges_its_candidates_as_runs(tmp_path):
    procedure(tmp_path, "planned", 8)
    candidates(tmp_path, 5)
    procedure(tmp_path, "ended", 5)  # a candidate failed: no winner released, the candidates are the owner's
    assert worst(tmp_path, TRAIN) == pytest.approx(composed(*[seg()] * 5), rel=1e-9)


def test_a_crashed_procedure_is_charged_as_runs_a_running_one_as_the_selection_it_becomes(tmp_path):
    k = 8
    out = procedure(tmp_path, "planned", k, grid_steps=(STEPS, 2 * STEPS))
    lock = RunDirLock(out)
    assert lock.acquire()
    try:
        candidates(tmp_path, 6)
        # running: candidates still to come may be the worst grid point (2 x STEPS)
        one = rdp_of([seg(2 * STEPS)])
        running = worst(tmp_path, TRAIN)
        assert running == pytest.approx(min(expected(one, 6 * rdp_of([seg()])), composed(*[seg()] * 6)), rel=1e-9)
        assert running < composed(*[seg()] * 6)
    finally:
        lock.release()
    # the process is gone and its line still says planned: it crashed, its candidates are charged as runs
    assert worst(tmp_path, TRAIN) == pytest.approx(composed(*[seg()] * 6), rel=1e-9)


def test_only_fresh_attempts_in_its_candidate_dirs_before_it_finished_are_candidates(tmp_path):
    k = 8
    procedure(tmp_path, "planned", k)
    candidates(tmp_path, k)
    procedure(tmp_path, "finished", k)
    group = np.minimum(selection_rdp(rdp_of([seg()]), DIST), k * rdp_of([seg()]))
    base = worst(tmp_path, TRAIN)
    # a run trained later into a candidate dir, and a run beside the procedure's dir: runs of their own
    run(tmp_path, "tune/candidate-999", TRAIN, steps=STEPS)
    run(tmp_path, "elsewhere/candidate-000", TRAIN, steps=STEPS)
    got = worst(tmp_path, TRAIN)
    both = rdp_of([seg(), seg()])
    assert got == pytest.approx(min(rdp_to_epsilon(group + both, delta=DELTA)[0], composed(*[seg()] * (k + 2))),
                                rel=1e-9)
    assert got > base


def test_compose_runs_without_procedures_is_unchanged(tmp_path):
    k = 4
    procedure(tmp_path, "planned", k)
    candidates(tmp_path, k)
    procedure(tmp_path, "finished", k)
    entries = [e for e in ledger(tmp_path).entries() if not e.procedure]
    assert compose_runs(entries, delta=DELTA, accountant="rdp")["epsilon"] == pytest.approx(
        composed(*[seg()] * k), rel=1e-9)


def test_a_procedure_about_to_start_is_checked_with_its_bound(tmp_path):
    run(tmp_path, "earlier", TRAIN, steps=STEPS)
    curve = selection_rdp(rdp_of([seg()]), DIST)
    led = ledger(tmp_path)
    got = worst_with_curve(led, TRAIN, curve=curve, delta=DELTA, accountant="rdp")
    assert got == pytest.approx(rdp_to_epsilon(rdp_of([seg()]) + curve, delta=DELTA)[0], rel=1e-9)
    # records no run touched: the procedure's bound alone
    fresh = worst_with_curve(led, ids(range(500, 510)), curve=curve, delta=DELTA, accountant="rdp")
    assert fresh == pytest.approx(rdp_to_epsilon(curve, delta=DELTA)[0], rel=1e-9) and fresh < got


def test_candidates_budget_checks_use_the_running_procedures_bound(tmp_path):
    k = 8
    out = procedure(tmp_path, "planned", k)
    lock = RunDirLock(out)
    assert lock.acquire()
    try:
        candidates(tmp_path, 5)
        sel = worst(tmp_path, TRAIN)
        budget = (sel + composed(*[seg()] * 6)) / 2  # above the selection, below six runs' composition
        run(tmp_path, "tune/candidate-005", TRAIN, steps=STEPS, dataset_budget=budget)  # passes as a candidate
    finally:
        lock.release()
    with pytest.raises(UserError, match="dataset_budget"):  # crashed: composition of six, past the budget
        run(tmp_path, "tune/candidate-006", TRAIN, steps=STEPS, dataset_budget=budget)
