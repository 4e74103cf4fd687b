"""A tuning procedure in the dataset ledger: its candidates and scores are charged as one private selection
(Papernot & Steinke's bound for the worst grid point, fixed before K is drawn, whatever K and the outcome); a
candidate continued later, a run in a dir the procedure never listed, and a crashed procedure's candidate recorded
after its last line, are charged as runs of their own.

The expected values are computed here from Opacus' RDP of each mechanism and ``dpdiff.privacy.selection`` (itself
checked against the papers' closed forms in test_selection.py): what is tested is which mechanisms the ledger
groups, and how."""

from __future__ import annotations

import contextlib

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


class Procedure:
    """A procedure's own line, written as ``dpdiff tune`` writes it: planned with K score releases on the scored
    records, a line per candidate dir before its candidate starts, then finished or ended."""

    def __init__(self, tmp_path, k: int, *, grid_steps=(STEPS,), attempt_id: str = "tune-score-1"):
        (tmp_path / "data").mkdir(exist_ok=True)
        self.tmp_path, self.k, self.attempt_id = tmp_path, k, attempt_id
        self.led = ledger(tmp_path)
        self.out = tmp_path / "tune"
        self.out.mkdir(exist_ok=True)
        self.spec = {"kind": SELECTION, "eta": DIST.eta, "gamma": DIST.gamma,
                     "grid": [[seg(t).to_dict()] for t in grid_steps], "candidates": []}
        self.record_set = None
        charge_attempt(self.led, self.entry, SCORED, delta=DELTA, accountant="rdp", unit="example", planned=True,
                       budget=None)

    def entry(self, record_set=None, *, status: str = "planned", scores: int | None = None):
        self.record_set = record_set or self.record_set
        return make_entry(attempt_id=self.attempt_id, run_id=self.attempt_id, run_dir=str(self.out.resolve()),
                          fingerprint="p", source_fingerprint="p", status=status, dp=True, privacy_unit="example",
                          delta=DELTA, accountant="rdp",
                          segments=[MechanismSegment(SCORE_NOISE, 1.0, self.k if scores is None else scores)],
                          record_set=self.record_set, procedure=dict(self.spec))

    def candidates(self, n: int, steps: int = STEPS) -> None:
        for _ in range(n):
            name = f"candidate-{len(self.spec['candidates']):03d}"
            self.spec["candidates"].append(name)
            self.led.record(self.entry())
            run(self.tmp_path, f"tune/{name}", TRAIN, steps=steps)

    def end(self, status: str, scores: int | None = None) -> None:
        self.led.record(self.entry(status=status, scores=scores))

    @contextlib.contextmanager
    def running(self):
        """The tuning process alive: its run dir locked."""
        lock = RunDirLock(self.out)
        assert lock.acquire()
        try:
            yield
        finally:
            lock.release()


def worst(tmp_path, records) -> float:
    return charges(tmp_path, records).worst.epsilon


def composed(*segments) -> float:
    return get_accountant("rdp").epsilon(history=list(segments), delta=DELTA).epsilon


def selected(one) -> float:
    return rdp_to_epsilon(selection_rdp(one, DIST), delta=DELTA)[0]


RELEASE = MechanismSegment(SCORE_NOISE, 1.0, 1)


def test_a_procedure_charges_its_training_records_the_selection_not_the_sum(tmp_path):
    k = 8
    p = Procedure(tmp_path, k)
    p.candidates(k)
    p.end("finished")
    got = worst(tmp_path, TRAIN)
    assert got == pytest.approx(selected(rdp_of([seg()])), rel=1e-9)
    # eight candidates compose to far more than their selection; the selection to more than one run
    assert got < 0.7 * composed(*[seg()] * k) and got > composed(seg())
    # the scored records: the selection of one score release each (never the training's epsilon)
    assert worst(tmp_path, SCORED) == pytest.approx(selected(rdp_of([RELEASE])), rel=1e-9)
    summary = charges(tmp_path, TRAIN).worst.total
    assert summary["selection_procedures"] == 1 and summary["accountant"] == "rdp"


@pytest.mark.parametrize(("ran", "status"), [(1, "finished"), (3, "ended")])
def test_the_charge_is_fixed_before_k_is_drawn(tmp_path, ran, status):
    """K = 1, or a procedure that ended after 3 candidates: still the selection bound, though the composition of
    what ran is smaller here (choosing the smaller after seeing K would condition on the procedure's randomness)."""
    p = Procedure(tmp_path, 1 if status == "finished" else 8)
    p.candidates(ran)
    p.end(status, scores=ran)
    got = worst(tmp_path, TRAIN)
    assert got == pytest.approx(selected(rdp_of([seg()])), rel=1e-9)
    if ran == 1:
        assert got > composed(seg())


def test_the_worst_grid_point_is_charged_whichever_points_were_drawn(tmp_path):
    p = Procedure(tmp_path, 4, grid_steps=(STEPS, 2 * STEPS))
    p.candidates(4)  # every candidate drew the cheaper point
    p.end("finished")
    assert worst(tmp_path, TRAIN) == pytest.approx(selected(rdp_of([seg(2 * STEPS)])), rel=1e-9)


def test_a_candidate_worse_than_its_grid_is_charged_its_own_ledger(tmp_path):
    p = Procedure(tmp_path, 4)
    p.candidates(1, steps=3 * STEPS)  # not what the grid said a candidate would spend
    p.end("finished")
    assert worst(tmp_path, TRAIN) == pytest.approx(selected(rdp_of([seg(3 * STEPS)])), rel=1e-9)


def test_only_fresh_attempts_in_listed_dirs_before_its_last_line_are_candidates(tmp_path):
    k = 8
    p = Procedure(tmp_path, k)
    p.candidates(k)
    p.end("finished")
    curve = selection_rdp(rdp_of([seg()]), DIST)
    # a run trained later into a listed dir, one into an unlisted candidate dir, one beside the procedure's dir
    run(tmp_path, "tune/candidate-001b", TRAIN, steps=STEPS)
    run(tmp_path, "elsewhere/candidate-000", TRAIN, steps=STEPS)
    assert worst(tmp_path, TRAIN) == pytest.approx(
        rdp_to_epsilon(curve + rdp_of([seg(), seg()]), delta=DELTA)[0], rel=1e-9)


def test_a_crashed_procedures_candidate_recorded_after_its_last_line_is_a_run(tmp_path):
    p = Procedure(tmp_path, 8)
    with p.running():
        p.candidates(3)
        # running: all three are its candidates
        assert worst(tmp_path, TRAIN) == pytest.approx(selected(rdp_of([seg()])), rel=1e-9)
    # the process died after its third candidate: the third was recorded after the line listing it
    curve = selection_rdp(rdp_of([seg()]), DIST)
    assert worst(tmp_path, TRAIN) == pytest.approx(rdp_to_epsilon(curve + rdp_of([seg()]), delta=DELTA)[0],
                                                   rel=1e-9)


def test_compose_runs_without_procedures_is_unchanged(tmp_path):
    k = 4
    p = Procedure(tmp_path, k)
    p.candidates(k)
    p.end("finished")
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


def test_candidates_budget_checks_charge_the_procedure_not_the_runs(tmp_path):
    p = Procedure(tmp_path, 8)
    with p.running():
        p.candidates(5)
        sel = worst(tmp_path, TRAIN)
        budget = (sel + composed(*[seg()] * 6)) / 2  # above the selection, below six runs' composition
        p.spec["candidates"].append("candidate-005")
        p.led.record(p.entry())
        run(tmp_path, "tune/candidate-005", TRAIN, steps=STEPS, dataset_budget=budget)  # passes as a candidate
    with pytest.raises(UserError, match="dataset_budget"):  # a run of its own: past the budget
        run(tmp_path, "tune/candidate-006", TRAIN, steps=STEPS, dataset_budget=budget)
