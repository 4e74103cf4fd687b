"""Reading a private image dataset into records, and grouping records into privacy units.

Accepted layout (diffusers' training examples / HF datasets' ``imagefolder``): a folder of
images with ``metadata.jsonl`` (or ``metadata.csv``) whose rows have ``file_name``, a caption
column (``text`` by default) and optionally ``user_id``. A dataset written by HF datasets'
``save_to_disk`` (an ``image`` column plus captions) is read too (see ``dpdiff.data.formats``).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from dpdiff.errors import UserError


@dataclass(frozen=True)
class ImageRecord:
    """One training image. ``path`` is None for images held in memory (``image`` set)."""

    key: str  # file name relative to the dataset root (or a row id): names the item in reports
    text: str
    user_id: str | None = None
    path: Path | None = None
    image_bytes: bytes | None = None  # encoded image, for datasets without files

    def open(self):
        from PIL import Image

        if self.path is not None:
            im = Image.open(self.path)
        else:
            import io

            im = Image.open(io.BytesIO(self.image_bytes))
        im.load()
        return im


@dataclass(frozen=True)
class PrivacyUnits:
    """A partition of record indices into privacy units (one clipped gradient each)."""

    kind: str  # "example" or "user"
    members: tuple[tuple[int, ...], ...]  # unit -> record indices
    names: tuple[str, ...]  # unit -> name (file name or user id)

    def __len__(self) -> int:
        return len(self.members)

    def subset(self, unit_ids) -> PrivacyUnits:
        ids = list(unit_ids)
        return PrivacyUnits(self.kind, tuple(self.members[i] for i in ids), tuple(self.names[i] for i in ids))


def group_units(records: list[ImageRecord], *, unit: str, groups: list[list[int]] | None = None) -> PrivacyUnits:
    """Group records into privacy units: each record (``example``) or each ``user_id`` (``user``).

    ``groups`` (duplicate sets from ``data.dedup=group``) are merged into one unit each; with
    user units, users sharing a duplicate set become one unit (the image is theirs jointly).
    """
    if unit not in ("example", "user"):
        raise UserError(f"privacy.unit must be 'example' or 'user', got {unit!r}")
    if unit == "user":
        missing = [r.key for r in records if not r.user_id]
        if missing:
            raise UserError(
                f"privacy.unit=user needs a user_id for every image; {len(missing)} have none "
                f"(first: {missing[0]}); add user_id to the metadata or use privacy.unit=example")
    # union-find over records: same user (user units) or same duplicate set
    parent = list(range(len(records)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(a: int, b: int) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    if unit == "user":
        first: dict[str, int] = {}
        for i, r in enumerate(records):
            first.setdefault(str(r.user_id), i)
            union(first[str(r.user_id)], i)
    for g in groups or []:
        for i in g[1:]:
            union(g[0], i)
    by_root: dict[int, list[int]] = defaultdict(list)
    for i in range(len(records)):
        by_root[find(i)].append(i)
    members = [tuple(v) for _, v in sorted(by_root.items())]

    def name(m: tuple[int, ...]) -> str:
        if unit == "user":
            users = sorted({str(records[i].user_id) for i in m})
            return "+".join(users)
        return records[m[0]].key if len(m) == 1 else f"{records[m[0]].key} (+{len(m) - 1} duplicates)"

    if unit == "user":
        members.sort(key=lambda m: name(m))
    return PrivacyUnits(unit, tuple(members), tuple(name(m) for m in members))


def split_holdout(units: PrivacyUnits, *, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded, data-independent split of unit ids into (train, holdout).

    Held-out units are never trained on; probes use them as non-members. The split depends
    only on the unit count and the seed, so choosing it spends no privacy budget.
    """
    import numpy as np

    n = len(units)
    n_hold = int(round(fraction * n))
    if fraction > 0 and n_hold == 0 and n >= 2:
        n_hold = 1
    perm = np.random.default_rng(seed).permutation(n)
    hold = sorted(perm[:n_hold].tolist())
    train = sorted(perm[n_hold:].tolist())
    return train, hold


def fingerprint(records: list[ImageRecord]) -> str:
    """A content fingerprint of a dataset: sha256 over sorted (key, caption, user, image sha256).

    Names the dataset in reports and the per-dataset privacy ledger without revealing it.
    """
    h = hashlib.sha256()
    for r in sorted(records, key=lambda r: r.key):
        h.update(r.key.encode())
        h.update(b"\0")
        h.update(r.text.encode())
        h.update(b"\0")
        h.update(str(r.user_id or "").encode())
        h.update(b"\0")
        h.update(_content_digest(r))
    return h.hexdigest()


def _content_digest(r: ImageRecord) -> bytes:
    """sha256 of the record's bytes; a listed file that is missing or unreadable hashes as such (so the
    fingerprint of a folder as listed, bad files included, is defined)."""
    if r.path is None:
        return hashlib.sha256(r.image_bytes or b"").digest()
    try:
        return hashlib.sha256(r.path.read_bytes()).digest()
    except OSError as err:
        return hashlib.sha256(f"<unreadable: {type(err).__name__}>".encode()).digest()
