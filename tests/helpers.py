"""Helpers shared by the tests (importable as ``helpers``; see pytest ``pythonpath``)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from dpdiff.privacy.randomness import GaussianNoise

ROOT = Path(__file__).resolve().parent.parent

#: configs/debug/fast.yaml (2 steps, probes and eval off) on tiny batches of 32 px images, for the tests whose data
#: folders hold a few images
SMALL = ["debug=fast", "train.batch_size=4", "train.micro_batch_size=4", "privacy.augmult=1", "data.resolution=32"]


def make_tiny_lora_unet(rank: int = 4, seed: int = 0, nonzero_b: bool = True):
    """A random-init tiny UNet with LoRA on the attention projections (B made non-zero so every
    LoRA weight has a gradient)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from dpdiff.models import tiny

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny.unet_config())
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    if nonzero_b:
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.02)
    unet.train()
    return unet


def write_image_folder(root: Path, n: int = 12, *, users: int | None = None, size: int = 32, seed: int = 0,
                       fmt: str = "jsonl") -> Path:
    """A small random-image folder with metadata (distinct random textures, so no duplicates)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        arr = (rng.random((size, size, 3)) * 255).astype("uint8")
        name = f"img_{i:03d}.png"
        Image.fromarray(arr).save(root / name)
        row = {"file_name": name, "text": f"a photo number {i % 3}"}
        if users:
            row["user_id"] = f"u{i % users}"
        rows.append(row)
    if fmt == "jsonl":
        (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        import csv

        with open(root / "metadata.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return root


def run_cli_subprocess(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 900):
    """Run ``dpdiff ...`` as a user would (a fresh process), returning CompletedProcess. For the few tests that need
    a process of their own (several processes, a kill, the console entry point itself); the rest use ``run_cli``."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "dpdiff.cli", *args], cwd=cwd or ROOT, env=e,
                          capture_output=True, text=True, timeout=timeout)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 900):
    """Run ``dpdiff ...`` in this process (``dpdiff.cli.main``, the console entry point's function) and return what
    ``run_cli_subprocess`` would: a CompletedProcess with the exit code, stdout and stderr. It saves each test the
    5-10 s a fresh process spends importing torch and diffusers. What a run changes in the process is put back
    afterwards: sys.argv, the environment, the working directory, every logger's handlers and levels (Hydra's job
    logging adds a file handler per run and reconfigures the rest) and Hydra's global state. An exception that is
    not a SystemExit becomes exit code 1 with its traceback on stderr, as in a process. ``timeout`` is accepted for
    ``run_cli_subprocess``'s signature and not enforced here."""
    import io
    import logging
    import traceback

    from hydra.core.global_hydra import GlobalHydra

    from dpdiff.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_env, saved_cwd = list(sys.argv), dict(os.environ), os.getcwd()
    # Hydra configures logging with dictConfig, which shuts down every handler the process ever made (absl's
    # closes its stream: pytest's captured stderr) and may disable existing loggers: hide the handlers from it
    # and put every logger back afterwards
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    saved_loggers = [(lg, list(lg.handlers), lg.level, lg.propagate, lg.disabled) for lg in loggers]
    saved_handler_list, saved_named = list(logging._handlerList), dict(logging._handlers)
    logging._handlerList[:] = []
    os.environ.update(env or {})
    os.chdir(cwd or ROOT)
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(list(args))
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if not isinstance(e.code, (int, type(None))):
                    err.write(f"{e.code}\n")
            except BaseException:  # noqa: BLE001 - a crash is exit 1 with its traceback, as in a process
                traceback.print_exc(file=err)
                code = 1
    finally:
        for lg, handlers, level, propagate, disabled in saved_loggers:
            for h in lg.handlers:
                if h not in handlers:
                    h.close()  # the run's own (its log file)
            lg.handlers[:], lg.level, lg.propagate, lg.disabled = handlers, level, propagate, disabled
        logging._handlerList[:] = saved_handler_list
        logging._handlers.clear()
        logging._handlers.update(saved_named)
        GlobalHydra.instance().clear()
        sys.argv[:] = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
    return subprocess.CompletedProcess(["dpdiff", *args], code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def trained_recipe(run_dir: Path, overrides: list[str], patch=None):
    """A FinetuneRecipe composed from ``overrides``, set up, patched, trained and saved in ``run_dir``
    (in this process, so a test can patch it); cleaned up on exit."""
    from dpdiff.schema import compose
    from recipes.finetune import FinetuneRecipe

    cfg = compose(overrides)
    run_dir.mkdir(parents=True)
    recipe = FinetuneRecipe(cfg, run_dir)
    try:
        recipe.setup()
        if patch:
            patch(recipe)
        recipe.train()
        recipe.save()
        yield recipe
    finally:
        recipe.cleanup()


#: every clipping engine and per-layer policy the tests compare with the per-unit loop
ENGINES = ["hooks", "bookkeeping_never", "bookkeeping_always", "bookkeeping_auto"]


def make_engine(engine: str, model, **kw):
    """``hooks`` or ``bookkeeping_<ghost>`` (ghost: never | always | auto)."""
    from dpdiff.privacy.engines import BookKeepingDPSGDEngine, DPSGDEngine

    if engine == "hooks":
        return DPSGDEngine(model, **kw)
    kind, ghost = engine.rsplit("_", 1)
    assert kind == "bookkeeping", engine
    return BookKeepingDPSGDEngine(model, **kw, ghost=ghost)


def clip_sum(ref: torch.Tensor, C: float) -> torch.Tensor:
    """The reference clipped sum, its norms in float64 (torch's fp32 ``norm`` of a long row is up to 1e-4 low)."""
    norms = ref.double().norm(dim=1)
    return (ref.double() * (C / (norms + 1e-6)).clamp(max=1.0)[:, None]).sum(0).to(ref.dtype)


def engine_clipped_sum(engine: str, model, objective, rows, *, C: float, expected: float, micro_units: int,
                       sigma: float = 0.0):
    """One step of ``engine`` over ``rows``, ``micro_units`` units per micro-batch: (flat gradient, engine)."""
    from dpdiff.training.trainer import split_units

    params = [p for p in model.parameters() if p.requires_grad]
    eng = make_engine(engine, model, noise_multiplier=sigma, max_grad_norm=C, expected_batch_size=expected,
                      noise=GaussianNoise.seeded(0), params=params)
    eng.start_step()
    for micro in split_units(rows, micro_units):
        eng.backward(objective.row_losses(model, micro), unit_pos=micro.unit_pos, row_weight=micro.row_weight,
                     num_units=micro.num_units)
    eng.finalize()
    eng.close()
    return torch.cat([p.grad.flatten() for p in params]), eng


def probe_section(name: str, changes: dict | None = None) -> dict:
    """The shipped ``probes.<name>`` group (configs/probes/default.yaml) with ``changes``, plus the group's
    ``confidence``: what the probe functions read (their keys have no defaults of their own)."""
    from omegaconf import OmegaConf

    from dpdiff.schema import compose

    probes = compose([]).probes
    section = OmegaConf.to_container(probes[name])
    return OmegaConf.to_container(OmegaConf.merge({**section, "confidence": probes.confidence}, changes or {}))
