"""The privacy ledger of a run: every DP-SGD step taken, persisted after each step and with each checkpoint.

The ledger holds the mechanism history (noise multiplier, sample rate, steps) and what is needed to
interpret it: the accountant, delta, the privacy unit and the fingerprint of the data the steps were
spent on. Epsilon is always recomputed from it, never stored alone, so a resumed run continues the
same composition and nothing is under-counted; a resume that would change the unit, delta or data
is refused (the history would describe another guarantee). ``attempts`` records where each process
that extended the ledger started (its attempt id and the ledger step it started at), so the dataset
ledger can charge every attempt exactly its own steps, also after a crash.
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
    privacy_unit: str = "example"
    dataset_fingerprint: str | None = None
    reproducible_noise: bool = False
    attempts: list[dict] = field(default_factory=list)  # [{"attempt_id": str, "start": ledger step}]

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

    def attempt_spans(self) -> list[tuple[str, int, int]]:
        """``(attempt_id, first step, end step)`` of every attempt recorded, in order."""
        out = []
        for i, a in enumerate(self.attempts):
            end = self.attempts[i + 1]["start"] if i + 1 < len(self.attempts) else self.steps
            out.append((str(a["attempt_id"]), int(a["start"]), int(end)))
        return out

    def to_dict(self) -> dict:
        return {"accountant": self.accountant, "delta": self.delta, "target_epsilon": self.target_epsilon,
                "privacy_unit": self.privacy_unit, "dataset_fingerprint": self.dataset_fingerprint,
                "reproducible_noise": self.reproducible_noise, "steps": self.steps,
                "segments": [s.to_dict() for s in self.segments], "attempts": list(self.attempts)}

    @classmethod
    def from_dict(cls, d: dict) -> PrivacyLedger:
        return cls(accountant=d["accountant"], delta=float(d["delta"]), target_epsilon=d.get("target_epsilon"),
                   segments=[MechanismSegment(float(s["noise_multiplier"]), float(s["sample_rate"]), int(s["steps"]))
                             for s in d["segments"]],
                   privacy_unit=d.get("privacy_unit", "example"), dataset_fingerprint=d.get("dataset_fingerprint"),
                   reproducible_noise=bool(d.get("reproducible_noise", False)),
                   attempts=list(d.get("attempts", [])))

    def save(self, path: Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> PrivacyLedger:
        return cls.from_dict(json.loads(Path(path).read_text()))


def slice_segments(segments: list[MechanismSegment], start: int, stop: int) -> list[MechanismSegment]:
    """The segments covering ledger steps ``start .. stop-1``."""
    out, pos = [], 0
    for s in segments:
        lo, hi = max(start, pos), min(stop, pos + s.steps)
        if hi > lo:
            out.append(MechanismSegment(s.noise_multiplier, s.sample_rate, hi - lo))
        pos += s.steps
    return out
