"""Each bad input on a small generated folder: non-zero exit, the file named, nothing half-written."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import SMALL, run_cli, write_image_folder
from PIL import Image

FAST = SMALL


def _meta(root):
    return [json.loads(x) for x in (root / "metadata.jsonl").read_text().splitlines() if x.strip()]


def _write_meta(root, rows):
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def truncated(root):
    data = (root / "img_002.png").read_bytes()
    (root / "img_002.png").write_bytes(data[: len(data) // 2])
    return "img_002.png"


def not_an_image(root):
    (root / "img_004.png").write_text("this is not a picture")
    return "img_004.png"


def unsupported_mode(root):
    arr = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype("uint8")
    Image.fromarray(arr).convert("LAB").save(root / "img_001.tif")
    rows = _meta(root)
    rows[1]["file_name"] = "img_001.tif"
    _write_meta(root, rows)
    return "img_001.tif"


def empty_caption(root):
    rows = _meta(root)
    rows[3]["text"] = "  "
    _write_meta(root, rows)
    return "img_003.png"


def missing_caption(root):
    rows = _meta(root)
    rows[5]["text"] = None
    _write_meta(root, rows)
    return "img_005.png"


def listed_but_absent(root):
    (root / "img_006.png").unlink()
    return "img_006.png"


def duplicate_name(root):
    rows = _meta(root)
    rows.append(dict(rows[0]))
    _write_meta(root, rows)
    return "img_000.png"


def bad_json_line(root):
    with open(root / "metadata.jsonl", "a") as f:
        f.write("{not json\n")
    return "line 13"


CASES = [truncated, not_an_image, unsupported_mode, empty_caption, missing_caption, listed_but_absent,
         duplicate_name, bad_json_line]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_dataset_stops_before_training(tmp_path, case):
    root = write_image_folder(tmp_path / "data", 12)
    needle = case(root)
    run_dir = tmp_path / "run"
    res = run_cli("finetune", *FAST, f"data.path={root}", f"hydra.run.dir={run_dir}")
    assert res.returncode == 2, res.stderr[-2000:]
    assert "dpdiff: error:" in res.stderr and needle in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert not run_dir.exists()
    check = run_cli("data", "check", f"path={root}")
    assert check.returncode == 2 and needle in (check.stdout + check.stderr)


def test_skip_bad_files_trains_and_reports_the_count(tmp_path):
    root = write_image_folder(tmp_path / "data", 12)
    truncated(root)
    not_an_image(root)
    run_dir = tmp_path / "run"
    res = run_cli("finetune", *FAST, f"data.path={root}", "data.skip_bad_files=true", "data.holdout_fraction=0",
                  f"hydra.run.dir={run_dir}")
    assert res.returncode == 0, res.stderr[-3000:]
    priv = json.loads((run_dir / "privacy.json").read_text())
    owner = json.loads((run_dir / "data_owner.json").read_text())  # counts of the data are the owner's
    assert owner["skipped_files"] == 2 and priv["num_units"] == 10
    assert "skipped" in (run_dir / "report.md").read_text()


def test_unlisted_files_and_a_dominant_user_are_reported_not_fatal(tmp_path):
    root = write_image_folder(tmp_path / "data", 12, users=3)
    Image.new("RGB", (32, 32)).save(root / "stray.png")
    rows = _meta(root)
    for r in rows[:9]:
        r["user_id"] = "u-big"
    _write_meta(root, rows)
    res = run_cli("data", "check", f"path={root}", "unit=user")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "unlisted_file: stray.png" in res.stdout
    assert "dominant_unit" in res.stdout


def test_too_few_units_for_the_batch(tmp_path):
    root = write_image_folder(tmp_path / "data", 6)
    run_dir = tmp_path / "run"
    res = run_cli("finetune", *FAST, f"data.path={root}", "train.batch_size=50", f"hydra.run.dir={run_dir}")
    assert res.returncode == 2 and "train.batch_size=50" in res.stderr
    assert not run_dir.exists()
