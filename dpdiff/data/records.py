"""Reading a private image dataset into records, and grouping records into privacy units.

Accepted layout (diffusers' training examples / HF datasets' ``imagefolder``): a folder of
images with ``metadata.jsonl`` (or ``metadata.csv``) whose rows have ``file_name``, a caption
column (``text`` by default) and optionally ``user_id``. A dataset written by HF datasets'
``save_to_disk`` (an ``image`` column plus captions) is read too (see ``dpdiff.data.formats``).
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dpdiff.data.streams import ImageRef
from dpdiff.errors import UserError
from dpdiff.privacy.dataset_ledger import RecordIds  # (re-exported: what the ledger charges)


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """One training image: a file ``root / key`` of an image folder, encoded bytes held in memory (canaries), or a
    reference into a large dataset's files (``ref``). Slotted, with the folder's ``root`` one object shared by all
    records: about 220 bytes a record rather than 490 with a ``Path`` each (measured), which is what a 10^6-image
    dataset costs every process before any pixel is read."""

    key: str  # file name relative to the dataset root (or a row id): names the item in reports
    text: str
    user_id: str | None = None
    root: Path | None = None  # the image folder (shared): the file is root / key
    image_bytes: bytes | None = None  # encoded image, for datasets without files
    ref: ImageRef | None = None  # where the encoded image lies in a large dataset (tar shard, parquet, Arrow)

    @property
    def path(self) -> Path | None:
        return None if self.root is None else self.root / self.key

    @property
    def file(self) -> str | None:
        """The image file as a string: what the data path opens. No ``Path`` object per record (pathlib interns every
        part it parses, and the interpreter's table of interned strings never shrinks: measured ~75 bytes a record
        that stayed after a pass over 10^5 records)."""
        return None if self.root is None else os.path.join(self.root, self.key)

    def read_bytes(self) -> bytes:
        """The encoded image (file contents)."""
        if self.root is not None:
            with open(self.file, "rb") as f:
                return f.read()
        if self.ref is not None:
            return self.ref.read_bytes()
        return self.image_bytes or b""

    def open(self):
        from PIL import Image

        if self.root is not None:
            im = Image.open(self.file)
        else:
            import io

            im = Image.open(io.BytesIO(self.read_bytes()))
        im.load()
        return im


class UnitMembers(Sequence):
    """unit -> record indices, held as two integer arrays (offsets, flat indices: a CSR layout) instead of a tuple
    of tuples: 16 bytes a record rather than ~80 (a tuple and an int object each), what 10^6 single-record units cost
    every process. Reads like the tuple of tuples it replaces: ``members[u]`` is a tuple of ints."""

    __slots__ = ("offsets", "flat")

    def __init__(self, members: Sequence[Sequence[int]] | UnitMembers):
        if isinstance(members, UnitMembers):
            self.offsets, self.flat = members.offsets, members.flat
            return
        sizes = np.fromiter((len(m) for m in members), dtype=np.int64)
        self.offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum(sizes, out=self.offsets[1:])
        self.flat = np.fromiter((int(i) for m in members for i in m), dtype=np.int64, count=int(self.offsets[-1]))

    @classmethod
    def from_arrays(cls, offsets: np.ndarray, flat: np.ndarray) -> UnitMembers:
        out = cls.__new__(cls)
        out.offsets, out.flat = np.asarray(offsets, dtype=np.int64), np.asarray(flat, dtype=np.int64)
        return out

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, u):
        if isinstance(u, slice):
            return tuple(self[i] for i in range(*u.indices(len(self))))
        u = range(len(self))[u]  # bounds and negative indices as a tuple has them
        return tuple(self.flat[self.offsets[u]:self.offsets[u + 1]].tolist())

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        flat, off = self.flat.tolist(), self.offsets.tolist()
        for a, b in zip(off, off[1:]):
            yield tuple(flat[a:b])

    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def take(self, unit_ids) -> UnitMembers:
        """The members of ``unit_ids``, in that order."""
        ids = np.asarray(list(unit_ids), dtype=np.int64)
        sizes = self.sizes()[ids] if len(ids) else np.zeros(0, dtype=np.int64)
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        flat = (np.concatenate([self.flat[self.offsets[u]:self.offsets[u + 1]] for u in ids.tolist()])
                if len(ids) else np.zeros(0, dtype=np.int64))
        return UnitMembers.from_arrays(offsets, flat)

    def __eq__(self, other) -> bool:
        if isinstance(other, UnitMembers):
            return np.array_equal(self.offsets, other.offsets) and np.array_equal(self.flat, other.flat)
        try:
            return tuple(self) == tuple(tuple(m) for m in other)
        except TypeError:
            return NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        return f"UnitMembers({len(self)} units, {len(self.flat)} records)"


@dataclass(frozen=True)
class PrivacyUnits:
    """A partition of record indices into privacy units (one clipped gradient each)."""

    kind: str  # "example" or "user"
    members: UnitMembers  # unit -> record indices (any sequence of sequences is accepted and stored compactly)
    names: tuple[str, ...]  # unit -> name (file name or user id)

    def __post_init__(self):
        if not isinstance(self.members, UnitMembers):
            object.__setattr__(self, "members", UnitMembers(self.members))
        if not isinstance(self.names, tuple):
            object.__setattr__(self, "names", tuple(self.names))

    def __len__(self) -> int:
        return len(self.members)

    def subset(self, unit_ids) -> PrivacyUnits:
        ids = list(unit_ids)
        return PrivacyUnits(self.kind, self.members.take(ids), tuple(self.names[i] for i in ids))

    def reindexed(self, new_index: np.ndarray) -> PrivacyUnits:
        """The same units with every record index ``i`` replaced by ``new_index[i]`` (e.g. onto the training-only
        arrays of encoded features)."""
        flat = np.asarray(new_index, dtype=np.int64)[self.members.flat]
        if len(flat) and flat.min() < 0:
            raise ValueError("reindexed: a member has no new index")
        return PrivacyUnits(self.kind, UnitMembers.from_arrays(self.members.offsets, flat), self.names)

    def extended(self, members: Sequence[Sequence[int]], names: Sequence[str]) -> PrivacyUnits:
        """These units followed by ``members`` (named ``names``)."""
        extra = UnitMembers(members)
        offsets = np.concatenate([self.members.offsets, self.members.offsets[-1] + extra.offsets[1:]])
        flat = np.concatenate([self.members.flat, extra.flat])
        return PrivacyUnits(self.kind, UnitMembers.from_arrays(offsets, flat), self.names + tuple(names))


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
    if unit == "example" and not groups:  # one unit per record: no grouping to do
        n = len(records)
        return PrivacyUnits(unit, UnitMembers.from_arrays(np.arange(n + 1), np.arange(n)),
                            tuple(r.key for r in records))
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

    Each unit is held out on its own: when a seeded hash of its name (BLAKE2b keyed by the seed), read as a
    uniform number in [0, 1), falls below ``fraction``. Whether a unit is trained on therefore depends on that
    unit alone, never on how many other units there are or where it sits in the list (a seeded permutation of
    the N units would move many units between train and holdout when one unit is added: the training sets of
    two neighbouring datasets would then differ in more than one unit). The holdout's size is Binomial(N,
    fraction). Held-out units are never trained on; probes use them as non-members. Choosing the split spends no
    privacy budget.
    """
    key = hashlib.blake2b(str(int(seed)).encode(), digest_size=32).digest()
    train, hold = [], []
    for i, name in enumerate(units.names):
        u = int.from_bytes(hashlib.blake2b(name.encode(), key=key, digest_size=8).digest(), "little") / 2.0**64
        (hold if u < fraction else train).append(i)
    return train, hold


def fingerprint(records: list[ImageRecord], *, ids: list[bytes] | None = None) -> str:
    """A content fingerprint of a dataset: sha256 over sorted (key, caption, user, image sha256).

    Names the dataset in reports and the per-dataset privacy ledger without revealing it. ``ids``
    (``record_ids(records)``, aligned with ``records``) saves hashing every image again.
    """
    h = hashlib.sha256()
    if ids is not None and len(ids) != len(records):
        raise ValueError("fingerprint: ids must be aligned with records")
    for i in sorted(range(len(records)), key=lambda i: records[i].key):
        r = records[i]
        h.update(r.key.encode())
        h.update(b"\0")
        h.update(r.text.encode())
        h.update(b"\0")
        h.update(str(r.user_id or "").encode())
        h.update(b"\0")
        h.update(ids[i] if ids is not None else _content_digest(r))
    return h.hexdigest()


def ids_of(records: list[ImageRecord]) -> RecordIds:
    """The records' ids with their user ids (None for example-level data): what the dataset ledger charges."""
    users = tuple(str(r.user_id) if r.user_id else None for r in records)
    return RecordIds(digests=tuple(record_ids(records)), users=users if any(users) else None)


def record_ids(records: list[ImageRecord]) -> list[bytes]:
    """Each record's stable id: the sha256 of its image bytes (32 bytes), aligned with ``records``, each
    computed once. The id follows the content, not the file name or caption: the same image under another
    name is the same record, an edited image a new one. Private (it identifies an image to whoever holds it):
    the dataset ledger stores only keyed hashes of it (``dpdiff.privacy.dataset_ledger``)."""
    return [_content_digest(r) for r in records]


def _content_digest(r: ImageRecord) -> bytes:
    """sha256 of the record's bytes; a listed file that is missing or unreadable hashes as such (so the
    fingerprint of a folder as listed, bad files included, is defined)."""
    try:
        return hashlib.sha256(r.read_bytes()).digest()
    except OSError as err:
        return hashlib.sha256(f"<unreadable: {type(err).__name__}>".encode()).digest()
