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
from dpdiff.privacy.precision import exact_float32
from dpdiff.privacy.randomness import GaussianNoise


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


def dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class LayerHooks:
    """Per-layer backward callbacks for every layer with trainable parameters.

    A forward hook keeps the layer's inputs and registers a tensor hook on its output; during
    backward that hook hands ``(layer, inputs, grad_output)`` to ``callback``. This is the
    mechanism of Opacus' hooks (per-layer activations x backprops) with a tensor hook instead of
    ``register_full_backward_hook`` (which wraps every input and output in an extra autograd node)
    and without Opacus' per-row buffers: the callback reduces rows to units at once. The per-layer
    per-row gradient formulas are Opacus' own (``GradSampleModule.GRAD_SAMPLERS``; for ``nn.Linear``
    the same formula by :func:`linear_per_row_grads`).

    The backward must reach every hooked output but form no weight gradient (DP-SGD replaces them).
    ``autograd.backward(loss, inputs=outputs)`` would do it, but autograd then *clones* every output's
    gradient into ``.grad`` and keeps all of them to the end of the backward: a copy of every layer's
    output gradient (for a full UNet at 512 px, gigabytes). Instead the backward asks for the gradient
    of one zero scalar leaf, ``sink``, only: no weight is asked for and nothing is retained. Every
    hooked layer must lie on a path to the sink. A hooked layer one of whose inputs requires grad does:
    only trainable weights make a tensor require grad, every trainable weight belongs to a hooked
    layer, so that input descends from a hooked output, which (by induction) leads to the sink. A
    hooked layer none of whose inputs requires grad (the first layer; a LoRA factor on the text
    embeddings; the time embedding) gets ``output + sink`` (same value, same dtype). A UNet has a few
    such layers, so the sink costs a few adds and sums per step.
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
        self.sink: torch.Tensor | None = None
        self.sinks = 0  # hooked outputs joined to the sink since the last backward
        self.handles = [m.register_forward_hook(self._forward) for m in self.layers]

    def _forward(self, module, inputs, output):
        if not self.enabled or not torch.is_grad_enabled():
            return None
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            raise RuntimeError(f"trainable layer {type(module).__name__} produced an output without grad")
        tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
        acts = [x.detach() for x in tensors]
        out = None
        if not any(x.requires_grad for x in tensors):  # not downstream of another hooked layer: join the sink
            if self.sink is None or self.sink.device != output.device:
                self.sink = torch.zeros((), device=output.device, requires_grad=True)
            out = output = output + self.sink  # a 0-dim tensor keeps the output's dtype
            self.sinks += 1
        output.register_hook(lambda grad, m=module, a=acts: self._call(m, a, grad.detach()))
        return out

    def _call(self, module, acts, grad) -> None:
        with exact_float32():  # the per-unit products at the precision their norms are taken (precision.py)
            self.callback(module, acts, grad)

    def per_row_grads(self, module, acts, backprops) -> dict:
        if type(module) is nn.Linear:
            return linear_per_row_grads(module, acts[0], backprops)
        return self.samplers[type(module)](module, acts, backprops)

    def backward_to_outputs(self, loss: torch.Tensor, *, retain_graph: bool = False) -> None:
        """Backward only as far as the hooked layers' outputs: the callbacks fire, and the weight
        gradients that DP-SGD replaces by per-unit ones are never computed."""
        if self.sink is None or not self.sinks:
            raise RuntimeError("no hooked layer joined the sink in this forward: was it run after engine.start_step(), "
                               "and does no input of the model require grad?")
        torch.autograd.backward(loss, inputs=[self.sink], retain_graph=retain_graph)
        self.sink.grad = None
        if not retain_graph:
            self.sinks = 0

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def linear_per_row_grads(module: nn.Linear, act: torch.Tensor, backprops: torch.Tensor) -> dict:
    """Opacus' rule for ``nn.Linear`` (``compute_linear_grad_sample``: row r's weight gradient is
    ``sum_t B[r, t]^T A[r, t]``), with the batched product oriented by shape: ``[o, T] x [T, i]`` with ``i << o``
    (a LoRA up-projection) runs 3-4x slower on CPU than ``([i, T] x [T, o])^T``. Returns views, maybe transposed."""
    a = act.to(backprops.dtype)
    rows = backprops.shape[0]
    i, o = module.in_features, module.out_features
    b3 = backprops.reshape(rows, -1, o)
    grads = {}
    if module.weight.requires_grad:
        a3 = a.reshape(rows, -1, i)
        grads[module.weight] = (torch.bmm(b3.transpose(1, 2), a3) if i >= o
                                else torch.bmm(a3.transpose(1, 2), b3).transpose(1, 2))
    if module.bias is not None and module.bias.requires_grad:
        grads[module.bias] = b3.sum(1)
    return grads


def rows_are_units(unit_pos: torch.Tensor, row_weight: torch.Tensor, num_units: int) -> bool:
    """True when row r *is* unit r with weight 1 (K=1, example-level): per-row gradients are per-unit ones."""
    return unit_pos.numel() == num_units and bool(
        (unit_pos == torch.arange(num_units, device=unit_pos.device)).all()) and bool((row_weight == 1).all())


def reduce_rows_to_units(gs: torch.Tensor, unit_pos: torch.Tensor, row_weight: torch.Tensor,
                         num_units: int, *, identity: bool | None = None) -> torch.Tensor:
    """sum_r w_r g_r per unit, in fp32 ([R, ...] -> [U, ...]). ``identity``: :func:`rows_are_units`, when the
    caller has it already (it is the same for every layer of a micro-batch)."""
    gs = gs.to(torch.float32)
    if identity if identity is not None else rows_are_units(unit_pos, row_weight, num_units):
        return gs  # one row per unit (K=1, example-level): nothing to sum
    ug = torch.zeros((num_units, *gs.shape[1:]), dtype=torch.float32, device=gs.device)
    ug.index_add_(0, unit_pos, gs * row_weight.to(torch.float32).view(-1, *([1] * (gs.dim() - 1))))
    return ug


def refuse_shared(module: nn.Module, seen: set[int]) -> None:
    """Refuse a layer (or a parameter it shares) that runs twice in one forward: its per-unit gradient is g1 + g2,
    but per-layer norms would add ||g1||^2 + ||g2||^2 (a tied model clips to 1.41 C)."""
    for p in module.parameters(recurse=False):
        if p.requires_grad:
            if id(p) in seen:
                raise RuntimeError(
                    f"{type(module).__name__} (or a parameter it shares) ran twice in one forward; per-unit "
                    "gradients of shared layers are not supported (their norms would be computed as "
                    "sqrt(|g1|^2 + |g2|^2) instead of |g1 + g2|)")
            seen.add(id(p))


class DPSGDEngine:
    """Turns per-row losses of micro-batches into one privatised gradient per logical step.

    Single pass ("hooks"): in backward, each trainable layer's per-row gradients are summed per
    unit at once (so memory holds per-*unit* gradients, K times fewer than per-row ones with
    augmentation multiplicity) into one ``[units, trainable weights]`` fp32 buffer; after the
    backward, one norm per row of it, the clip factors, and one matrix-vector product give the
    clipped sum. The step's clipped sum is one flat fp32 buffer too (``params`` are views of it
    after ``finalize``): one all-reduce per step, and no per-layer Python work after the backward.
    """

    def __init__(self, model: nn.Module, *, noise_multiplier: float, max_grad_norm: float,
                 expected_batch_size: float, noise: GaussianNoise,
                 params: list[nn.Parameter] | None = None, hooks: bool = True,
                 param_groups: dict[str, list[int]] | None = None, gradient_canaries=None):
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
        if not isinstance(noise, GaussianNoise):
            raise TypeError("noise must be a dpdiff.privacy.randomness.GaussianNoise (a torch.Generator on the CPU "
                            "keeps only 32 bits of its seed)")
        self.noise = noise
        # observers, fixed at construction: name -> indices into params for the SNR statistics, and an opt-in
        # audit (dpdiff.privacy.gradient_canaries.GradientCanaryHook) that sees each step's clipped sum, never
        # changes it
        self.param_groups: dict[str, list[int]] = dict(param_groups or {})
        self.gradient_canaries = gradient_canaries
        self._slices: dict[int, tuple[int, int]] = {}  # id(param) -> [start, end) in the flat buffers
        start = 0
        for p in self.params:
            self._slices[id(p)] = (start, start + p.numel())
            start += p.numel()
        self.numel = start
        # hooks=False: the caller computes each unit's vector itself and hands it to ``add_unit_vectors`` (the
        # embedding adapter's per-unit gradients and per-unit embeddings, ``dpdiff.training.concept``)
        self.hooks = LayerHooks(model, self._on_layer) if hooks else None
        self._flat_sum: torch.Tensor | None = None
        self._summed: list[torch.Tensor] | None = None  # per-parameter views of _flat_sum
        self._step_open = False
        self._unit_flat: torch.Tensor | None = None
        self._seen_params: set[int] = set()  # trainable parameters whose layer ran in this micro-batch
        self.stats = StepStats()

    @property
    def kind(self) -> str:
        """What privacy.json's ``engine`` names: this engine's registry name, or ``unit_vectors`` when the caller
        hands it each unit's vector."""
        return "hooks" if self.hooks is not None else "unit_vectors"

    def close(self) -> None:
        if self.hooks is not None:
            self.hooks.remove()

    def _device(self) -> torch.device:
        return self.params[0].device if self.params else torch.device("cpu")

    def _on_layer(self, module, acts, backprops) -> None:
        refuse_shared(module, self._seen_params)
        for p, gs in self.hooks.per_row_grads(module, acts, backprops).items():
            if not p.requires_grad or id(p) not in self._slices:
                continue
            ug = reduce_rows_to_units(gs, self._unit_pos, self._row_weight, self._num_units, identity=self._identity)
            start, end = self._slices[id(p)]
            self._unit_flat[:, start:end].view(ug.shape).copy_(ug)  # ug may be a transposed view: one copy
            self._written += end - start

    #: noise is drawn in chunks of whole tensors of at most this many coordinates: one draw for a LoRA's weights, a
    #: bounded extra buffer for a full UNet's
    NOISE_CHUNK = 2**24

    def _noise_chunks(self) -> list[tuple[int, int]]:
        """``(i, j)``: params[i:j] are one chunk (consecutive in the flat buffer)."""
        chunks, i = [], 0
        while i < len(self.params):
            j, start = i + 1, self._slices[id(self.params[i])][0]
            while j < len(self.params) and self._slices[id(self.params[j])][1] - start <= self.NOISE_CHUNK:
                j += 1
            chunks.append((i, j))
            i = j
        return chunks

    def _add_noise(self, std: float) -> list[float]:
        """Add N(0, std^2) to every coordinate of the clipped sum, in place; return each tensor's squared noise norm.

        One Gaussian draw per chunk of consecutive tensors instead of one per tensor: the same distribution
        (i.i.d. coordinates) in a fraction of the calls. A CPU draws Gaussians on one thread (~8 ns each, 7 s for
        a full SD UNet's 860M weights): when there are several chunks, each gets its own child stream of the
        noise source (``GaussianNoise.children``: independent, full-entropy, reproducible in a reproducible run)
        and the chunks are drawn on ``torch.get_num_threads()`` threads (numpy's fills release the GIL)."""
        chunks = self._noise_chunks()
        device = self._flat_sum.device

        def draw(chunk: tuple[int, int], source: GaussianNoise) -> list[float]:
            i, j = chunk
            start, end = self._slices[id(self.params[i])][0], self._slices[id(self.params[j - 1])][1]
            z = source.fill_(torch.empty(end - start, dtype=torch.float32, device=device), std)
            sq = _squared_norms([z[slice(self._slices[id(p)][0] - start, self._slices[id(p)][1] - start)]
                                 for p in self.params[i:j]])
            self._flat_sum[start:end] += z
            return sq

        if len(chunks) == 1 or not self.noise.parallel:
            return [x for c in chunks for x in draw(c, self.noise)]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(torch.get_num_threads(), 1)) as pool:
            return [x for sq in pool.map(draw, chunks, self.noise.children(len(chunks))) for x in sq]

    # --- one logical step -------------------------------------------------------------
    def start_step(self) -> None:
        """Begin a logical step: the forwards of its micro-batches run with the hooks on."""
        self._flat_sum = self._summed = None  # allocated by the first micro-batch, after its backward
        self._step_open = True
        self.stats = StepStats()
        for p in self.params:
            p.grad = None
        if self.hooks is not None:
            self.hooks.enabled = True

    def _sums(self) -> list[torch.Tensor]:
        """The step's clipped-sum accumulators (per-parameter views of one fp32 buffer), allocated on first use:
        after the first micro-batch's backward has freed its activations, as autograd allocates ``p.grad``, so a
        full model's gradient buffer never coexists with a forward's activations that non-DP training would not
        hold together either."""
        if self._flat_sum is None:
            self._flat_sum = torch.zeros(self.numel, dtype=torch.float32, device=self._device())
            self._summed = [self._flat_sum[slice(*self._slices[id(p)])].view(p.shape) for p in self.params]
        return self._summed

    def _start_micro_batch(self, unit_pos, row_weight, num_units) -> None:
        self._unit_pos, self._row_weight, self._num_units = unit_pos, row_weight, num_units
        self._identity = rows_are_units(unit_pos, row_weight, num_units)
        self._seen_params = set()

    def _check_every_param_seen(self) -> None:
        """After the norms backward: every trainable parameter's layer must have reported, or a per-unit gradient is
        missing (and the clip would be computed without it)."""
        missing = sum(id(p) not in self._seen_params for p in self.params)
        if missing:
            raise RuntimeError(
                f"{missing} trainable parameter(s) received no per-unit gradient; was the forward run after "
                "engine.start_step(), and the model moved to its device before the engine attached?")

    def backward(self, row_loss: torch.Tensor, *, unit_pos: torch.Tensor, row_weight: torch.Tensor,
                 num_units: int) -> None:
        """Backward one micro-batch of whole units and add its clipped unit gradients.

        ``row_loss[r]`` is row r's loss; row r belongs to unit ``unit_pos[r]`` (0..num_units-1)
        and counts with weight ``row_weight[r]`` (the rows of a unit weigh 1 in total). The forward
        that produced ``row_loss`` must have run after ``start_step()``.
        """
        assert self._step_open, "call start_step() first"
        if self.hooks is None:
            raise RuntimeError("this engine was built without layer hooks: hand it per-unit vectors (add_unit_vectors)")
        if row_loss.numel() == 0:
            return  # never forward/backward an empty batch (diffusers' attention crashes)
        self._start_micro_batch(unit_pos, row_weight, num_units)
        self._unit_flat = torch.empty((num_units, self.numel), dtype=torch.float32, device=row_loss.device)
        self._written = 0  # coordinates of _unit_flat written by the layers' callbacks (it is torch.empty)
        try:
            self.hooks.backward_to_outputs(row_loss.sum())
            self._check_every_param_seen()
            if self._written != self.numel:
                raise RuntimeError(f"{self.numel - self._written} of {self.numel} trainable weights received no "
                                   "per-unit gradient in this micro-batch (or one was written twice)")
            norms = self._add_clipped(self._unit_flat)
        finally:
            self._unit_flat = None
        self.stats.add(row_loss=row_loss, norms=norms, num_units=num_units)

    def _add_clipped(self, unit_flat: torch.Tensor) -> torch.Tensor:
        """Clip each row of ``unit_flat`` ([units, numel], fp32) to C, add the rows to the step's sum; the norms."""
        with exact_float32():
            norms = unit_norms(unit_flat)
            factor = clipping.clip_factors(norms=norms, max_grad_norm=self.max_grad_norm)
            unit_grads = clipping.zero_nonfinite_units(unit_grads=unit_flat, finite=torch.isfinite(norms))
            self._sums()
            self._flat_sum += factor @ unit_grads
        return norms

    def add_unit_vectors(self, unit_vectors: torch.Tensor, *, row_loss: torch.Tensor | None = None) -> None:
        """Add one micro-batch of per-unit vectors computed by the caller ([units, numel], in ``params`` order,
        each a function of its own unit alone): clipped to C and summed exactly as the hooks' per-unit gradients
        are. ``row_loss``: the rows' losses, for the step's statistics."""
        assert self._step_open, "call start_step() first"
        if unit_vectors.dim() != 2 or unit_vectors.shape[1] != self.numel:
            raise ValueError(f"add_unit_vectors: expected [units, {self.numel}], got {tuple(unit_vectors.shape)}")
        if len(unit_vectors) == 0:
            return
        norms = self._add_clipped(unit_vectors.detach().to(torch.float32))
        self.stats.add(row_loss=row_loss if row_loss is not None else torch.zeros(0), norms=norms,
                       num_units=len(unit_vectors))

    def finalize(self) -> dict:
        """Sum the clipped gradients over ranks, add the noise once (rank 0) to that global sum, give every
        rank the same noisy sum, normalise by q*N and write ``p.grad`` (fp32 -> p.dtype).

        Rank 0 also measures, per parameter group, the norm of the clipped mean (the signal) against the
        norm of the noise added to it: a non-private statistic, logged for the data owner to see whether a
        run can learn (a ratio far below 1 at every step means the update is mostly noise).
        """
        assert self._step_open, "call start_step() first"
        self._sums()  # an empty logical batch: zeros, then noise only
        if self.hooks is not None:
            self.hooks.enabled = False
        std = self.noise_multiplier * self.max_grad_norm
        distributed = dist_ready()
        if distributed:  # the noise-free global sum, identical on every rank: one collective for all weights
            dist.all_reduce(self._flat_sum, op=dist.ReduceOp.SUM)
        main = not distributed or dist.get_rank() == 0
        signal_sq = _squared_norms(self._summed) if main else []
        noise_sq = [0.0] * len(self._summed)
        if main and std > 0:
            noise_sq = self._add_noise(std)
        if distributed:  # rank 0's noisy sum to every rank: one noise draw in total
            dist.broadcast(self._flat_sum, src=0)
        if main and self.gradient_canaries is not None:  # scored beside the released sum, never added to it
            self.gradient_canaries.observe(self._summed)
        self._flat_sum /= self.expected_batch_size  # in place: the gradients are views of one buffer, no copy
        for p, acc in zip(self.params, self._summed):
            p.grad = acc if acc.dtype == p.dtype else acc.to(p.dtype)
        self._summed = self._flat_sum = None
        self._step_open = False
        out = self.stats.summary(self.max_grad_norm)
        if main:
            out.update(signal_to_noise(signal_sq, noise_sq, groups=self.param_groups,
                                       expected_batch_size=self.expected_batch_size))
        return out


#: columns per block when summing squares (bounds the temporary of ``pow(2)``)
_NORM_BLOCK = 2**22


def unit_norms(unit_grads: torch.Tensor) -> torch.Tensor:
    """``||g_u||`` of each row of ``unit_grads`` ([U, P] fp32), accurate to fp32 rounding for any P.

    Not ``torch.linalg.vector_norm`` / ``Tensor.norm`` / ``torch._foreach_norm``: on a CPU (torch 2.13) they
    accumulate a long fp32 row naively, and on rows of a few million weights come out up to 1e-4 *low*, so a
    unit clipped by them keeps a norm above C (the sensitivity the noise is calibrated to). ``pow(2).sum``
    reduces pairwise; blocks of columns bound its temporary and are added in float64."""
    total = torch.zeros(unit_grads.shape[0], dtype=torch.float64, device=unit_grads.device)
    for block in unit_grads.split(_NORM_BLOCK, dim=1):
        total += block.pow(2).sum(1).double()
    return total.sqrt().to(torch.float32)


def _squared_norms(tensors: list[torch.Tensor]) -> list[float]:
    """``||t||^2`` of each tensor in one fused call and one device sync, for the signal/noise *statistics* only
    (``_foreach_norm`` may be 1e-4 low on long tensors, see :func:`unit_norms`; nothing is clipped by it)."""
    if not tensors:
        return []
    return torch.stack(torch._foreach_norm(tensors)).double().pow(2).tolist()


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


def expected_noise_std(*, noise_multiplier: float, max_grad_norm: float, expected_batch_size: float) -> float:
    """Std of each coordinate of the privatised mean gradient's noise: sigma*C/(q*N)."""
    return noise_multiplier * max_grad_norm / expected_batch_size if expected_batch_size > 0 else math.inf
