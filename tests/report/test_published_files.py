"""What a user publishes holds the guarantee only.

The standard DP adversary knows the whole config, every other record and everything a user publishes:
privacy.json, the model card and the weights, and the tracker's logs (wandb). None of them may name a
person, a file, or the dataset's fingerprints (with D and D minus x in hand, a fingerprint is an exact
membership oracle); those stay in data_owner.json (0600), which the grep is shown able to find.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from helpers import SMALL, run_cli

from dpdiff.report.summary import flat_summary
from dpdiff.training.tracking import REDACTED, WandbTracker, public_part, redact_config

PEOPLE = ["Alice Smith", "Bob Jones", "Carol White", "David Brown", "Erin Garcia", "Frank Miller", "Grace Lee",
          "Henry Wilson", "Ivy Chen"]
FAST = SMALL


def _people_folder(root: Path, per_person: int = 2) -> tuple[Path, list[str]]:
    """Images named after people (``alice_smith_1.png``), their user ids and captions naming them."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    rows, files = [], []
    for person in PEOPLE:
        for k in range(per_person):
            name = f"{person.lower().replace(' ', '_')}_{k + 1}.png"
            Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")).save(root / name)
            rows.append({"file_name": name, "text": f"a portrait of {person}", "user_id": person})
            files.append(name)
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root, files


def _safetensors_metadata(path: Path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]).get("__metadata__") or {}


def _leaks(path: Path, needles: list[str]) -> list[str]:
    data = path.read_bytes()
    low = data.lower()
    return [n for n in needles if n.encode() in data or n.lower().encode() in low]


def test_published_files_leak_nothing(tmp_path):
    from dpdiff.data.prepare import source_fingerprint

    data, files = _people_folder(tmp_path / "zoe_quinn_photos")
    run = tmp_path / "run"
    r = run_cli("finetune", *FAST, f"data.path={data}", "privacy.unit=user", "privacy.target_epsilon=8",
                "tracker=wandb", f"hydra.run.dir={run}", env={"WANDB_MODE": "offline"})
    assert r.returncode == 0, r.stderr[-3000:]

    # the data owner's file holds what the grep looks for (so the grep could find it), readable by its owner only
    owner_path = run / "data_owner.json"
    owner = json.loads(owner_path.read_text())
    assert next(iter(owner)) == "not_for_publication"
    assert owner_path.stat().st_mode & 0o777 == 0o600
    fp, src = owner["dataset_fingerprint"], owner["source_fingerprint"]
    assert src == source_fingerprint(str(data))[1] and len(fp) == 64
    assert owner["num_images"] and owner["run_id"]

    secrets = [*PEOPLE, *files, *(f.removesuffix(".png") for f in files), data.name, fp, src, fp[:12], src[:12]]
    run_ids = [owner["run_id"], owner["attempt_id"]]  # the run dir's path and the attempt's id
    # the grep works: the data-owner files do name the people and the fingerprint
    assert "Alice Smith" in (run / "run.json").read_text() and fp in owner_path.read_text()

    weights = run / "lora"
    card = weights / "README.md"
    published = [run / "privacy.json", card, *sorted(p for p in weights.rglob("*") if p.is_file())]
    # every file of the wandb offline dir (symlinks skipped: they point at these files, or out of the dir)
    wandb_files = sorted(p for p in (run / "wandb").rglob("*") if p.is_file() and not p.is_symlink())
    assert any(p.suffix == ".wandb" for p in wandb_files), wandb_files
    for path in published + wandb_files:
        assert not _leaks(path, secrets), (path, _leaks(path, secrets))
    # wandb's local debug logs (logs/, never uploaded) name the dir they are written in, the run dir: the
    # transaction log and files/ (what `wandb sync` uploads) must not
    for path in published + [p for p in wandb_files if "logs" not in p.relative_to(run / "wandb").parts]:
        assert not _leaks(path, run_ids), (path, _leaks(path, run_ids))
    meta = _safetensors_metadata(weights / "pytorch_lora_weights.safetensors")
    assert not [n for n in secrets if n.lower() in json.dumps(meta).lower()]

    # privacy.json and the model card: the guarantee, with N released as public
    priv = json.loads((run / "privacy.json").read_text())
    for key in ("dataset_fingerprint", "source_fingerprint", "duplicates", "num_images", "skipped_files",
                "holdout_units", "run_id", "attempt_id", "dataset_ledger", "plan", "canaries"):
        assert key not in priv, key
    assert any("num_units) is released and treated as public" in c for c in priv["caveats"])
    text = card.read_text()
    assert text.startswith("---\n") and "\n- differential-privacy\n- lora\n" in text
    assert "base_model:" in text and str(tmp_path) not in text and "differentially private" in text
    # the report is the data owner's: it shows the moved fields
    assert fp in (run / "report.html").read_text()


class _FakeRun:
    def __init__(self):
        self.logged, self.summary, self.finished = [], {}, False

    def log(self, values, step):
        self.logged.append((step, values))

    def finish(self):
        self.finished = True


def test_wandb_receives_public_values_only(tmp_path, monkeypatch):
    import wandb

    init = {}
    monkeypatch.setattr(wandb, "init", lambda **kw: init.update(kw) or _FakeRun())
    t = WandbTracker(tmp_path, config={"data": {"path": "/data/alice_smith"}}, project="p")
    assert init["config"] == {"data": {"path": REDACTED}}
    settings = init["settings"]
    assert settings.console == "off" and settings.x_disable_meta and settings.x_disable_stats
    for step in (1, 2):
        t.log({"loss": 0.5, "units": 3, "rows": 17, "seconds": 1.2, "epsilon": 0.4 * step, "lr": 1e-4}, step=step)
    # the summary: privacy.json's public scalars (an older record's fingerprint and run id are dropped)
    t.summary(flat_summary({"epsilon": 0.8, "num_units": 9, "dataset_fingerprint": "f" * 64,
                            "run_id": "/home/x/run", "caveats": ["c"]}, {"mia": {"auc": 0.6}}))
    # held back until the end (a row's arrival time would time its step), then sent in order
    assert t.run.logged == [] and t.run.summary == {}
    t.finish()
    assert t.run.finished
    assert t.run.logged == [(1, {"epsilon": 0.4, "lr": 1e-4}), (2, {"epsilon": 0.8, "lr": 1e-4})]
    assert t.run.summary == {"privacy/epsilon": 0.8, "privacy/num_units": 9}
    assert public_part({"units": 1, "rows": 2, "seconds": 3}) == {}
    # with tracker.log_private_data=true everything is sent as it happens, config unredacted
    init.clear()
    t = WandbTracker(tmp_path, config={"data": {"path": "/data/a"}}, project="p", log_private_data=True)
    assert init["config"] == {"data": {"path": "/data/a"}} and "settings" not in init
    t.log({"loss": 0.5, "rows": 17}, step=1)
    assert t.run.logged == [(1, {"loss": 0.5, "rows": 17})]


def test_config_sent_to_a_tracker_has_no_local_paths():
    cfg = {"data": {"path": "/data/patients", "cache_dir": "/scratch/c", "demo": "printed", "sample_prompts": None},
           "model": {"pretrained": "/models/sd15", "family": "sd"},
           "privacy": {"dataset_ledger": "/ledgers/l.jsonl", "target_epsilon": 4.0},
           "train": {"resume_from": "latest", "lr": 1e-4}, "probes": {"extraction": {"feature_extractor": None}},
           "launcher": {"extra_args": ["--config_file", "/home/me/multinode.yaml"]},
           "hydra": {"run": {"dir": "/runs/x"}, "overrides": {"task": ["data.path=/data/patients"]}}}
    out = redact_config(cfg)
    assert out["data"]["path"] == out["data"]["cache_dir"] == out["model"]["pretrained"] == REDACTED
    assert out["privacy"]["dataset_ledger"] == out["train"]["resume_from"] == out["hydra"] == REDACTED
    assert out["launcher"]["extra_args"] == ["--config_file", REDACTED]
    assert out["privacy"]["target_epsilon"] == 4.0 and out["model"]["family"] == "sd"
    assert out["probes"]["extraction"]["feature_extractor"] is None and out["data"]["demo"] == "printed"
    assert redact_config({"data": {"path": "demo:handwritten59"}})["data"]["path"] == "demo:handwritten59"
    assert "/data" not in json.dumps(out) and "/runs" not in json.dumps(out)
