"""privacy.json, data_owner.json, the model card and run.json: the machine-readable record of a run.

The run dir is split in two. What a user publishes with the weights holds the mechanism and the
guarantee only: ``privacy.json`` (built by ``privacy_record``) and the model card ``README.md`` next to
the weights (``write_model_card``). The standard DP adversary knows the config, every other record and
everything published, so a published file must hold nothing computed from the data beyond the number
of privacy units N (released and treated as public, as a caveat says). Everything else the run knows
about its data (the dataset fingerprints, which with D and D minus x in hand are an exact membership
oracle; the duplicate sets; the counts of images, skipped files and held-out units; the canaries; the
run's paths and ids; the dataset-ledger summary; the planning summary, computed from the captions) goes
to ``data_owner.json`` (``owner_record``, written 0600; its first key says it is not for publication).
``privacy_ledger.json`` (the resumable ledger) also names the dataset fingerprint: it is a data-owner
file too, like metrics.jsonl, run.json and the report.

All are built from explicit, keyword-only inputs (the privacy plan, the prepared data, what the training
loop did), so they are unit-tested without a training run. privacy.json names at least ``epsilon``,
``delta``, ``target_epsilon``, ``accountant``, ``noise_multiplier``, ``max_grad_norm``, ``sample_rate``,
``steps``, ``expected_batch_size``, ``num_units``, ``privacy_unit``, ``augmult``, ``world_size`` and
``dp``; run.json names at least ``base_model``, ``dpdiff_version``, ``git_commit`` and ``wall_seconds``.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from dpdiff.io import sanitize, write_json_atomic, write_text_atomic

NEIGHBOURING = "add/remove one privacy unit (Poisson-sampled DP-SGD)"


#: the keys of privacy.json, a contract: the mechanism and the guarantee; of the data, only N (num_units)
CONTRACT_KEYS = ("dp", "epsilon", "delta", "target_epsilon", "accountant", "noise_multiplier", "max_grad_norm",
                 "sample_rate", "steps", "expected_batch_size", "num_units", "privacy_unit", "augmult", "world_size")
PUBLIC_PRIVACY_KEYS = frozenset(CONTRACT_KEYS + (
    "neighbouring_relation", "epsilon_estimate", "epsilon_lower", "accountant_note", "ledger", "max_images_per_user",
    "noise_source", "reproducible_noise", "engine", "train_steps", "stopped_for_budget", "guarantee", "caveats",
    "selection", "schedule"))  # selection: dpdiff tune's procedure guarantee; schedule: the batch and steps used

N_IS_PUBLIC = ("The number of privacy units N (num_units) is released and treated as public; the guarantee does "
               "not hide it.")

#: the first key of data_owner.json, and its value
OWNER_NOTICE_KEY = "not_for_publication"
OWNER_NOTICE = ("data_owner.json: statistics of the private training data outside the DP guarantee (dataset "
                "fingerprints, duplicate sets, counts of images, skipped files and held-out units, canaries, the "
                "run's paths and ids, the dataset ledger, the planning summary). For the data owner only: do not "
                "publish it; publish privacy.json and the model card.")


#: the caveat of a run whose hyperparameters nobody accounted (``caveats``; a tune winner's replaces it)
UNACCOUNTED_CHOICE = ("The data checks (validation, deduplication) and the choice of hyperparameters read the private "
                      "data without privacy accounting.")


def caveats(*, dp: bool, data, resumed: bool, reproducible_noise: bool) -> list[str]:
    """What the (epsilon, delta) guarantee does not cover: the public caveats of privacy.json and the model
    card. They depend on the config and N only, never on other statistics of the data (those are in
    ``owner_caveats``)."""
    out = []
    if not dp:
        out.append("This model was trained WITHOUT differential privacy: it has no privacy guarantee.")
    if dp and reproducible_noise:
        out.append("privacy.reproducible_noise=true: the noise and sampling masks were derived from train.seed. "
                   "There is no guarantee across runs (runs seeded alike draw the same noise), and anyone holding "
                   "this run's config can regenerate its noise. Use only for debugging.")
    if dp:
        out.append(N_IS_PUBLIC)
    out.append("metrics.jsonl (training loss, gradient-norm and signal-to-noise statistics) is computed on the "
               "private data and is not privatised; share it only with the data owner.")
    out.append("data_owner.json, privacy_ledger.json (dataset fingerprint), run.json and the report hold "
               "statistics of the private data outside the guarantee: they are for the data owner, not for "
               "publication.")
    if data.sample_prompts_source == "training captions":
        out.append("The sample-grid prompts are the most frequent training captions: the captions themselves are "
                   "shown verbatim and are not protected by the guarantee.")
    if data.holdout_units:
        out.append("Some privacy units were held out (never trained on); the probes (as non-members) and the "
                   "utility metrics read them, outside the guarantee: the report is for the data owner.")
    out.append(UNACCOUNTED_CHOICE if not data.builtin else
               "Hyperparameters of the built-in demo were chosen on data generated like this demo data (not "
               "accounted).")
    if data.dedup and data.dedup.get("mode") in ("group", "drop"):
        out.append(f"Deduplication ({data.dedup['mode']}) compared images across privacy units: which images are "
                   "merged or dropped depends on other units' data, outside the guarantee.")
    if resumed:
        out.append("This run resumed from a checkpoint; the ledger composes every step of every part.")
    out.append("Probe results (extraction, membership inference, audit) describe the training data: they are "
               "for the data owner, not for publication.")
    return out


def owner_caveats(data) -> list[str]:
    """The caveats that name counts of the private data (data_owner.json and the report only)."""
    out = []
    if data.holdout_units:
        out.append(f"{len(data.holdout_units)} privacy units were held out (never trained on); the probes (as "
                   "non-members) and the utility metrics read them, outside the guarantee: the report is for the "
                   "data owner.")
    if data.dedup and data.dedup.get("mode") in ("group", "drop") and data.dedup.get("duplicate_sets"):
        out.append(f"Deduplication ({data.dedup['mode']}) found {data.dedup['duplicate_sets']} duplicate set(s) "
                   "across privacy units: which images were merged or dropped depends on other units' data, "
                   "outside the guarantee.")
    if data.skipped:
        out.append(f"{len(data.skipped)} bad file(s) were skipped; the guarantee covers the units actually used.")
    return out


def privacy_record(*, plan, data, world_size: int, train_steps: int, engine: str | None = None,
                   stopped_for_budget: bool = False, schedule: dict | None = None) -> dict:
    """The content of privacy.json: the mechanism and the guarantee, nothing else computed from the data
    than N (``num_units``). ``plan`` is the run's ``PrivacyPlan`` (settings, mechanism, ledger); ``data`` its
    ``PreparedData``; ``engine`` the clipping engine's ``kind``; ``stopped_for_budget`` whether the training loop
    stopped before its planned steps. What else the run knows of the data goes to data_owner.json
    (``owner_record``).
    """
    record = _public_record(plan=plan, data=data, world_size=world_size, train_steps=train_steps, engine=engine,
                            stopped_for_budget=stopped_for_budget)
    if schedule is not None:  # the batch size and steps trained with, and whether the plan's rule chose them
        record["schedule"] = schedule
    leaked = set(record) - PUBLIC_PRIVACY_KEYS
    if leaked:  # a new field must be classified (public here, or data_owner.json) before it is written
        raise RuntimeError(f"privacy.json would hold non-public keys {sorted(leaked)}")
    return record


def _public_record(*, plan, data, world_size: int, train_steps: int, engine: str | None,
                   stopped_for_budget: bool) -> dict:
    s, mech = plan.settings, plan.mechanism
    base = {
        "dp": bool(s.enabled),
        "privacy_unit": s.unit,
        "neighbouring_relation": NEIGHBOURING if s.enabled else None,
        "num_units": data.num_train_units,
        "augmult": s.augmult if s.enabled else 1,
        "max_images_per_user": s.max_images_per_user,
        "world_size": int(world_size),
        "train_steps": int(train_steps),
        "stopped_for_budget": bool(stopped_for_budget),
        "noise_source": plan.randomness.description if s.enabled else None,
        "reproducible_noise": bool(plan.reproducible_noise) if s.enabled else None,
        "engine": engine,
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
        "ledger": [{"noise_multiplier": float(g["noise_multiplier"]), "sample_rate": float(g["sample_rate"]),
                    "steps": int(g["steps"])} for g in plan.ledger.to_dict()["segments"]],
        "guarantee": (f"({eps.epsilon:.4g}, {mech.delta:.3g})-DP for each {s.unit} ({NEIGHBOURING}), "
                      f"{s.accountant} accountant"),
    }


def owner_record(*, plan, data, canaries: dict | None = None, dataset_total: dict | None = None,
                 planning: dict | None = None, **_ignored) -> dict:
    """The content of data_owner.json: what the run computed from the data beyond N (not for publication).

    Same inputs as ``privacy_record`` (``world_size`` and ``train_steps`` are accepted and ignored);
    ``planning`` is the pre-run plan summary (``dpdiff.privacy.planning``) when there is one.
    """
    return {
        OWNER_NOTICE_KEY: OWNER_NOTICE,
        "privacy_unit": plan.settings.unit,
        "num_units": data.num_train_units,
        "num_images": len(data.train_records()),
        "skipped_files": len(data.skipped),
        "holdout_units": len(data.holdout_units),
        "duplicates": data.dedup,
        "dataset_fingerprint": data.fingerprint,
        "source_fingerprint": data.source_fingerprint,
        "canaries": canaries,
        "dataset_ledger": _dataset_ledger_summary(dataset_total),
        "run_id": plan.run_id,
        "attempt_id": plan.attempt_id,
        "plan": planning,
        "caveats": owner_caveats(data),
    }


def _dataset_ledger_summary(total: dict | None) -> dict | None:
    if total is None:
        return None
    out = {"path": total.get("path"), "runs": total["runs"], "total_epsilon": total["epsilon"],
           "delta": total["delta"], "unit": total["unit"], "accountant": total.get("accountant"),
           "note": total.get("note")}
    # per-record charges (dpdiff.privacy.dataset_ledger.charges_summary), when the ledger has them
    for key in ("per_record", "records", "records_charged", "new_records", "legacy_attempts"):
        if key in total:
            out[key] = total[key]
    return out


def write_privacy_json(run_dir: Path, record: dict) -> None:
    write_json_atomic(Path(run_dir) / "privacy.json", record)


def write_owner_json(run_dir: Path, record: dict) -> Path:
    """data_owner.json, readable by its owner only (0600 from its creation: never briefly world-readable)."""
    path = Path(run_dir) / "data_owner.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(sanitize(record), indent=2, allow_nan=False) + "\n"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an older tmp file of the same name keeps its mode through O_CREAT
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return path


def read_owner_json(run_dir: Path) -> dict:
    """data_owner.json of a run dir, or {} (a run from before the split, or a published copy without it)."""
    path = Path(run_dir) / "data_owner.json"
    return json.loads(path.read_text()) if path.exists() else {}


def plain_base_name(base: str) -> str:
    """A base model's public name: a hub id as is, a local directory by its folder name (never its path)."""
    text = str(base).rstrip("/\\")
    p = Path(text).expanduser()
    if text.startswith(("/", "~", ".", "\\")) or p.is_absolute() or p.exists() or (len(text) > 1 and text[1] == ":"):
        return p.name or text
    return text


def model_card(record: dict, *, base_name: str, adapter: str | None = None) -> str:
    """The model card (diffusers/HF style README.md) of the published weights: YAML front matter, the
    guarantee sentence, the mechanism numbers and the caveats of privacy.json, nothing else."""
    from dpdiff.report.run_report import guarantee_sentence, mechanism_rows

    dp = bool(record.get("dp"))
    tags = ["dpdiff", "differential-privacy" if dp else "not-differentially-private"]
    if adapter:
        tags.append(adapter)
    title = "Differentially private fine-tune" if dp else "Fine-tune WITHOUT differential privacy"
    lines = ["---", f"base_model: {json.dumps(plain_base_name(base_name))}", "library_name: diffusers", "tags:"]
    lines += [f"- {t}" for t in tags]
    lines += ["---", "", f"# {title} of {plain_base_name(base_name)} (dpdiff)", "",
              f"**{guarantee_sentence(record)}**", ""]
    if dp and record.get("guarantee"):
        lines += [f"Guarantee: {record['guarantee']}.", ""]
    lines += ["## Mechanism", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in mechanism_rows(record)]
    lines += ["", "## Caveats", ""]
    lines += [f"{i + 1}. {c}" for i, c in enumerate(record.get("caveats") or [])]
    return "\n".join(lines) + "\n"


def with_selection(record: dict, selection: dict, *, grid_keys: list[str]) -> dict:
    """A tune winner's privacy.json: ``selection`` (the procedure's guarantee, ``dpdiff tune``'s selection.json
    fields) added, the guarantee restated as the procedure's, and the caveat on unaccounted hyperparameter choices
    replaced (they were chosen inside the procedure's guarantee, over ``grid_keys``)."""
    out = dict(record)
    out["selection"] = selection
    eps, delta = selection["epsilon"], selection["delta"]
    out["guarantee"] = (f"({eps:.4g}, {delta:.3g})-DP for each {record.get('privacy_unit', 'unit')} for the tuning "
                        f"procedure that selected this run (this run alone: {record['guarantee']})")
    tuned = (f"The tuned settings ({', '.join(grid_keys)}) were chosen by dpdiff tune (private selection: a random "
             "number of candidates, each scored by a noisy held-out loss), inside the guarantee above; the number of "
             "candidates and their scores are not published. The data checks (validation, deduplication) and the "
             "other settings read the private data without privacy accounting.")
    kept = list(record.get("caveats") or [])
    at = kept.index(UNACCOUNTED_CHOICE) if UNACCOUNTED_CHOICE in kept else len(kept)
    out["caveats"] = [*kept[:at], tuned, *kept[at + 1:]]
    return out


def republish(run_dir: Path, record: dict) -> Path:
    """Write a changed privacy.json and the model card next to the run's weights from it (``run.json`` names the
    weights, the base model and the adapter): what is published must state the same guarantee. Returns the
    weights dir."""
    run_dir = Path(run_dir)
    run = json.loads((run_dir / "run.json").read_text())
    write_privacy_json(run_dir, record)
    write_model_card(run_dir / run["weights"], record, base_name=run["base_model"], adapter=run.get("adapter"))
    return run_dir / run["weights"]


_ADAPTER_TAGS = {"lora": "lora", "full": "full-finetune", "attn": "attention-finetune"}


def write_model_card(weights_dir: Path, record: dict, base_name: str, *, adapter: str | None = None) -> Path:
    """``README.md`` next to the weights (what is published with them): see ``model_card``.
    ``base_name``: the base model's hub id or local dir (only its folder name is written); ``adapter``: the
    adapter kind (lora | full | attn; default: lora for a ``lora/`` dir, else full)."""
    weights_dir = Path(weights_dir)
    kind = adapter or ("lora" if weights_dir.name == "lora" else "full")
    adapter = _ADAPTER_TAGS.get(kind, kind)
    path = weights_dir / "README.md"
    write_text_atomic(path, model_card(record, base_name=base_name, adapter=adapter))
    return path


def run_record(*, version: str, base_model: str, model_family: str, data, adapter: str, resolution: int,
               weights: str, samples: str | None, samples_base: str | None, sample_prompts: list[str],
               wall_seconds: float, train_steps: int, resumed_from: str | None, device: str, world_size: int,
               phases: list[list[dict]] | None = None) -> dict:
    """The content of run.json. ``phases``: per rank, each phase's wall time and memory (``runtime.PhaseClock``)."""
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
        "phases": phases,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
                     "opacus": opacus.__version__, "python": platform.python_version()},
        "data": data.summary(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_run_json(run_dir: Path, record: dict) -> None:
    write_json_atomic(Path(run_dir) / "run.json", record)
