"""The DP-SGD step against independent references: a per-unit loop, noise statistics, clipping bounds."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import ENGINES, clip_sum, engine_clipped_sum, make_engine, make_tiny_lora_unet
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dpdiff.privacy.engines import DPSGDEngine, NonPrivateEngine, expected_noise_std
from dpdiff.privacy.randomness import GaussianNoise
from dpdiff.training.loss import DiffusionObjective, RowBatch


def _objective():
    from diffusers import DDPMScheduler

    from dpdiff.models import tiny

    return DiffusionObjective(DDPMScheduler(**tiny.scheduler_config()))


def _rows(rows_per_unit: list[int], seed: int = 0) -> RowBatch:
    g = torch.Generator().manual_seed(seed)
    r = sum(rows_per_unit)
    pos = torch.cat([torch.full((n,), j) for j, n in enumerate(rows_per_unit)]).long()
    w = torch.cat([torch.full((n,), 1.0 / n) for n in rows_per_unit])
    return RowBatch(torch.randn(r, 4, 8, 8, generator=g), torch.randn(r, 4, 8, 8, generator=g),
                    torch.randint(0, 1000, (r,), generator=g), torch.randn(r, 32, 64, generator=g), pos, w,
                    len(rows_per_unit))


def naive_unit_gradients(model, objective, rows: RowBatch) -> torch.Tensor:
    """Reference: each unit alone, forward + backward of the mean loss of its rows (no Opacus)."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for u in range(rows.num_units):
        sel = (rows.unit_pos == u).nonzero().flatten()
        sub = RowBatch(rows.latents[sel], rows.noise[sel], rows.timesteps[sel], rows.encoder_hidden_states[sel],
                       torch.zeros(len(sel), dtype=torch.long), rows.row_weight[sel], 1)
        loss = objective.row_losses(model, sub).mean()
        out.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    return torch.stack(out)


def engine_gradient(model, objective, rows, *, C, sigma=0.0, expected=1.0, micro_units=None, seed=0):
    params = [p for p in model.parameters() if p.requires_grad]
    eng = DPSGDEngine(model, noise_multiplier=sigma, max_grad_norm=C, expected_batch_size=expected,
                      noise=GaussianNoise.seeded(seed), params=params)
    eng.start_step()
    from dpdiff.training.trainer import split_units

    for micro in split_units(rows, micro_units or rows.num_units):
        eng.backward(objective.row_losses(model, micro), unit_pos=micro.unit_pos, row_weight=micro.row_weight,
                     num_units=micro.num_units)
    stats = eng.finalize()
    g = torch.cat([p.grad.flatten() for p in params])
    eng.close()
    return g, stats


@pytest.mark.parametrize("rows_per_unit", [
    [1, 1, 1, 1],  # K = 1, example-level
    [3, 3, 3],  # augmult K = 3
    [1, 4, 2, 6],  # user-level: variable images x K per unit
])
def test_lora_unit_gradients_match_naive_loop(rows_per_unit):
    objective = _objective()
    model = make_tiny_lora_unet(rank=4)
    ref_model = copy.deepcopy(model)
    rows = _rows(rows_per_unit)
    ref = naive_unit_gradients(ref_model, objective, rows)
    C = float(ref.norm(dim=1).median())  # some clipped, some not
    got, stats = engine_gradient(model, objective, rows, C=C, expected=2.5, micro_units=2)
    want = clip_sum(ref, C) / 2.5
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    assert stats["units"] == len(rows_per_unit) and stats["rows"] == sum(rows_per_unit)


def test_full_finetune_unit_gradients_match_naive_loop():
    from diffusers import UNet2DConditionModel

    from dpdiff.models import tiny

    torch.manual_seed(0)
    cfg = tiny.unet_config()
    cfg.update(block_out_channels=(32, 32), layers_per_block=1)
    model = UNet2DConditionModel(**cfg).train()
    ref_model = copy.deepcopy(model)
    objective = _objective()
    rows = _rows([2, 2, 1])
    ref = naive_unit_gradients(ref_model, objective, rows)
    C = float(ref.norm(dim=1).min()) * 0.5  # every unit clipped
    got, _ = engine_gradient(model, objective, rows, C=C)
    want = clip_sum(ref, C)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_micro_batching_does_not_change_the_step():
    objective = _objective()
    model = make_tiny_lora_unet(rank=4)
    rows = _rows([2, 2, 2, 2, 2])
    a, _ = engine_gradient(copy.deepcopy(model), objective, rows, C=1e-2, sigma=1.0, expected=5, micro_units=5)
    b, _ = engine_gradient(copy.deepcopy(model), objective, rows, C=1e-2, sigma=1.0, expected=5, micro_units=1)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


class _Linear(nn.Module):
    """y = W x: row r's gradient is outer(dL/dy, x_r), set exactly through the loss."""

    def __init__(self, d_in=50, d_out=40):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("engine", ENGINES)
def test_norms_of_long_gradients_are_exact_and_no_clipped_unit_exceeds_C(engine):
    """Per-unit gradients of 3.6M weights with heavy-tailed entries, where torch's fp32 ``norm`` comes out ~1e-4 low:
    every engine's unit norms agree with float64 to 1e-6, and each unit alone, clipped, has norm <= C (the
    sensitivity the noise is calibrated to), checked in float64."""
    g = torch.Generator().manual_seed(11)
    d_in, d_out = 3000, 1200
    x = torch.randn(3, d_in, generator=g) * torch.rand(1, d_in, generator=g).pow(4) * 10
    t = torch.randn(3, d_out, generator=g) * torch.rand(1, d_out, generator=g).pow(4) * 10
    want = torch.stack([torch.outer(t[i], x[i]).flatten().double().norm() for i in range(3)])
    C = float(want.min()) * 0.999999  # every unit is clipped, by a hair
    model = _Linear(d_in, d_out)
    for u in range(3):
        eng = make_engine(engine, model, noise_multiplier=0.0, max_grad_norm=C, expected_batch_size=1.0,
                          noise=GaussianNoise.seeded(0))
        eng.start_step()
        eng.backward((model(x[u : u + 1]) * t[u : u + 1]).sum(1), unit_pos=torch.zeros(1, dtype=torch.long),
                     row_weight=torch.ones(1), num_units=1)
        eng.finalize()
        eng.close()
        assert abs(eng.stats.norms[0] / float(want[u]) - 1) < 1e-6
        assert float(model.lin.weight.grad.double().norm()) <= C * (1 + 1e-6)


def _linear_step(x, targets, unit_pos, num_units, *, C, sigma=0.0, expected=1.0, seed=0):
    model = _Linear(x.shape[1], targets.shape[1])
    eng = DPSGDEngine(model, noise_multiplier=sigma, max_grad_norm=C, expected_batch_size=expected,
                      noise=GaussianNoise.seeded(seed))
    counts = torch.bincount(unit_pos, minlength=num_units).float()
    eng.start_step()
    loss = (model(x) * targets).sum(1)  # per-row gradient = outer(targets_r, x_r)
    eng.backward(loss, unit_pos=unit_pos, row_weight=1.0 / counts[unit_pos], num_units=num_units)
    eng.finalize()
    return model, eng


@settings(max_examples=25, deadline=None)
@given(n_units=st.integers(1, 6), scale=st.floats(1e-3, 1e3), C=st.floats(1e-3, 10.0), seed=st.integers(0, 10**6))
def test_every_clipped_unit_gradient_is_within_C(n_units, scale, C, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_units, 8, generator=g) * scale
    t = torch.randn(n_units, 5, generator=g)
    unit_pos = torch.arange(n_units)
    # each unit alone: the privatised (noise-free, expected=1) gradient is exactly its clipped gradient
    for u in range(n_units):
        model, _ = _linear_step(x[u : u + 1], t[u : u + 1], torch.zeros(1, dtype=torch.long), 1, C=C)
        norm = float(model.lin.weight.grad.norm())
        raw = float((t[u][:, None] * x[u][None, :]).norm())
        assert norm <= C * (1 + 1e-5)
        assert norm == pytest.approx(min(raw, C * raw / (raw + 1e-6)), rel=1e-4)
    # and the sum over units is bounded by n*C
    model, _ = _linear_step(x, t, unit_pos, n_units, C=C)
    assert float(model.lin.weight.grad.norm()) <= n_units * C * (1 + 1e-5)


def test_noise_std_matches_sigma_C_over_expected_batch():
    d_in, d_out = 400, 250  # 100k coordinates
    sigma, C, expected = 1.3, 0.7, 12.5
    x = torch.zeros(3, d_in)  # all per-unit gradients zero: what remains is the noise
    t = torch.randn(3, d_out)
    model, _ = _linear_step(x, t, torch.arange(3), 3, C=C, sigma=sigma, expected=expected, seed=1)
    g = model.lin.weight.grad.flatten().double()
    n = g.numel()
    want = expected_noise_std(noise_multiplier=sigma, max_grad_norm=C, expected_batch_size=expected)
    assert want == pytest.approx(sigma * C / expected)
    # sample std of n iid normals: relative sd ~ 1/sqrt(2n); 6 sd is a ~1e-9 false-alarm bound
    assert abs(float(g.std()) / want - 1) < 6 / math.sqrt(2 * n)
    assert abs(float(g.mean())) < 6 * want / math.sqrt(n)


def test_noise_drawn_in_parallel_chunks_is_iid_with_the_right_std_and_reproducible(monkeypatch):
    """A full UNet's noise is drawn in chunks on several threads, one generator per chunk: every coordinate still
    has std sigma*C/B and mean 0, chunks are uncorrelated (not copies of one stream), the same seed gives the
    same noise and another seed other noise."""
    monkeypatch.setattr(DPSGDEngine, "NOISE_CHUNK", 30_000)
    model = nn.Sequential(*[nn.Linear(100, 100) for _ in range(10)])  # 10 x 10,100 weights: 5 chunks of 2 layers
    sigma, C, expected = 2.0, 0.5, 4.0

    def noise(seed: int) -> list[torch.Tensor]:
        eng = DPSGDEngine(model, noise_multiplier=sigma, max_grad_norm=C, expected_batch_size=expected,
                          noise=GaussianNoise.seeded(seed))
        assert len(eng._noise_chunks()) == 5
        eng.start_step()  # no micro-batch: the step is noise only
        stats = eng.finalize()
        assert stats["noise_norm"] > 0
        return [p.grad.flatten().double().clone() for p in eng.params]

    a = noise(1)
    g = torch.cat(a)
    want = sigma * C / expected
    n = g.numel()
    assert abs(float(g.std()) / want - 1) < 6 / math.sqrt(2 * n)
    assert abs(float(g.mean())) < 6 * want / math.sqrt(n)
    w0, w9 = a[0], a[-2]  # the first and the last layer's weights: different chunks, different generators
    corr = float(torch.corrcoef(torch.stack([w0, w9]))[0, 1])
    assert abs(corr) < 6 / math.sqrt(w0.numel())
    assert all(torch.equal(x, y) for x, y in zip(a, noise(1)))
    assert not torch.equal(g, torch.cat(noise(2)))


def test_zero_noise_gives_the_exact_clipped_mean():
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(4, 10, generator=g), torch.randn(4, 6, generator=g)
    C, expected = 0.5, 3.0
    model, _ = _linear_step(x, t, torch.arange(4), 4, C=C, expected=expected)
    per_unit = torch.stack([torch.outer(t[i], x[i]) for i in range(4)])
    norms = per_unit.flatten(1).norm(dim=1)
    want = (per_unit * (C / (norms + 1e-6)).clamp(max=1)[:, None, None]).sum(0) / expected
    torch.testing.assert_close(model.lin.weight.grad, want)


def test_empty_logical_batch_is_a_noise_only_step():
    model = _Linear(30, 20)
    eng = DPSGDEngine(model, noise_multiplier=2.0, max_grad_norm=1.0, expected_batch_size=4.0,
                      noise=GaussianNoise.seeded(0))
    eng.start_step()
    eng.backward(torch.zeros(0), unit_pos=torch.zeros(0, dtype=torch.long), row_weight=torch.zeros(0), num_units=0)
    stats = eng.finalize()
    assert stats["units"] == 0
    grad = model.lin.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0
    assert float(grad.std()) == pytest.approx(2.0 * 1.0 / 4.0, rel=0.15)
    # the hooks are still healthy after an empty step: the next step (noise off) is the exact clipped mean
    eng.noise_multiplier = 0.0
    model.zero_grad(set_to_none=True)
    eng.start_step()
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(2, 30, generator=g), torch.randn(2, 20, generator=g)
    eng.backward((model(x) * t).sum(1), unit_pos=torch.arange(2), row_weight=torch.ones(2), num_units=2)
    stats = eng.finalize()
    assert stats["units"] == 2
    per_unit = torch.stack([torch.outer(t[i], x[i]) for i in range(2)])
    norms = per_unit.flatten(1).norm(dim=1)
    want = (per_unit * (1.0 / (norms + 1e-6)).clamp(max=1)[:, None, None]).sum(0) / 4.0
    torch.testing.assert_close(model.lin.weight.grad, want)


def test_non_private_engine_is_the_mean_of_unit_means():
    model = _Linear(10, 5)
    eng = NonPrivateEngine(model)
    x, t = torch.randn(5, 10), torch.randn(5, 5)
    pos = torch.tensor([0, 0, 1, 2, 2])
    counts = torch.bincount(pos).float()
    eng.start_step()
    eng.backward((model(x) * t).sum(1), unit_pos=pos, row_weight=1.0 / counts[pos], num_units=3)
    eng.finalize()
    per_row = torch.stack([torch.outer(t[i], x[i]) for i in range(5)])
    want = sum(per_row[i] / counts[pos[i]] for i in range(5)) / 3
    torch.testing.assert_close(model.lin.weight.grad, want)


def test_unsupported_trainable_layer_is_refused():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.w

    with pytest.raises(ValueError, match="not supported"):
        DPSGDEngine(Odd(), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=1.0,
                    noise=GaussianNoise.seeded(0))


@pytest.mark.parametrize("engine", [e for e in ENGINES if e != "hooks"])
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_fast_engines_match_naive_loop(kind, engine):
    """Book-keeping clipping, instantiated and ghost norms (Linear and Conv2d): the same clipped sum
    and the same per-unit norms as the per-unit loop, with K draws and a variable number of images per unit."""

    model = _unet(kind)
    objective = _objective()
    rows = _rows([2, 1, 3])  # K draws and variable images per unit
    ref = naive_unit_gradients(copy.deepcopy(model), objective, rows)
    C = float(ref.norm(dim=1).median())
    got, eng = engine_clipped_sum(engine, model, objective, rows, C=C, expected=3.0, micro_units=2)
    want = clip_sum(ref, C) / 3.0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    torch.testing.assert_close(torch.tensor(sorted(eng.stats.norms)), ref.double().norm(dim=1).float().sort().values,
                               rtol=1e-4, atol=1e-8)
    if engine == "bookkeeping_always":  # every Linear and Conv2d by ghost norms, the norms' weights instantiated
        assert eng.layer_choice["ghost"] > 0 and (kind == "lora" or eng.layer_choice["units"] > 0)
    eng.close()


@pytest.mark.parametrize("engine", ["bookkeeping_always"])
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_ghost_norms_of_regular_units_match_naive_loop(kind, engine):
    """Equal rows per unit (K = 2) takes the batched ghost-norm path."""
    model = _unet(kind)
    objective = _objective()
    rows = _rows([2, 2, 2])
    ref = naive_unit_gradients(copy.deepcopy(model), objective, rows)
    C = float(ref.norm(dim=1).median())
    got, eng = engine_clipped_sum(engine, model, objective, rows, C=C, expected=1.0, micro_units=3)
    want = clip_sum(ref, C)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    assert eng.layer_choice["ghost"] > 0


# --- the clip factor, non-finite unit gradients, shared layers ------------------------------------------------------

def test_clip_factors_is_abadi_clipping_keyword_only_and_zero_when_not_finite():
    from dpdiff.privacy.clipping import clip_factors

    C = 0.7
    norms = torch.tensor([0.0, 1e-9, 0.3, 0.7, 0.7000001, 2.0, 1e3, 1e30, float("nan"), float("inf"), -float("inf")])
    c = clip_factors(norms=norms, max_grad_norm=C)
    finite = torch.isfinite(norms)
    # Abadi et al. 2016, Algorithm 1: g / max(1, ||g|| / C); the + 1e-6 of Opacus clips at most 1e-6/C more
    abadi = 1.0 / torch.clamp(norms[finite].double() / C, min=1.0)
    torch.testing.assert_close(c[finite].double(), abadi, rtol=2e-6, atol=0.0)
    assert bool((c[finite].double() * norms[finite].double() <= C * (1 + 1e-6)).all())  # C, up to fp32 rounding
    assert c[~finite].tolist() == [0.0, 0.0, 0.0]  # a non-finite unit contributes nothing
    with pytest.raises(TypeError):
        clip_factors(norms, C)  # keyword-only: a swapped C and norm cannot slip through


def _spy_clip_factors(monkeypatch):
    from dpdiff.privacy import clipping

    calls = []
    original = clipping.clip_factors

    def spy(**kw):
        calls.append(kw)
        return original(**kw)

    monkeypatch.setattr(clipping, "clip_factors", spy)
    return calls


@pytest.mark.parametrize("engine", ["hooks", "bookkeeping_auto"])
def test_every_engine_clips_with_the_named_clip_function(monkeypatch, engine):
    calls = _spy_clip_factors(monkeypatch)
    model = _Linear(6, 4)
    eng = make_engine(engine, model, noise_multiplier=0.0, max_grad_norm=0.5, expected_batch_size=1.0,
                      noise=GaussianNoise.seeded(0))
    x, t = torch.randn(3, 6), torch.randn(3, 4)
    eng.start_step()
    eng.backward((model(x) * t).sum(1), unit_pos=torch.arange(3), row_weight=torch.ones(3), num_units=3)
    eng.finalize()
    assert len(calls) == 1 and calls[0]["max_grad_norm"] == 0.5 and calls[0]["norms"].shape == (3,)


def _unet(kind: str):
    from diffusers import UNet2DConditionModel

    from dpdiff.models import tiny

    if kind == "lora":
        return make_tiny_lora_unet(rank=4)
    torch.manual_seed(0)
    cfg = tiny.unet_config()
    cfg.update(block_out_channels=(32, 32), layers_per_block=1)
    return UNet2DConditionModel(**cfg).train()


def _subset(rows: RowBatch, units: list[int]) -> RowBatch:
    sel = torch.cat([(rows.unit_pos == u).nonzero().flatten() for u in units])
    remap = torch.full((rows.num_units,), -1, dtype=torch.long)
    remap[torch.tensor(units)] = torch.arange(len(units))
    return RowBatch(rows.latents[sel], rows.noise[sel], rows.timesteps[sel], rows.encoder_hidden_states[sel],
                    remap[rows.unit_pos[sel]], rows.row_weight[sel], len(units))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_a_nonfinite_unit_contributes_zero_and_leaves_the_others_exact(kind, engine):
    """One unit's latents are NaN: its contribution is exactly 0, the other units' clipped sum is exactly
    that of a run without it (per-unit loop reference), and the step counts it."""
    from dpdiff.training.trainer import split_units

    objective = _objective()
    model = _unet(kind)
    rows = _rows([2, 1, 3, 2])
    bad = 1
    rows.latents[rows.unit_pos == bad] = float("nan")
    good = [u for u in range(rows.num_units) if u != bad]
    ref = naive_unit_gradients(copy.deepcopy(model), objective, _subset(rows, good))
    assert bool(torch.isfinite(ref).all())
    C = float(ref.norm(dim=1).median())
    params = [p for p in model.parameters() if p.requires_grad]
    kw = dict(noise_multiplier=0.0, max_grad_norm=C, expected_batch_size=2.0,
              noise=GaussianNoise.seeded(0), params=params)
    eng = make_engine(engine, model, **kw)
    eng.start_step()
    for micro in split_units(rows, 2):  # the bad unit shares its micro-batch with a good one
        eng.backward(objective.row_losses(model, micro), unit_pos=micro.unit_pos, row_weight=micro.row_weight,
                     num_units=micro.num_units)
    stats = eng.finalize()
    eng.close()
    got = torch.cat([p.grad.flatten() for p in params])
    want = clip_sum(ref, C) / 2.0
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    assert stats["nonfinite_units"] == 1 and stats["units"] == 4
    assert len(eng.stats.norms) == 3 and math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm_median"])


@pytest.mark.parametrize("engine", ENGINES)
def test_an_infinite_unit_gradient_with_finite_activations_contributes_zero(engine):
    """inf only in one row's backprop (its activations finite): 0 * inf = NaN in the reweighted backward must
    not reach the shared weight gradient either."""

    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(4, 10, generator=g), torch.randn(4, 6, generator=g)
    t[2, 3] = float("inf")
    model = _Linear(10, 6)
    kw = dict(noise_multiplier=0.0, max_grad_norm=0.5, expected_batch_size=1.0, noise=GaussianNoise.seeded(0))
    eng = make_engine(engine, model, **kw)
    eng.start_step()
    eng.backward((model(x) * t).sum(1), unit_pos=torch.arange(4), row_weight=torch.ones(4), num_units=4)
    stats = eng.finalize()
    per_unit = torch.stack([torch.outer(t[i], x[i]) for i in (0, 1, 3)])
    norms = per_unit.flatten(1).norm(dim=1)
    want = (per_unit * (0.5 / (norms + 1e-6)).clamp(max=1)[:, None, None]).sum(0)
    torch.testing.assert_close(model.lin.weight.grad, want)
    assert stats["nonfinite_units"] == 1


class _Twice(nn.Module):
    """One nn.Linear applied twice in the forward: each unit's gradient is g1 + g2."""

    def __init__(self, d=5):
        super().__init__()
        self.lin = nn.Linear(d, d, bias=True)

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x)))


class _Tied(nn.Module):
    """Two nn.Linear sharing one weight."""

    def __init__(self, d=5):
        super().__init__()
        self.a = nn.Linear(d, d, bias=False)
        self.b = nn.Linear(d, d, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("model_cls", [_Twice, _Tied])
@pytest.mark.parametrize("engine", ENGINES)
def test_a_layer_used_twice_in_one_forward_is_refused(engine, model_cls):
    """Per-layer norms of a reused layer would be sqrt(|g1|^2 + |g2|^2), not |g1 + g2|: fail closed."""

    torch.manual_seed(0)
    model = model_cls()
    kw = dict(noise_multiplier=0.0, max_grad_norm=1e-3, expected_batch_size=1.0, noise=GaussianNoise.seeded(0))
    eng = make_engine(engine, model, **kw)
    x, t = torch.randn(3, 5), torch.randn(3, 5)
    eng.start_step()
    with pytest.raises(RuntimeError, match="ran twice in one forward"):
        eng.backward((model(x) * t).sum(1), unit_pos=torch.arange(3), row_weight=torch.ones(3), num_units=3)


# --- book-keeping: one backward pass, the per-layer rule, the engine choice ----------------------------------------

@pytest.mark.parametrize("engine,passes", [("hooks", 1), ("bookkeeping_auto", 1), ("bookkeeping_always", 1)])
def test_bookkeeping_runs_one_backward_pass(monkeypatch, engine, passes):
    """Book-keeping forms the clipped sum from what it kept: one autograd backward per micro-batch, as hooks."""
    model = _unet("full")
    objective = _objective()
    rows = _rows([1, 1, 2])
    calls = []
    original = torch.autograd.backward
    monkeypatch.setattr(torch.autograd, "backward", lambda *a, **k: calls.append(1) or original(*a, **k))
    eng = make_engine(engine, model, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=1.0,
                      noise=GaussianNoise.seeded(0))
    eng.start_step()
    eng.backward(objective.row_losses(model, rows), unit_pos=rows.unit_pos, row_weight=rows.row_weight,
                 num_units=rows.num_units)
    eng.finalize()
    assert len(calls) == passes


@pytest.mark.parametrize("layer,out_shape,ghost", [
    (nn.Conv2d(1280, 1280, 3, padding=1), (2, 1280, 8, 8), True),  # SD 1.5's lowest resolution: ghost
    (nn.Conv2d(320, 320, 3, padding=1), (2, 320, 64, 64), False),  # its highest at 512 px: per-unit gradients
    (nn.Linear(1280, 1280), (2, 64, 1280), True),  # attention projections over 8x8 tokens
    (nn.Linear(320, 320), (2, 4096, 320), False),  # ... over 64x64 tokens
    (nn.Linear(320, 4), (2, 4096, 320), False),  # a LoRA factor: tiny gradient, instantiate
])
def test_mixed_rule_picks_ghost_norms_where_they_are_cheaper(layer, out_shape, ghost):
    from dpdiff.privacy.engines.ghost import ghost_is_cheaper

    assert ghost_is_cheaper(layer, torch.empty(out_shape), num_units=2) is ghost


def test_auto_picks_hooks_when_per_unit_gradients_fit_else_bookkeeping():
    from dpdiff.errors import UserError
    from dpdiff.privacy.plan import choose_engine

    lora, unet = 800_000, 860_000_000
    assert choose_engine("auto", trainable_numel=lora, micro_batch_size=64, memory_gb=2.0) == "hooks"
    assert choose_engine("auto", trainable_numel=unet, micro_batch_size=4, memory_gb=2.0) == "bookkeeping"
    with pytest.raises(UserError, match="two_pass was retired"):
        choose_engine("two_pass", trainable_numel=lora, micro_batch_size=4, memory_gb=2.0)
    with pytest.raises(UserError, match="per_sample=ghost"):
        choose_engine("ghost", trainable_numel=lora, micro_batch_size=4, memory_gb=2.0)


# --- one unit's presence changes the released sum by its own clipped contribution only ------------------------------

@pytest.mark.parametrize("engine", ["hooks", "bookkeeping_auto", "bookkeeping_always"])
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_removing_a_unit_changes_the_sum_by_its_own_clipped_contribution_only(kind, engine):
    """Rows built by the trainer's RowBuilder (augmentation draws keyed per unit): the clipped sum over units
    {0..5} minus the sum over {0..5} without unit 2 is unit 2's clipped contribution alone (norm <= C), as the
    noise calibration assumes, on every engine. With one augmentation stream over the whole batch, removing unit 2
    shifted the draws of units 3-5 and the difference reached several C."""
    from dpdiff.data.records import PrivacyUnits
    from dpdiff.training.encode import EncodedData
    from dpdiff.training.rows import RowBuilder

    g = torch.Generator().manual_seed(0)
    data = EncodedData(latent_mean=torch.randn(6, 1, 4, 8, 8, generator=g),
                       latent_std=torch.rand(6, 1, 4, 8, 8, generator=g) * 0.1,
                       text_emb=torch.randn(3, 32, 64, generator=g), text_index=torch.arange(6) % 3,
                       captions=["a", "b", "c"], scaling_factor=1.0, shift_factor=0.0)
    units = PrivacyUnits("example", tuple((i,) for i in range(6)), tuple(f"img_{i}.png" for i in range(6)))
    rb = RowBuilder(data, units, augmult=2, random_flip=False, num_train_timesteps=1000, key=bytes(range(32)))
    model, objective = _unet(kind), _objective()
    sums = {}
    for name, batch in (("all", [0, 1, 2, 3, 4, 5]), ("without", [0, 1, 3, 4, 5]), ("alone", [2])):
        rows = rb.build(batch, step=3)
        if name == "all":
            C = 0.5 * float(naive_unit_gradients(copy.deepcopy(model), objective, rows).norm(dim=1).min())
        sums[name], _ = engine_clipped_sum(engine, model, objective, rows, C=C, expected=1.0, micro_units=2)
    diff = (sums["all"] - sums["without"]).double()
    assert float(diff.norm()) <= C * (1 + 1e-4)  # every unit is clipped to exactly C here
    torch.testing.assert_close(diff, sums["alone"].double(), rtol=0, atol=1e-5 * C)


def test_the_hooks_buffer_is_checked_for_every_weight_written(monkeypatch):
    """The per-unit buffer is ``torch.empty``: a layer whose callback writes nothing (here: dropped) must stop the
    step instead of clipping uninitialised memory."""
    model = make_tiny_lora_unet(rank=2)
    objective, rows = _objective(), _rows([1, 1])
    eng = DPSGDEngine(model, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=1.0,
                      noise=GaussianNoise.seeded(0))
    original = eng.hooks.per_row_grads
    skipped = []

    def lossy(module, acts, backprops):
        out = original(module, acts, backprops)
        if not skipped:  # drop the first layer's gradients
            skipped.append(module)
            return {}
        return out

    monkeypatch.setattr(eng.hooks, "per_row_grads", lossy)
    eng.start_step()
    with pytest.raises(RuntimeError, match="received no per-unit gradient"):
        eng.backward(objective.row_losses(model, rows), unit_pos=rows.unit_pos, row_weight=rows.row_weight,
                     num_units=rows.num_units)
    eng.close()


def test_the_engines_clip_in_full_fp32_whatever_the_user_set(monkeypatch):
    """``torch.set_float32_matmul_precision("high")`` (TF32 on CUDA, bf16 modes of oneDNN on a CPU) is switched off
    inside the engine's per-layer callbacks and clip phase, and restored after."""
    from dpdiff.privacy.precision import fp32_settings

    model = make_tiny_lora_unet(rank=2)
    objective, rows = _objective(), _rows([1, 2])
    seen = []
    eng = DPSGDEngine(model, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=1.0,
                      noise=GaussianNoise.seeded(0))
    original = eng.hooks.per_row_grads
    monkeypatch.setattr(eng.hooks, "per_row_grads", lambda *a: seen.append(fp32_settings()) or original(*a))
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        user = fp32_settings()
        assert "tf32" in user.values()
        eng.start_step()
        eng.backward(objective.row_losses(model, rows), unit_pos=rows.unit_pos, row_weight=rows.row_weight,
                     num_units=rows.num_units)
        eng.finalize()
        assert seen and all(set(s.values()) == {"ieee"} for s in seen)
        assert fp32_settings() == user  # restored
    finally:
        torch.set_float32_matmul_precision(before)
        eng.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs in benchmarks/gpu_check.sh)")
@pytest.mark.parametrize("engine", ["hooks", "bookkeeping_always"])
def test_on_cuda_with_tf32_on_no_clipped_unit_exceeds_C(engine):
    """On a GPU with TF32 allowed everywhere, every engine's clipped units stay within C (fp32 rounding), as
    their float64 reference: the contribution of each unit alone, its norm at most C (1 + 1e-5)."""
    model = _unet("full").cuda()
    objective = _objective()
    rows = _rows([1, 2, 1]).to("cuda")
    torch.set_float32_matmul_precision("high")
    try:
        ref = naive_unit_gradients(copy.deepcopy(model), objective, rows)
        C = 0.25 * float(ref.norm(dim=1).min())
        for u in range(rows.num_units):
            sel = (rows.unit_pos == u).nonzero().flatten()
            one = rows.select(sel, unit_pos=torch.zeros(len(sel), dtype=torch.long, device="cuda"), num_units=1)
            got, _ = engine_clipped_sum(engine, model, objective, one, C=C, expected=1.0, micro_units=1)
            assert float(got.double().norm()) <= C * (1 + 1e-5)
    finally:
        torch.set_float32_matmul_precision("highest")
