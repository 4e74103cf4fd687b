"""White-box gradient canaries for the one-run audit (Steinke, Nasr, Jagielski, NeurIPS 2023, Sec. 6; Nasr et al.
2023): Dirac canaries in gradient space, scored beside each step's released noisy sum. The audit that turns their
scores into an epsilon lower bound is ``dpdiff.probes.run`` (``run_audit``); the scoring lives here, in the privacy
layer, because it reads the mechanism's released output at every step (the clipping engine calls it after the
noise) and its rules are the mechanism's: the coins come from a full-entropy stream of their own
(``PrivacyRandomness.canary_rng``), DP runs only, never a resumed run (the scores live in the process that started
the run). ``PrivacyPlan.engine`` wires them; see ``dpdiff.probes.canaries`` for the method.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dpdiff.errors import UserError
from dpdiff.io import write_json_atomic


def check_gradient_canaries(count: int, *, dp: bool, resuming: bool) -> None:
    """The rules for ``probes.audit.gradient_canaries=count``: checked from the settings before any private data is
    read, and again by ``PrivacyPlan.engine`` where they are wired."""
    if count <= 0:
        return
    if not dp:
        raise UserError("probes.audit.gradient_canaries: gradient canaries audit a DP run's noisy sums; this run has "
                        "no privacy (privacy=none): set it to 0")
    if resuming:
        raise UserError("probes.audit.gradient_canaries: a resumed run cannot be audited with gradient canaries "
                        "(their scores live in the process that started the run); set it to 0 to resume")


class GradientCanaries:
    """White-box Dirac gradient canaries (module docstring). Keyword-only, seeded, no data needed.

    ``count`` canaries over ``num_params`` flattened trainable parameters: distinct coordinates and
    inclusion coins (probability 1/2) drawn from ``seed``. Per step, after the noise:
    ``observe(noisy_summed_grad, noise_multiplier=sigma, sample_rate=q, clip_norm=C, rng=rng)``: each included
    canary joins with probability q and is scored at ``released + C`` (module docstring). The canaries never
    enter the released sum, so they are not units of the mechanism. The score treats the other units' summed
    gradient at a canary coordinate as zero; where it is not, the score is noisier (a weaker audit), never
    invalid: the coins are drawn independently of everything else.
    """

    def __init__(self, *, count: int, num_params: int, seed: int):
        if count < 2:
            raise UserError(f"gradient canaries: count={count}, need at least 2 (hundreds for a useful bound)")
        if count > num_params:
            raise UserError(f"gradient canaries: count={count} exceeds the {num_params} trainable parameters")
        rng = np.random.default_rng([int(seed), 0x6AD])
        self.count = int(count)
        self.coordinates = np.sort(rng.choice(int(num_params), size=self.count, replace=False))
        self.included = rng.random(self.count) < 0.5
        self.scores = np.zeros(self.count)
        self.steps = 0
        self._coords_t = None

    def _coords(self, device):
        import torch

        if self._coords_t is None or self._coords_t.device != device:
            self._coords_t = torch.as_tensor(self.coordinates, dtype=torch.long, device=device)
        return self._coords_t

    def joined(self, *, sample_rate: float, rng: np.random.Generator) -> np.ndarray:
        """This step's coins: canary i joins when it is included and its Poisson coin (rate q) says so."""
        return (rng.random(self.count) < float(sample_rate)) & self.included

    def observe(self, noisy_summed_grad, *, noise_multiplier: float, sample_rate: float, clip_norm: float,
                rng: np.random.Generator) -> int:
        """Score this step: the released flat noisy *sum* (before any division by the batch size) at each canary
        coordinate, plus ``clip_norm`` for the canaries that joined (drawn here). Returns how many joined."""
        joined = self.joined(sample_rate=sample_rate, rng=rng)
        values = noisy_summed_grad.view(-1)[self._coords(noisy_summed_grad.device)].double().cpu().numpy()
        self.observe_values(values + float(clip_norm) * joined, noise_multiplier=noise_multiplier,
                            sample_rate=sample_rate, clip_norm=clip_norm)
        return int(joined.sum())

    def observe_values(self, values: np.ndarray, *, noise_multiplier: float, sample_rate: float,
                       clip_norm: float) -> None:
        """``observe`` given the noisy sum's values at the canary coordinates only."""
        x = np.asarray(values, dtype=np.float64) / float(clip_norm)
        q, var = float(sample_rate), float(noise_multiplier) ** 2
        if q >= 1.0:
            self.scores += (x - 0.5) / var
        else:
            self.scores += np.logaddexp(np.log1p(-q), np.log(q) + (x - 0.5) / var)
        self.steps += 1

    def to_json(self) -> dict:
        return {"count": self.count, "steps": self.steps, "coordinates": self.coordinates.tolist(),
                "included": self.included.tolist(), "scores": self.scores.tolist()}

    def save(self, run_dir: Path) -> Path:
        path = Path(run_dir) / "gradient_canaries.json"
        write_json_atomic(path, self.to_json())
        return path


def load_gradient_canaries(run_dir: Path) -> dict | None:
    """``gradient_canaries.json`` of a run (None when the run had no gradient canaries)."""
    import json

    p = Path(run_dir) / "gradient_canaries.json"
    return json.loads(p.read_text()) if p.exists() else None


class GradientCanaryHook:
    """Connects ``GradientCanaries`` to a DP engine's noise step, whose clipped sum is a list of tensors (one
    per trainable parameter): the canaries' flat coordinates are mapped onto (tensor, offset) once. The
    engine calls ``observe(tensors)`` after the noise, on the process that adds it; the coins come from ``rng``
    (``PrivacyRandomness.canary_rng``: full entropy, on the CPU whatever the device of the gradients)."""

    def __init__(self, canaries: GradientCanaries, *, shapes: list[tuple[int, ...]], noise_multiplier: float,
                 sample_rate: float, clip_norm: float, rng: np.random.Generator):
        sizes = np.array([int(np.prod(s)) for s in shapes], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        if int(sizes.sum()) <= int(canaries.coordinates.max()):
            raise ValueError("gradient canaries were drawn over more parameters than the engine trains")
        self.canaries, self.rng = canaries, rng
        self.tensor = np.searchsorted(starts, canaries.coordinates, side="right") - 1
        self.offset = canaries.coordinates - starts[self.tensor]
        self.noise_multiplier, self.sample_rate, self.clip_norm = noise_multiplier, sample_rate, clip_norm

    def observe(self, tensors) -> int:
        """Score this step beside the released noisy sum ``tensors`` (read only); returns how many joined."""
        joined = self.canaries.joined(sample_rate=self.sample_rate, rng=self.rng)
        values = np.array([float(tensors[int(t)].view(-1)[int(o)]) for t, o in zip(self.tensor, self.offset)])
        self.canaries.observe_values(values + self.clip_norm * joined, noise_multiplier=self.noise_multiplier,
                                     sample_rate=self.sample_rate, clip_norm=self.clip_norm)
        return int(joined.sum())
