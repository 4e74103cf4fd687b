"""The privacy ledger of a *dataset*: every training attempt ever run on it, composed.

An *attempt* is one process run of ``dpdiff finetune`` (a fresh run, or one resume of a run). Each
attempt appends lines to the dataset's JSON-lines ledger: when it starts (its *planned* steps, so a
crash never under-counts) and when it ends (the steps it actually took). The latest line of an
attempt supersedes its earlier ones. An attempt is charged only its *own* steps: a resumed attempt
inherits its parent's ledger (counted by the parent's entry) and adds what it spends itself. When a
run is resumed after a crash, the resuming attempt corrects the crashed attempt's "planned" line to
the steps that attempt really spent (its run ledger is saved after every step, and the run dir's
lock proves it is no longer running). So every spend is counted exactly once: two runs into one run
dir, two resumes from one checkpoint, a crash and its resume.

The dataset is identified by two fingerprints: ``source_fingerprint`` (every record the folder
lists, as read, before any file is skipped or deduplicated: what ``dpdiff budget DATASET``
computes) and ``fingerprint`` (the records actually trained on). Both the in-run budget check and
``dpdiff budget`` read the same ledger files (``ledger_location``) and match either fingerprint.

``compose_runs`` is the one cross-run composer (the in-run ``privacy.dataset_budget`` check,
``dpdiff budget`` and the sweep report all call it): every attempt's mechanism history composed by
one accountant. It is valid because every attempt draws its noise and sampling masks from fresh
entropy (``dpdiff.privacy.randomness``); a non-private attempt, or several attempts of which one used
seeded (reproducible) noise, leave no finite guarantee, and the total says so.

Composition is over add/remove-one-unit neighbours. Runs may use different units: a user-level
guarantee implies the same example-level one, so the total is stated per user only when every run
was user-level, per example otherwise.
"""

from __future__ import annotations

import json
import math
import os
import time as _time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dpdiff.io import append_jsonl
from dpdiff.privacy.accountants import DEFAULT_ACCOUNTANT, MechanismSegment, get_accountant

LEDGER_NAME = ".dpdiff-ledger.jsonl"


@dataclass(frozen=True, kw_only=True)
class LedgerLocation:
    """Where a dataset's ledger is written, and every file where entries of it may be found."""

    write: Path
    read: tuple[Path, ...]


def ledger_location(*, data_root: Path, source_fingerprint: str, configured: str | None = None) -> LedgerLocation:
    """``privacy.dataset_ledger`` if set; else ``.dpdiff-ledger.jsonl`` in the dataset folder when writable;
    else ``$DPDIFF_HOME/ledgers/<source fingerprint>.jsonl``. Reads always cover all of them."""
    from dpdiff.paths import home

    root = Path(data_root)
    in_folder = root / LEDGER_NAME
    in_home = home() / "ledgers" / f"{source_fingerprint}.jsonl"
    if configured:
        write = Path(configured).expanduser()
    elif root.is_dir() and os.access(root, os.W_OK):
        write = in_folder
    else:
        write = in_home
    read = tuple(dict.fromkeys([write, in_folder, in_home]))
    return LedgerLocation(write=write, read=read)


@dataclass(frozen=True, kw_only=True)
class AttemptEntry:
    attempt_id: str
    run_id: str  # the lineage: the run dir where the run began
    run_dir: str
    fingerprint: str  # the records trained on
    source_fingerprint: str  # the dataset as listed
    status: str  # planned | finished | ended (a crashed attempt, corrected by its resume)
    dp: bool
    privacy_unit: str
    delta: float | None
    accountant: str | None
    segments: tuple[MechanismSegment, ...] = ()  # this attempt's own steps, none inherited
    reproducible_noise: bool = False
    parent_attempt: str | None = None
    epsilon: float | None = None  # of this attempt's own steps (display only)
    time: str = ""
    seq: int = field(default_factory=_time.time_ns)

    @property
    def steps(self) -> int:
        return sum(s.steps for s in self.segments)

    def to_dict(self) -> dict:
        return {"attempt_id": self.attempt_id, "run_id": self.run_id, "run_dir": self.run_dir,
                "fingerprint": self.fingerprint, "source_fingerprint": self.source_fingerprint,
                "status": self.status, "dp": self.dp, "privacy_unit": self.privacy_unit, "delta": self.delta,
                "accountant": self.accountant, "segments": [s.to_dict() for s in self.segments],
                "reproducible_noise": self.reproducible_noise, "parent_attempt": self.parent_attempt,
                "epsilon": self.epsilon, "time": self.time, "seq": self.seq}

    @classmethod
    def from_dict(cls, d: dict) -> AttemptEntry:
        fp = d["fingerprint"]
        return cls(attempt_id=d.get("attempt_id") or d["run_id"], run_id=d["run_id"],
                   run_dir=d.get("run_dir", d["run_id"]), fingerprint=fp,
                   source_fingerprint=d.get("source_fingerprint") or fp, status=d["status"], dp=bool(d["dp"]),
                   privacy_unit=d.get("privacy_unit", "example"), delta=d.get("delta"),
                   accountant=d.get("accountant"),
                   segments=tuple(MechanismSegment(float(s["noise_multiplier"]), float(s["sample_rate"]),
                                                   int(s["steps"])) for s in d.get("segments", [])),
                   reproducible_noise=bool(d.get("reproducible_noise", False)),
                   parent_attempt=d.get("parent_attempt"), epsilon=d.get("epsilon"), time=d.get("time", ""),
                   seq=int(d.get("seq", 0)))


def make_entry(*, attempt_id: str, run_id: str, run_dir: str, fingerprint: str, source_fingerprint: str,
               status: str, dp: bool, privacy_unit: str, delta: float | None, accountant: str | None,
               segments: Sequence[MechanismSegment], reproducible_noise: bool = False,
               parent_attempt: str | None = None) -> AttemptEntry:
    """An entry with its own epsilon computed (for display) and the current time."""
    segs = tuple(s for s in segments if s.steps > 0)
    eps = None
    if dp and segs and delta and accountant:
        eps = get_accountant(accountant).epsilon(history=list(segs), delta=delta).epsilon
    elif dp:
        eps = 0.0
    return AttemptEntry(attempt_id=attempt_id, run_id=run_id, run_dir=run_dir, fingerprint=fingerprint,
                        source_fingerprint=source_fingerprint, status=status, dp=dp, privacy_unit=privacy_unit,
                        delta=delta, accountant=accountant, segments=segs, reproducible_noise=reproducible_noise,
                        parent_attempt=parent_attempt, epsilon=eps, time=_time.strftime("%Y-%m-%dT%H:%M:%S%z"))


class DatasetLedger:
    def __init__(self, location: LedgerLocation | Path):
        if not isinstance(location, LedgerLocation):
            location = LedgerLocation(write=Path(location), read=(Path(location),))
        self.location = location

    @property
    def path(self) -> Path:
        return self.location.write

    def entries(self, fingerprints: Iterable[str] | None = None) -> list[AttemptEntry]:
        """The latest line of every attempt in any of the ledger files (optionally of given fingerprints)."""
        fps = set(fingerprints) if fingerprints is not None else None
        latest: dict[str, AttemptEntry] = {}
        for path in self.location.read:
            if not path.exists():
                continue
            for n, line in enumerate(path.read_text().splitlines()):
                if not line.strip():
                    continue
                try:
                    e = AttemptEntry.from_dict(json.loads(line))
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    continue  # a torn last line after a crash
                if fps is not None and not ({e.fingerprint, e.source_fingerprint} & fps):
                    continue
                if e.seq == 0:  # entries written before lines carried a sequence number: file order
                    e = AttemptEntry(**{**e.__dict__, "seq": n})
                old = latest.get(e.attempt_id)
                if old is None or e.seq >= old.seq:
                    latest[e.attempt_id] = e
        return sorted(latest.values(), key=lambda e: e.seq)

    def record(self, entry: AttemptEntry) -> None:
        path = self.location.write
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        append_jsonl(path, entry.to_dict())
        if new:
            os.chmod(path, 0o600)


def compose_runs(entries: Sequence, *, delta: float, accountant: str = DEFAULT_ACCOUNTANT) -> dict:
    """Total epsilon at ``delta`` of all the given runs' (or attempts') mechanisms composed.

    ``entries`` are objects with ``dp``, ``segments``, ``privacy_unit`` and ``reproducible_noise``
    (``AttemptEntry``, or the sweep report's rows). The one cross-run composer of dpdiff.
    """
    n = len(entries)
    if any(not e.dp for e in entries):
        return {"epsilon": math.inf, "delta": delta, "runs": n, "unit": "example", "accountant": accountant,
                "steps": None, "note": "a non-private run trained on this dataset: no finite guarantee remains"}
    if n > 1 and any(getattr(e, "reproducible_noise", False) for e in entries):
        return {"epsilon": math.inf, "delta": delta, "runs": n, "unit": "example", "accountant": accountant,
                "steps": None, "note": "a run with privacy.reproducible_noise=true (seeded noise) does not compose "
                                       "with other runs as an independent mechanism: no finite total"}
    hist = [s for e in entries for s in e.segments]
    eps = get_accountant(accountant).epsilon(history=hist, delta=delta).epsilon if hist else 0.0
    unit = "user" if entries and all(e.privacy_unit == "user" for e in entries) else "example"
    return {"epsilon": eps, "delta": delta, "runs": n, "unit": unit, "accountant": accountant,
            "steps": sum(s.steps for s in hist), "note": None}
