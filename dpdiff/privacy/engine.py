"""The DP-SGD step: per-unit gradients, clipping, one Gaussian noise draw, normalisation.

What one logical step computes (Abadi et al. 2016, with the unit-level grouping of DPDM,
Dockhorn et al. 2023, "noise multiplicity", and user-level DP, McMahan et al. 2018)::

    g_u   = sum_{rows r of unit u} w_r * grad loss_r        w_r = 1/(rows of u): the mean over the
                                                            unit's images and K augmentation draws
    g~_u  = g_u * min(1, C / (||g_u|| + 1e-6))              one clipped gradient per privacy unit
                                                            (``clipping.clip_factors``); 0 if
                                                            ||g_u|| is NaN or inf
    G     = sum_u g~_u  (+ all-reduce over ranks)
    g^    = (G + N(0, sigma^2 C^2 I)) / (q * N)             noise drawn once in total (rank 0);
                                                            q*N the exact expected batch size

Per-row gradients come from Opacus' per-layer formulas (activations x backprops of a summed
loss, so row r's gradient is that of its own loss), evaluated in a tensor hook per layer and
summed per unit at once. Unlike Opacus' ``DPOptimizer``, which clips every batch row, rows are
summed per unit *before* clipping; norms are computed in fp32 whatever the parameter dtype
(clipped with bf16 norms, unit gradients overshoot C). A logical
batch is fed in micro-batches of whole units; ``finalize`` is called once per logical step, also
for an empty batch (noise only, still accounted). Opacus' clip formula and the one-rank noise of
its ``DistributedDPOptimizer`` are followed on purpose, so results compare with Opacus runs.

A unit whose gradient is not finite (NaN or inf anywhere, e.g. from a corrupt image or an
overflow) contributes exactly zero, selected away with ``torch.where`` so that no other unit's
contribution changes, and is counted in the step's ``nonfinite_units`` statistic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from dpdiff.privacy import clipping


@dataclass
class StepStats:
    """Non-private diagnostics of one logical step (for the data owner; not DP-protected)."""

    units: int = 0
    rows: int = 0
    loss_sum: float = 0.0  # over the rows whose loss is finite
    loss_rows: int = 0
    norms: list[float] = field(default_factory=list)  # the finite per-unit gradient norms
    nonfinite_units: int = 0  # units whose gradient was NaN/inf: they contributed zero

    def add(self, *, row_loss: torch.Tensor, norms: torch.Tensor | None, num_units: int) -> None:
        """Record one micro-batch: its row losses and (DP engines) its per-unit gradient norms."""
        loss = row_loss.detach()
        finite_loss = torch.isfinite(loss)
        self.units += num_units
        self.rows += int(loss.numel())
        self.loss_sum += float(loss[finite_loss].sum())
        self.loss_rows += int(finite_loss.sum())
        if norms is not None:
            finite = torch.isfinite(norms)
            self.norms += norms[finite].tolist()
            self.nonfinite_units += int((~finite).sum())

    def summary(self, max_grad_norm: float | None) -> dict:
        out = {"units": self.units, "rows": self.rows,
               "loss": self.loss_sum / self.loss_rows if self.loss_rows else float("nan")}
        if max_grad_norm is not None:  # DP engines: clipping diagnostics
            out["nonfinite_units"] = self.nonfinite_units
            if self.norms:
                t = torch.tensor(self.norms)
                out.update(grad_norm_median=float(t.median()),
                           clip_fraction=float((t > max_grad_norm).float().mean()))
        return out


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class LayerHooks:
    """Per-layer backward callbacks for every layer with trainable parameters.

    A forward hook keeps the layer's inputs and registers a tensor hook on its output; during
    backward that hook hands ``(layer, inputs, grad_output)`` to ``callback``. This is the
    mechanism of Opacus' hooks (per-layer activations x backprops) with a tensor hook instead of
    ``register_full_backward_hook`` (which wraps every input and output in an extra autograd node)
    and without Opacus' per-row buffers: the callback reduces rows to units at once. The per-layer
    per-row gradient formulas are Opacus' own (``GradSampleModule.GRAD_SAMPLERS``).
    """

    def __init__(self, model: nn.Module, callback):
        from opacus.grad_sample import GradSampleModule

        self.samplers = GradSampleModule.GRAD_SAMPLERS
        self.layers = [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
        bad = sorted({type(m).__name__ for m in self.layers if type(m) not in self.samplers})
        if bad:
            raise ValueError(
                f"per-sample gradients are not supported for trainable layers of type {', '.join(bad)} "
                "(Opacus has no exact per-sample rule for them); freeze them or choose another adapter")
        self.callback = callback
        self.enabled = False
        self.outputs: list[torch.Tensor] = []
        self.handles = [m.register_forward_hook(self._forward) for m in self.layers]

    def _forward(self, module, inputs, output):
        if not self.enabled or not torch.is_grad_enabled():
            return
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            raise RuntimeError(f"trainable layer {type(module).__name__} produced an output without grad")
        acts = [x.detach() for x in inputs if isinstance(x, torch.Tensor)]
        output.register_hook(lambda grad, m=module, a=acts: self.callback(m, a, grad.detach()))
        self.outputs.append(output)

    def per_row_grads(self, module, acts, backprops) -> dict:
        return self.samplers[type(module)](module, acts, backprops)

    def backward_to_outputs(self, loss: torch.Tensor, *, retain_graph: bool = False) -> None:
        """Backward only as far as the hooked layers' outputs: the callbacks fire, and the weight
        gradients that DP-SGD replaces by per-unit ones are never computed."""
        outs, self.outputs = self.outputs, []
        torch.autograd.backward(loss, inputs=outs, retain_graph=retain_graph)
        for o in outs:
            o.grad = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.outputs = []


def reduce_rows_to_units(gs: torch.Tensor, unit_pos: torch.Tensor, row_weight: torch.Tensor,
                         num_units: int) -> torch.Tensor:
    """sum_r w_r g_r per unit, in fp32 ([R, ...] -> [U, ...])."""
    gs = gs.to(torch.float32)
    if num_units == gs.shape[0] and bool((unit_pos == torch.arange(num_units, device=unit_pos.device)).all()) \
            and bool((row_weight == 1).all()):
        return gs  # one row per unit (K=1, example-level): nothing to sum
    ug = torch.zeros((num_units, *gs.shape[1:]), dtype=torch.float32, device=gs.device)
    ug.index_add_(0, unit_pos, gs * row_weight.to(torch.float32).view(-1, *([1] * (gs.dim() - 1))))
    return ug


class DPSGDEngine:
    """Turns per-row losses of micro-batches into one privatised gradient per logical step.

    Single pass: in backward, each trainable layer's per-row gradients are summed per unit at
    once (so memory holds per-*unit* gradients, K times fewer than per-row ones with augmentation
    multiplicity), their squared norms accumulated; then every unit is clipped and the clipped
    gradients summed.
    """

    def __init__(self, model: nn.Module, *, noise_multiplier: float, max_grad_norm: float,
                 expected_batch_size: float, noise_generator: torch.Generator,
                 params: list[nn.Parameter] | None = None):
        if max_grad_norm <= 0:
            raise ValueError("max_grad_norm must be > 0")
        if expected_batch_size <= 0:
            raise ValueError("expected_batch_size must be > 0")
        if noise_multiplier < 0:
            raise ValueError("noise_multiplier must be >= 0")
        self.model = model
        self.params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.expected_batch_size = float(expected_batch_size)
        self.noise_generator = noise_generator
        self.param_groups: dict[str, list[int]] = {}  # name -> indices into params, for the SNR statistics
        self.gradient_canaries = None  # an opt-in audit (dpdiff.probes.canaries.GradientCanaryHook)
        self.hooks = LayerHooks(model, self._on_layer)
        self._summed: list[torch.Tensor] | None = None
        self._unit_grads: dict = {}
        self.stats = StepStats()

    def close(self) -> None:
        self.hooks.remove()

    def _on_layer(self, module, acts, backprops) -> None:
        for p, gs in self.hooks.per_row_grads(module, acts, backprops).items():
            if not p.requires_grad:
                continue
            if p in self._unit_grads:
                raise RuntimeError(f"{type(module).__name__} ran twice in one forward; per-unit gradients of "
                                   "shared layers are not supported")
            ug = reduce_rows_to_units(gs, self._unit_pos, self._row_weight, self._num_units)
            self._unit_grads[p] = ug
            self._sq_norms += ug.flatten(1).pow(2).sum(1)

    # --- one logical step -------------------------------------------------------------
    def start_step(self) -> None:
        """Begin a logical step: the forwards of its micro-batches run with the hooks on."""
        self._summed = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        self.stats = StepStats()
        for p in self.params:
            p.grad = None
        self.hooks.outputs = []
        self.hooks.enabled = True

    def _per_unit_pass(self, row_loss, unit_pos, row_weight, num_units) -> torch.Tensor:
        """Backward with the hooks on; returns the per-unit gradient norms."""
        self._unit_pos, self._row_weight, self._num_units = unit_pos, row_weight, num_units
        self._sq_norms = torch.zeros(num_units, dtype=torch.float32, device=row_loss.device)
        self._unit_grads = {}
        self.hooks.backward_to_outputs(row_loss.sum())
        return self._sq_norms.sqrt()

    def backward(self, row_loss: torch.Tensor, *, unit_pos: torch.Tensor, row_weight: torch.Tensor,
                 num_units: int) -> None:
        """Backward one micro-batch of whole units and add its clipped unit gradients.

        ``row_loss[r]`` is row r's loss; row r belongs to unit ``unit_pos[r]`` (0..num_units-1)
        and counts with weight ``row_weight[r]`` (the rows of a unit weigh 1 in total). The forward
        that produced ``row_loss`` must have run after ``start_step()``.
        """
        assert self._summed is not None, "call start_step() first"
        if row_loss.numel() == 0:
            return  # never forward/backward an empty batch (diffusers' attention crashes)
        norms = self._per_unit_pass(row_loss, unit_pos, row_weight, num_units)
        missing = [p for p in self.params if p not in self._unit_grads]
        if missing:
            raise RuntimeError(
                f"{len(missing)} trainable parameter(s) received no per-unit gradient; was the forward run after "
                "engine.start_step(), and the model moved to its device before the engine attached?")
        factor = clipping.clip_factors(norms=norms, max_grad_norm=self.max_grad_norm)
        finite = torch.isfinite(norms)
        for acc, p in zip(self._summed, self.params):
            ug = clipping.zero_nonfinite_units(unit_grads=self._unit_grads[p], finite=finite)
            acc += torch.einsum("u,u...->...", factor, ug)
        self._unit_grads = {}
        self.stats.add(row_loss=row_loss, norms=norms, num_units=num_units)

    def finalize(self) -> dict:
        """Sum the clipped gradients over ranks, add the noise once (rank 0) to that global sum, give every
        rank the same noisy sum, normalise by q*N and write ``p.grad`` (fp32 -> p.dtype).

        Rank 0 also measures, per parameter group, the norm of the clipped mean (the signal) against the
        norm of the noise added to it: a non-private statistic, logged for the data owner to see whether a
        run can learn (a ratio far below 1 at every step means the update is mostly noise).
        """
        assert self._summed is not None, "call start_step() first"
        self.hooks.enabled = False
        self.hooks.outputs = []
        std = self.noise_multiplier * self.max_grad_norm
        distributed = _dist_ready()
        if distributed:  # the noise-free global sum, identical on every rank
            for acc in self._summed:
                dist.all_reduce(acc, op=dist.ReduceOp.SUM)
        main = not distributed or dist.get_rank() == 0
        signal_sq = [float(acc.pow(2).sum()) for acc in self._summed] if main else []
        noise_sq = [0.0] * len(self._summed)
        if main and self.gradient_canaries is not None:
            self.gradient_canaries.inject(self._summed, generator=self.noise_generator)
        for i, acc in enumerate(self._summed):
            if main and std > 0:
                z = torch.normal(0.0, std, size=acc.shape, generator=self.noise_generator, device=acc.device,
                                 dtype=torch.float32)
                noise_sq[i] = float(z.pow(2).sum())
                acc += z
            if distributed:  # rank 0's noisy sum to every rank: one noise draw in total
                dist.broadcast(acc, src=0)
        if main and self.gradient_canaries is not None:
            self.gradient_canaries.observe(self._summed)
        for p, acc in zip(self.params, self._summed):
            p.grad = (acc / self.expected_batch_size).to(p.dtype)
        self._summed = None
        out = self.stats.summary(self.max_grad_norm)
        if main:
            out.update(signal_to_noise(signal_sq, noise_sq, groups=self.param_groups,
                                       expected_batch_size=self.expected_batch_size))
        return out


def signal_to_noise(signal_sq: list[float], noise_sq: list[float], *, groups: dict[str, list[int]],
                    expected_batch_size: float) -> dict:
    """``signal_norm`` (of the clipped mean gradient), ``noise_norm`` (of the noise in the averaged gradient) and
    their ratio ``snr``, overall and as ``snr/<group>`` per parameter group (squared norms per tensor in)."""
    def ratio(s: float, n: float) -> float:
        return math.sqrt(s) / math.sqrt(n) if n > 0 else math.inf

    s, n = sum(signal_sq), sum(noise_sq)
    out = {"signal_norm": math.sqrt(s) / expected_batch_size, "noise_norm": math.sqrt(n) / expected_batch_size,
           "snr": ratio(s, n)}
    for name, idx in groups.items():
        out[f"snr/{name}"] = ratio(sum(signal_sq[i] for i in idx), sum(noise_sq[i] for i in idx))
    return out


class NonPrivateEngine:
    """The same interface without privacy: the plain mean gradient over the batch's units.

    Used for ``privacy=none`` baselines so that DP and non-DP runs share one training loop.
    """

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

    def finalize(self) -> dict:
        units = torch.tensor([float(self.stats.units)])
        if _dist_ready():
            dist.all_reduce(units)
        total = max(float(units.item()), 1.0)
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if _dist_ready():
                dist.all_reduce(p.grad)
            p.grad /= total
        return self.stats.summary(None)


def expected_noise_std(*, noise_multiplier: float, max_grad_norm: float, expected_batch_size: float) -> float:
    """Std of each coordinate of the privatised mean gradient's noise: sigma*C/(q*N)."""
    return noise_multiplier * max_grad_norm / expected_batch_size if expected_batch_size > 0 else math.inf
