"""Defaults that fit the dataset: the plan's batch size and steps for N, measured on a second dataset size.

    python benchmarks/auto_defaults.py [--per-digit 180] [--epsilon 8] [--images 40]

The recipe's schedule was measured on the 3,600-unit demo (75 steps of 512, lr 2e-2). `train.batch_size=auto`
and `train.max_steps=auto` (the defaults) take the plan's rule (``dpdiff.privacy.planning.auto_schedule``). This
script measures two candidate rules on a set of another size, keeping the demo's batch (what auto does) against
keeping its sample rate q = 512/3600: ``5 x
per_digit`` printed digits 0-4 rendered from a seed neither the demo nor the evaluation classifier uses (900 by
default), the same look-shift task as the demo. For the demo's fixed numbers and for the rule, a DP run at
``--epsilon`` and a non-private run at the same batch, steps and lr; each scored like the small-data benchmark
(``--images`` generations per digit: look rate, right digit, right digit in the look).

Results: benchmarks/results/auto_defaults.json and .md. The claims are the ratios DP / non-private at the same
steps, and the DP runs' prompt accuracy, measured in one run of this script.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import small_data as sd

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SCORES = ("look_rate", "prompt_accuracy", "in_look_and_correct")
SEED = 77  # the demo renders from seed 1, the classifier's reference digits from 2024


def write_set(root: Path, per_digit: int) -> Path:
    from dpdiff.data.demos import NUMBER_WORDS
    from dpdiff.data.printed import materialize

    return materialize(root, digits=range(5), per_digit=per_digit, seed=SEED,
                       caption=lambda d: f"a digit {NUMBER_WORDS[d]}")


def main() -> None:
    import platform

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-digit", type=int, default=180)
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--levers", action="store_true",
                    help="measure the levers on the auto schedule instead (results/auto_defaults_levers.*)")
    ap.add_argument("--seeds", type=int, default=2, help="--levers: seeds per lever (common random numbers)")
    ap.add_argument("--add", action="store_true",
                    help="--levers: keep the runs already in the results file, run only the levers (or seeds) it "
                         "lacks (their noise is the same draw: common random numbers across invocations)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dpdiff-auto-"))
    data = write_set(work / "data", args.per_digit)
    if args.levers:
        return levers(args, data, work)
    args.out = args.out or str(RESULTS / "auto_defaults")
    schedules = {"the demo's batch (512 x 75; auto)": ["train.batch_size=auto", "train.max_steps=auto"],
                 "the demo's sample rate (128 x 75)": ["train.batch_size=128", "train.max_steps=75"]}
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "images": 5 * args.per_digit,
           "epsilon": args.epsilon, "per_digit": args.images, "runs": [],
           "base": sd.score_base(args.images)}
    for name, sched in schedules.items():
        for private in (True, False):
            label = f"DP eps {args.epsilon:g}" if private else "non-private"
            run = {"name": f"{name}, {label}", "kind": "lora",
                   "args": [*sched, f"privacy.target_epsilon={args.epsilon}" if private else "privacy=none"]}
            t0 = time.time()
            run_dir = sd.finetune(data, run, work, home=work / "home")
            priv = json.loads((run_dir / "privacy.json").read_text())
            r = {"name": run["name"], "schedule": name, "dp": private, "epsilon": priv.get("epsilon"),
                 "noise_multiplier": priv.get("noise_multiplier"), "steps": priv.get("train_steps"),
                 "batch_size": priv["schedule"]["batch_size"],
                 "wall_seconds": round(time.time() - t0, 1), **sd.score(run_dir, "lora", per=args.images)}
            res["runs"].append(r)
            print(json.dumps(r), flush=True)
    sd.write_results(Path(args.out), res, markdown)


# The levers the issue names for keeping prompts under the noise, each one change to the auto schedule's DP run.
# "Caption-conditioned" parameters are the cross-attention key/value maps (attn2.to_k, attn2.to_v: they read the
# text embedding); the "shared" variant leaves them frozen, so the noise cannot move what a caption asks for.
LEVERS = {
    "auto schedule, lr 2e-2 (the default)": [],
    "lr 1e-2": ["train.lr=1e-2"],
    "shared parameters only (cross-attention to_k/to_v frozen)":
        ["adapter.target_modules=[to_q,attn1.to_k,attn1.to_v,to_out.0]"],
    "caption dropout 0.1 (guidance dropout)": ["train.caption_dropout=0.1"],
    "shared parameters, lr 1e-2 (two levers combined)":
        ["adapter.target_modules=[to_q,attn1.to_k,attn1.to_v,to_out.0]", "train.lr=1e-2"],
    "shared parameters, lr 1e-2, caption dropout 0.1 (three combined)":
        ["adapter.target_modules=[to_q,attn1.to_k,attn1.to_v,to_out.0]", "train.lr=1e-2",
         "train.caption_dropout=0.1"],
}


def levers(args, data: Path, work: Path) -> None:
    """DP runs per lever at the auto schedule and the non-private run at the same schedule, scored alike.

    One DP run's outcome moves by more than a lever's effect between fresh noise draws (the default measured 0.75
    and 0.60 look rate in two runs), so the levers are compared on common random numbers: every DP run of one seed
    draws the same sampling masks and Gaussian noise (``privacy.reproducible_noise=true``, ``train.seed``), and each
    lever runs under ``--seeds`` seeds. The paired differences are the claim; the seeds' spread is shown."""
    import platform

    out = Path(args.out or RESULTS / "auto_defaults_levers")
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "images": 5 * args.per_digit,
           "epsilon": args.epsilon, "per_digit": args.images, "seeds": args.seeds, "runs": [],
           "base": None}
    runs = [(name, [*a, f"privacy.target_epsilon={args.epsilon}", "privacy.reproducible_noise=true"], True, seed)
            for seed in range(args.seeds) for name, a in LEVERS.items()]
    runs.append(("auto schedule, lr 2e-2, non-private", ["privacy=none"], False, 0))
    if args.add and out.with_suffix(".json").exists():
        old = json.loads(out.with_suffix(".json").read_text())
        if (old["images"], old["epsilon"], old["per_digit"]) != (res["images"], res["epsilon"], res["per_digit"]):
            raise SystemExit(f"--add: {out}.json was measured with other --per-digit/--epsilon/--images")
        res.update(runs=old["runs"], base=old["base"], seeds=max(old["seeds"], args.seeds))
        done = {(r["name"], r["seed"]) for r in old["runs"]}
        # the default's first seed once more: the new rows are paired with old ones only if it draws as it drew
        recheck = [r for r in runs if r[2] and r[3] == 0][:1]
        runs = [r for r in runs if (r[0], r[3]) not in done] + [(f"recheck: {recheck[0][0]}", *recheck[0][1:])]
    if res["base"] is None:
        res["base"] = sd.score_base(args.images)
    for name, a, private, seed in runs:
        t0 = time.time()
        run_dir = sd.finetune(data, {"name": f"{name} seed {seed}", "kind": "lora", "args": [*a, f"train.seed={seed}"]},
                              work, home=work / "home")
        priv = json.loads((run_dir / "privacy.json").read_text())
        r = {"name": name, "dp": private, "seed": seed, "args": a, "noise_multiplier": priv.get("noise_multiplier"),
             "steps": priv.get("train_steps"), "batch_size": priv["schedule"]["batch_size"],
             "wall_seconds": round(time.time() - t0, 1), **sd.score(run_dir, "lora", per=args.images)}
        print(json.dumps(r), flush=True)
        if name.startswith("recheck: "):
            first = next(x for x in res["runs"] if x["name"] == name.removeprefix("recheck: ") and x["seed"] == seed)
            res["recheck"] = {"name": first["name"], "seed": seed, "then": {k: first[k] for k in SCORES},
                              "now": {k: r[k] for k in SCORES}}
        else:
            res["runs"].append(r)
        sd.write_results(out, res, levers_markdown)  # after every run: an interrupted --add keeps what it measured


def levers_markdown(res: dict) -> str:
    ref = next(r for r in res["runs"] if not r["dp"])
    keys = ("look_rate", "prompt_accuracy", "in_look_and_correct")
    lines = [f"# Levers for prompt accuracy under noise: {res['images']} printed digits, epsilon {res['epsilon']:g}",
             "", f"Machine: {res['machine']}. The look-shift set of `auto_defaults.md` (seed {SEED}); every run the "
             "auto schedule (512 x 75 for this N), LoRA rank 4, one change per row (or the levers named, combined). "
             "Each DP row is the mean of "
             f"{res['seeds']} seeds on common random numbers (every row of one seed draws the same sampling masks and "
             "noise: `privacy.reproducible_noise=true train.seed=s`), the seeds' values in brackets; the difference "
             "to the default row, seed by seed, is the lever's effect. Scored from "
             f"{res['per_digit']} generations per digit. Generated by `python benchmarks/auto_defaults.py --levers`.",
             "", "| run | overrides | look rate | / non-private look | right digit | right digit in the look | "
             "right digit vs default (per seed) |", "|---|---|---|---|---|---|---|"]
    dp = [r for r in res["runs"] if r["dp"]]
    names = list(dict.fromkeys(r["name"] for r in dp))
    default = {r["seed"]: r for r in dp if r["name"] == names[0]}

    def cell(rs, k):
        vals = [r[k] for r in rs]
        return f"{sum(vals) / len(vals):.2f} [{', '.join(f'{v:.2f}' for v in vals)}]"

    for name in names:
        rs = [r for r in dp if r["name"] == name]
        mean_look = sum(r["look_rate"] for r in rs) / len(rs)
        ratio = f"{mean_look / ref['look_rate']:.2f}x" if ref["look_rate"] > 0 else "-"
        diff = ", ".join(f"{r['prompt_accuracy'] - default[r['seed']]['prompt_accuracy']:+.2f}" for r in rs)
        args = " ".join(x for x in rs[0]["args"] if "target_epsilon" not in x and "reproducible" not in x) or "-"
        lines.append(f"| {name} | `{args}` | {cell(rs, keys[0])} | {ratio} | {cell(rs, keys[1])} | "
                     f"{cell(rs, keys[2])} | {diff if name != names[0] else '-'} |")
    lines.append(f"| {ref['name']} | `privacy=none` | {ref['look_rate']:.2f} | - | {ref['prompt_accuracy']:.2f} | "
                 f"{ref['in_look_and_correct']:.2f} | - |")
    lines += ["", f"Base: look rate {res['base']['look_rate']:.2f}, right digit {res['base']['prompt_accuracy']:.2f}.",
              ""]
    if res.get("recheck"):
        rc = res["recheck"]
        same = all(abs(rc["then"][k] - rc["now"][k]) < 1e-9 for k in rc["then"])
        lines += [f"Rows added later (`--add`) are paired with the earlier ones only if one seed still draws the same "
                  f"noise: {rc['name']}, seed {rc['seed']}, re-run then: "
                  + ", ".join(f"{k} {rc['then'][k]:.3f} -> {rc['now'][k]:.3f}" for k in rc["then"])
                  + (" (identical)." if same else " (NOT identical: the added rows are not paired)."), ""]
    return "\n".join(lines)


def markdown(res: dict) -> str:
    lines = [f"# Defaults that fit the dataset: {res['images']} printed digits, epsilon {res['epsilon']:g}", "",
             f"Machine: {res['machine']}. A look-shift set of {res['images']} printed digits 0-4 (seed {SEED}; the "
             "base draws handwritten ones), captions \"a digit k\"; every run LoRA rank 4, lr 2e-2. Scored from "
             f"{res['per_digit']} generations per digit. Generated by `python benchmarks/auto_defaults.py`.", "",
             "| run | batch | steps | sigma | look rate | DP / non-private look | right digit | right digit in the "
             "look | wall (s) |", "|---|---|---|---|---|---|---|---|---|"]
    by = {(r["schedule"], r["dp"]): r for r in res["runs"]}
    for r in res["runs"]:
        ref = by.get((r["schedule"], False))
        ratio = f"{r['look_rate'] / ref['look_rate']:.2f}x" if r["dp"] and ref and ref["look_rate"] > 0 else "-"
        sigma = f"{r['noise_multiplier']:.2f}" if r["dp"] else "-"
        lines.append(f"| {r['name']} | {r['batch_size'] or '-'} | {r['steps']} | {sigma} | {r['look_rate']:.2f} | "
                     f"{ratio} | {r['prompt_accuracy']:.2f} | {r['in_look_and_correct']:.2f} | "
                     f"{r['wall_seconds']:.0f} |")
    lines += ["", f"Base: look rate {res['base']['look_rate']:.2f}, right digit {res['base']['prompt_accuracy']:.2f}.",
              ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
