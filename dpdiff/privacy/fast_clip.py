"""Two-pass per-unit clipping: per-unit norms layer by layer, then one reweighted backward; and the ghost-norm
helpers it shares with the one-pass book-keeping engine (``bookkeeping.py``, which ``auto`` prefers).

Materialising per-unit gradients of every UNet weight at once (the single-pass engine) needs
``units x parameters`` floats: impossible for a full SD UNet. Opacus' fast gradient clipping
(Lee & Kifer 2021; Bu et al. 2022, "ghost clipping") avoids it with two backward passes; it
clips *rows*, though, and dpdiff clips *units* (K augmentation draws, or all images of a user).
This engine generalises it to units:

pass 1 (hooks on, weight gradients skipped): for each layer in turn, per-row gradients (Opacus'
    per-layer formulas) are summed per unit with the rows' weights, their squared norms
    accumulated per unit, and discarded, so at most one layer's per-unit gradients exist at a
    time. For ``nn.Linear`` and ``nn.Conv2d`` (on unfolded patches) the *ghost norm* is used instead
    when cheaper (the per-layer rule of Bu et al.'s "MixOpt", ``ghost_is_cheaper``):
    ||sum_r w_r B_r^T A_r||^2 = sum((A_u A_u^T) * (B_u B_u^T)) over the unit's stacked tokens, cost
    (n T)^2 (i + o) against n T i o for materialising.
pass 2 (hooks off): backward of sum_r w_r c_u(r) loss_r, with c_u = min(1, C/(||g_u|| + 1e-6)),
    leaves exactly sum_u c_u g_u in ``p.grad``: the clipped sum the single-pass engine computes.

Noise, the all-reduce and the normalisation are the single-pass engine's (``DPSGDEngine.finalize``).
Exactness is tested against the same naive per-unit loop.

Non-finite units. A unit whose norm from pass 1 is NaN or inf gets c_u = 0 (``clipping.clip_factors``),
but pass 2 cannot simply run with it: its rows' activations or backprops may be NaN/inf, and the
weight gradient autograd forms, a sum over *all* rows of backprop x activation, would carry
0 * NaN = NaN into every unit's contribution. For such a micro-batch pass 2 is instead a second
hooked backward (to the layers' outputs only) of the same reweighted loss, in which each layer's
weight gradient is formed from its activations and backprops with the bad units' rows *selected
away* (``torch.where``) first: exactly sum_u c_u g_u over the finite units, with no re-forward
(rows are independent through the network, the assumption every per-sample rule already makes).

Shared layers. A layer (or a parameter) used twice in one forward has gradient g1 + g2 per unit,
but per-layer norms would add ||g1||^2 + ||g2||^2 (a tiny model clips to 1.41 C): it is refused,
as the single-pass engine refuses it.
"""

from __future__ import annotations

import torch
from torch import nn

from dpdiff.privacy import clipping
from dpdiff.privacy.engine import DPSGDEngine, reduce_rows_to_units, refuse_shared


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
    """What the engines with per-layer ghost norms share: the ``ghost`` policy (``auto``: the cheaper per layer;
    ``always``: every ghost-capable layer; ``never``: instantiate everything; the last two are for tests), the
    parameter index, the per-layer norm step and the clip step."""

    def __init__(self, model: nn.Module, *, noise_multiplier: float, max_grad_norm: float,
                 expected_batch_size: float, noise_generator: torch.Generator,
                 params: list[nn.Parameter] | None = None, ghost: str = "auto"):
        super().__init__(model, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                         expected_batch_size=expected_batch_size, noise_generator=noise_generator, params=params)
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


class TwoPassDPSGDEngine(GhostNormEngine):
    def __init__(self, model: nn.Module, **kw):
        super().__init__(model, **kw)
        self.ghost_layers = 0
        self.materialised_layers = 0
        self._pass = "norms"  # which backward the output hooks are in: norms | reweighted | masked
        self._row_ok: torch.Tensor | None = None

    def _on_layer(self, module, acts, backprops) -> None:
        """Pass 1: this layer's contribution to every unit's squared gradient norm."""
        if self._pass == "reweighted":  # the output hooks fire again in an autograd pass 2: nothing to do
            return
        if self._pass == "masked":
            self._add_masked_layer_grads(module, acts, backprops)
            return
        if self._add_layer_norms(module, acts, backprops) is None:
            self.ghost_layers += 1
        else:
            self.materialised_layers += 1

    def _add_masked_layer_grads(self, module, acts, backprops) -> None:
        """Masked pass 2: this layer's sum over the finite units' rows of backprop x activation.

        The backprops are those of sum_r w_r c_u(r) loss_r, so the sum over rows is this layer's part
        of sum_u c_u g_u. Rows of non-finite units are replaced by zeros *before* any product, so
        their NaN/inf never reaches a sum over rows.
        """
        acts = [select_rows(a, self._row_ok) for a in acts]
        backprops = select_rows(backprops, self._row_ok)
        if isinstance(module, (nn.Linear, nn.Conv2d)):  # formed as autograd does, instead of per-row gradients
            grads = weight_gradient(module, acts[0], backprops)
        else:
            grads = {p: gs.to(torch.float32).sum(0)
                     for p, gs in self.hooks.per_row_grads(module, acts, backprops).items()}
        for p, g in grads.items():
            i = self._index.get(id(p))
            if i is not None and p.requires_grad:
                self._summed[i] += g

    def backward(self, row_loss: torch.Tensor, *, unit_pos: torch.Tensor, row_weight: torch.Tensor,
                 num_units: int) -> None:
        assert self._step_open, "call start_step() first"
        if row_loss.numel() == 0:
            return
        self._start_micro_batch(unit_pos, row_weight, num_units)
        self._pass = "norms"
        self.hooks.backward_to_outputs(row_loss.sum(), retain_graph=True)  # pass 1: norms only
        norms, factor, finite = self._clip()
        weights = (row_weight.to(torch.float32) * factor[unit_pos]).to(row_loss.dtype)
        try:
            self._sums()
            if bool(finite.all()):
                for p in self.params:
                    p.grad = None
                self._pass = "reweighted"
                (row_loss * weights).sum().backward()  # pass 2: sum_u c_u g_u in p.grad
                for acc, p in zip(self._summed, self.params):
                    if p.grad is not None:
                        acc += p.grad.to(torch.float32)
                    p.grad = None
            else:
                self._pass = "masked"
                self._row_ok = finite[unit_pos]
                self.hooks.backward_to_outputs((row_loss * weights).sum())
        finally:
            self._pass = "norms"
            self._row_ok = None
        self.stats.add(row_loss=row_loss, norms=norms, num_units=num_units)
