"""Dataset formats dpdiff reads: image folder + metadata.jsonl/csv, and HF ``save_to_disk``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from dpdiff.data.records import ImageRecord
from dpdiff.errors import UserError


def _rows_jsonl(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: line {n} is not valid JSON ({err.msg}); fix or remove that line") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}: line {n} is not a JSON object")
        rows.append(row)
    return rows


def _rows_csv(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def read_image_folder(root: Path, *, caption_column: str) -> list[ImageRecord]:
    meta = [p for p in (root / "metadata.jsonl", root / "metadata.csv") if p.exists()]
    if not meta:
        raise UserError(
            f"{root} has no metadata.jsonl or metadata.csv; write one row per image with "
            f"'file_name' and '{caption_column}' (the layout diffusers' training examples use)")
    if len(meta) == 2:
        raise UserError(f"{root} has both metadata.jsonl and metadata.csv; keep one")
    rows = _rows_jsonl(meta[0]) if meta[0].suffix == ".jsonl" else _rows_csv(meta[0])
    if not rows:
        raise UserError(f"{meta[0]} lists no images")
    records = []
    for n, row in enumerate(rows, 1):
        if "file_name" not in row:
            raise UserError(f"{meta[0]}: row {n} has no 'file_name'")
        if caption_column not in row:
            raise UserError(
                f"{meta[0]}: row {n} has no caption column '{caption_column}' "
                f"(columns: {', '.join(sorted(row))}); set data.caption_column=<name>")
        text = row[caption_column]
        user = row.get("user_id")
        records.append(ImageRecord(
            key=str(row["file_name"]),
            text="" if text is None else str(text),
            user_id=None if user in (None, "") else str(user),
            path=root / str(row["file_name"]),
        ))
    return records


def read_saved_dataset(root: Path, *, caption_column: str) -> list[ImageRecord]:
    """A ``datasets.Dataset.save_to_disk`` directory with an image column and captions."""
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
    ds = ds.cast_column(image_cols[0], HFImage(decode=False))
    records = []
    for i, row in enumerate(ds):
        img = row[image_cols[0]]
        data = img.get("bytes")
        path = img.get("path")
        if data is None and path:
            data = Path(path).read_bytes()
        key = Path(path).name if path else f"row-{i:06d}"
        user = row.get("user_id")
        records.append(ImageRecord(key=key, text=str(row[caption_column] or ""),
                                   user_id=None if user in (None, "") else str(user),
                                   image_bytes=bytes(data) if data is not None else b""))
    return records


def check_root(root: Path) -> None:
    """``data.path`` must be an existing directory (checked with the settings, before anything runs)."""
    if not root.exists():
        raise UserError(f"data.path {root} does not exist; point data.path at your image folder")
    if not root.is_dir():
        raise UserError(f"data.path {root} is not a directory; point it at the folder holding metadata.jsonl")


def read_any(root: Path, *, caption_column: str) -> list[ImageRecord]:
    check_root(root)
    if (root / "dataset_info.json").exists() or (root / "dataset_dict.json").exists():
        return read_saved_dataset(root, caption_column=caption_column)
    return read_image_folder(root, caption_column=caption_column)


def read_dataset(path: Path, *, caption_column: str = "text") -> list[ImageRecord]:
    """Read the records of an image folder (metadata.jsonl/csv) or a save_to_disk dataset."""
    return read_any(Path(path), caption_column=caption_column)
