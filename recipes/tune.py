"""dpdiff tune: hyperparameter tuning whose cost is accounted (private selection, Papernot & Steinke 2022).

    dpdiff tune OUT_DIR --grid train.lr=0.005,0.01,0.02 --grid adapter.rank=2,4 [--mean-candidates 8]
                [--eta 1] [--score-noise 4] [--score-clip 0.5] [--score-floor 0] [--score-units 256]
                [OVERRIDE ...]

Keeping the best of several private runs by a score computed on private data leaks beyond each run's epsilon. Here
the number of candidates K is random (a truncated negative binomial with the mean asked, drawn from fresh OS
entropy), each candidate is a grid point drawn uniformly at random and trained as ``dpdiff finetune`` trains (the
same overrides otherwise), and scored by a DP score: its denoising loss on held-out units (never trained on), each
unit's loss clipped to [score_floor, score_clip] and centred on the range's middle, summed, one Gaussian draw
N(0, (score_noise x (score_clip - score_floor))^2) added (the candidates share the held-out units, so the noisy sums
rank them). Only the best is released. The guarantee of the
whole procedure (``dpdiff.privacy.selection``: Theorem 2 of Papernot & Steinke over the worst grid point's ledger
plus the score's Gaussian mechanism) is computed before anything trains, written to OUT_DIR/selection.json and to
the winner's privacy.json (``selection``), and refused if it exceeds ``privacy.dataset_budget``.

What the data owner keeps to themselves: K and every candidate (OUT_DIR/candidate-*, tuning_owner.json, 0600):
the bound averages over K, so K must not be published; publish OUT_DIR/best (the winner) and selection.json.

The dataset ledger follows every record the procedure touched: each candidate is a ``dpdiff finetune`` attempt
on the records it trains on, and the procedure's own line charges the score releases on the held-out records they
read, names the procedure and lists its candidate dirs. The ledger charges a record the procedure's candidates and
scores together as the one mechanism they are: Papernot & Steinke's bound for the worst grid point (the training
records) and one score release (the scored ones), whatever K and the outcome, never their composition as runs
(``dpdiff.privacy.dataset_ledger.selection_group_rdp``). Before the first candidate trains, the training records'
history composed with that bound, and the held-out records' history with the scores', are checked against
``privacy.dataset_budget``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import math
import os
import subprocess
import sys
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np

from dpdiff.cli import user_errors_exit
from dpdiff.data.prepare import prepare
from dpdiff.data.records import ids_of
from dpdiff.errors import UserError
from dpdiff.io import write_json_atomic
from dpdiff.privacy.accountants import MechanismSegment
from dpdiff.privacy.dataset_ledger import (
    CANDIDATE_PREFIX,
    SELECTION,
    DatasetLedger,
    RecordIds,
    charge_attempt,
    charges_summary,
    ledger_location,
    make_entry,
    record_charges,
    worst_with_curve,
)
from dpdiff.privacy.plan import resolve_mechanism
from dpdiff.privacy.selection import (
    TruncatedNegativeBinomial,
    candidate_rdp,
    rdp_of,
    selection_from_rdp,
    selection_rdp,
)
from dpdiff.probes.context import record_losses
from dpdiff.report.privacy_json import republish, with_selection
from dpdiff.report.run_report import write_run_report
from dpdiff.runtime import RunDirLock
from dpdiff.schema import compose
from dpdiff.settings import RunSettings
from recipes.probe import ProbeRecipe

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


def grid_mechanisms(base_overrides: list[str], grid: list[list[str]]):
    """(each grid point's DP-SGD mechanism as a segment, delta, the prepared data, the base settings): every grid
    point's mechanism as the finetune recipe would resolve it, before anything trains."""

    s0 = RunSettings.from_config(compose(base_overrides + grid[0]))
    if not s0.privacy.enabled:
        raise UserError("dpdiff tune selects among private runs: drop privacy=none")
    data = prepare(s0.data, unit=s0.privacy.unit)
    n = data.num_train_units
    segments, delta = [], None
    for point in grid:
        s = RunSettings.from_config(compose(base_overrides + point))
        s = replace(s, train=s.train.resolved(num_units=n)[0])  # auto batch size and steps, as finetune resolves
        aggregate = s.adapter.embedding is not None and s.adapter.embedding.mechanism == "aggregate"
        b, t = (n, 1) if aggregate else (s.train.batch_size, s.train.max_steps)
        mech = resolve_mechanism(s.privacy, num_units=n, batch_size=b, max_steps=t)
        segments.append(MechanismSegment(mech.noise_multiplier, mech.sample_rate, mech.steps))
        delta = mech.delta if delta is None else max(delta, mech.delta)
    return segments, delta, data, s0


def score_units(data, max_units: int, rng) -> list[int]:
    """The held-out units every candidate is scored on: all of them, or ``max_units`` drawn uniformly with fresh
    entropy (independently of the data), once for the whole procedure so the candidates' sums rank them."""
    held = sorted(int(u) for u in data.holdout_units)
    if not held:
        raise UserError("dpdiff tune scores candidates on held-out units: set data.holdout_fraction > 0")
    if len(held) > max_units:
        held = [held[j] for j in sorted(rng.choice(len(held), size=max_units, replace=False).tolist())]
    return held


class ProcedureLine:
    """The procedure's line in the dataset ledger. The candidates' runs charge the records they train on (each its
    own ``dpdiff finetune`` attempt); this line charges the held-out records the scores read: K Gaussian releases
    (noise multiplier ``score_noise``, sensitivity one unit's clipped loss) on the scored units' records, planned
    for the K drawn before the first candidate trains (refused past ``privacy.dataset_budget``), corrected to
    the scores released when the procedure ends. It also names the procedure (``procedure``: the TNB, every grid
    point's mechanism and the candidate dirs, each listed before its candidate starts), so that the ledger charges
    its candidates and scores as one private selection (``dpdiff.privacy.dataset_ledger.selection_group_rdp``)."""

    def __init__(self, out: Path, data, settings, units: list[int], *, score_noise: float, delta: float,
                 dist: TruncatedNegativeBinomial, grid: list[MechanismSegment]):
        self.ids = ids_of([data.records[i] for u in units for i in data.units.members[u]])
        self.procedure = {"kind": SELECTION, "eta": dist.eta, "gamma": dist.gamma,
                          "grid": [[g.to_dict()] for g in grid], "candidates": []}
        self.priv, self.data, self.out, self.noise = settings.privacy, data, out, score_noise
        self.delta = float(self.priv.dataset_delta or delta)
        self.led = DatasetLedger(ledger_location(data_root=data.root, source_fingerprint=data.source_fingerprint,
                                                 configured=self.priv.dataset_ledger))
        self.attempt_id = f"tune-score-{uuid.uuid4().hex}"
        self.record_set: dict | None = None

    def _entry(self, status: str, scores: int):
        return make_entry(attempt_id=self.attempt_id, run_id=self.attempt_id, run_dir=str(self.out.resolve()),
                          fingerprint=self.data.fingerprint, source_fingerprint=self.data.source_fingerprint,
                          status=status, dp=True, privacy_unit=self.priv.unit, delta=self.delta,
                          accountant=self.priv.accountant, segments=[MechanismSegment(self.noise, 1.0, scores)],
                          record_set=self.record_set, procedure=self.procedure)

    def charge(self, status: str, scores: int) -> None:
        def make(record_set):
            if record_set is not None:
                self.record_set = record_set
            return self._entry(status, scores)

        charge_attempt(self.led, make, self.ids, delta=self.delta, accountant=self.priv.accountant,
                       unit=self.priv.unit, planned=status == "planned", budget=self.priv.dataset_budget,
                       what="the tuning scores", noun="held-out record")

    def add_candidate(self, name: str, scores: int) -> None:
        """List a candidate dir in the procedure's line before its candidate starts (the ledger counts the fresh
        attempt there as the procedure's)."""
        self.procedure = {**self.procedure, "candidates": [*self.procedure["candidates"], name]}
        with self.led.lock():
            self.led.record(self._entry("planned", scores))

    def check_training_records(self, curve) -> float:
        """Before any candidate trains: the training records' worst epsilon once the procedure (RDP ``curve``:
        the selection bound for training records) is composed with what the ledger already charged them; refused
        past ``privacy.dataset_budget``. Returns that epsilon."""
        worst = worst_with_curve(self.led, self.data.train_record_ids(), curve=curve, delta=self.delta,
                                 accountant=self.priv.accountant)
        budget = self.priv.dataset_budget
        if budget is not None and worst > budget:
            raise UserError(f"privacy.dataset_budget={budget:g}: the tuning procedure would bring its most-charged "
                            f"training record to epsilon {worst:.3f} at delta {self.delta:.3g} (ledger "
                            f"{self.led.path}): fewer expected candidates, a smaller target epsilon, or raise the "
                            "budget knowingly")
        return worst

    def summary(self) -> dict:
        """The ledger's charges, once the procedure ended, on the records it touched (training and scored)."""
        train = self.data.train_record_ids()
        users = (None if train.users is None and self.ids.users is None else
                 (*(train.users or (None,) * len(train)), *(self.ids.users or (None,) * len(self.ids))))
        ids = RecordIds(digests=(*train.digests, *self.ids.digests), users=users)
        ch = record_charges(self.led, self.led.entries(), ids, delta=self.delta, accountant=self.priv.accountant,
                            absent=False)
        return {**charges_summary(ch), "path": str(self.led.path)}


def noisy_score(run_dir: Path, *, units: list[int], clip: float, noise: float, rng, floor: float = 0.0) -> dict:
    """The candidate's DP score: the sum over the held-out ``units`` (``score_units``) of each unit's denoising
    loss clipped to [floor, clip] minus the range's middle, plus N(0, (noise x (clip - floor))^2). Lower is better.

    Sensitivity clip - floor: replacing one scored unit by another (the scored units are a fixed-size draw from
    the held-out ones, so a neighbouring dataset's draw can be coupled to differ in one unit) moves one term by at
    most the range; adding or removing one, by at most half of it (centred terms). Centring shifts every
    candidate's sum alike (same units), so it never changes their order; it is what lets a floor shrink the
    noise. A floor and clip that bracket the losses (the demo's unit losses lie in 0.13-0.21) cut the noise at
    the same privacy: [0, 0.5] draws std 2 at --score-noise 4, [0.1, 0.25] 0.6 (on the built-in demo the unit
    losses measured 0.13-0.21; a user picks the range from public knowledge of the loss's scale)."""

    recipe = ProbeRecipe(run_dir, [])
    recipe.setup()
    ctx = recipe.ctx
    by_unit: dict = {}
    for i in ctx.nonmember_records:
        by_unit.setdefault(ctx.unit_key(i), []).append(i)
    keys = [("unit", u) for u in units]
    if not all(k in by_unit for k in keys):  # the candidate read another split than the one charged
        raise UserError(f"{run_dir}: the candidate's held-out units are not those the tuning scores were charged "
                        "for (the data folder changed during tuning?)")
    ids = [i for k in keys for i in by_unit[k]]
    # the held-out loss of the utility metrics (the shipped eval group's timesteps and noise draws)
    ev = compose([]).eval
    loss = record_losses(ctx, ids, timesteps=ev.timesteps, noise_draws=ev.noise_draws)["model"]
    per_record = dict(zip(ids, loss.tolist()))
    unit_loss = np.array([np.mean([per_record[i] for i in by_unit[k]]) for k in keys])
    # every candidate sums over the same held-out units, so the sums rank the candidates as the means would,
    # without dividing by a private count
    return {"score": score_sum(unit_loss, floor=floor, clip=clip) + float(rng.normal(0.0, noise * (clip - floor)))}


def score_sum(unit_loss, *, floor: float, clip: float) -> float:
    """The score's statistic before noise: each unit's loss clipped to [floor, clip], centred, summed
    (sensitivity clip - floor; ``noisy_score``)."""
    return float((np.clip(np.asarray(unit_loss, dtype=float), floor, clip) - (floor + clip) / 2).sum())


def candidate_dir(i: int) -> str:
    return f"{CANDIDATE_PREFIX}{i:03d}"


def run_candidate(out: Path, i: int, overrides: list[str]) -> Path:
    run_dir = out / candidate_dir(i)
    cmd = [sys.executable, "-m", "dpdiff.cli", "finetune", *overrides, f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        raise UserError(f"candidate {i} ({' '.join(overrides)}) failed: {last}")
    return run_dir


def tune(args) -> dict:
    out = Path(args.out_dir).expanduser()
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} is not empty: dpdiff tune writes a new directory")
    if args.score_noise <= 0 or args.score_clip <= 0 or args.score_units < 1:
        raise UserError("--score-noise and --score-clip must be > 0, --score-units >= 1")
    if not 0 <= args.score_floor < args.score_clip:
        raise UserError("--score-floor must be >= 0 and below --score-clip")
    grid = parse_grid(args.grid)
    base = [*args.overrides, "probes=none", "eval=none"]
    tracker = compose(base + grid[0]).tracker
    if str(tracker.get("kind")) != "local":
        raise UserError(f"dpdiff tune with tracker={tracker.get('kind')}: every candidate would be a tracked run, "
                        "which tells anyone who sees the tracker (now, or after a sync) how many candidates ran; the "
                        "procedure's guarantee averages over that number and needs it unpublished. Use "
                        "tracker=local (each candidate's metrics stay in its dir)")
    dist = TruncatedNegativeBinomial.with_mean(args.mean_candidates, eta=args.eta)
    segments, delta, data, s0 = grid_mechanisms(base, grid)
    n = data.num_train_units
    # a candidate's RDP: its training plus its score (a record is trained on or scored, never both; the sum is
    # what selection.json states for any record), and for the training records alone
    worst = np.max([candidate_rdp([g], score_noise_multiplier=args.score_noise) for g in segments], axis=0)
    train_curve = selection_rdp(np.max([rdp_of([g]) for g in segments], axis=0), dist)
    sel = selection_from_rdp(worst, dist, delta=delta)
    eps, order, one = sel["epsilon"], sel["order"], sel["one_candidate_epsilon"]
    public = {"epsilon": eps, "delta": delta, "rdp_order": order, "method": "private selection (Papernot & Steinke "
              "2022, Theorem 2): a random number of candidates, only the best released", "eta": dist.eta,
              "gamma": dist.gamma, "expected_candidates": dist.mean(), "grid_points": len(grid),
              "one_candidate_epsilon": one, "score": {"what": "held-out denoising loss per unit, clipped to [floor, "
                                                      "clip] and centred, summed, plus Gaussian noise of std "
                                                      "noise_multiplier x (clip - floor) (lower is better)",
                                                      "clip": args.score_clip, "floor": args.score_floor,
                                                      "noise_multiplier": args.score_noise,
                                                      "max_units": args.score_units}}
    # (the scored units' count stays with the owner: it is drawn from the private held-out split's size)

    budget = s0.privacy.dataset_budget
    if budget is not None and eps > float(budget):
        raise UserError(f"the tuning procedure would spend epsilon {eps:.3g} > privacy.dataset_budget {budget}: "
                        "fewer expected candidates, a larger --score-noise or a smaller target epsilon")
    print(f"dpdiff tune: {len(grid)} grid points, {n} training units; the whole procedure is "
          f"({eps:.3g}, {delta:.2g})-DP (one candidate: {one:.3g}); candidates: random, {dist.mean():.1f} expected",
          flush=True)
    rng = np.random.default_rng()  # fresh OS entropy: K, the grid draws, the scored units and the score noise
    k = dist.sample(rng)
    units = score_units(data, args.score_units, rng)
    ledger = ProcedureLine(out, data, s0, units, score_noise=args.score_noise, delta=delta, dist=dist, grid=segments)
    # before any candidate trains, both refused past privacy.dataset_budget: the training records' history with
    # the procedure's bound, and the held-out records' history with the scores (the procedure's ledger line)
    worst_train = ledger.check_training_records(train_curve)
    out.mkdir(parents=True, exist_ok=True)
    lock = RunDirLock(out)  # held while the procedure runs: the ledger counts a running procedure as a selection
    if not lock.acquire():
        raise UserError(f"{out} is in use by another dpdiff process")
    try:
        try:
            ledger.charge("planned", k)
        except UserError:  # refused before anything ran: leave no directory in the way of a retry
            lock.release()
            lock.path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                out.rmdir()
            raise
        print(f"dataset ledger: the most-charged training record at epsilon <= {worst_train:.3g} once the procedure "
              f"ends (delta {ledger.delta:.2g}; {ledger.led.path})", flush=True)
        cands = []
        try:
            for i in range(k):
                point = grid[int(rng.integers(len(grid)))]
                ledger.add_candidate(candidate_dir(i), k)
                run_dir = run_candidate(out, i, base + point)
                sc = noisy_score(run_dir, units=units, clip=args.score_clip, floor=args.score_floor,
                                 noise=args.score_noise, rng=rng)
                cands.append({"run_dir": run_dir.name, "overrides": point, **sc})
                print(f"  candidate {i}: {' '.join(point)}  noisy score {sc['score']:.4f}", flush=True)
        finally:  # the scores actually released (a failed candidate ends the procedure)
            ledger.charge("finished" if len(cands) == k else "ended", len(cands))
        best = min(cands, key=lambda c: c["score"])
        public.update(best_overrides=best["overrides"])
        write_json_atomic(out / "selection.json", public)
        owner = out / "tuning_owner.json"
        write_json_atomic(owner, {"not_for_publication": "the number of candidates and their scores: the guarantee "
                                  "averages over K, which must not be published", "candidates": cands,
                                  "score_units": units, "score_clip": args.score_clip,
                                  "score_floor": args.score_floor,
                                  "dataset_ledger": ledger.summary()})
        os.chmod(owner, 0o600)
        win = out / best["run_dir"]
        priv = with_selection(json.loads((win / "privacy.json").read_text()),
                              {k2: public[k2] for k2 in ("epsilon", "delta", "method", "eta", "gamma",
                                                         "expected_candidates", "one_candidate_epsilon")},
                              grid_keys=[spec.partition("=")[0] for spec in args.grid])
        weights = republish(win, priv)  # privacy.json and the model card state the procedure's guarantee
        write_run_report(win)  # and so does the winner's report
        link = out / "best"
        link.symlink_to(best["run_dir"])
        print(f"best: {' '.join(best['overrides'])} -> {link} ; the procedure: ({eps:.3g}, {delta:.2g})-DP "
              f"(selection.json). Publish {link / weights.relative_to(win)} (weights and model card), "
              f"{link / 'privacy.json'} and "
              "selection.json; keep the rest of the candidate dirs and tuning_owner.json private (the winner's "
              "dir name and report say how many candidates ran)", flush=True)
    finally:
        lock.release()
    return public


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpdiff tune", description=__doc__.split("\n\n")[2].replace("\n", " "))
    p.add_argument("out_dir", help="a new directory for the candidates and selection.json")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a train.* or adapter.* key and its values (repeat for more keys)")
    p.add_argument("--mean-candidates", type=float, default=8.0, help="expected number of candidates E[K] (> 1)")
    p.add_argument("--eta", type=float, default=1.0, help="the TNB's eta (1: geometric, 0: logarithmic)")
    p.add_argument("--score-noise", type=float, default=4.0,
                   help="noise multiplier of the held-out score: its noise std is this x (--score-clip - "
                        "--score-floor), to compare "
                        "with how much the candidates' summed losses differ (which grows with --score-units)")
    p.add_argument("--score-clip", type=float, default=0.5,
                   help="each held-out unit's loss is clipped to this (near the denoising loss's scale)")
    p.add_argument("--score-floor", type=float, default=0.0,
                   help="each held-out unit's loss is also clipped from below to this; the score's sensitivity, "
                        "and its noise, are --score-clip minus this (choose both from public knowledge of the loss "
                        "scale, never from the private held-out losses)")
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
