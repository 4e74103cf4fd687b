"""privacy.json and run.json: the machine-readable contract of a run.

Both are built from explicit, keyword-only inputs (the privacy plan, the prepared data, what the
training loop did), so they are unit-tested without a training run. privacy.json names at least
``epsilon``, ``delta``, ``target_epsilon``, ``accountant``, ``noise_multiplier``, ``max_grad_norm``,
``sample_rate``, ``steps``, ``expected_batch_size``, ``num_units``, ``privacy_unit``, ``augmult``,
``world_size`` and ``dp``; run.json names at least ``base_model``, ``dpdiff_version``, ``git_commit``
and ``wall_seconds``.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

from dpdiff.io import write_json_atomic

NEIGHBOURING = "add/remove one privacy unit (Poisson-sampled DP-SGD)"


def caveats(*, dp: bool, data, resumed: bool, reproducible_noise: bool) -> list[str]:
    """What the (epsilon, delta) guarantee does not cover, stated in the report."""
    out = []
    if not dp:
        out.append("This model was trained WITHOUT differential privacy: it has no privacy guarantee.")
    if dp and reproducible_noise:
        out.append("privacy.reproducible_noise=true: the noise and sampling masks were derived from train.seed. "
                   "There is no guarantee across runs (runs seeded alike draw the same noise), and anyone holding "
                   "this run's config can regenerate its noise. Use only for debugging.")
    out.append("metrics.jsonl (training loss, gradient-norm and signal-to-noise statistics) is computed on the "
               "private data and is not privatised; share it only with the data owner.")
    if data.sample_prompts_source == "training captions":
        out.append("The sample-grid prompts are the most frequent training captions: the captions themselves are "
                   "shown verbatim and are not protected by the guarantee.")
    if data.holdout_units:
        out.append(f"{len(data.holdout_units)} privacy units were held out (never trained on); the probes (as "
                   "non-members) and the utility metrics read them, outside the guarantee: the report is for the "
                   "data owner.")
    out.append("The data checks (validation, deduplication) and the choice of hyperparameters read the private "
               "data without privacy accounting." if not data.builtin else
               "Hyperparameters of the built-in demo were chosen on data generated like this demo data (not "
               "accounted).")
    if data.dedup and data.dedup.get("mode") in ("group", "drop") and data.dedup.get("duplicate_sets"):
        out.append(f"Deduplication ({data.dedup['mode']}) compared images across privacy units: which images were "
                   "merged or dropped depends on other units' data, outside the guarantee.")
    if data.skipped:
        out.append(f"{len(data.skipped)} bad file(s) were skipped; the guarantee covers the units actually used.")
    if resumed:
        out.append("This run resumed from a checkpoint; the ledger composes every step of every part.")
    out.append("Probe results (extraction, membership inference, audit) describe the training data: they are "
               "for the data owner, not for publication.")
    return out


def privacy_record(*, plan, data, world_size: int, train_steps: int, canaries: dict | None = None,
                   dataset_total: dict | None = None, planning: dict | None = None) -> dict:
    """The content of privacy.json.

    ``plan`` is the run's ``PrivacyPlan`` (settings, mechanism, ledger); ``data`` its ``PreparedData``;
    ``planning`` the pre-run plan summary (``dpdiff.privacy.planning``) when there is one.
    """
    s, mech = plan.settings, plan.mechanism
    base = {
        "dp": bool(s.enabled),
        "privacy_unit": s.unit,
        "neighbouring_relation": NEIGHBOURING if s.enabled else None,
        "num_units": data.num_train_units,
        "num_images": len(data.train_records()),
        "augmult": s.augmult if s.enabled else 1,
        "max_images_per_user": s.max_images_per_user,
        "world_size": int(world_size),
        "train_steps": int(train_steps),
        "stopped_for_budget": bool(plan.stopped_for_budget),
        "skipped_files": len(data.skipped),
        "duplicates": data.dedup,
        "dataset_fingerprint": data.fingerprint,
        "source_fingerprint": data.source_fingerprint,
        "holdout_units": len(data.holdout_units),
        "canaries": canaries,
        "dataset_ledger": _dataset_ledger_summary(dataset_total),
        "run_id": plan.run_id,
        "attempt_id": plan.attempt_id,
        "noise_source": plan.randomness.description if s.enabled else None,
        "reproducible_noise": bool(plan.reproducible_noise) if s.enabled else None,
        "engine": getattr(plan, "engine_kind", None),
        "plan": planning,
        "caveats": caveats(dp=s.enabled, data=data, resumed=plan.resume is not None,
                           reproducible_noise=plan.reproducible_noise),
    }
    if mech is None:
        return {**base, "epsilon": None, "delta": None, "target_epsilon": None, "accountant": None,
                "noise_multiplier": 0.0, "max_grad_norm": None, "sample_rate": None,
                "steps": int(train_steps), "expected_batch_size": None,
                "guarantee": "none: trained without differential privacy"}
    eps = plan.epsilon()
    return {
        **base,
        "epsilon": eps.epsilon,
        "epsilon_estimate": eps.estimate,
        "epsilon_lower": eps.lower,
        "accountant_note": eps.error_note,
        "delta": mech.delta,
        "target_epsilon": s.target_epsilon,
        "accountant": s.accountant,
        "noise_multiplier": mech.noise_multiplier,
        "max_grad_norm": s.max_grad_norm,
        "sample_rate": mech.sample_rate,
        "steps": plan.ledger.steps,
        "expected_batch_size": mech.expected_batch_size,
        "ledger": plan.ledger.to_dict()["segments"],
        "guarantee": (f"({eps.epsilon:.4g}, {mech.delta:.3g})-DP for each {s.unit} ({NEIGHBOURING}), "
                      f"{s.accountant} accountant"),
    }


def _dataset_ledger_summary(total: dict | None) -> dict | None:
    if total is None:
        return None
    return {"path": total.get("path"), "runs": total["runs"], "total_epsilon": total["epsilon"],
            "delta": total["delta"], "unit": total["unit"], "accountant": total.get("accountant"),
            "note": total.get("note")}


def write_privacy_json(run_dir: Path, record: dict) -> None:
    write_json_atomic(Path(run_dir) / "privacy.json", record)


def run_record(*, version: str, base_model: str, model_family: str, data, adapter: str, resolution: int,
               weights: str, samples: str | None, samples_base: str | None, sample_prompts: list[str],
               wall_seconds: float, train_steps: int, resumed_from: str | None, device: str, world_size: int) -> dict:
    """The content of run.json."""
    import diffusers
    import opacus
    import peft
    import torch

    from dpdiff.runtime import git_commit

    return {
        "dpdiff_version": version,
        "git_commit": git_commit(),
        "base_model": base_model,
        "model_family": model_family,  # sd | sdxl | sd3 | flux (dpdiff.models.families)
        "data_path": str(data.root),
        "builtin_demo": data.builtin,
        "adapter": adapter,
        "resolution": int(resolution),
        "weights": weights,
        "samples": samples,
        "samples_base": samples_base,
        "sample_prompts": list(sample_prompts),
        "wall_seconds": round(float(wall_seconds), 2),
        "train_steps": int(train_steps),
        "resumed_from": resumed_from,
        "device": device,
        "world_size": int(world_size),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
                     "opacus": opacus.__version__, "python": platform.python_version()},
        "data": data.summary(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_run_json(run_dir: Path, record: dict) -> None:
    write_json_atomic(Path(run_dir) / "run.json", record)
