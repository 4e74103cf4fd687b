"""Dataset formats dpdiff reads: an image folder with metadata.jsonl/csv; and, read lazily (records hold
references, ``dpdiff.data.streams``), HF ``save_to_disk`` datasets, webdataset tar shards and parquet files."""

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
            root=root,
        ))
    return records


def _record(key: str, text: str, user_id: str | None, ref) -> ImageRecord:
    return ImageRecord(key=key, text=text, user_id=user_id, ref=ref)


def read_saved_dataset(root: Path, *, caption_column: str) -> list[ImageRecord]:
    """A ``datasets.Dataset.save_to_disk`` directory with an image column and captions (images read lazily)."""
    from dpdiff.data.streams import read_saved_dataset as read

    return read(root, caption_column=caption_column, record=_record)


def check_root(root: Path) -> None:
    """``data.path`` must be an existing directory (checked with the settings, before anything runs)."""
    if not root.exists():
        raise UserError(f"data.path {root} does not exist; point data.path at your image folder")
    if not root.is_dir():
        raise UserError(f"data.path {root} is not a directory; point it at the folder holding metadata.jsonl")


def read_any(root: Path, *, caption_column: str) -> list[ImageRecord]:
    from dpdiff.data import streams

    check_root(root)
    if (root / "dataset_info.json").exists() or (root / "dataset_dict.json").exists():
        return read_saved_dataset(root, caption_column=caption_column)
    has_meta = (root / "metadata.jsonl").exists() or (root / "metadata.csv").exists()
    if not has_meta and streams.is_webdataset(root):
        return streams.read_webdataset(root, caption_column=caption_column, record=_record)
    if not has_meta and streams.is_parquet(root):
        return streams.read_parquet(root, caption_column=caption_column, record=_record)
    return read_image_folder(root, caption_column=caption_column)


def read_dataset(path: Path, *, caption_column: str = "text") -> list[ImageRecord]:
    """Read the records of an image folder (metadata.jsonl/csv) or a save_to_disk dataset."""
    return read_any(Path(path), caption_column=caption_column)
