"""Measure (not just assert) how closely the privacy code agrees with independent references.

    python benchmarks/privacy_checks.py      # writes benchmarks/results/privacy_checks.json

The tests assert tolerances; this records the actual figures for the privacy-budget paper trail:
- per-unit gradients of the engine vs a naive per-unit forward/backward loop (LoRA with K=1, K=3 and
  user units of unequal size; full fine-tuning; the two-pass engine), as max relative error;
- the privatized gradient's empirical noise std over 10^6 coordinates / sigma*C/expected_batch;
- the same noise std in a 2-process (gloo) step: noise must be added once in total, not per rank;
- epsilon of each accountant vs Google's dp_accounting (PLD; RDP for ours RDP) over the test grid.
The references are the test suite's own (tests/privacy), which use no dpdiff privacy code.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests" / d) for d in ("", "privacy", "training")]

from helpers import make_tiny_lora_unet  # noqa: E402
from test_accountants import GRID, google_pld, google_rdp  # noqa: E402
from test_distributed import _run as run_processes  # noqa: E402
from test_engine import _linear_step, _objective, _rows, clip_sum, engine_gradient, naive_unit_gradients  # noqa: E402

from dpdiff.privacy.accountants import MechanismSegment, get_accountant  # noqa: E402
from dpdiff.privacy.engines import expected_noise_std  # noqa: E402


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def gradients() -> dict:
    out = {}
    objective = _objective()
    for name, rows_per_unit in (("lora_K1", [1, 1, 1, 1]), ("lora_K3", [3, 3, 3]), ("lora_users", [1, 4, 2, 6])):
        torch.manual_seed(0)
        model = make_tiny_lora_unet(rank=4)
        rows = _rows(rows_per_unit)
        ref = naive_unit_gradients(copy.deepcopy(model), objective, rows)
        C = float(ref.norm(dim=1).median())
        got, _ = engine_gradient(model, objective, rows, C=C, expected=2.5, micro_units=2)
        out[name] = rel_err(got, clip_sum(ref, C) / 2.5)
    from diffusers import UNet2DConditionModel

    from dpdiff.models import tiny

    torch.manual_seed(0)
    cfg = tiny.unet_config()
    cfg.update(block_out_channels=(32, 32), layers_per_block=1)
    model = UNet2DConditionModel(**cfg).train()
    rows = _rows([2, 2, 1])
    ref = naive_unit_gradients(copy.deepcopy(model), objective, rows)
    C = float(ref.norm(dim=1).min()) * 0.5
    got, _ = engine_gradient(model, objective, rows, C=C)
    out["full_finetune"] = rel_err(got, clip_sum(ref, C))
    return {"max_relative_error_vs_naive_loop": out}


def noise() -> dict:
    sigma, C, expected = 1.3, 0.7, 12.5
    x = torch.zeros(3, 1000)  # per-unit gradients all zero: the step is pure noise
    model, eng = _linear_step(x, torch.randn(3, 1000), torch.arange(3), 3, C=C, sigma=sigma, expected=expected, seed=1)
    g = model.lin.weight.grad.flatten().double()
    eng.close()
    want = expected_noise_std(noise_multiplier=sigma, max_grad_norm=C, expected_batch_size=expected)
    n = g.numel()
    return {"coordinates": n, "std_ratio": float(g.std()) / want, "one_sd_of_ratio": 1 / math.sqrt(2 * n),
            "mean_over_std": float(g.mean()) / want}


def distributed_noise(tmp: Path) -> dict:
    """Two gloo processes, all per-unit gradients zero: std of the all-reduced noisy gradient."""
    sigma, C, expected = 2.0, 0.5, 4.0  # as dist_workers.engine_step uses C=0.5, expected batch 4
    grads = run_processes(2, tmp, sigma, True)
    g = grads[0].flatten().double()
    return {"processes": 2, "coordinates": g.numel(), "ranks_identical": bool(torch.equal(grads[0], grads[1])),
            "std_ratio": float(g.std()) / (sigma * C / expected),
            "note": "1 = noise once in total; sqrt(2) = once per rank; 0 = none"}


def accounting() -> dict:
    rows = []
    for q, sigma, steps, delta in GRID:
        ref = google_pld(q, sigma, steps, delta)
        seg = [MechanismSegment(sigma, q, steps)]
        row = {"q": q, "sigma": sigma, "steps": steps, "delta": delta, "dp_accounting_pld": ref,
               "dp_accounting_rdp": google_rdp(q, sigma, steps, delta)}
        for name in ("pld", "prv", "rdp"):
            row[name] = get_accountant(name).epsilon(history=seg, delta=delta).epsilon
        rows.append(row)
    worst = {name: max(abs(r[name] / r["dp_accounting_pld"] - 1) for r in rows) for name in ("pld", "prv", "rdp")}
    rdp_vs_rdp = max(abs(r["rdp"] / r["dp_accounting_rdp"] - 1) for r in rows)
    return {"grid": rows, "max_relative_gap_vs_dp_accounting_pld": worst,
            "rdp_max_relative_gap_vs_dp_accounting_rdp": rdp_vs_rdp}


def main() -> None:
    torch.set_num_threads(2)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        dist_noise = distributed_noise(Path(tmp))
    res = {**gradients(), "noise": noise(), "noise_two_processes": dist_noise, "accounting": accounting()}
    out = HERE / "results" / "privacy_checks.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "accounting"}, indent=2))
    acc = res["accounting"]
    print("accounting, max relative gap vs dp_accounting PLD:", acc["max_relative_gap_vs_dp_accounting_pld"],
          "| rdp vs dp_accounting RDP:", round(acc["rdp_max_relative_gap_vs_dp_accounting_rdp"], 4))


if __name__ == "__main__":
    main()
