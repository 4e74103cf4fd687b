"""Precision policy: frozen encoders may run in low precision; trainable weights, per-unit
gradients, norms, clipping and noise are always fp32 (Opacus #740/#764: bf16 norms overshoot C).
fp16 is allowed only as autocast without a GradScaler: a scaler would multiply the gradients the
clipping sees (see docs/stack-notes.md), and per-unit clipping already bounds their range."""

from __future__ import annotations

import torch

from dpdiff.errors import UserError

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def frozen_dtype(name: str, device: torch.device) -> torch.dtype:
    try:
        dt = _DTYPES[str(name)]
    except KeyError:
        raise UserError(f"model.frozen_dtype={name}: must be float32, bfloat16 or float16") from None
    if dt == torch.float16 and device.type == "cpu":
        raise UserError("model.frozen_dtype=float16 is slow or unsupported on CPU; use bfloat16 or float32")
    return dt


def autocast_dtype(mode, device: torch.device) -> torch.dtype | None:
    mode = str(mode)
    if mode in ("no", "False", "None", "fp32"):
        return None
    if mode == "bf16":
        return torch.bfloat16
    if mode == "fp16":
        if device.type == "cpu":
            raise UserError("train.mixed_precision=fp16 needs a GPU; use bf16 on CPU")
        return torch.float16
    raise UserError(f"train.mixed_precision={mode}: must be no, bf16 or fp16")
