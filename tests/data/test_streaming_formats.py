"""webdataset tar shards, parquet and HF save_to_disk read lazily: the same records as the image folder, and no
image bytes held by a record."""

from __future__ import annotations

import io
import json
import pickle
import tarfile

import numpy as np
import pytest
from helpers import write_image_folder

from dpdiff.data.formats import read_dataset
from dpdiff.data.records import record_ids
from dpdiff.errors import UserError


@pytest.fixture
def folder(tmp_path):
    return write_image_folder(tmp_path / "folder", 9, users=3)


def _rows(root):
    return [json.loads(x) for x in (root / "metadata.jsonl").read_text().splitlines()]


def _check_same(ref, got):
    assert [(r.text, r.user_id) for r in ref] == [(r.text, r.user_id) for r in got]
    assert record_ids(ref) == record_ids(got)  # the same image bytes, so the same ledger ids
    for a, b in zip(ref, got):
        assert b.image_bytes is None and b.ref is not None  # a reference, not the bytes
        assert np.array_equal(np.asarray(a.open()), np.asarray(b.open()))
    again = pickle.loads(pickle.dumps(got[0]))  # records travel to other processes
    assert np.array_equal(np.asarray(again.open()), np.asarray(got[0].open()))


def test_webdataset_shards(folder, tmp_path):
    root = tmp_path / "wds"
    root.mkdir()
    rows = _rows(folder)
    for shard, part in enumerate((rows[:5], rows[5:])):
        with tarfile.open(root / f"shard-{shard:05d}.tar", "w") as tf:
            for k, r in enumerate(part):
                base = f"s{shard}_{k:04d}"

                def add(name, data):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))

                add(base + ".png", (folder / r["file_name"]).read_bytes())
                if k % 2:  # caption in the json, or in a .txt beside it
                    add(base + ".json", json.dumps({"text": r["text"], "user_id": r["user_id"]}).encode())
                else:
                    add(base + ".txt", r["text"].encode())
                    add(base + ".json", json.dumps({"user_id": r["user_id"]}).encode())
    got = read_dataset(root)
    _check_same(read_dataset(folder), got)
    assert got[0].key == "shard-00000.tar/s0_0000.png"
    with tarfile.open(root / "extra.tar.gz", "w:gz"):
        pass
    with pytest.raises(UserError, match="compressed"):
        read_dataset(root)


def test_parquet_files(folder, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _rows(folder)
    root = tmp_path / "pq"
    root.mkdir()
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for i, part in enumerate((rows[:6], rows[6:])):
        table = pa.table({
            "image": pa.array([{"bytes": (folder / r["file_name"]).read_bytes(), "path": None} for r in part],
                              type=image_type),
            "text": [r["text"] for r in part], "user_id": [r["user_id"] for r in part],
            "file_name": [r["file_name"] for r in part]})
        pq.write_table(table, root / f"part-{i}.parquet", row_group_size=4)  # several row groups per file
    got = read_dataset(root)
    _check_same(read_dataset(folder), got)
    assert got[0].key == f"part-0.parquet/{rows[0]['file_name']}"
    with pytest.raises(UserError, match="caption column 'prompt'"):
        read_dataset(root, caption_column="prompt")


def test_saved_hf_dataset_is_memory_mapped_and_keeps_its_keys(folder, tmp_path):
    from datasets import Dataset, Features, Value
    from datasets import Image as HFImage

    rows = _rows(folder)
    ds = Dataset.from_dict({"image": [str(folder / r["file_name"]) for r in rows], "text": [r["text"] for r in rows],
                            "user_id": [r["user_id"] for r in rows]},
                           features=Features({"image": HFImage(), "text": Value("string"),
                                              "user_id": Value("string")}))
    ds.save_to_disk(str(tmp_path / "hf"))
    got = read_dataset(tmp_path / "hf")
    _check_same(read_dataset(folder), got)
    assert [r.key for r in got] == [r["file_name"] for r in rows]  # the keys (and fingerprints) of earlier versions


def test_parallel_map_keeps_order_on_threads():
    from dpdiff.data.validate import parallel_map

    items = list(range(5000))
    assert parallel_map(lambda x: x * x, items, workers=3) == [x * x for x in items]
    assert parallel_map(lambda x: -x, items) == [-x for x in items]  # the serial default
