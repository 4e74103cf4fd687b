"""Ghost norms per layer: the helpers and the base engine that the book-keeping engine (``bookkeeping.py``)
builds on.

Materialising per-unit gradients of every UNet weight at once (the single-pass ``hooks`` engine) needs
``units x parameters`` floats: impossible for a full SD UNet. Opacus' fast gradient clipping (Lee & Kifer
2021; Bu et al. 2022, "ghost clipping") avoids it; it clips *rows*, though, and dpdiff clips *units* (K
augmentation draws, or all images of a user). Here, in the backward, for each layer in turn, per-row
gradients (Opacus' per-layer formulas) are summed per unit with the rows' weights and their squared norms
accumulated per unit; for ``nn.Linear`` and ``nn.Conv2d`` (on unfolded patches) the *ghost norm* is used
instead when cheaper (the per-layer rule of Bu et al.'s "MixOpt", ``ghost_is_cheaper``):
||sum_r w_r B_r^T A_r||^2 = sum((A_u A_u^T) * (B_u B_u^T)) over the unit's stacked tokens, cost (n T)^2 (i + o)
against n T i o for materialising.

A two-pass engine (norms, then a reweighted second autograd backward) was retired: a weight also used through a
functional call outside its module received a second-pass gradient that pass 1 never measured (a unit's
contribution reached 2C at C = 1), and it did the book-keeping engine's work plus a second backward.

Shared layers. A layer (or a parameter) used twice in one forward has gradient g1 + g2 per unit,
but per-layer norms would add ||g1||^2 + ||g2||^2 (a tiny model clips to 1.41 C): it is refused,
as the single-pass engine refuses it.
"""

from __future__ import annotations

import torch
from torch import nn

from dpdiff.privacy import clipping
from dpdiff.privacy.engines.hooks import DPSGDEngine, reduce_rows_to_units, refuse_shared
from dpdiff.privacy.randomness import GaussianNoise


def ghost_capable(module: nn.Module) -> bool:
    """Layers whose per-unit gradient norm has a ghost form here: ``nn.Linear`` (Li et al. 2022), and
    ``nn.Conv2d`` without groups and with numeric zero padding, as a linear layer on unfolded patches (Bu et al.
    2022, "Scalable and efficient training of large convolutional neural networks with differential privacy")."""
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


def as_token_matrices(module: nn.Module, act: torch.Tensor, backprops: torch.Tensor):
    """A ghost-capable layer's input and output gradient as ``[R, T, i]`` and ``[R, T, o]`` (fp32): the layer is
    then ``out[r, t] = W a[r, t] (+ b)`` for every row r and token t (Conv2d: patches, unfolded as Opacus does)."""
    rows = backprops.shape[0]
    if isinstance(module, nn.Conv2d):
        from opacus.utils.tensor_utils import unfold2d

        a = unfold2d(act.to(torch.float32), kernel_size=module.kernel_size, padding=module.padding,
                     stride=module.stride, dilation=module.dilation).transpose(1, 2)
        b = backprops.to(torch.float32).reshape(rows, module.out_channels, -1).transpose(1, 2)
        return a, b
    return (act.to(torch.float32).reshape(rows, -1, module.in_features),
            backprops.to(torch.float32).reshape(rows, -1, module.out_features))


def ghost_is_cheaper(module: nn.Module, backprops: torch.Tensor, *, num_units: int) -> bool:
    """The per-layer rule of mixed ghost clipping (Bu et al. 2022, 2023): ghost norms cost ``(k T)^2 (i + o)`` per
    unit (T tokens or output pixels per row, k rows per unit), instantiated per-unit gradients ``k T i o``. The same
    ratio compares their memory: ``k T (i + o)`` for a unit's inputs and output gradients against ``i o`` for its
    gradient, so the cheaper choice in FLOPs is also the smaller one."""
    rows = backprops.shape[0]
    if isinstance(module, nn.Conv2d):
        tokens = backprops[0].numel() // module.out_channels
        i = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        o = module.out_channels
    else:
        tokens = backprops[0].numel() // backprops.shape[-1]  # T (1 for [R, o])
        i, o = module.in_features, module.out_features
    per_unit_tokens = tokens * max(rows / max(num_units, 1), 1.0)
    return per_unit_tokens * (i + o) < i * o


def ghost_sq_norms(a: torch.Tensor, b: torch.Tensor, *, unit_pos: torch.Tensor, row_weight: torch.Tensor,
                   num_units: int, weight: bool, bias: bool) -> torch.Tensor:
    """Squared norm of each unit's gradient ``sum_r w_r B_r^T A_r`` (weight) and ``sum_r w_r sum_t B_rt`` (bias)
    without forming it: ``sum((A_u A_u^T) * (B_u B_u^T))`` over the unit's stacked tokens (the ghost norm, Goodfellow
    2015; Li et al. 2022), for ``a`` ``[R, T, i]`` and ``b`` ``[R, T, o]``."""
    b = b * row_weight.to(torch.float32).view(-1, 1, 1)
    u = num_units
    out = torch.zeros(u, dtype=torch.float32, device=b.device)
    counts = torch.bincount(unit_pos, minlength=u)
    k = int(counts[0])
    regular = bool((counts == k).all()) and bool(
        (unit_pos == torch.arange(u, device=unit_pos.device).repeat_interleave(k)).all())
    if regular:  # every unit has k consecutive rows: one batched Gram product for all units
        au = a.reshape(u, -1, a.shape[-1])
        bu = b.reshape(u, -1, b.shape[-1])
        if weight:
            out += (torch.bmm(au, au.transpose(1, 2)) * torch.bmm(bu, bu.transpose(1, 2))).sum((1, 2))
        if bias:
            out += bu.sum(1).pow(2).sum(1)
        return out
    for j in range(u):
        sel = (unit_pos == j).nonzero().flatten()
        au = a[sel].reshape(-1, a.shape[-1])
        bu = b[sel].reshape(-1, b.shape[-1])
        if weight:
            out[j] += ((au @ au.T) * (bu @ bu.T)).sum()
        if bias:
            out[j] += bu.sum(0).pow(2).sum()
    return out


def select_rows(t: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """``t`` with the rows where ``ok`` is False replaced by zeros (selection: NaN/inf never multiply)."""
    return torch.where(ok.view(-1, *([1] * (t.dim() - 1))), t, t.new_zeros(()))


def weight_gradient(module: nn.Module, act: torch.Tensor, grad_out: torch.Tensor) -> dict:
    """The sum over rows of a Linear or Conv2d layer's parameter gradients for output gradient ``grad_out``, formed
    as autograd forms it (one matmul; ``torch.nn.grad.conv2d_weight``), in fp32."""
    act, grad_out = act.to(torch.float32), grad_out.to(torch.float32)
    grads = {}
    if isinstance(module, nn.Conv2d):
        if module.weight.requires_grad:
            grads[module.weight] = torch.nn.grad.conv2d_weight(
                act, module.weight.shape, grad_out, stride=module.stride, padding=module.padding,
                dilation=module.dilation, groups=module.groups)
        if module.bias is not None and module.bias.requires_grad:
            grads[module.bias] = grad_out.sum((0, 2, 3))
        return grads
    b = grad_out.reshape(-1, module.out_features)
    if module.weight.requires_grad:
        grads[module.weight] = b.T @ act.reshape(-1, module.in_features)
    if module.bias is not None and module.bias.requires_grad:
        grads[module.bias] = b.sum(0)
    return grads


class GhostNormEngine(DPSGDEngine):
    """What an engine with per-layer ghost norms needs: the ``ghost`` policy (``auto``: the cheaper per layer;
    ``always``: every ghost-capable layer; ``never``: instantiate everything; the last two are for tests), the
    parameter index, the per-layer norm step and the clip step."""

    def __init__(self, model: nn.Module, *, noise_multiplier: float, max_grad_norm: float,
                 expected_batch_size: float, noise: GaussianNoise,
                 params: list[nn.Parameter] | None = None, ghost: str = "auto",
                 param_groups: dict[str, list[int]] | None = None, gradient_canaries=None):
        super().__init__(model, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                         expected_batch_size=expected_batch_size, noise=noise, params=params,
                         param_groups=param_groups, gradient_canaries=gradient_canaries)
        if ghost not in ("auto", "always", "never"):
            raise ValueError("ghost must be auto, always or never")
        self.ghost = ghost
        self._index = {id(p): i for i, p in enumerate(self.params)}

    def _use_ghost(self, module, backprops) -> bool:
        if self.ghost == "never" or not ghost_capable(module):
            return False
        return self.ghost == "always" or ghost_is_cheaper(module, backprops, num_units=self._num_units)

    def _start_micro_batch(self, unit_pos, row_weight, num_units) -> None:
        super()._start_micro_batch(unit_pos, row_weight, num_units)
        self._sq_norms = torch.zeros(num_units, dtype=torch.float32, device=row_weight.device)

    def _add_layer_norms(self, module, acts, backprops) -> dict[nn.Parameter, torch.Tensor] | None:
        """In the norms backward: add this layer's part of every unit's squared gradient norm. Returns None when
        the ghost norm was used, else the layer's per-unit gradients (trainable parameters of this engine)."""
        refuse_shared(module, self._seen_params)
        if self._use_ghost(module, backprops):
            a, b = as_token_matrices(module, acts[0], backprops)
            self._sq_norms += ghost_sq_norms(
                a, b, unit_pos=self._unit_pos, row_weight=self._row_weight, num_units=self._num_units,
                weight=module.weight.requires_grad, bias=module.bias is not None and module.bias.requires_grad)
            return None
        unit_grads = {}
        for p, gs in self.hooks.per_row_grads(module, acts, backprops).items():
            if p.requires_grad:  # every trainable weight counts in the norm, as in the ghost norm (clips no less)
                ug = reduce_rows_to_units(gs, self._unit_pos, self._row_weight, self._num_units,
                                          identity=self._identity)
                self._sq_norms += ug.flatten(1).pow(2).sum(1)
                if id(p) in self._index:
                    unit_grads[p] = ug
        return unit_grads

    def _clip(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """After the norms backward: the units' norms, clip factors and finiteness."""
        # ghost norms are sums of Gram products: a zero gradient can come out at -1e-12, whose sqrt is NaN;
        # clamp_min keeps NaN (a non-finite unit) NaN
        norms = self._sq_norms.clamp_min(0.0).sqrt()
        return norms, clipping.clip_factors(norms=norms, max_grad_norm=self.max_grad_norm), torch.isfinite(norms)
