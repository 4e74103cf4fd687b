"""Full fp32 inside the clipping engines, whatever the user set for the rest of the program.

A clipped unit's contribution stays within C only if the products that form it are computed at the
precision its norm was. cuDNN runs fp32 convolutions (forward and weight gradients) in TF32 by default, and
``torch.set_float32_matmul_precision("high")`` (or oneDNN's bf16 fp32 modes on a CPU) does the same to matmuls:
the book-keeping engine's ghost norms (matmuls) and its clipped sums (``conv2d_weight``) would then be rounded
differently, and a unit's contribution could exceed C by ~1e-3 relative. :func:`exact_float32` switches every
backend's fp32 precision to IEEE inside the engines' per-layer work and restores the user's settings after.

Only PyTorch's ``fp32_precision`` API is used (reading or writing the legacy ``allow_tf32`` flags after the new
API was used raises in torch >= 2.9).
"""

from __future__ import annotations

import contextlib

import torch

_KNOBS = ("cuda.matmul", "cudnn.conv", "cudnn.rnn", "mkldnn.matmul", "mkldnn.conv", "mkldnn.rnn")


def _precision_knobs() -> dict[str, object]:
    """The backend objects that carry an ``fp32_precision`` setting in this torch build, by dotted name."""
    out = {}
    for name in _KNOBS:
        obj = torch.backends
        for part in name.split("."):
            obj = getattr(obj, part, None)
        if obj is not None and hasattr(obj, "fp32_precision"):
            out[name] = obj
    return out


@contextlib.contextmanager
def exact_float32():
    """Within the block, fp32 matmuls and convolutions run in IEEE fp32 on every backend (no TF32, no bf16)."""
    knobs = list(_precision_knobs().values())
    saved = [k.fp32_precision for k in knobs]
    try:
        for k in knobs:
            k.fp32_precision = "ieee"
        yield
    finally:
        for k, v in zip(knobs, saved):
            k.fp32_precision = v


def fp32_settings() -> dict[str, str]:
    """The current fp32 precision of each backend knob (for tests and the run log)."""
    return {name: k.fp32_precision for name, k in _precision_knobs().items()}
