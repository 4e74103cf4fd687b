"""The training loop shared by DP and non-private runs.

One iteration is one *logical* step: the sampler draws this rank's units, their rows (all K
draws) are built at once, fed through the denoiser in micro-batches of whole units, the engine
turns them into one gradient (clipped, summed over ranks, noised once for DP), the optimizer
steps, and the step is recorded in the privacy ledger. Empty batches still step (noise only)
and are counted. Micro-batching only bounds memory: it changes neither q nor the noise.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from dpdiff.io import write_json_atomic
from dpdiff.privacy.plan import PrivacyPlan
from dpdiff.runtime import gather_objects
from dpdiff.training.checkpoint import save_checkpoint
from dpdiff.training.loss import DiffusionObjective, RowBatch

log = logging.getLogger("dpdiff")


def split_units(rows: RowBatch, max_units: int) -> list[RowBatch]:
    """Micro-batches of at most ``max_units`` whole units, in order."""
    out = []
    for start in range(0, rows.num_units, max_units):
        stop = min(start + max_units, rows.num_units)
        sel = ((rows.unit_pos >= start) & (rows.unit_pos < stop)).nonzero().flatten()
        out.append(rows.select(sel, unit_pos=rows.unit_pos[sel] - start, num_units=stop - start))
    return out


class Trainer:
    def __init__(self, *, denoiser, params, objective: DiffusionObjective, row_builder, sampler, engine, optimizer,
                 lr_scheduler, max_steps: int, micro_batch_size: int, run_dir: Path, tracker, device,
                 privacy: PrivacyPlan, ema=None, is_main: bool = True, log_every: int = 10,
                 checkpoint_every: int = 0, checkpoints_total_limit: int | None = None,
                 autocast_dtype: torch.dtype | None = None, start_step: int = 0, progress: bool = True):
        self.denoiser, self.params, self.objective = denoiser, params, objective
        self.row_builder, self.sampler, self.engine = row_builder, sampler, engine
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.max_steps, self.micro_batch_size = max_steps, micro_batch_size
        self.run_dir, self.tracker, self.device = Path(run_dir), tracker, device
        self.privacy, self.ema, self.is_main = privacy, ema, is_main
        self.log_every, self.checkpoint_every = log_every, checkpoint_every
        self.checkpoints_total_limit = checkpoints_total_limit
        self.autocast_dtype = autocast_dtype
        self.step = start_step
        self.progress = progress
        self.history: list[dict] = []
        self.last_lr = 0.0
        self.stopped_for_budget = False  # the loop stopped early because the plan refused one more step

    # ------------------------------------------------------------------------------------------
    def _micro_step(self, rows: RowBatch) -> None:
        rows = rows.to(self.device)
        if self.autocast_dtype is not None:
            with torch.autocast(device_type=torch.device(self.device).type, dtype=self.autocast_dtype):
                loss = self.objective.row_losses(self.denoiser, rows)
        else:
            loss = self.objective.row_losses(self.denoiser, rows)
        self.engine.backward(loss.float(), unit_pos=rows.unit_pos, row_weight=rows.row_weight,
                             num_units=rows.num_units)

    def train_step(self) -> dict:
        units = self.sampler.sample()
        self.engine.start_step()
        if units:
            rows = self.row_builder.build(units, step=self.step)
            for micro in split_units(rows, self.micro_batch_size):
                self._micro_step(micro)
        stats = self.engine.finalize()
        self.last_lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.privacy.record_step()
        if self.ema is not None:
            self.ema.step(self.params)
        self.step += 1
        return stats

    def run(self) -> None:
        from tqdm.auto import tqdm

        before = [p.detach().clone() for p in self.params] if self.step == 0 else None
        bar = tqdm(total=self.max_steps, initial=self.step, desc="training",
                   disable=not (self.is_main and self.progress),
                   dynamic_ncols=True)
        self.denoiser.train()
        t0 = time.time()
        while self.step < self.max_steps:
            if not self.privacy.may_step():
                self.stopped_for_budget = True
                log.warning("stopping at step %d: one more step would exceed privacy.target_epsilon", self.step)
                break
            stats = self.train_step()
            self.privacy.save_ledger()  # the spend is on disk before anything is logged
            if before is not None and self.last_lr > 0:
                self._check_weights_changed(before)
                before = None
            bar.update(1)
            if self.step % self.log_every == 0 or self.step == self.max_steps:
                metrics = {**stats, "lr": self.lr_scheduler.get_last_lr()[0],
                           "seconds": round(time.time() - t0, 3)}
                if self.privacy.ledger is not None and self.is_main:
                    metrics["epsilon"] = self.privacy.epsilon().epsilon
                bar.set_postfix(loss=f"{stats['loss']:.4f}", **({"eps": f"{metrics['epsilon']:.2f}"}
                                                                if "epsilon" in metrics else {}))
                self.tracker.log(metrics, step=self.step)
                self.history.append({"step": self.step, **metrics})
            if self.checkpoint_every and self.step % self.checkpoint_every == 0 and self.step < self.max_steps:
                self.checkpoint()
        bar.close()

    def _check_weights_changed(self, before: list[torch.Tensor]) -> None:
        """After the first step with lr > 0 the weights must differ (a silent no-update otherwise)."""
        live = {id(p) for p in self.denoiser.parameters() if p.requires_grad}
        held = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        if live != held:
            raise RuntimeError("the optimizer does not hold the denoiser's trainable parameters (the model was moved "
                               "or re-wrapped after the adapter was attached; opacus #820, peft #3409)")
        changed = any(not torch.equal(b, p.detach()) for b, p in zip(before, self.params))
        if not changed:
            raise RuntimeError(
                "the trainable weights did not change after the first step: the optimizer holds stale tensors "
                "(a model moved to its device after the adapter was attached; opacus #820, peft #3409)")

    def state(self) -> dict:
        """The resumable state; per-rank parts are gathered from every rank (collective).

        The privacy plan's part is its ledger and lineage. The noise and the Poisson sampler's RNG are never saved
        (a resume draws fresh entropy), except the sampler of a non-private run and, under
        ``privacy.reproducible_noise`` (debugging), both, for a bit-exact resume. The augmentation draws need no
        state: they are keyed by (run key, step, unit).
        """
        reproducible = self.privacy.mechanism is not None and self.privacy.reproducible_noise
        local = {"sampler": self.sampler.state_dict() if (self.privacy.mechanism is None or reproducible) else None}
        per_rank = gather_objects(local)
        noise = getattr(self.engine, "noise", None)
        return {**self.privacy.state_dict(), "world_size": len(per_rank), "ranks": per_rank,
                "noise": noise.state_dict() if reproducible and noise is not None else None}

    def checkpoint(self) -> Path | None:
        """Save a checkpoint (call on every rank: the RNG states are gathered; rank 0 writes)."""
        state = self.state()
        if not self.is_main:
            return None
        self.privacy.save_ledger()
        trainable = {n: p for n, p in self.denoiser.named_parameters() if p.requires_grad}
        path = save_checkpoint(self.run_dir, step=self.step, trainable=trainable, optimizer=self.optimizer,
                               lr_scheduler=self.lr_scheduler, state=state, ema=self.ema,
                               keep=self.checkpoints_total_limit)
        write_json_atomic(self.run_dir / "last_checkpoint.json", {"path": str(path), "step": self.step})
        return path
