"""Checkpoints: the whole resumable state, privacy ledger included.

As Opacus' ``PrivacyEngine.save_checkpoint`` (model, optimizer, accountant) plus what DP-SGD
resumption needs beyond it: the sampler's RNG (so the resumed run continues the same Poisson
process), the draw and noise generators, EMA and LR schedule. ``checkpoint-{step}`` dirs
with a retention limit, as diffusers' training scripts. A checkpoint is written to a temp dir
and renamed, so a crash never leaves a half checkpoint; the run's ledger file is written
before it, so a crash between them over-counts, never under-counts.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dpdiff.errors import UserError
from dpdiff.io import write_json_atomic

_CKPT = re.compile(r"^checkpoint-(\d+)$")


def generator_state(gen: torch.Generator) -> str:
    return base64.b64encode(gen.get_state().numpy().tobytes()).decode()


def set_generator_state(gen: torch.Generator, state: str) -> None:
    import numpy as np

    gen.set_state(torch.from_numpy(np.frombuffer(base64.b64decode(state), dtype=np.uint8).copy()))


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    out = []
    for p in Path(run_dir).glob("checkpoint-*"):
        m = _CKPT.match(p.name)
        if m and (p / "state.json").exists():
            out.append((int(m.group(1)), p))
    return sorted(out)


def save_checkpoint(run_dir: Path, *, step: int, trainable: dict[str, torch.Tensor], optimizer, lr_scheduler,
                    state: dict, ema=None, keep: int | None = None) -> Path:
    run_dir = Path(run_dir)
    final = run_dir / f"checkpoint-{step}"
    tmp = run_dir / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                "ema": ema.state_dict() if ema is not None else None}, tmp / "optim.pt")
    write_json_atomic(tmp / "state.json", {"step": step, **state})
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    if keep is not None and keep > 0:
        for _, old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_checkpoint(resume_from: str, run_dir: Path) -> Path:
    """``latest`` (in this run dir), a run dir (its latest checkpoint) or a checkpoint dir."""
    if resume_from == "latest":
        found = list_checkpoints(run_dir)
        if not found:
            raise UserError(f"train.resume_from=latest: no checkpoint in {run_dir}")
        return found[-1][1]
    p = Path(resume_from).expanduser()
    if not p.exists():
        raise UserError(f"train.resume_from={resume_from} does not exist")
    if (p / "state.json").exists():
        return p.resolve()
    found = list_checkpoints(p)
    if not found:
        raise UserError(f"train.resume_from={resume_from} holds no checkpoint-* directory")
    return found[-1][1].resolve()


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        trainable = load_file(str(path / "trainable.safetensors"))
        optim = torch.load(path / "optim.pt", map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise UserError(f"checkpoint {path} is unreadable ({err}); resume from another checkpoint") from None
    return {"state": state, "trainable": trainable, **optim}
