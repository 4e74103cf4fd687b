"""The privacy ledger of a *dataset*: every run ever trained on it, composed.

Each run on a dataset (identified by its content fingerprint) appends its mechanism to a JSON-lines
ledger: once when it starts (the *planned* steps, so a crash never under-counts) and once when it
ends (the steps actually taken). The latest line of a run supersedes its earlier ones. ``dpdiff
budget DATASET`` composes every run's history with one accountant: the total epsilon that the
data has been exposed to across fine-tunings, sweeps and retries. A non-private run makes it
infinite, and says so.

Location: ``privacy.dataset_ledger`` if set; else ``.dpdiff-ledger.jsonl`` in the dataset folder
when writable; else ``$DPDIFF_HOME/ledgers/<fingerprint>.jsonl``.

Composition across runs is over add/remove-one-unit neighbours. Runs may use different units:
a user-level guarantee implies the same example-level one, so the total is stated per user only
when every run was user-level, per example otherwise.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from dpdiff.io import append_jsonl
from dpdiff.privacy.accountants import MechanismSegment, get_accountant

LEDGER_NAME = ".dpdiff-ledger.jsonl"


def ledger_path(*, data_root: Path, fingerprint: str, configured: str | None = None) -> Path:
    from dpdiff.paths import home

    if configured:
        return Path(configured).expanduser()
    root = Path(data_root)
    if root.is_dir() and os.access(root, os.W_OK):
        return root / LEDGER_NAME
    return home() / "ledgers" / f"{fingerprint}.jsonl"


def candidate_paths(data_root: Path, fingerprint: str) -> list[Path]:
    from dpdiff.paths import home

    return [Path(data_root) / LEDGER_NAME, home() / "ledgers" / f"{fingerprint}.jsonl"]


@dataclass
class RunEntry:
    run_id: str
    fingerprint: str
    status: str  # planned | finished
    dp: bool
    privacy_unit: str
    delta: float | None
    accountant: str | None
    segments: list[MechanismSegment]
    epsilon: float | None
    time: str

    def to_dict(self) -> dict:
        return {"run_id": self.run_id, "fingerprint": self.fingerprint, "status": self.status, "dp": self.dp,
                "privacy_unit": self.privacy_unit, "delta": self.delta, "accountant": self.accountant,
                "segments": [s.to_dict() for s in self.segments], "epsilon": self.epsilon, "time": self.time}

    @classmethod
    def from_dict(cls, d: dict) -> RunEntry:
        return cls(run_id=d["run_id"], fingerprint=d["fingerprint"], status=d["status"], dp=bool(d["dp"]),
                   privacy_unit=d.get("privacy_unit", "example"), delta=d.get("delta"), accountant=d.get("accountant"),
                   segments=[MechanismSegment(**s) for s in d.get("segments", [])], epsilon=d.get("epsilon"),
                   time=d.get("time", ""))


class DatasetLedger:
    def __init__(self, path: Path):
        self.path = Path(path)

    def entries(self, fingerprint: str | None = None) -> list[RunEntry]:
        """The latest entry of each run (optionally only for one dataset fingerprint)."""
        if not self.path.exists():
            return []
        latest: dict[str, RunEntry] = {}
        for line in self.path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                e = RunEntry.from_dict(json.loads(line))
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a torn last line after a crash
            if fingerprint is None or e.fingerprint == fingerprint:
                latest[e.run_id] = e
        return list(latest.values())

    def record(self, entry: RunEntry) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        append_jsonl(self.path, entry.to_dict())
        if new:
            os.chmod(self.path, 0o600)


def compose(entries: list[RunEntry], *, delta: float, accountant: str = "pld") -> dict:
    """Total epsilon at ``delta`` of all runs' mechanisms composed."""
    if any(not e.dp for e in entries):
        return {"epsilon": math.inf, "delta": delta, "runs": len(entries), "unit": "example",
                "note": "a non-private run trained on this dataset: no finite guarantee remains"}
    hist = [s for e in entries for s in e.segments]
    eps = get_accountant(accountant).epsilon(history=hist, delta=delta).epsilon if hist else 0.0
    unit = "user" if entries and all(e.privacy_unit == "user" for e in entries) else "example"
    return {"epsilon": eps, "delta": delta, "runs": len(entries), "unit": unit, "accountant": accountant,
            "steps": sum(s.steps for s in hist)}


def entry_for_run(*, run_id: str, fingerprint: str, status: str, dp: bool, unit: str, delta: float | None,
                  accountant: str | None, segments: list[MechanismSegment]) -> RunEntry:
    eps = None
    if dp and segments and delta:
        eps = get_accountant(accountant).epsilon(history=segments, delta=delta).epsilon
    return RunEntry(run_id=run_id, fingerprint=fingerprint, status=status, dp=dp, privacy_unit=unit, delta=delta,
                    accountant=accountant, segments=list(segments), epsilon=eps,
                    time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
