"""The engine of a non-private baseline (``privacy=none``): the interface of the DP engines without clipping or
noise, so DP and non-DP runs share one training loop."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from dpdiff.privacy.engines.hooks import StepStats, dist_ready


class NonPrivateEngine:
    """The same interface without privacy: the plain mean gradient over the batch's units.

    Used for ``privacy=none`` baselines so that DP and non-DP runs share one training loop.
    """

    kind = "none"

    def __init__(self, model: nn.Module, params: list[nn.Parameter] | None = None):
        self.model = model
        self.params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
        self.stats = StepStats()
        self.max_grad_norm = None

    def close(self) -> None:
        pass

    def start_step(self) -> None:
        self.stats = StepStats()
        for p in self.params:
            p.grad = None

    def backward(self, row_loss: torch.Tensor, *, unit_pos: torch.Tensor, row_weight: torch.Tensor,
                 num_units: int) -> None:
        if row_loss.numel() == 0:
            return
        (row_loss * row_weight).sum().backward()  # sum over units of each unit's mean loss
        self.stats.add(row_loss=row_loss, norms=None, num_units=num_units)

    def add_unit_vectors(self, unit_vectors: torch.Tensor, *, row_loss: torch.Tensor | None = None) -> None:
        """Per-unit vectors computed by the caller ([units, numel] in ``params`` order), summed unclipped."""
        if len(unit_vectors) == 0:
            return
        total = unit_vectors.detach().sum(0)
        start = 0
        for p in self.params:
            part = total[start : start + p.numel()].view(p.shape).to(p.dtype)
            p.grad = part.clone() if p.grad is None else p.grad + part
            start += p.numel()
        self.stats.add(row_loss=row_loss if row_loss is not None else torch.zeros(0), norms=None,
                       num_units=len(unit_vectors))

    def finalize(self) -> dict:
        units = torch.tensor([float(self.stats.units)])
        if dist_ready():
            dist.all_reduce(units)
        total = max(float(units.item()), 1.0)
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if dist_ready():
                dist.all_reduce(p.grad)
            p.grad /= total
        return self.stats.summary(None)
