"""From ``data.*`` settings to the privacy units a run trains on: read, check, dedup, group, split."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dpdiff.data.formats import read_dataset
from dpdiff.data.records import (
    ImageRecord,
    PrivacyUnits,
    fingerprint,
    group_units,
    split_holdout,
)
from dpdiff.data.validate import Problem, check_records, summarize
from dpdiff.errors import UserError


@dataclass
class PreparedData:
    root: Path
    builtin: bool
    demo: str | None
    records: list[ImageRecord]
    units: PrivacyUnits  # every unit (train + holdout)
    train_units: list[int]
    holdout_units: list[int]
    fingerprint: str  # the records trained on (after skipped files and deduplication)
    source_fingerprint: str  # every record the dataset lists, as read: what `dpdiff budget` computes
    skipped: list[Problem] = field(default_factory=list)
    remarks: list[Problem] = field(default_factory=list)
    dedup: dict | None = None
    sample_prompts: list[str] = field(default_factory=list)
    sample_prompts_source: str = ""
    canary_records: list[int] = field(default_factory=list)  # audit canaries appended to records

    def member_records(self) -> list[int]:
        """Trained records of the user's own data (canaries excluded)."""
        canaries = set(self.canary_records)
        return [i for i in self.train_records() if i not in canaries]

    def train_record_ids(self):
        """The ids of the user's records this run trains on (``member_records``: held-out records and audit
        canaries excluded), with their user ids: what the dataset ledger charges. Computed on first use (it
        reads every trained image once more) and kept; a copy made with ``dataclasses.replace`` (canaries
        inserted) computes its own. Returns a ``dpdiff.data.records.RecordIds``."""
        from dpdiff.data.records import ids_of

        cached = self.__dict__.get("_train_record_ids")
        if cached is None:
            cached = ids_of([self.records[i] for i in self.member_records()])
            self.__dict__["_train_record_ids"] = cached
        return cached

    @property
    def num_train_units(self) -> int:
        return len(self.train_units)

    def train_records(self) -> list[int]:
        return np.sort(self.units.members.take(self.train_units).flat).tolist()

    def unit_of_record(self) -> np.ndarray:
        """Record index -> privacy unit id, over every unit (trained and held out): an integer array (-1 for a
        record in no unit, which preparation never leaves)."""
        m = self.units.members
        out = np.full(len(self.records), -1, dtype=np.int64)
        out[m.flat] = np.repeat(np.arange(len(m)), m.sizes())
        return out

    def holdout_records(self) -> list[int]:
        return np.sort(self.units.members.take(self.holdout_units).flat).tolist()

    def summary(self) -> dict:
        return {
            "path": str(self.root), "builtin_demo": self.builtin, "demo": self.demo, "fingerprint": self.fingerprint,
            "source_fingerprint": self.source_fingerprint,
            "images": len(self.records), "privacy_units": len(self.units), "train_units": len(self.train_units),
            "holdout_units": len(self.holdout_units), "train_images": len(self.train_records()),
            "skipped_files": len(self.skipped), "skipped": [p.line() for p in self.skipped],
            "remarks": [p.line() for p in self.remarks], "dedup": self.dedup,
            "sample_prompts_source": self.sample_prompts_source,
        }


def resolve_data_path(path, *, demo: str | None = None) -> tuple[Path, str | None]:
    """``(root, demo name)``: a user's folder (demo None), or a built-in demo's, materialised on first use
    (``data.path=null``, or ``demo:NAME``)."""
    from dpdiff.data.demos import DEFAULT_DEMO, get_demo

    if path in (None, "", "demo"):
        name = demo or DEFAULT_DEMO
        return get_demo(name).directory(), name
    if str(path).startswith("demo:"):
        name = str(path).split(":", 1)[1]
        return get_demo(name).directory(), name
    return Path(str(path)).expanduser().resolve(), None


def load_and_check(*, path, caption_column: str = "text", demo: str | None = None,
                   check_pixels: bool = True) -> tuple[Path, str | None, list[ImageRecord], list[Problem]]:
    root, demo_name = resolve_data_path(path, demo=demo)
    records = read_dataset(root, caption_column=caption_column)
    problems = check_records(records, root=root, check_pixels=check_pixels)
    return root, demo_name, records, problems


def source_fingerprint(path, *, caption_column: str = "text", demo: str | None = None) -> tuple[Path, str]:
    """The dataset's fingerprint as listed (no file skipped, none deduplicated): how ledgers find it."""
    root, _ = resolve_data_path(path, demo=demo)
    return root, fingerprint(read_dataset(root, caption_column=caption_column))


def prepare(settings, *, unit: str, seed_holdout: int | None = None) -> PreparedData:
    """Read and check the dataset (``DataSettings``), then group into units and split off the holdout units.

    Raises ``UserError`` (listing each bad file) unless ``data.skip_bad_files`` is set.
    """
    root, demo, records, problems = load_and_check(path=settings.path, caption_column=settings.caption_column,
                                                   demo=settings.demo)
    builtin = demo is not None
    source_fp = fingerprint(records)
    fatal = [p for p in problems if p.fatal_for_record]
    remarks = [p for p in problems if not p.fatal_for_record]
    skipped: list[Problem] = []
    if fatal:
        if not settings.skip_bad_files:
            raise UserError(f"{root}: {len(fatal)} problem(s) in the dataset; fix them or set data.skip_bad_files=true "
                            f"to train without those files: {summarize(fatal)}")
        bad_keys = {p.key for p in fatal}
        # a duplicated file name is ambiguous: drop every row carrying it
        records = [r for r in records if r.key not in bad_keys]
        skipped = fatal
        if not records:
            raise UserError(f"{root}: no usable images left after skipping {len(fatal)} bad file(s)")

    dedup_info = None
    from dpdiff.data.dedup import apply_dedup

    records, groups, dedup_info = apply_dedup(records, mode=settings.dedup,
                                              max_hash_distance=int(settings.dedup_hash_distance))
    units = group_units(records, unit=unit, groups=groups)
    from dpdiff.data.validate import check_units

    remarks += check_units(units.members.sizes().tolist(), batch_size=None)
    split_seed = settings.split_seed if seed_holdout is None else seed_holdout
    train, hold = split_holdout(units, fraction=float(settings.holdout_fraction), seed=int(split_seed))

    prompts = settings.sample_prompts
    if prompts:
        source = "config"
        prompts = [str(p) for p in prompts]
    elif builtin:
        from dpdiff.data.demos import get_demo

        prompts, source = get_demo(demo).sample_prompts, "builtin"
    else:
        counts = Counter(records[i].text for u in train for i in units.members[u])
        prompts, source = [c for c, _ in counts.most_common(6)], "training captions"
    return PreparedData(root=root, builtin=builtin, demo=demo, records=records, units=units, train_units=train,
                        holdout_units=hold, fingerprint=fingerprint(records), source_fingerprint=source_fp,
                        skipped=skipped, remarks=remarks,
                        dedup=dedup_info, sample_prompts=prompts, sample_prompts_source=source)
