"""Per-unit gradient clipping: the one clip factor both DP-SGD engines use.

DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy", Algorithm 1) bounds each
unit's contribution by clipping its gradient to norm C: ``g~ = g / max(1, ||g|| / C)``. The
Gaussian mechanism's noise std ``sigma * C`` only covers a change of at most C in the clipped sum,
so *every* unit's clipped gradient must have norm <= C, whatever the data did to it.
"""

from __future__ import annotations

import torch

#: Added to the norm before dividing, as in Opacus (``DPOptimizer.clip_and_accumulate`` and the
#: fast-gradient-clipping module compute ``(C / (norm + 1e-6)).clamp(max=1)``), so that clipped
#: sums compare with Opacus runs and a zero gradient gives factor 1 without a division by zero.
CLIP_EPS = 1e-6


def clip_factors(*, norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """Per-unit clipping factors ``c_u = min(1, C / (||g_u|| + 1e-6))``; 0 where ``||g_u||`` is not finite.

    ``norms`` are the units' gradient norms ``||g_u||`` (any shape, computed in fp32 by the
    engines); ``max_grad_norm`` is C > 0. ``c_u * ||g_u|| <= C`` for every unit: this is the
    clipping of Abadi et al. 2016 (Algorithm 1, ``g / max(1, ||g||/C)``) with Opacus' ``+ 1e-6``
    (Opacus ``optimizers/optimizer.py``), which only ever clips slightly more.

    A NaN or infinite norm gets factor 0: the unit then contributes nothing, which is a valid
    clip (norm 0 <= C); a NaN factor would instead turn the whole clipped sum, and the model,
    into NaN, an outcome that depends on one unit's data and that the noise does not cover.
    Note ``0 * NaN`` is NaN: the caller must also *replace* such a unit's gradient by zeros
    (``torch.where``), not just multiply it by its factor (see :func:`zero_nonfinite_units`).
    """
    if not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
    norms = norms.to(torch.float32)
    factor = (max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)
    return torch.where(torch.isfinite(norms), factor, torch.zeros_like(factor))


def zero_nonfinite_units(*, unit_grads: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """``unit_grads`` ([U, ...]) with the units where ``finite`` ([U] bool) is False replaced by exact zeros.

    Selection, not multiplication: a unit's NaN/inf entries never reach the sum over units, so
    the other units' clipped contributions are exactly what they would be without it.
    """
    if bool(finite.all()):
        return unit_grads
    mask = finite.view(-1, *([1] * (unit_grads.dim() - 1)))
    return torch.where(mask, unit_grads, torch.zeros((), dtype=unit_grads.dtype, device=unit_grads.device))
