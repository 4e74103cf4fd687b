"""``dpdiff plan``: what a privacy budget buys before anything is trained.

Given the number of privacy units N, a target (epsilon, delta), a compute budget (rows = batch x K x
steps, or minutes at a measured throughput) and the trainable-parameter count d, it calibrates the noise
multiplier for a grid of batch sizes and ranks them by the run's noise-to-signal ratio:

    per step:  the noise of the averaged gradient has norm sigma*C*sqrt(d)/B, while the clipped mean
               gradient has norm at most C (all unit gradients aligned), so  nsr_step = sigma*sqrt(d)/B;
    per run:   over T steps the signal adds up linearly and the noise as sqrt(T):
               nsr_run = sigma*sqrt(d) / (B*sqrt(T)).

These are lower bounds on the real ratio: the clipped mean is shorter than C by how much the units'
gradients agree, which the run measures and logs (``signal_norm``/``noise_norm`` in metrics.jsonl). When
sigma is large, sigma is about proportional to q*sqrt(T) at fixed epsilon, so nsr_run ~ sqrt(d)/(N*eps)
whatever B and T are (Sander et al. 2023, "TAN without a burn"): more units, fewer trainable weights and
a larger epsilon help; batch size and steps then mostly decide the compute. The warnings' thresholds
are measured on the built-in demo (README, benchmarks/utility_frontier.py).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass

from dpdiff.errors import UserError

# Calibrated on the built-in demo (LoRA rank 4, 75 steps of 512; benchmarks/results/utility_frontier_printed.md),
# as the share of the non-private run's utility reached: nsr_run 0.031 -> 86%, 0.045 -> 80% (epsilon 8),
# 0.070 -> 70%, 0.21 -> 65% (epsilon 1). Below NSR_RUN_LEARNS the run learned what most units share.
NSR_RUN_LEARNS = 0.05
# Not a measurement: where the noise over the run equals the largest possible signal (all unit gradients
# aligned). At 0.21 the demo still learned two thirds of the non-private utility; above 1 nothing can.
NSR_RUN_CANNOT = 1.0
# Prompt-specific content: the demo's new concepts (handwritten 5-9, ~160 units per caption) were not
# learned at epsilon 8 (3% vs 49% without privacy) where the printed look (~720 per caption) was.
MIN_UNITS_PER_PROMPT = 300


@dataclass(frozen=True, kw_only=True)
class PlanRow:
    batch_size: int
    steps: int
    sample_rate: float
    noise_multiplier: float
    epsilon: float
    noise_std_per_coordinate: float  # sigma*C/B, of the averaged gradient
    nsr_step: float
    nsr_run: float
    rows: int

    def to_dict(self) -> dict:
        return asdict(self)


def noise_to_signal(*, noise_multiplier: float, batch_size: float, steps: int, trainable: int) -> tuple[float, float]:
    """(per step, over the run) ratio of the noise norm to the largest possible clipped-mean norm."""
    step = noise_multiplier * math.sqrt(trainable) / batch_size
    return step, step / math.sqrt(max(steps, 1))


def candidate(*, num_units: int, batch_size: int, steps: int, target_epsilon: float, delta: float,
              accountant: str, trainable: int, max_grad_norm: float, augmult: int) -> PlanRow:
    from dpdiff.privacy.accountants import MechanismSegment, calibrate_noise_multiplier, get_accountant

    q = batch_size / num_units
    acc = get_accountant(accountant)
    sigma = calibrate_noise_multiplier(target_epsilon=target_epsilon, delta=delta, sample_rate=q, steps=steps,
                                       accountant=acc)
    eps = acc.epsilon(history=[MechanismSegment(sigma, q, steps)], delta=delta).epsilon
    step, run = noise_to_signal(noise_multiplier=sigma, batch_size=batch_size, steps=steps, trainable=trainable)
    return PlanRow(batch_size=batch_size, steps=steps, sample_rate=q, noise_multiplier=sigma, epsilon=eps,
                   noise_std_per_coordinate=sigma * max_grad_norm / batch_size, nsr_step=step, nsr_run=run,
                   rows=batch_size * steps * augmult)


def plan_grid(*, num_units: int, target_epsilon: float, delta: float, rows_budget: int, trainable: int,
              max_grad_norm: float = 0.01, augmult: int = 1, accountant: str = "rdp", min_steps: int = 50,
              batch_sizes: list[int] | None = None) -> list[PlanRow]:
    """Candidates at the same compute: for each batch size B, T = rows_budget / (B*K) steps (at least
    ``min_steps``: fewer updates do not train), sorted by the run's noise-to-signal ratio."""
    if num_units < 2:
        raise UserError(f"{num_units} privacy units: DP-SGD needs many more")
    sizes = batch_sizes or [b for b in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
                            if b <= num_units // 2]
    out = []
    for b in sizes:
        steps = rows_budget // (b * augmult)
        if steps < min_steps:
            continue
        try:
            out.append(candidate(num_units=num_units, batch_size=b, steps=int(steps), target_epsilon=target_epsilon,
                                 delta=delta, accountant=accountant, trainable=trainable,
                                 max_grad_norm=max_grad_norm, augmult=augmult))
        except ValueError:
            continue  # no sigma reaches the target at this batch size
    if not out:
        raise UserError(f"no batch size gives at least {min_steps} steps within {rows_budget} rows: raise the "
                        "compute budget (steps or minutes) or lower privacy.augmult")
    return sorted(out, key=lambda r: r.nsr_run)


def assess(*, nsr_run: float, units_per_prompt: float | None) -> list[str]:
    """Plain-words warnings for a plan (empty when nothing stands in the way)."""
    out = []
    if nsr_run >= NSR_RUN_CANNOT:
        out.append(f"cannot learn: the noise over the whole run (ratio {nsr_run:.2f}) exceeds the largest possible "
                   "signal; use fewer trainable weights (a smaller adapter.rank, fewer target_modules), more "
                   "privacy units, or a larger epsilon")
    elif nsr_run > NSR_RUN_LEARNS:
        out.append(f"weak: the run's noise-to-signal ratio {nsr_run:.2f} is above {NSR_RUN_LEARNS} (where the demo "
                   "reached 80% of its non-private utility); expect what most units share, not detail")
    if units_per_prompt is not None and units_per_prompt < MIN_UNITS_PER_PROMPT:
        out.append(f"few units per prompt ({units_per_prompt:.0f} on median): DP fine-tuning adapts what all units "
                   "share (a look, a domain), but a new concept per caption needs far more units at this epsilon")
    return out


def units_per_prompt(captions: list[str]) -> float | None:
    """Median number of units per distinct caption (captions are private: computed locally)."""
    if not captions:
        return None
    counts = sorted(Counter(captions).values())
    return float(counts[len(counts) // 2])


def run_plan(*, num_units: int, batch_size: float, steps: int, noise_multiplier: float, max_grad_norm: float,
             trainable: int, captions: list[str] | None = None) -> dict:
    """The plan a run actually ran with (for privacy.json and the report)."""
    step, run = noise_to_signal(noise_multiplier=noise_multiplier, batch_size=batch_size, steps=steps,
                                trainable=trainable)
    upp = units_per_prompt(captions or [])
    return {"trainable_parameters": int(trainable), "noise_std_per_coordinate": noise_multiplier * max_grad_norm
            / batch_size, "nsr_step": step, "nsr_run": run, "units_per_prompt": upp,
            "warnings": assess(nsr_run=run, units_per_prompt=upp)}


# The demo's measured schedule (benchmarks/results/utility_frontier_printed.md): 75 steps at an expected batch of
# 512 of its 3,600 training units with lr 2e-2 learned the private look at epsilon 8. Re-measured on 900 units
# (benchmarks/results/auto_defaults.md, epsilon 8): keeping the batch (512 x 75, q = 0.57) reached 0.80x the
# non-private look rate at the same steps (right digit 0.86), keeping the demo's q instead (128 x 75) 0.64x (0.81):
# at a fixed epsilon and steps a larger batch lowers the noise per averaged gradient sigma*C/B (Sander et al. 2023),
# so ``auto`` keeps the demo's batch and steps, the batch capped at 0.6 N (a power of two).
AUTO_BATCH = 512
AUTO_STEPS = 75
AUTO_MAX_SAMPLE_RATE = 0.6


def auto_schedule(*, num_units: int) -> dict:
    """``train.batch_size=auto`` / ``train.max_steps=auto``: the demo's batch (512) and steps (75), the batch at most
    0.6 N rounded down to a power of two. Depends on N alone, which is public."""
    if num_units < 2:
        raise UserError(f"{num_units} privacy units: too few to train on")
    cap = 2 ** int(math.floor(math.log2(max(AUTO_MAX_SAMPLE_RATE * num_units, 1.0))))
    b = int(min(AUTO_BATCH, cap))
    return {"batch_size": b, "max_steps": AUTO_STEPS,
            "rule": f"the demo's batch {AUTO_BATCH} (at most {AUTO_MAX_SAMPLE_RATE:g} N, a power of two) and "
                    f"{AUTO_STEPS} steps, for N={num_units} (N is public)"}


@dataclass(frozen=True, kw_only=True)
class SearchPlan:
    """A scaled-down search configuration and the full-size one it stands for (Sander et al. 2023, "TAN without a
    burn", Section 4: at a fixed number of steps, a DP-SGD run's utility tracks sigma/B, so hyper-parameters found at
    batch B/k with noise sigma/k carry over to (B, sigma) at about 1/k of the compute per candidate).

    The scaled run is a *simulation* of the full run's noise, not a private run: its own sigma is k times smaller, so
    trained on the private data it spends ``search_epsilon`` (charged to the dataset ledger like any run). TAN runs
    its searches on the private data and leaves this cost out; here it is stated, and the way to avoid it is to
    search on data the user may spend freely (public data of the same kind, or a set that is not private)."""

    scale: int
    full: PlanRow
    search_batch_size: int
    search_noise_multiplier: float
    search_epsilon: float  # what one search run costs if trained on these N units
    compute_ratio: float   # rows of one search candidate / rows of one full-size candidate

    def search_overrides(self) -> list[str]:
        return [f"train.batch_size={self.search_batch_size}", f"train.max_steps={self.full.steps}",
                f"privacy.noise_multiplier={self.search_noise_multiplier:.6g}", "privacy.target_epsilon=null"]

    def full_overrides(self) -> list[str]:
        return [f"train.batch_size={self.full.batch_size}", f"train.max_steps={self.full.steps}"]


def search_plan(full: PlanRow, *, scale: int, num_units: int, delta: float, accountant: str) -> SearchPlan:
    """Scale ``full`` down by ``scale`` at the same sigma/B and steps. The scaled batch is rounded to an integer and
    the noise multiplier follows the rounded batch exactly, so sigma'/B' == sigma/B."""
    from dpdiff.privacy.accountants import MechanismSegment, get_accountant

    if scale < 2:
        raise UserError(f"--search-scale must be at least 2 (the batch is divided by it), got {scale}")
    b = full.batch_size // scale
    if b < 1:
        raise UserError(f"--search-scale {scale} leaves no batch: the full-size batch is {full.batch_size}")
    sigma = full.noise_multiplier * b / full.batch_size
    eps = get_accountant(accountant).epsilon(history=[MechanismSegment(sigma, b / num_units, full.steps)],
                                             delta=delta).epsilon
    return SearchPlan(scale=scale, full=full, search_batch_size=b, search_noise_multiplier=sigma,
                      search_epsilon=float(eps), compute_ratio=b / full.batch_size)
