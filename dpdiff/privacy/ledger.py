"""The privacy ledger of a run: every DP-SGD step taken, persisted with each checkpoint.

The ledger holds the mechanism history (noise multiplier, sample rate, steps) and the
settings needed to interpret it. Epsilon is always recomputed from it, never stored alone,
so a resumed run continues the same composition and nothing is under-counted: the ledger
is written (atomically) *before* a checkpoint's weights, so a crash in between can only
over-count.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from dpdiff.io import write_json_atomic
from dpdiff.privacy.accountants import EpsilonReport, MechanismSegment, get_accountant


@dataclass
class PrivacyLedger:
    accountant: str
    delta: float
    target_epsilon: float | None
    segments: list[MechanismSegment] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return sum(s.steps for s in self.segments)

    def record_step(self, *, noise_multiplier: float, sample_rate: float) -> None:
        last = self.segments[-1] if self.segments else None
        if last and last.noise_multiplier == noise_multiplier and last.sample_rate == sample_rate:
            self.segments[-1] = MechanismSegment(noise_multiplier, sample_rate, last.steps + 1)
        else:
            self.segments.append(MechanismSegment(noise_multiplier, sample_rate, 1))

    def epsilon(self, delta: float | None = None) -> EpsilonReport:
        return get_accountant(self.accountant).epsilon(history=self.segments, delta=delta or self.delta)

    def to_dict(self) -> dict:
        return {"accountant": self.accountant, "delta": self.delta, "target_epsilon": self.target_epsilon,
                "steps": self.steps, "segments": [s.to_dict() for s in self.segments]}

    @classmethod
    def from_dict(cls, d: dict) -> PrivacyLedger:
        return cls(accountant=d["accountant"], delta=float(d["delta"]), target_epsilon=d.get("target_epsilon"),
                   segments=[MechanismSegment(float(s["noise_multiplier"]), float(s["sample_rate"]), int(s["steps"]))
                             for s in d["segments"]])

    def save(self, path: Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> PrivacyLedger:
        return cls.from_dict(json.loads(Path(path).read_text()))
