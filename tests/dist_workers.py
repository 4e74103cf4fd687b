"""Worker functions for multi-process tests (gloo on CPU), importable by spawned children."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from dpdiff.privacy.randomness import GaussianNoise


def init(rank: int, world: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)


def leave() -> None:
    """Wait for every rank, then exit without tearing gloo down. torch's gloo teardown can abort a rank
    (SIGABRT, "terminate called without an active exception") while a peer still closes its pair: seen once in a
    loaded `make test` after a barrier and destroy_process_group. The library never destroys the process group
    either (the process exits); an exception still goes through the callers' ``finally``."""
    import sys

    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def engine_step(rank: int, world: int, port: int, out_dir: str, sigma: float, zero: bool) -> None:
    """One DP step of a Linear model; units 0..7 are split over ranks by index parity."""
    from torch import nn

    from dpdiff.privacy.engines import DPSGDEngine

    init(rank, world, port)
    try:
        torch.manual_seed(0)
        model = nn.Linear(300, 200, bias=False)  # the same initial weights on every rank
        g = torch.Generator().manual_seed(123)
        x = torch.zeros(8, 300) if zero else torch.randn(8, 300, generator=g)
        t = torch.randn(8, 200, generator=g)
        mine = [u for u in range(8) if u % world == rank]
        eng = DPSGDEngine(model, noise_multiplier=sigma, max_grad_norm=0.5, expected_batch_size=4.0,
                          noise=GaussianNoise.seeded(1000 + rank))
        eng.start_step()
        if mine:
            xs, ts = x[mine], t[mine]
            eng.backward((model(xs) * ts).sum(1), unit_pos=torch.arange(len(mine)), row_weight=torch.ones(len(mine)),
                         num_units=len(mine))
        eng.finalize()
        torch.save(model.weight.grad, os.path.join(out_dir, f"grad{rank}.pt"))
        leave()
    finally:
        dist.destroy_process_group()


def context_world(rank: int, world: int, port: int, out_dir: str) -> None:
    """process_context under a launcher's environment (as accelerate launch / torchrun set it)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    from dpdiff.runtime import process_context

    ctx = process_context("auto")
    got = [ctx.rank, ctx.world_size, int(dist.is_initialized() and dist.get_world_size()), str(ctx.device)]
    with open(os.path.join(out_dir, f"ctx{rank}.txt"), "w") as f:
        f.write(" ".join(map(str, got)))
    leave()


def plans_agree(rank: int, world: int, port: int, out_dir: str, differ: bool) -> None:
    """Each rank builds a privacy plan (rank 1 over one more unit when ``differ``) and checks the ranks agree."""
    from pathlib import Path

    from dpdiff.errors import UserError
    from dpdiff.privacy.plan import DatasetIdentity, PrivacyPlan
    from dpdiff.privacy.settings import PrivacySettings

    init(rank, world, port)
    try:
        s = PrivacySettings(enabled=True, target_epsilon=8.0, delta=1e-4, max_grad_norm=1.0, accountant="rdp",
                            augmult=1, unit="example", max_images_per_user=None, noise_multiplier=None,
                            reproducible_noise=False, secure_rng=False, dataset_budget=None,
                            dataset_delta=None, dataset_ledger=None)
        root = Path(out_dir) / "data"
        root.mkdir(parents=True, exist_ok=True)
        n = 200 + (1 if differ and rank == 1 else 0)
        plan = PrivacyPlan.build(settings=s, dataset=DatasetIdentity(root=root, fingerprint="f" * 64,
                                                                     source_fingerprint="f" * 64),
                                 num_units=n, batch_size=20, max_steps=30, seed=0, run_dir=Path(out_dir) / "run",
                                 rank=rank, world_size=world)
        try:
            plan.check_ranks_agree()
            outcome = "agree"
        except UserError as err:
            outcome = f"refused: {err}"
        with open(os.path.join(out_dir, f"plan{rank}.txt"), "w") as f:
            f.write(outcome)
        leave()
    finally:
        dist.destroy_process_group()
