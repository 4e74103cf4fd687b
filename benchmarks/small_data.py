"""Small private sets: a new look from 100 images, DP-LoRA against the private embedding adapter.

    python benchmarks/small_data.py [--per-digit 20] [--epsilons 1,8] [--images 20]

The private set: ``per_digit`` printed digits 0-4 from the built-in demo's images (5 x 20 = 100 by default), a
look the tiny base has never drawn (it draws handwritten digits), captions "a digit three". Every run is
``dpdiff finetune`` as a user runs it (probes off); each is then scored the way the demo's eval scores
(``dpdiff.report.utility``'s digit x style classifier): from ``--images`` generations per digit of the prompt
"a digit k" (with the adapter's token for the embedding adapter), the **look rate** (the fraction drawn printed)
and the **prompt accuracy** (the fraction showing the requested digit). Runs:

* non-private LoRA and non-private textual inversion (adapter=embedding, privacy=none): the references;
* at each epsilon: DP-LoRA (the recipe's defaults for this N), the embedding adapter by DP-SGD (mechanism=dpsgd),
  and by noisy aggregation of per-image embeddings (mechanism=aggregate, DPAgg-TI).

Results: benchmarks/results/small_data.json and small_data.md. The claim is the ratio of each private run's look
rate to non-private textual inversion's, measured in one run of this script.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ROOT = HERE.parent
TOKEN = "<private-look>"


def write_small_set(root: Path, per_digit: int) -> Path:
    """``per_digit`` images of each digit 0-4 of the built-in printed demo, as an image folder."""
    from dpdiff.data.demos import builtin_digits_dir

    src = builtin_digits_dir()
    rows = [json.loads(x) for x in (src / "metadata.jsonl").read_text().splitlines() if x.strip()]
    taken: dict[str, int] = {}
    out = []
    root.mkdir(parents=True, exist_ok=True)
    for r in rows:
        if taken.get(r["text"], 0) >= per_digit:
            continue
        taken[r["text"]] = taken.get(r["text"], 0) + 1
        (root / r["file_name"]).write_bytes((src / r["file_name"]).read_bytes())
        out.append({"file_name": r["file_name"], "text": r["text"]})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in out) + "\n")
    return root


def runs(epsilons: list[float]) -> list[dict]:
    lora = ["train.batch_size=32", "train.micro_batch_size=32", "train.max_steps=100", "train.lr=0.02"]
    out = [{"name": "LoRA, non-private", "eps": None, "kind": "lora", "args": ["privacy=none", *lora]},
           {"name": "textual inversion, non-private", "eps": None, "kind": "embedding",
            "args": ["experiment=private_look", "privacy=none"]}]
    for e in epsilons:
        out += [{"name": f"DP-LoRA, eps {e:g}", "eps": e, "kind": "lora",
                 "args": [f"privacy.target_epsilon={e}", *lora]},
                {"name": f"embedding, DP-SGD, eps {e:g}", "eps": e, "kind": "embedding",
                 "args": ["experiment=private_look", f"privacy.target_epsilon={e}"]},
                {"name": f"embedding, aggregate (DPAgg-TI), eps {e:g}", "eps": e, "kind": "embedding",
                 "args": ["experiment=private_look", "adapter.mechanism=aggregate", "privacy.max_grad_norm=1.0",
                          f"privacy.target_epsilon={e}"]}]
    return out


def finetune(data: Path, run: dict, work: Path, *, home: Path) -> Path:
    import re

    run_dir = work / re.sub(r"[^A-Za-z0-9_.-]+", "_", run["name"]).strip("_")  # a path Hydra's override grammar takes
    args = [str(Path(sys.executable).with_name("dpdiff")), "finetune", f"data.path={data}",
            f"hydra.run.dir={run_dir}", "probes=none", "eval=none", "data.holdout_fraction=0", "train.progress=false",
            "train.sample.steps=10", *run["args"]]
    env = {**os.environ, "DPDIFF_HOME": str(home), "WANDB_MODE": "offline"}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"{run['name']} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return run_dir


def score(run_dir: Path, kind: str, *, per: int) -> dict:
    """Look rate and prompt accuracy of ``per`` generations per digit (seeds fixed, shared by every run)."""
    from dpdiff.models.loading import load_base
    from dpdiff.paths import TINY_BASE_DIR

    base = load_base(str(TINY_BASE_DIR))
    if kind == "lora":
        base.pipe.load_lora_weights(str(run_dir / "lora"))
        return look(base, per=per)
    base.pipe.load_textual_inversion(str(run_dir / "embedding" / "learned_embeds.safetensors"))
    return look(base, per=per, suffix=f" {TOKEN}")


def look(base, *, per: int, suffix: str = "") -> dict:
    """Generate ``per`` images of "a digit k{suffix}" for k = 0..4 and score them with the demo's classifier."""
    from dpdiff.models.loading import sampling_pipeline
    from dpdiff.models.pipeline import generate
    from dpdiff.report.utility import _score

    pipe = sampling_pipeline(base, base.denoiser, resolution=base.resolution)
    words = ("zero", "one", "two", "three", "four")
    prompts = [f"a digit {words[d]}{suffix}" for d in range(5) for _ in range(per)]
    images = generate(pipe, prompts, seeds=[10_000 + i for i in range(len(prompts))], steps=20, guidance_scale=3.0)
    res = _score(images, list(range(5)), per, "printed")
    return {"look_rate": res["style_rate"], "prompt_accuracy": res["prompt_accuracy"],
            "in_look_and_correct": res["accuracy_in_style"]}


def weights_count(run_dir: Path) -> int:
    """Trainable weights the run released (its LoRA factors or its token vector)."""
    from safetensors import safe_open

    f = next(iter(sorted((run_dir / "lora").glob("*.safetensors"))), None) if (run_dir / "lora").exists() \
        else run_dir / "embedding" / "learned_embeds.safetensors"
    with safe_open(str(f), framework="pt") as st:
        return sum(st.get_tensor(k).numel() for k in st.keys())


def markdown(res: dict) -> str:
    ref = next((r for r in res["runs"] if r["name"] == "textual inversion, non-private"), None)
    lines = ["# Small private sets: a new look from 100 images", "",
             f"Machine: {res['machine']}. Private set: {res['images']} printed digits 0-4 (the base draws handwritten "
             "ones), captions \"a digit k\". Scored from "
             f"{res['per_digit']} generations per digit: look rate = drawn printed, prompt accuracy = the requested "
             "digit. Generated by `python benchmarks/small_data.py`.", "",
             "| run | epsilon (spent) | sigma | trainable | look rate | vs non-private TI | prompt accuracy | "
             "right digit in the look | wall (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        rel = f"{r['look_rate'] / ref['look_rate']:.2f}x" if ref and ref["look_rate"] > 0 else "n/a"
        eps = "none" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        sigma = "-" if not r.get("noise_multiplier") else f"{r['noise_multiplier']:.2f}"
        lines.append(f"| {r['name']} | {eps} | {sigma} | {r['trainable']:,} | {r['look_rate']:.2f} | {rel} | "
                     f"{r['prompt_accuracy']:.2f} | {r['in_look_and_correct']:.2f} | {r['wall_seconds']:.0f} |")
    lines += ["", f"Base model (no fine-tuning): look rate {res['base']['look_rate']:.2f}, prompt accuracy "
              f"{res['base']['prompt_accuracy']:.2f} (plain captions); with the token's initialisation word appended "
              f"(\"a digit k style\"): {res['base_suffix']['look_rate']:.2f}, "
              f"{res['base_suffix']['prompt_accuracy']:.2f}. "
              f"Each cell is a rate over {5 * res['per_digit']} images: about +-{_halfwidth(5 * res['per_digit'])} "
              "at 95% around 0.5, less near 0 or 1.", ""]
    return "\n".join(lines)


def main() -> None:
    import platform

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-digit", type=int, default=20)
    ap.add_argument("--epsilons", default="1,8")
    ap.add_argument("--images", type=int, default=40, help="generations per digit when scoring")
    ap.add_argument("--out", default=str(RESULTS / "small_data"))
    ap.add_argument("--only", default=None, help="run only the runs whose name contains this text")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dpdiff-small-"))
    data = write_small_set(work / "data", args.per_digit)
    eps = [float(x) for x in args.epsilons.split(",") if x]
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "images": 5 * args.per_digit,
           "per_digit": args.images, "runs": []}
    res["base"] = score_base(args.images)
    res["base_suffix"] = score_base(args.images, suffix=" style")
    for run in runs(eps):
        if args.only and args.only not in run["name"]:
            continue
        t0 = time.time()
        run_dir = finetune(data, run, work, home=work / "home")
        wall = time.time() - t0
        priv = json.loads((run_dir / "privacy.json").read_text())
        trainable = weights_count(run_dir)
        r = {"name": run["name"], "target_epsilon": run["eps"], "epsilon": priv.get("epsilon"),
             "noise_multiplier": priv.get("noise_multiplier"), "steps": priv.get("steps"),
             "trainable": trainable,
             "wall_seconds": round(wall, 1), **score(run_dir, run["kind"], per=args.images)}
        res["runs"].append(r)
        print(json.dumps(r), flush=True)
    write_results(Path(args.out), res, markdown)


def write_results(out: Path, res: dict, markdown) -> None:
    """``out``.json (the measurements) and ``out``.md (``markdown(res)``), and the table on stdout."""
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))


def _halfwidth(n: int) -> str:
    return f"{1.96 * (0.25 / n) ** 0.5:.2f}"


def score_base(per: int, *, suffix: str = "") -> dict:
    from dpdiff.models.loading import load_base
    from dpdiff.paths import TINY_BASE_DIR

    return look(load_base(str(TINY_BASE_DIR)), per=per, suffix=suffix)


if __name__ == "__main__":
    main()
