"""Canaries for the one-run privacy audit (Steinke, Nasr, Jagielski, NeurIPS 2023).

``probes.audit.canaries=m`` creates m out-of-distribution canaries (random smooth-noise textures
with unique random-letter captions), includes each in training independently with probability
1/2 (seeded; the draw is recorded in ``canaries.json``), each as its own privacy unit. After
training, each canary is scored by its base-calibrated loss (L_base - L_finetuned); the top
k+ are guessed "in" and the bottom k- "out", and the number of correct guesses becomes an
epsilon lower bound at the configured confidence (``dpdiff.probes.audit``). If that lower bound
exceeds the accountant's epsilon, the implementation leaks more than it claims: verdict FAIL; if
the bound could not have exceeded it (its ceiling is below the claim), INCONCLUSIVE.

White-box gradient canaries (opt-in, ``dpdiff.privacy.gradient_canaries``): Dirac canaries in gradient space
(Steinke et al. 2023, Sec. 6; Nasr et al. 2023, "Tight Auditing of Differentially Private Machine
Learning"). Canary i is a privacy unit whose clipped gradient is ``C e_{j_i}`` (one coordinate of
the flattened trainable parameters, distinct per canary); it joins each step's Poisson sample
with the same rate q as every unit when its coin says "in". The auditor reads the noisy summed
gradient of every step (the mechanism's released output, so all-iterates access is within the DP
guarantee) at the canary coordinates and scores canary i by the log likelihood ratio of the
subsampled Gaussian, ``sum_t log(1 - q + q exp((x_t - 1/2) / sigma^2))`` with ``x_t`` the
coordinate over C: the Neyman-Pearson test of this mechanism, so far easier to detect than data
canaries read from the last model's loss. The canaries are scored *beside* the released sum, never
added to it: after the noise of each step the engine calls ``observe``, which draws each canary's
Poisson coin (rate q, from a full-entropy stream of its own) and reads ``released + C [joined]`` at its
coordinate. That is exactly the value the released sum would hold had the canary been a trained unit (same
noise draw), so the audit's statistic is unchanged, while the weights the user ships are those of the
user's data alone (an audit must not change the model it audits). Then ``save``; the audit reads
``gradient_canaries.json``.

Canaries change the training set (N grows by the included ones); the dataset fingerprint and
the per-dataset ledger still describe the user's own data, and the report names the canaries.
"""

from __future__ import annotations

import io
import string
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from dpdiff.errors import UserError
from dpdiff.io import write_json_atomic
from dpdiff.schema import required


def canary_image(rng: np.random.Generator, size: int) -> Image.Image:
    """A random texture: smooth colour noise at a random scale plus a random stripe pattern."""
    cells = int(rng.integers(3, 9))
    low = rng.random((cells, cells, 3))
    img = Image.fromarray((low * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) / 255
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle, freq = rng.random() * np.pi, rng.integers(2, 6)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy))
    arr = np.clip(0.7 * arr + 0.3 * stripes[..., None] * rng.random(3), 0, 1)
    return Image.fromarray((arr * 255).astype(np.uint8))


def canary_caption(rng: np.random.Generator, words: int = 3, letters: int = 4) -> str:
    alphabet = np.array(list(string.ascii_lowercase))
    return " ".join("".join(rng.choice(alphabet, letters)) for _ in range(words))


@dataclass
class CanarySettings:
    count: int = 0
    seed: int = 0
    inclusion_prob: float = 0.5
    records: list = field(default_factory=list)  # the canary ImageRecords, once created
    included: list = field(default_factory=list)  # bools, one per canary

    @classmethod
    def from_config(cls, probes_cfg) -> CanarySettings:
        audit = probes_cfg.get("audit") or {}
        m = required(audit, "canaries") or 0
        if not isinstance(m, int) or m < 0:
            raise UserError(f"probes.audit.canaries={m}: must be an integer >= 0")
        if m == 1:
            raise UserError("probes.audit.canaries=1: an audit needs many canaries (hundreds for a useful bound)")
        return cls(count=m, seed=int(required(audit, "seed") or 0))

    def insert(self, data, *, run_dir: Path, seed: int, resolution: int | None = None):
        """Return a copy of ``data`` (PreparedData) with the included canaries added as training units."""
        from dpdiff.data.records import ImageRecord

        size = resolution or _guess_size(data)
        rng = np.random.default_rng([self.seed, seed, 0xCA4A])
        used = {r.text for r in data.records}
        canary_dir = Path(run_dir) / "canaries"
        canary_dir.mkdir(parents=True, exist_ok=True)
        records, included, meta = [], [], []
        for i in range(self.count):
            img = canary_image(rng, size)
            cap = canary_caption(rng)
            while cap in used:
                cap = canary_caption(rng)
            used.add(cap)
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            key = f"canary-{i:04d}"
            img.save(canary_dir / f"{key}.png")
            records.append(ImageRecord(key=key, text=cap, user_id=key, image_bytes=buf.getvalue()))
            inc = bool(rng.random() < self.inclusion_prob)
            included.append(inc)
            meta.append({"key": key, "caption": cap, "included": inc})
        self.records, self.included = records, included
        write_json_atomic(Path(run_dir) / "canaries.json",
                          {"count": self.count, "seed": self.seed, "inclusion_prob": self.inclusion_prob,
                           "resolution": size, "canaries": meta})
        n0 = len(data.records)
        all_records = list(data.records) + records
        new_units = [(n0 + i,) for i in range(self.count)]
        units = data.units.extended(new_units, [r.key for r in records])
        u0 = len(data.units)
        train = sorted(list(data.train_units) + [u0 + i for i, inc in enumerate(included) if inc])
        return replace(data, records=all_records, units=units, train_units=train,
                       canary_records=list(range(n0, n0 + self.count)))

    def summary(self) -> dict | None:
        if not self.count:
            return None
        return {"count": self.count, "included": int(sum(self.included)), "seed": self.seed,
                "note": "out-of-distribution canaries were added to training for the one-run audit"}


def _guess_size(data) -> int:
    rec = next((r for r in data.records), None)
    if rec is None:
        return 32
    return min(rec.open().size)


def load_canaries(run_dir: Path) -> dict | None:
    import json

    p = Path(run_dir) / "canaries.json"
    return json.loads(p.read_text()) if p.exists() else None
