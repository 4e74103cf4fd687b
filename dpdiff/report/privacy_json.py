"""privacy.json and run.json: the machine-readable contract of a run (DESIGN.md section 4)."""

from __future__ import annotations

import platform
import time
from pathlib import Path

from dpdiff.io import write_json_atomic

NEIGHBOURING = "add/remove one privacy unit (Poisson-sampled DP-SGD)"


def caveats(recipe) -> list[str]:
    """What the (epsilon, delta) guarantee does not cover, stated in the report."""
    cfg, data = recipe.cfg, recipe.data
    out = []
    if not recipe.privacy.enabled:
        out.append("This model was trained WITHOUT differential privacy: it has no privacy guarantee.")
    out.append("metrics.jsonl (training loss, gradient-norm statistics) is computed on the private data and is "
               "not privatised; share it only with the data owner.")
    if data.sample_prompts_source == "training captions":
        out.append("The sample-grid prompts are the most frequent training captions: the captions themselves are "
                   "shown verbatim and are not protected by the guarantee.")
    if data.holdout_units:
        out.append(f"{len(data.holdout_units)} privacy units were held out (never trained on); the probes (as "
                   "non-members) and the utility metrics read them, outside the guarantee: the report is for the "
                   "data owner.")
    out.append("The data checks (validation, deduplication) and the choice of hyperparameters read the private "
               "data without privacy accounting." if not data.builtin else
               "Hyperparameters of the built-in demo were chosen on this same demo data (not accounted).")
    if data.skipped:
        out.append(f"{len(data.skipped)} bad file(s) were skipped; the guarantee covers the units actually used.")
    if cfg.train.get("resume_from"):
        out.append("This run resumed from a checkpoint; the ledger composes every step of both parts.")
    out.append("Probe results (extraction, membership inference, audit) describe the training data: they are "
               "for the data owner, not for publication.")
    return out


def _dataset_ledger_summary(recipe) -> dict | None:
    total = getattr(recipe, "dataset_total", None)
    if total is None:
        return None
    return {"path": str(recipe.dataset_ledger.path), "runs": total["runs"], "total_epsilon": total["epsilon"],
            "delta": total["delta"], "unit": total["unit"]}


def privacy_record(recipe) -> dict:
    p, mech, data = recipe.privacy, recipe.mech, recipe.data
    base = {
        "dp": bool(p.enabled),
        "privacy_unit": p.unit,
        "neighbouring_relation": NEIGHBOURING if p.enabled else None,
        "num_units": data.num_train_units,
        "num_images": len(data.train_records()),
        "augmult": p.augmult if p.enabled else 1,
        "max_images_per_user": p.max_images_per_user,
        "world_size": recipe.proc.world_size,
        "train_steps": recipe.trainer.step,
        "stopped_for_budget": recipe.trainer.stopped_for_budget,
        "skipped_files": len(data.skipped),
        "duplicates": data.dedup,
        "dataset_fingerprint": data.fingerprint,
        "holdout_units": len(data.holdout_units),
        "canaries": getattr(recipe.canaries, "summary", lambda: None)(),
        "dataset_ledger": _dataset_ledger_summary(recipe),
        "caveats": caveats(recipe),
    }
    if not p.enabled:
        return {**base, "epsilon": None, "delta": None, "target_epsilon": None, "accountant": None,
                "noise_multiplier": 0.0, "max_grad_norm": None, "sample_rate": None,
                "steps": recipe.trainer.step, "expected_batch_size": float(recipe.cfg.train.batch_size),
                "guarantee": "none: trained without differential privacy"}
    eps = recipe.ledger.epsilon()
    return {
        **base,
        "epsilon": eps.epsilon,
        "epsilon_estimate": eps.estimate,
        "epsilon_lower": eps.lower,
        "accountant_note": eps.error_note,
        "delta": mech.delta,
        "target_epsilon": p.target_epsilon,
        "accountant": p.accountant,
        "noise_multiplier": mech.noise_multiplier,
        "max_grad_norm": p.max_grad_norm,
        "sample_rate": mech.sample_rate,
        "steps": recipe.ledger.steps,
        "expected_batch_size": mech.expected_batch_size,
        "secure_rng": p.secure_rng,
        "ledger": recipe.ledger.to_dict()["segments"],
        "guarantee": (f"({eps.epsilon:.4g}, {mech.delta:.3g})-DP for each {p.unit} ({NEIGHBOURING}), "
                      f"{p.accountant} accountant"),
    }


def write_privacy_json(run_dir: Path, record: dict) -> None:
    write_json_atomic(Path(run_dir) / "privacy.json", record)


def write_run_json(recipe) -> None:
    import diffusers
    import opacus
    import peft
    import torch

    from dpdiff.runtime import git_commit

    write_json_atomic(recipe.run_dir / "run.json", {
        "dpdiff_version": recipe.version,
        "git_commit": git_commit(),
        "base_model": recipe.base.path,
        "data_path": str(recipe.data.root),
        "builtin_demo": recipe.data.builtin,
        "adapter": recipe.cfg.adapter.kind,
        "resolution": recipe.resolution,
        "weights": str(recipe.weights_dir.relative_to(recipe.run_dir)),
        "samples": "samples.png",
        "samples_base": "samples_base.png" if recipe.base_samples_path else None,
        "sample_prompts": recipe.data.sample_prompts,
        "wall_seconds": round(time.time() - recipe.t_start, 2),
        "train_steps": recipe.trainer.step,
        "resumed_from": str(recipe.resume["path"]) if recipe.resume else None,
        "device": str(recipe.proc.device),
        "world_size": recipe.proc.world_size,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
                     "opacus": opacus.__version__, "python": platform.python_version()},
        "data": recipe.data.summary(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
