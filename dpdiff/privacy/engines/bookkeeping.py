"""Book-keeping per-unit clipping: exact DP-SGD for full fine-tuning in one backward pass.

Followed: Bu, Wang, Zha and Karypis 2023, "Differentially private optimization on large model at
small cost" (book-keeping, BK; fastDP's ``clipping_mode="MixOpt"``), generalised from rows to
dpdiff's privacy units (K augmentation draws, or all images of a user, per unit).

Opacus' ghost clipping runs two backward passes: one for the per-unit norms, one for the
reweighted loss. BK runs one. During it every trainable layer's unit-gradient
norms are computed from the layer's input A and output gradient B, and what is needed to form
the clipped gradient later is *kept* (book-kept); once the backward has given every unit's norm,
the clip factors c_u are known and each layer's clipped sum ``sum_u c_u g_u`` is formed at once:

    ghost     ghost norm (``fast_clip.ghost_sq_norms``: Linear, and Conv2d on unfolded patches), keep
              (A, B); clipped sum = ``B'^T A`` with B' = B scaled row by row by ``w_r c_u(r)``: one
              matmul (Linear) or one convolution weight gradient (Conv2d), the cost of autograd's own
              weight gradient. Cheaper when a unit has few tokens for the layer's size: the low-
              resolution convolutions and attention projections of a UNet.
    units     per-unit gradients instantiated (Opacus' per-layer formulas, rows summed per unit), their
              norms taken, the gradients kept; clipped sum = ``einsum(c, g_u)``. Cheaper for layers with
              many tokens per unit: high-resolution convolutions, LoRA factors, norms' affine weights.

The choice per layer is the mixed rule (``fast_clip.ghost_is_cheaper``); the same ratio compares the
memory of (A, B) with that of the per-unit gradients, so the cheaper choice is also the smaller
one, and no large layer's per-unit gradients are ever held (the single-pass ``hooks`` engine holds
all of them). Autograd never forms weight gradients (the backward stops at the layers' outputs).

Non-finite units: c_u = 0 (``clipping.clip_factors``), and their rows of A and B (or their
per-unit gradients) are *selected away* before any product, so 0 * NaN never reaches a sum over
rows. A layer that runs twice in one forward is refused (``engine.refuse_shared``).
"""

from __future__ import annotations

import torch
from torch import nn

from dpdiff.privacy import clipping
from dpdiff.privacy.engines.ghost import GhostNormEngine, select_rows, weight_gradient
from dpdiff.privacy.precision import exact_float32


class BookKeepingDPSGDEngine(GhostNormEngine):
    """One backward pass, per-layer ghost or instantiated unit-gradient norms, exact per-unit clipping.

    ``ghost``: as :class:`~dpdiff.privacy.fast_clip.GhostNormEngine` (``never``: the single-pass engine's arithmetic
    with per-layer book-keeping).
    """

    kind = "bookkeeping"

    def __init__(self, model: nn.Module, **kw):
        super().__init__(model, **kw)
        self.layer_choice: dict[str, int] = {"ghost": 0, "units": 0}  # of the last micro-batch, for the logs
        self._kept: list[tuple] = []

    def _on_layer(self, module, acts, backprops) -> None:
        """In the backward: this layer's part of every unit's squared norm, and what its clipped sum needs."""
        unit_grads = self._add_layer_norms(module, acts, backprops)
        if unit_grads is None:  # ghost norm: keep A and B as they came (the unfolded patches are not kept)
            self._kept.append(("ghost", module, acts[0], backprops))
            self.layer_choice["ghost"] += 1
        else:
            self._kept.append(("units", unit_grads))
            self.layer_choice["units"] += 1

    def backward(self, row_loss: torch.Tensor, *, unit_pos: torch.Tensor, row_weight: torch.Tensor,
                 num_units: int) -> None:
        assert self._step_open, "call start_step() first"
        if row_loss.numel() == 0:
            return
        self._start_micro_batch(unit_pos, row_weight, num_units)
        self._kept = []
        self.layer_choice = {"ghost": 0, "units": 0}
        try:
            self.hooks.backward_to_outputs(row_loss.sum())  # the one backward: norms, and A, B or g_u kept
            self._check_every_param_seen()
            with exact_float32():  # ghost norms and clipped sums at one precision (precision.py)
                norms, factor, finite = self._clip()
                row_ok, all_finite = finite[unit_pos], bool(finite.all())
                row_scale = torch.where(row_ok, row_weight.to(torch.float32) * factor[unit_pos], 0.0)
                self._sums()
                while self._kept:  # the clipped sum, layer by layer, releasing each layer's book-keeping as it goes
                    record = self._kept.pop()
                    if record[0] == "units":
                        for p, ug in record[1].items():
                            ug = clipping.zero_nonfinite_units(unit_grads=ug, finite=finite)
                            self._summed[self._index[id(p)]] += torch.einsum("u,u...->...", factor, ug)
                    else:
                        _, module, act, grad_out = record
                        if not all_finite:  # select the bad units' rows away before any product (0 * NaN is NaN)
                            act, grad_out = select_rows(act, row_ok), select_rows(grad_out, row_ok)
                        grad_out = grad_out.to(torch.float32) * row_scale.view(-1, *([1] * (grad_out.dim() - 1)))
                        for p, g in weight_gradient(module, act, grad_out).items():
                            if id(p) in self._index:  # a trainable weight outside ``params`` is not this engine's
                                self._summed[self._index[id(p)]] += g
        finally:
            self._kept = []
        self.stats.add(row_loss=row_loss, norms=norms, num_units=num_units)
