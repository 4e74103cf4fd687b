"""Large-dataset formats read lazily: records hold a reference to their image, never its bytes.

* **webdataset tar shards** (``*.tar`` in the folder): samples are the tar members sharing a basename
  (``0001.jpg`` + ``0001.txt`` or ``0001.json``), as webdataset writes them. One streaming pass over each
  shard's headers records every image member's byte offset and size (what webdataset's ``wids`` index holds);
  captions (``.txt``, or the caption column of ``.json``, with ``user_id``) are read in that pass, images later
  by one ``pread`` each. The ``webdataset`` package iterates shards in order and cannot open one sample, which
  the encode, the checks and the probes need, hence this reader. Compressed shards (``.tar.gz``) cannot be
  seeked and are refused with a line saying so.
* **parquet** (``*.parquet`` files): the caption and ``user_id`` columns are read up front (pyarrow reads one
  column without the others); the image column (HF's ``{bytes, path}`` struct or plain binary) is read per row
  group when an image is opened, the last row groups kept in a small cache (a sequential pass reads each once).
* **HF ``save_to_disk``** datasets: memory-mapped Arrow (``datasets.load_from_disk``); captions read as one
  column, images by row on demand.

Memory is then the captions and keys (tens of bytes a record) rather than the images. References are plain
tuples, so records stay picklable (ranks and worker processes re-open the files themselves).
"""

from __future__ import annotations

import functools
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from dpdiff.errors import UserError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class ImageRef:
    """Where a record's encoded image lies: ``kind`` "tar" (file, offset, size), "parquet" (file, row group,
    row, column) or "arrow" (dataset dir, split, row, column)."""

    kind: str
    file: str
    a: int = 0
    b: int = 0
    column: str = ""

    def read_bytes(self) -> bytes:
        if self.kind == "tar":
            with open(self.file, "rb") as f:
                return os.pread(f.fileno(), self.b, self.a)
        if self.kind == "parquet":
            return _cell_bytes(_row_group(self.file, self.a, self.column)[self.b])
        if self.kind == "arrow":
            return _cell_bytes(_hf_dataset(self.file, self.column)[self.a][self.column])
        raise ValueError(f"unknown image reference kind {self.kind!r}")


def _cell_bytes(cell) -> bytes:
    """An image cell: HF's ``{"bytes": ..., "path": ...}`` struct or raw bytes."""
    if isinstance(cell, dict):
        if cell.get("bytes") is not None:
            return bytes(cell["bytes"])
        if cell.get("path"):
            return Path(cell["path"]).read_bytes()
        return b""
    return bytes(cell or b"")


@functools.lru_cache(maxsize=4)
def _row_group(file: str, group: int, column: str) -> list:
    import pyarrow.parquet as pq

    return pq.ParquetFile(file).read_row_group(group, columns=[column]).column(0).to_pylist()


@functools.lru_cache(maxsize=2)
def _hf_dataset(root: str, column: str):
    from datasets import Image as HFImage
    from datasets import load_from_disk

    ds = load_from_disk(root)
    if hasattr(ds, "keys") and not hasattr(ds, "column_names"):
        ds = ds["train"]
    return ds.cast_column(column, HFImage(decode=False))


def is_webdataset(root: Path) -> bool:
    return any(root.glob("*.tar")) or any(root.glob("*.tar.gz")) or any(root.glob("*.tgz"))


def is_parquet(root: Path) -> bool:
    return any(root.glob("*.parquet"))


def read_webdataset(root: Path, *, caption_column: str, record) -> list:
    """Every sample of the folder's ``*.tar`` shards (sorted by name) with an image member; ``record`` builds a
    record from (key, text, user_id, ref)."""
    packed = sorted(root.glob("*.tar.gz")) + sorted(root.glob("*.tgz"))
    if packed:
        raise UserError(f"{packed[0]} is compressed: images cannot be read one at a time from it; decompress the "
                        "shards (gunzip) to plain .tar, as webdataset usually writes them")
    records = []
    for shard in sorted(root.glob("*.tar")):
        samples: dict[str, dict] = {}
        try:
            with tarfile.open(shard, mode="r:") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    base, dot, ext = m.name.rpartition(".")
                    if not dot:
                        continue
                    s = samples.setdefault(base, {})
                    ext = "." + ext.lower()
                    if ext in IMAGE_EXTS and "image" not in s:
                        s["image"] = (m.offset_data, m.size, ext)
                    elif ext == ".txt":
                        s["txt"] = tf.extractfile(m).read().decode("utf-8", errors="replace").strip()
                    elif ext == ".json":
                        try:
                            s["json"] = json.loads(tf.extractfile(m).read())
                        except ValueError:
                            raise UserError(f"{shard}: {m.name} is not valid JSON") from None
        except tarfile.TarError as err:
            raise UserError(f"{shard} is not a readable tar shard ({err})") from None
        for base, s in samples.items():
            if "image" not in s:
                continue
            meta = s.get("json") if isinstance(s.get("json"), dict) else {}
            if caption_column in meta:
                text = meta[caption_column]
            elif "txt" in s:
                text = s["txt"]
            else:
                raise UserError(f"{shard}: sample {base!r} has no caption ({base}.txt or '{caption_column}' in "
                                f"{base}.json); set data.caption_column=<name>")
            user = meta.get("user_id")
            off, size, ext = s["image"]
            records.append(record(f"{shard.name}/{base}{ext}", "" if text is None else str(text),
                                  None if user in (None, "") else str(user), ImageRef("tar", str(shard), off, size)))
    if not records:
        raise UserError(f"{root}: the tar shards hold no image samples")
    return records


def _image_column(schema, root: Path) -> str:
    import pyarrow as pa

    for f in schema:
        t = f.type
        if pa.types.is_struct(t) and {"bytes"} <= {c.name for c in t}:
            return f.name
    for f in schema:
        if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type):
            return f.name
    raise UserError(f"{root}: the parquet files have no image column (a binary column or HF's {{bytes, path}})")


def read_parquet(root: Path, *, caption_column: str, record) -> list:
    """Every row of the folder's ``*.parquet`` files (sorted by name); images stay in the files."""
    import pyarrow.parquet as pq

    records = []
    for file in sorted(root.glob("*.parquet")):
        pf = pq.ParquetFile(file)
        names = pf.schema_arrow.names
        col = _image_column(pf.schema_arrow, file)
        if caption_column not in names:
            raise UserError(f"{file}: no caption column '{caption_column}' (columns: {', '.join(names)}); "
                            "set data.caption_column=<name>")
        wanted = [caption_column] + [c for c in ("user_id", "file_name") if c in names]
        for g in range(pf.num_row_groups):
            table = pf.read_row_group(g, columns=wanted).to_pydict()
            for j, text in enumerate(table[caption_column]):
                user = table.get("user_id", [None] * (j + 1))[j]
                name = table.get("file_name", [None] * (j + 1))[j]
                key = f"{file.name}/{name}" if name else f"{file.name}/{g}-{j}"
                records.append(record(key, "" if text is None else str(text),
                                      None if user in (None, "") else str(user),
                                      ImageRef("parquet", str(file), g, j, col)))
    if not records:
        raise UserError(f"{root}: the parquet files hold no rows")
    return records


def read_saved_dataset(root: Path, *, caption_column: str, record) -> list:
    """A ``datasets.Dataset.save_to_disk`` directory (memory-mapped): captions read as a column, images by row."""
    from datasets import Image as HFImage
    from datasets import load_from_disk

    ds = load_from_disk(str(root))
    if hasattr(ds, "keys") and not hasattr(ds, "column_names"):  # a DatasetDict: take 'train'
        if "train" not in ds:
            raise UserError(f"{root} is a DatasetDict without a 'train' split")
        ds = ds["train"]
    image_cols = [c for c, f in ds.features.items() if isinstance(f, HFImage)]
    if not image_cols:
        raise UserError(f"{root}: the saved dataset has no image column")
    if caption_column not in ds.column_names:
        raise UserError(f"{root}: no caption column '{caption_column}' (columns: {', '.join(ds.column_names)}); "
                        "set data.caption_column=<name>")
    col = image_cols[0]
    texts = ds[caption_column]
    users = ds["user_id"] if "user_id" in ds.column_names else [None] * len(texts)
    paths = _image_paths(ds, col)
    records = []
    for i, text in enumerate(texts):
        path = paths[i]
        key = Path(path).name if path else f"row-{i:06d}"
        user = users[i]
        records.append(record(key, str(text or ""), None if user in (None, "") else str(user),
                              ImageRef("arrow", str(root), i, 0, col)))
    return records


def _image_paths(ds, col: str) -> list:
    """The ``path`` field of each row's image struct, read from the Arrow child array (the image bytes beside it
    are not touched); row by row when the dataset has an indices mapping."""
    import pyarrow as pa
    from datasets import Image as HFImage

    if getattr(ds, "_indices", None) is None:
        table = getattr(ds.data, "table", ds.data)
        out = []
        for chunk in table.column(col).chunks:
            if pa.types.is_struct(chunk.type) and "path" in [f.name for f in chunk.type]:
                out += chunk.field("path").to_pylist()
            else:
                out += [None] * len(chunk)
        return out
    raw = ds.cast_column(col, HFImage(decode=False))
    return [(raw[i][col] or {}).get("path") for i in range(len(raw))]
