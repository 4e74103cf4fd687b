"""dpdiff tune: hyperparameter tuning whose cost is accounted (private selection, Papernot & Steinke 2022).

    dpdiff tune OUT_DIR --grid train.lr=0.005,0.01,0.02 --grid adapter.rank=2,4 [--mean-candidates 8]
                [--eta 1] [--score-noise 4] [--score-clip 0.5] [--score-units 256] [OVERRIDE ...]

Keeping the best of several private runs by a score computed on private data leaks beyond each run's epsilon. Here
the number of candidates K is random (a truncated negative binomial with the mean asked, drawn from fresh OS
entropy), each candidate is a grid point drawn uniformly at random and trained as ``dpdiff finetune`` trains (the
same overrides otherwise), and scored by a DP score: its denoising loss on held-out units (never trained on), each
unit's loss clipped to [0, score_clip], summed, one Gaussian draw N(0, (score_noise x score_clip)^2) added (the
candidates share the held-out units, so the noisy sums rank them). Only the best is released. The guarantee of the
whole procedure (``dpdiff.privacy.selection``: Theorem 2 of Papernot & Steinke over the worst grid point's ledger
plus the score's Gaussian mechanism) is computed before anything trains, written to OUT_DIR/selection.json and to
the winner's privacy.json (``selection``), and refused if it exceeds ``privacy.dataset_budget``.

What the data owner keeps to themselves: K and every candidate (OUT_DIR/candidate-*, tuning_owner.json, 0600):
the bound averages over K, so K must not be published; publish OUT_DIR/best (the winner) and selection.json.
The dataset ledger charges every candidate run as it trains (composition over the K runs: an upper bound on the
procedure's cost, which selection.json states more tightly).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from dpdiff.cli import user_errors_exit
from dpdiff.errors import UserError

log = logging.getLogger("dpdiff")

#: config groups a grid may vary: the data, the privacy mechanism's settings and the held-out split stay fixed
TUNABLE = ("train.", "adapter.")


def parse_grid(specs: list[str]) -> list[list[str]]:
    """``KEY=V1,V2`` specs -> every combination, as lists of overrides."""
    axes = []
    for spec in specs:
        key, _, values = spec.partition("=")
        if not values or not key:
            raise UserError(f"--grid {spec!r}: write KEY=V1,V2,... (e.g. train.lr=0.01,0.02)")
        if not key.startswith(TUNABLE) or key in ("train.seed", "train.resume_from"):
            raise UserError(f"--grid {key}: only train.* and adapter.* keys are tuned (the data, the privacy "
                            "settings and the split are the same for every candidate)")
        axes.append([f"{key}={v}" for v in values.split(",") if v != ""])
    if not axes:
        raise UserError("dpdiff tune needs at least one --grid KEY=V1,V2,...")
    return [list(p) for p in itertools.product(*axes)]


def grid_worst_rdp(base_overrides: list[str], grid: list[list[str]], *, score_noise: float):
    """(worst RDP curve over the grid, delta, number of training units): every grid point's mechanism as the
    finetune recipe would resolve it, before anything trains."""
    import numpy as np

    from dpdiff.data.prepare import prepare
    from dpdiff.privacy.accountants import MechanismSegment
    from dpdiff.privacy.plan import resolve_mechanism
    from dpdiff.privacy.selection import candidate_rdp
    from dpdiff.report.cli import compose_finetune
    from dpdiff.settings import RunSettings

    s0 = RunSettings.from_config(compose_finetune(base_overrides + grid[0]))
    if not s0.privacy.enabled:
        raise UserError("dpdiff tune selects among private runs: drop privacy=none")
    n = prepare(s0.data, unit=s0.privacy.unit).num_train_units
    worst, delta = None, None
    for point in grid:
        s = RunSettings.from_config(compose_finetune(base_overrides + point))
        s = replace(s, train=s.train.resolved(num_units=n)[0])  # auto batch size and steps, as finetune resolves
        aggregate = s.adapter.embedding is not None and s.adapter.embedding.mechanism == "aggregate"
        b, t = (n, 1) if aggregate else (s.train.batch_size, s.train.max_steps)
        mech = resolve_mechanism(s.privacy, num_units=n, batch_size=b, max_steps=t)
        rdp = candidate_rdp([MechanismSegment(mech.noise_multiplier, mech.sample_rate, mech.steps)],
                            score_noise_multiplier=score_noise)
        worst = rdp if worst is None else np.maximum(worst, rdp)
        delta = mech.delta if delta is None else max(delta, mech.delta)
    return worst, delta, n


def noisy_score(run_dir: Path, *, clip: float, noise: float, max_units: int, rng) -> dict:
    """The candidate's DP score: the sum over held-out units (at most ``max_units``, drawn with ``rng``) of each
    unit's denoising loss clipped to [0, clip], plus N(0, (noise x clip)^2). Lower is better."""
    import numpy as np

    from dpdiff.probes.context import denoising_losses, encode_captions, encode_images, shared_noises
    from recipes.probe import ProbeRecipe

    recipe = ProbeRecipe(run_dir, [])
    recipe.setup()
    ctx = recipe.ctx
    held = list(ctx.nonmember_records)
    if not held:
        raise UserError("dpdiff tune scores candidates on held-out units: set data.holdout_fraction > 0")
    by_unit: dict = {}
    for i in held:
        by_unit.setdefault(ctx.unit_key(i), []).append(i)
    keys = sorted(by_unit, key=str)
    if len(keys) > max_units:  # a subset drawn independently of the data (fresh entropy)
        keys = [keys[j] for j in sorted(rng.choice(len(keys), size=max_units, replace=False).tolist())]
    ids = [i for k in keys for i in by_unit[k]]
    recs = [ctx.records[i] for i in ids]
    lat = encode_images(ctx, recs)
    cond = encode_captions(ctx, [r.text for r in recs], recs)
    noises = shared_noises(tuple(lat.shape[1:]), 2, 4242)  # public, the same for every candidate
    loss = denoising_losses(ctx.denoiser, ctx.objective(), lat, cond, timesteps=[100, 300, 500, 700, 900],
                            noises=noises, device=ctx.device).mean(dim=tuple(range(1, 3)))
    per_record = dict(zip(ids, loss.tolist()))
    unit_loss = np.array([np.mean([per_record[i] for i in by_unit[k]]) for k in keys])
    clipped = np.clip(unit_loss, 0.0, clip)
    # the released statistic is the noisy sum (sensitivity: one unit's clipped loss); every candidate sums over the
    # same held-out units, so the sums rank the candidates as the means would, without dividing by a private count
    return {"score": float(clipped.sum() + rng.normal(0.0, noise * clip)), "units": len(keys)}


def run_candidate(out: Path, i: int, overrides: list[str]) -> Path:
    run_dir = out / f"candidate-{i:03d}"
    cmd = [sys.executable, "-m", "dpdiff.cli", "finetune", *overrides, f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        raise UserError(f"candidate {i} ({' '.join(overrides)}) failed: {last}")
    return run_dir


def tune(args) -> dict:
    import numpy as np

    from dpdiff.io import write_json_atomic
    from dpdiff.privacy.selection import TruncatedNegativeBinomial, selection_from_rdp

    out = Path(args.out_dir).expanduser()
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} is not empty: dpdiff tune writes a new directory")
    if args.score_noise <= 0 or args.score_clip <= 0 or args.score_units < 1:
        raise UserError("--score-noise and --score-clip must be > 0, --score-units >= 1")
    grid = parse_grid(args.grid)
    base = [*args.overrides, "probes=none", "eval=none"]
    dist = TruncatedNegativeBinomial.with_mean(args.mean_candidates, eta=args.eta)
    worst, delta, n = grid_worst_rdp(base, grid, score_noise=args.score_noise)
    sel = selection_from_rdp(worst, dist, delta=delta)
    eps, order, one = sel["epsilon"], sel["order"], sel["one_candidate_epsilon"]
    public = {"epsilon": eps, "delta": delta, "rdp_order": order, "method": "private selection (Papernot & Steinke "
              "2022, Theorem 2): a random number of candidates, only the best released", "eta": dist.eta,
              "gamma": dist.gamma, "expected_candidates": dist.mean(), "grid_points": len(grid),
              "one_candidate_epsilon": one, "score": {"what": "held-out denoising loss per unit, clipped, summed, "
                                                      "plus Gaussian noise (lower is better)",
                                                      "clip": args.score_clip, "noise_multiplier": args.score_noise,
                                                      "max_units": args.score_units}}
    from dpdiff.report.cli import compose_finetune

    budget = compose_finetune(base + grid[0]).privacy.get("dataset_budget")
    if budget is not None and eps > float(budget):
        raise UserError(f"the tuning procedure would spend epsilon {eps:.3g} > privacy.dataset_budget {budget}: "
                        "fewer expected candidates, a larger --score-noise or a smaller target epsilon")
    print(f"dpdiff tune: {len(grid)} grid points, {n} training units; the whole procedure is "
          f"({eps:.3g}, {delta:.2g})-DP (one candidate: {one:.3g}); candidates: random, {dist.mean():.1f} expected",
          flush=True)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng()  # fresh OS entropy: K, the grid draws and the score noise are in no config
    k = dist.sample(rng)
    cands = []
    for i in range(k):
        point = grid[int(rng.integers(len(grid)))]
        run_dir = run_candidate(out, i, base + point)
        sc = noisy_score(run_dir, clip=args.score_clip, noise=args.score_noise, max_units=args.score_units, rng=rng)
        cands.append({"run_dir": run_dir.name, "overrides": point, **sc})
        print(f"  candidate {i}: {' '.join(point)}  noisy score {sc['score']:.4f}", flush=True)
    best = min(cands, key=lambda c: c["score"])
    public.update(best_overrides=best["overrides"])
    write_json_atomic(out / "selection.json", public)
    owner = out / "tuning_owner.json"
    write_json_atomic(owner, {"not_for_publication": "the number of candidates and their scores: the guarantee "
                              "averages over K, which must not be published", "candidates": cands})
    os.chmod(owner, 0o600)
    win = out / best["run_dir"]
    priv = json.loads((win / "privacy.json").read_text())
    priv["selection"] = {k2: public[k2] for k2 in ("epsilon", "delta", "method", "eta", "gamma",
                                                   "expected_candidates", "one_candidate_epsilon")}
    priv["guarantee"] = (f"({eps:.4g}, {delta:.3g})-DP for each {priv.get('privacy_unit', 'unit')} for the tuning "
                         f"procedure that selected this run (this run alone: {priv['guarantee']})")
    write_json_atomic(win / "privacy.json", priv)
    link = out / "best"
    link.symlink_to(best["run_dir"])
    print(f"best: {' '.join(best['overrides'])} -> {link} ; the procedure: ({eps:.3g}, {delta:.2g})-DP "
          f"(selection.json); keep candidate-* and tuning_owner.json private", flush=True)
    return public


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpdiff tune", description=__doc__.split("\n\n")[2].replace("\n", " "))
    p.add_argument("out_dir", help="a new directory for the candidates and selection.json")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a train.* or adapter.* key and its values (repeat for more keys)")
    p.add_argument("--mean-candidates", type=float, default=8.0, help="expected number of candidates E[K] (> 1)")
    p.add_argument("--eta", type=float, default=1.0, help="the TNB's eta (1: geometric, 0: logarithmic)")
    p.add_argument("--score-noise", type=float, default=4.0,
                   help="noise multiplier of the held-out score: its noise std is this x --score-clip, to compare "
                        "with how much the candidates' summed losses differ (which grows with --score-units)")
    p.add_argument("--score-clip", type=float, default=0.5,
                   help="each held-out unit's loss is clipped to this (near the denoising loss's scale)")
    p.add_argument("--score-units", type=int, default=256, help="held-out units scored per candidate (at most)")
    p.add_argument("overrides", nargs="*", help="finetune overrides shared by every candidate, key=value")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    with user_errors_exit():
        if not math.isfinite(args.mean_candidates) or args.mean_candidates <= 1:
            raise UserError("--mean-candidates must be > 1")
        tune(args)


if __name__ == "__main__":
    main()
