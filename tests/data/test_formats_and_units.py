"""Dataset formats, privacy units, holdout split and dedup."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import write_image_folder
from PIL import Image

from dpdiff.data.dedup import apply_dedup, find_duplicate_sets
from dpdiff.data.formats import read_dataset
from dpdiff.data.records import fingerprint, group_units, split_holdout
from dpdiff.errors import UserError


def _same(a, b):
    assert [(r.key, r.text, r.user_id) for r in a] == [(r.key, r.text, r.user_id) for r in b]
    for ra, rb in zip(a, b):
        assert np.array_equal(np.asarray(ra.open()), np.asarray(rb.open()))


def test_jsonl_csv_and_save_to_disk_load_the_same_data(tmp_path):
    a = read_dataset(write_image_folder(tmp_path / "a", 6, users=2))
    b = read_dataset(write_image_folder(tmp_path / "b", 6, users=2, fmt="csv"))
    _same(a, b)
    from datasets import Dataset, Features, Value
    from datasets import Image as HFImage

    rows = [json.loads(x) for x in (tmp_path / "a" / "metadata.jsonl").read_text().splitlines()]
    ds = Dataset.from_dict({"image": [str(tmp_path / "a" / r["file_name"]) for r in rows],
                            "text": [r["text"] for r in rows], "user_id": [r["user_id"] for r in rows]},
                           features=Features({"image": HFImage(), "text": Value("string"), "user_id": Value("string")}))
    ds.save_to_disk(str(tmp_path / "c"))
    c = read_dataset(tmp_path / "c")
    _same(a, c)
    assert fingerprint(a) == fingerprint(c)


def test_caption_column_is_configurable(tmp_path):
    root = write_image_folder(tmp_path / "d", 3)
    rows = [json.loads(x) for x in (root / "metadata.jsonl").read_text().splitlines()]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": r["file_name"], "prompt": r["text"]})
                                                   for r in rows))
    with pytest.raises(UserError, match="data.caption_column"):
        read_dataset(root)
    assert [r.text for r in read_dataset(root, caption_column="prompt")] == [r["text"] for r in rows]


def test_user_units_group_all_images_of_a_user(tmp_path):
    recs = read_dataset(write_image_folder(tmp_path / "u", 10, users=3))
    units = group_units(recs, unit="user")
    assert len(units) == 3
    assert sorted(len(m) for m in units.members) == [3, 3, 4]
    assert all(len({recs[i].user_id for i in m}) == 1 for m in units.members)
    assert len(group_units(recs, unit="example")) == 10


def test_user_units_need_user_ids(tmp_path):
    recs = read_dataset(write_image_folder(tmp_path / "n", 4))
    with pytest.raises(UserError, match="user_id"):
        group_units(recs, unit="user")


def test_holdout_split_is_seeded_and_disjoint(tmp_path):
    recs = read_dataset(write_image_folder(tmp_path / "h", 20))
    units = group_units(recs, unit="example")
    tr, ho = split_holdout(units, fraction=0.25, seed=1)
    assert not set(tr) & set(ho) and sorted(tr + ho) == list(range(20))
    assert split_holdout(units, fraction=0.25, seed=1) == (tr, ho)
    assert split_holdout(units, fraction=0.25, seed=2) != (tr, ho)


def test_holdout_of_a_unit_depends_on_that_unit_alone():
    """Removing one unit leaves every other unit on its side of the split (a permutation of N would not), and the
    held-out share matches the fraction: 10000 units at 0.25 hold out 2500 +- 6 sd (43) (the hash is seeded:
    deterministic, no false failures)."""
    from dpdiff.data.records import PrivacyUnits

    names = tuple(f"img_{i:05d}.png" for i in range(10000))
    units = PrivacyUnits("example", tuple((i,) for i in range(len(names))), names)
    tr, ho = split_holdout(units, fraction=0.25, seed=3)
    assert abs(len(ho) - 2500) < 6 * 43
    held = {names[i] for i in ho}
    for drop in (0, 17, 5000, 9999):
        keep = [i for i in range(len(names)) if i != drop]
        sub = PrivacyUnits("example", tuple((i,) for i in range(len(keep))), tuple(names[i] for i in keep))
        _, ho2 = split_holdout(sub, fraction=0.25, seed=3)
        assert {sub.names[i] for i in ho2} == held - {names[drop]}


def test_planted_near_duplicates_are_found_and_grouped(tmp_path):
    root = write_image_folder(tmp_path / "p", 12)
    rng = np.random.default_rng(7)
    base = np.asarray(Image.open(root / "img_003.png"), dtype=np.float32)
    lines = (root / "metadata.jsonl").read_text().splitlines()
    for j in range(2):  # two near-copies of img_003 (slight noise) and one exact copy of img_005
        near = np.clip(base + rng.normal(0, 3, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(near).save(root / f"near_{j}.png")
        lines.append(json.dumps({"file_name": f"near_{j}.png", "text": "copy"}))
    Image.open(root / "img_005.png").save(root / "exact.png")
    lines.append(json.dumps({"file_name": "exact.png", "text": "copy"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    recs = read_dataset(root)
    sets = find_duplicate_sets(recs)
    named = sorted(sorted(recs[i].key for i in s) for s in sets)
    assert named == [["exact.png", "img_005.png"], ["img_003.png", "near_0.png", "near_1.png"]]
    kept, groups, info = apply_dedup(recs, mode="group")
    units = group_units(kept, unit="example", groups=groups)
    assert len(units) == len(recs) - 3 and info["duplicate_sets"] == 2
    dropped, _, info = apply_dedup(recs, mode="drop")
    assert len(dropped) == len(recs) - 3 and info["dropped"] == 3
    same, groups, _ = apply_dedup(recs, mode="report")
    assert len(same) == len(recs) and groups is None


def test_digits_demo_has_no_false_duplicates():
    from dpdiff.data.demos import builtin_digits_dir

    recs = read_dataset(builtin_digits_dir())
    assert len(recs) > 800
    sets = find_duplicate_sets(recs)
    assert sum(len(s) for s in sets) <= 0.02 * len(recs)


def test_unit_members_read_like_the_tuples_they_replace():
    from dpdiff.data.records import PrivacyUnits, UnitMembers

    raw = ((0, 3), (1,), (2, 4, 5))
    m = UnitMembers(raw)
    assert len(m) == 3 and m[0] == (0, 3) and m[-1] == (2, 4, 5) and tuple(m) == raw and m == raw
    assert m.sizes().tolist() == [2, 1, 3] and m[0:2] == raw[0:2]
    with pytest.raises(IndexError):
        m[3]
    units = PrivacyUnits("user", raw, ("a", "b", "c"))
    sub = units.subset([2, 0])
    assert tuple(sub.members) == ((2, 4, 5), (0, 3)) and sub.names == ("c", "a")
    new_index = np.array([10, 11, 12, 13, 14, 15])
    assert tuple(sub.reindexed(new_index).members) == ((12, 14, 15), (10, 13))
    with pytest.raises(ValueError, match="no new index"):
        sub.reindexed(np.array([-1, 0, 0, 0, 0, 0]))
    ext = units.extended([(6,), (7, 8)], ["d", "e"])
    assert tuple(ext.members) == raw + ((6,), (7, 8)) and ext.names == ("a", "b", "c", "d", "e")
