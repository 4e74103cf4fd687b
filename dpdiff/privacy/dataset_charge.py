"""One training attempt's lines in the dataset's ledger (``dpdiff.privacy.dataset_ledger``): what the privacy plan
charges before training (the planned steps, on the records it trains on), after it (the steps taken), and, for a
run that failed before its first step, an empty entry that releases the planned charge. A resumed run first
corrects its crashed predecessors' planned lines to the steps their run ledger says they spent.

Kept apart from ``dpdiff.privacy.plan`` (which decides the mechanism) so that the plan is the mechanism and its
randomness, and this object the bookkeeping of one attempt across runs.
"""

from __future__ import annotations

import logging
from pathlib import Path

from dpdiff.privacy.accountants import MechanismSegment
from dpdiff.privacy.dataset_ledger import (
    DatasetLedger,
    RecordIds,
    charge_attempt,
    charges_summary,
    ledger_location,
    make_entry,
)
from dpdiff.privacy.ledger import PrivacyLedger, slice_segments

log = logging.getLogger("dpdiff")


class DatasetCharge:
    """The dataset-ledger lines of one attempt. ``ledger`` is the run's own privacy ledger (its steps grow as the
    attempt trains), ``ledger_start`` where this attempt's own steps begin in it."""

    def __init__(self, *, settings, dataset, mechanism, ledger: PrivacyLedger | None, run_dir: Path, run_id: str,
                 attempt_id: str, ledger_start: int, resumed: bool, reproducible_noise: bool, is_main: bool):
        self.settings, self.dataset, self.mechanism, self.ledger = settings, dataset, mechanism, ledger
        self.run_dir, self.run_id, self.attempt_id = Path(run_dir), run_id, attempt_id
        self.ledger_start, self.resumed, self.is_main = ledger_start, resumed, is_main
        self.reproducible_noise = reproducible_noise
        self.total: dict | None = None  # the worst-charged training record's total after the last charge
        self.dataset_ledger: DatasetLedger | None = None
        self._record_set: dict | None = None
        self._record_ids = None
        self._charged = False

    def _entry(self, *, status: str, segments, record_set: dict | None = None):
        m = self.mechanism
        return make_entry(attempt_id=self.attempt_id, run_id=self.run_id, run_dir=str(self.run_dir.resolve()),
                          fingerprint=self.dataset.fingerprint, source_fingerprint=self.dataset.source_fingerprint,
                          status=status, dp=self.settings.enabled, privacy_unit=self.settings.unit,
                          delta=m.delta if m else None, accountant=self.settings.accountant if m else None,
                          segments=segments, reproducible_noise=self.reproducible_noise,
                          parent_attempt=self._parent_attempt(),
                          record_set=record_set if record_set is not None else self._record_set)

    def _parent_attempt(self) -> str | None:
        if self.ledger is None or len(self.ledger.attempts) < 2:
            return None
        return str(self.ledger.attempts[-2]["attempt_id"])

    def charge(self, *, status: str) -> dict | None:
        """Record this attempt in the dataset's ledger: ``planned`` (all planned steps, before training) or
        ``finished`` (the steps taken). Main process only. Returns the worst-charged training record's total
        (``epsilon``) with the records carrying each charge (``records_charged``).

        ``planned`` charges the set of records this run trains on (``DatasetIdentity.record_ids``), under the
        ledger's lock, and refuses a run whose privacy unit differs from that of a DP attempt already charged to
        any of its records, or that would bring any of its records past ``privacy.dataset_budget``."""
        if not self.is_main:
            return None
        s = self.settings
        led = self.dataset_ledger = DatasetLedger(ledger_location(data_root=self.dataset.root,
                                                                  source_fingerprint=self.dataset.source_fingerprint,
                                                                  configured=s.dataset_ledger))
        if self._record_ids is None:
            ids = self.dataset.record_ids() if callable(self.dataset.record_ids) else self.dataset.record_ids
            self._record_ids = (ids if ids is None or isinstance(ids, RecordIds)
                                else RecordIds(digests=tuple(ids)))
        ids = self._record_ids
        per_record = ids is not None
        current = ids if per_record else [b"\0" * 32]  # unknown records: one stand-in, charged every attempt
        delta = float(s.dataset_delta or (self.mechanism.delta if self.mechanism else 1e-5))
        fps = {self.dataset.fingerprint, self.dataset.source_fingerprint}
        if status == "planned":
            own = ([MechanismSegment(self.mechanism.noise_multiplier, self.mechanism.sample_rate,
                                     max(self.mechanism.steps - self.ledger_start, 0))] if self.mechanism else [])
        else:
            own = slice_segments(self.ledger.segments, self.ledger_start, self.ledger.steps) if self.ledger else []

        def make(record_set: dict | None):
            if record_set is not None:
                self._record_set = record_set
            return self._entry(status=status, segments=own)

        charges = charge_attempt(led, make, current, delta=delta, accountant=s.accountant, unit=s.unit,
                                 planned=status == "planned", budget=s.dataset_budget,
                                 per_record=per_record,
                                 before=(lambda: self._correct_crashed_attempts(fps)) if status == "planned" else None)
        self._charged = True
        self.total = {**charges_summary(charges, per_record=per_record), "path": str(led.path)}
        return self.total

    def release(self) -> None:
        """A run that failed before its first step: its planned entry is replaced by an empty one (no steps, no
        records charged)."""
        if (self.is_main and self.dataset_ledger is not None and self._charged
                and (self.ledger is None or self.ledger.steps == self.ledger_start)):
            self.dataset_ledger.record(self._entry(status="ended", segments=[], record_set={"records": 0}))

    def _correct_crashed_attempts(self, fps: set[str]) -> None:
        """A resumed run's earlier attempts whose last line is still "planned" crashed (the run dir's lock is free):
        replace their planned steps by the steps their run ledger records they spent (in the ledger file holding
        the attempt, with the same record set)."""
        if not self.resumed or self.ledger is None:
            return
        latest = {e.attempt_id: e for e in self.dataset_ledger.entries(fps)}
        for attempt_id, start, end in PrivacyLedger.attempt_spans(self._inherited_ledger()):
            e = latest.get(attempt_id)
            if e is None or e.status != "planned":
                continue
            spent = slice_segments(self.ledger.segments, start, end)
            self.dataset_ledger.record(make_entry(
                attempt_id=attempt_id, run_id=e.run_id, run_dir=e.run_dir, fingerprint=e.fingerprint,
                source_fingerprint=e.source_fingerprint, status="ended", dp=e.dp, privacy_unit=e.privacy_unit,
                delta=e.delta, accountant=e.accountant, segments=spent, reproducible_noise=e.reproducible_noise,
                parent_attempt=e.parent_attempt, record_set=e.record_set), path=e.origin)
            log.info("dataset ledger: attempt %s ended after %d steps (its planned entry corrected)", attempt_id[:8],
                     end - start)

    def _inherited_ledger(self) -> PrivacyLedger:
        inherited = PrivacyLedger.from_dict(self.ledger.to_dict())
        inherited.attempts = inherited.attempts[:-1]
        inherited.segments = slice_segments(inherited.segments, 0, self.ledger_start)
        return inherited
