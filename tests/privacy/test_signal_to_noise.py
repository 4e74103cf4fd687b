"""The logged signal-to-noise of a DP step, and the gradient-canary hook on the engine's noise step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dpdiff.privacy.engines import DPSGDEngine
from dpdiff.privacy.randomness import GaussianNoise


def _step(model, x, *, sigma, c, b, groups=None, seed=0):
    eng = DPSGDEngine(model, noise_multiplier=sigma, max_grad_norm=c, expected_batch_size=b,
                      noise=GaussianNoise.seeded(seed), param_groups=groups)
    eng.start_step()
    loss = model(x).pow(2).mean(dim=1)
    eng.backward(loss, unit_pos=torch.arange(len(x)), row_weight=torch.ones(len(x)), num_units=len(x))
    stats = eng.finalize()
    eng.close()
    return stats


def test_signal_norm_is_the_clipped_mean_and_noise_norm_the_noise():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.Tanh(), torch.nn.Linear(30, 5))
    x = torch.randn(12, 20)
    c, b = 0.05, 16.0
    # the reference: per-example gradients by a loop, clipped, summed, divided by the expected batch
    total = [torch.zeros_like(p) for p in model.parameters()]
    for xi in x:
        model.zero_grad()
        model(xi[None]).pow(2).mean().backward()
        g = [p.grad.clone() for p in model.parameters()]
        norm = math.sqrt(sum(float(t.pow(2).sum()) for t in g))
        for acc, t in zip(total, g):
            acc += t * min(1.0, c / (norm + 1e-6))
    want = math.sqrt(sum(float(t.pow(2).sum()) for t in total)) / b
    stats = _step(model, x, sigma=2.0, c=c, b=b, groups={"first": [0, 1], "second": [2, 3]})
    assert stats["signal_norm"] == pytest.approx(want, rel=1e-4)
    d = sum(p.numel() for p in model.parameters())
    assert stats["noise_norm"] == pytest.approx(2.0 * c * math.sqrt(d) / b, rel=0.1)
    assert stats["snr"] == pytest.approx(stats["signal_norm"] / stats["noise_norm"], rel=1e-6)
    assert {"snr/first", "snr/second"} <= set(stats)
    # the whole is between its groups
    assert min(stats["snr/first"], stats["snr/second"]) <= stats["snr"] <= max(stats["snr/first"],
                                                                               stats["snr/second"])


def test_gradient_canary_hook_equals_the_flat_canaries():
    """Scoring through the per-tensor hook is the flat GradientCanaries on the concatenation, and neither writes
    into the released sum."""
    from dpdiff.privacy.gradient_canaries import GradientCanaries, GradientCanaryHook

    shapes = [(3, 4), (5,), (2, 2, 2)]
    n = sum(int(np.prod(s)) for s in shapes)
    a, b = GradientCanaries(count=10, num_params=n, seed=3), GradientCanaries(count=10, num_params=n, seed=3)
    hook = GradientCanaryHook(a, shapes=shapes, noise_multiplier=1.0, sample_rate=1.0, clip_norm=0.5,
                              rng=np.random.default_rng(0))
    noisy = [torch.randn(s, generator=torch.Generator().manual_seed(1)) for s in shapes]
    before = [t.clone() for t in noisy]
    joined = hook.observe(noisy)
    flat = torch.cat([t.flatten() for t in noisy])
    b.observe(flat, noise_multiplier=1.0, sample_rate=1.0, clip_norm=0.5, rng=np.random.default_rng(0))
    assert joined == int(a.included.sum()) > 0
    np.testing.assert_allclose(a.scores, b.scores)
    assert all(torch.equal(x, y) for x, y in zip(noisy, before))  # the released sum is untouched
