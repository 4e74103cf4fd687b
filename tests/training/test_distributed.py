"""Multi-process DP: the sum is all-reduced, and the noise is added once in total (gloo, 2 processes)."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.multiproc


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(world, tmp_path, sigma, zero):
    import dist_workers

    tmp_path.mkdir(parents=True, exist_ok=True)
    mp.spawn(dist_workers.engine_step, args=(world, _port(), str(tmp_path), sigma, zero), nprocs=world, join=True)
    return [torch.load(tmp_path / f"grad{r}.pt") for r in range(world)]


def test_two_processes_sum_like_one_without_noise(tmp_path):
    one = _run(1, tmp_path / "one", 0.0, False)
    two = _run(2, tmp_path / "two", 0.0, False)
    torch.testing.assert_close(two[0], two[1])  # every rank steps with the same gradient
    torch.testing.assert_close(two[0], one[0], rtol=1e-5, atol=1e-7)


def test_noise_is_added_once_in_total(tmp_path):
    sigma, C, expected = 2.0, 0.5, 4.0
    grads = _run(2, tmp_path / "n", sigma, True)
    torch.testing.assert_close(grads[0], grads[1])
    g = grads[0].flatten().double()
    want = sigma * C / expected
    n = g.numel()
    ratio = float(g.std()) / want
    # once: ratio 1; once per rank: sqrt(2); never: 0
    assert abs(ratio - 1) < 6 / math.sqrt(2 * n), ratio


def test_process_context_forms_one_group_on_cpu(tmp_path):
    """Two launched CPU processes must form one gloo group: each thinking it is rank 0 of 1 would
    train twice with two noise draws and write the same files."""
    import dist_workers

    mp.spawn(dist_workers.context_world, args=(2, _port(), str(tmp_path)), nprocs=2, join=True)
    got = sorted((tmp_path / f"ctx{r}.txt").read_text() for r in range(2))
    assert got == ["0 2 2 cpu", "1 2 2 cpu"], got


@pytest.mark.parametrize("differ", [False, True])
def test_ranks_that_read_different_data_refuse_together(tmp_path, differ):
    """Rank 1 sees one more unit than rank 0 (a node-local copy that differs): both refuse, naming num_units; with
    the same data both go on."""
    import dist_workers

    mp.spawn(dist_workers.plans_agree, args=(2, _port(), str(tmp_path), differ), nprocs=2, join=True)
    got = [(tmp_path / f"plan{r}.txt").read_text() for r in range(2)]
    if differ:
        assert all(g.startswith("refused: process 1 disagrees with process 0 on") and "num_units" in g for g in got)
    else:
        assert got == ["agree", "agree"]
