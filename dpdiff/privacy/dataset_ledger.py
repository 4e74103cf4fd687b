"""The privacy ledger of a dataset folder, per record: every training attempt, and the records it trained on.

**Attempts.** An *attempt* is one process run of ``dpdiff finetune`` (a fresh run, or one resume of a run).
Each attempt appends lines to the folder's JSON-lines ledger: when it starts (its *planned* steps, so a crash
never under-counts) and when it ends (the steps it actually took). The latest line of an attempt supersedes
its earlier ones. An attempt is charged only its *own* steps: a resumed attempt inherits its parent's ledger
(counted by the parent's entry) and adds what it spends itself. When a run is resumed after a crash, the
resuming attempt corrects the crashed attempt's "planned" line to the steps that attempt really spent (its
run ledger is saved after every step, and the run dir's lock proves it is no longer running). So every spend
is counted exactly once: two runs into one run dir, two resumes from one checkpoint, a crash and its resume.
The planned line is appended under an exclusive lock (``<ledger>.lock``, ``fcntl.flock``) held from reading
the ledger to writing it, so two runs started at once cannot both pass ``privacy.dataset_budget``.

**Records.** A record is an image, named by its content: the sha256 of its bytes
(``dpdiff.data.records.record_ids``), never by its file name. Each attempt stores the set of records it
trained on once (a sorted array of 16-byte ids in ``<ledger>.records/<attempt_id>.npy``; the status lines of
one attempt share it), and a user-level attempt also the set of its users. The ids stored are *keyed* hashes
(BLAKE2b keyed with a random 32-byte salt kept beside the ledger in ``<ledger>.salt``, mode 0600, created on
first write): without the salt they say nothing about the images; with it, whoever holds an image can test
whether it was trained on. The ledger, its salt and its record sets are therefore the data owner's files, to
be kept as private as the data itself.

**What a record's epsilon means.** A record is charged every attempt that trained on it (for a user-level
attempt: on any record of its user, as the folder's ``user_id`` column now says, or on the record itself), and
its epsilon is that of the composition of those attempts' mechanisms (``compose_runs``, one accountant). Under
add/remove of that record's privacy unit it is an upper bound on what every output of those attempts together
reveals about the record: the attempts that never trained on it could not depend on it. This is related to
individual privacy accounting (Feldman & Zrnic 2021, "Individual privacy accounting via a Renyi filter") but is
not it: there, a record's charge follows its actual (clipped) gradient norms inside one adaptive composition;
here every record a run trained on is charged that run's full worst-case epsilon, and a run's epsilon is never
personalised. Records added later start at epsilon 0; records no longer in the folder keep their history (and
count again if they come back). ``dpdiff budget DATASET`` and the in-run ``privacy.dataset_budget`` check
report the *worst-charged* record and how many records carry each charge.

**What it does not do.** An image edited in place (re-encoded, cropped, one pixel changed) gets a new id: it
is a new record starting at 0, and its old version keeps its history; the person it shows is protected only as
far as the unit says. A near-duplicate under another file name is a different record unless ``data.dedup``
groups it with its twin. Id collisions (16 bytes) only merge two records' charges, never lose one. Entries
written before per-record ledgers (no record set), and attempts whose record set can no longer be read (salt
or sidecar deleted), are charged to every record, conservatively, and the output says so. Users are linked only
through the folder's current ``user_id`` column: a record removed from the folder is no longer tied to its
user. Absent records are counted per ledger file (each file has its own salt).

**Composition** is over add/remove-one-unit neighbours, and a per-example and a per-user guarantee do not
compose into either: removing one image of a multi-image user *replaces* that user's unit, which add/remove of
users does not cover, and a user-level epsilon bounds a whole user, not a group of examples from several
users. ``compose_runs`` therefore returns no finite total for attempts of mixed units, and a planned run whose
unit differs from that of a DP attempt charged to any of its records is refused. It is valid only because
every attempt draws its noise and sampling masks from fresh entropy (``dpdiff.privacy.randomness``); a
non-private attempt, or several attempts of which one used seeded (reproducible) noise, leave no finite
guarantee, and the total says so.

**Tuning procedures.** ``dpdiff tune`` releases only the best of a random number of candidates. Its own line
(its score releases) and its candidates' attempts are charged together as the one mechanism they are, by
Papernot & Steinke's bound over the worst grid point, fixed before the number of candidates is drawn
(``selection_group_rdp``), composed with a record's other charges by RDP; never as the sum of the candidates.

**Location.** ``privacy.dataset_ledger=PATH`` if set, else ``.dpdiff-ledger.jsonl`` in the dataset folder,
else (folder not writable) ``$DPDIFF_HOME/ledgers/<sha256 of the folder's resolved path>.jsonl``; reads cover
all of them, and the file named by the folder's source fingerprint that earlier versions wrote there.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import math
import os
import time as _time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dpdiff.errors import UserError
from dpdiff.io import append_jsonl, write_bytes_atomic
from dpdiff.privacy.accountants import DEFAULT_ACCOUNTANT, MechanismSegment, get_accountant

LEDGER_NAME = ".dpdiff-ledger.jsonl"
SALT_BYTES = 32
ID_BYTES = 16
_ID_DTYPE = f"S{ID_BYTES}"


@dataclass(frozen=True)
class RecordIds:
    """The ids of the records a run trains on (``record_ids``), with each record's ``user_id`` (aligned;
    None for example-level runs): what the dataset ledger charges."""

    digests: tuple[bytes, ...]
    users: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.digests)



@dataclass(frozen=True, kw_only=True)
class LedgerLocation:
    """Where a dataset's ledger is written, and every file where entries of it may be found."""

    write: Path
    read: tuple[Path, ...]


def folder_key(root: Path) -> str:
    """sha256 of the folder's resolved path: names its ledger under ``$DPDIFF_HOME`` (stable as images are added)."""
    return hashlib.sha256(str(Path(root).expanduser().resolve()).encode()).hexdigest()


def ledger_location(*, data_root: Path, source_fingerprint: str | None = None,
                    configured: str | None = None) -> LedgerLocation:
    """``privacy.dataset_ledger`` if set; else ``.dpdiff-ledger.jsonl`` in the dataset folder when writable;
    else ``$DPDIFF_HOME/ledgers/<sha256 of the folder path>.jsonl``. Reads always cover all of them, and
    ``$DPDIFF_HOME/ledgers/<source fingerprint>.jsonl`` (where earlier versions wrote)."""
    from dpdiff.paths import home

    root = Path(data_root)
    in_folder = root / LEDGER_NAME
    ledgers = home() / "ledgers"
    in_home = ledgers / f"{folder_key(root)}.jsonl"
    if configured:
        write = Path(configured).expanduser()
    elif root.is_dir() and os.access(root, os.W_OK):
        write = in_folder
    else:
        write = in_home
    old = [ledgers / f"{source_fingerprint}.jsonl"] if source_fingerprint else []
    read = tuple(dict.fromkeys([write, in_folder, in_home, *old]))
    return LedgerLocation(write=write, read=read)


@dataclass(frozen=True, kw_only=True)
class AttemptEntry:
    attempt_id: str
    run_id: str  # the lineage: the run dir where the run began
    run_dir: str
    fingerprint: str  # the records trained on
    source_fingerprint: str  # the dataset as listed
    status: str  # planned | finished | ended (a crashed attempt, corrected by its resume)
    dp: bool
    privacy_unit: str
    delta: float | None
    accountant: str | None
    segments: tuple[MechanismSegment, ...] = ()  # this attempt's own steps, none inherited
    reproducible_noise: bool = False
    parent_attempt: str | None = None
    epsilon: float | None = None  # of this attempt's own steps (display only)
    time: str = ""
    seq: int = field(default_factory=_time.time_ns)
    # the records it trained on: {"records": n, "file": sidecar, ["users": m, "users_file": sidecar]} in
    # ``<ledger>.records/``; {"records": 0}: none (a run that ended before training); None: unknown (an entry
    # written before per-record ledgers): charged to every record
    record_set: dict | None = None
    # a tuning procedure's own line (``dpdiff tune``: its score releases): {"kind": "private_selection", "eta",
    # "gamma", "grid": [segments of each grid point], "candidates": [the candidate dirs in its run dir, each listed
    # before its candidate starts]} (``selection_members``)
    procedure: dict | None = None
    origin: Path | None = field(default=None, compare=False, repr=False)  # the ledger file it was read from

    @property
    def steps(self) -> int:
        return sum(s.steps for s in self.segments)

    def to_dict(self) -> dict:
        return {"attempt_id": self.attempt_id, "run_id": self.run_id, "run_dir": self.run_dir,
                "fingerprint": self.fingerprint, "source_fingerprint": self.source_fingerprint,
                "status": self.status, "dp": self.dp, "privacy_unit": self.privacy_unit, "delta": self.delta,
                "accountant": self.accountant, "segments": [s.to_dict() for s in self.segments],
                "reproducible_noise": self.reproducible_noise, "parent_attempt": self.parent_attempt,
                "epsilon": self.epsilon, "time": self.time, "seq": self.seq, "record_set": self.record_set,
                **({"procedure": self.procedure} if self.procedure else {})}

    @classmethod
    def from_dict(cls, d: dict) -> AttemptEntry:
        fp = d["fingerprint"]
        rs = d.get("record_set")
        return cls(attempt_id=d.get("attempt_id") or d["run_id"], run_id=d["run_id"],
                   run_dir=d.get("run_dir", d["run_id"]), fingerprint=fp,
                   source_fingerprint=d.get("source_fingerprint") or fp, status=d["status"], dp=bool(d["dp"]),
                   privacy_unit=d.get("privacy_unit", "example"), delta=d.get("delta"),
                   accountant=d.get("accountant"),
                   segments=tuple(MechanismSegment(float(s["noise_multiplier"]), float(s["sample_rate"]),
                                                   int(s["steps"])) for s in d.get("segments", [])),
                   reproducible_noise=bool(d.get("reproducible_noise", False)),
                   parent_attempt=d.get("parent_attempt"), epsilon=d.get("epsilon"), time=d.get("time", ""),
                   seq=int(d.get("seq", 0)), record_set=dict(rs) if isinstance(rs, dict) else None,
                   procedure=dict(d["procedure"]) if isinstance(d.get("procedure"), dict) else None)


def make_entry(*, attempt_id: str, run_id: str, run_dir: str, fingerprint: str, source_fingerprint: str,
               status: str, dp: bool, privacy_unit: str, delta: float | None, accountant: str | None,
               segments: Sequence[MechanismSegment], reproducible_noise: bool = False,
               parent_attempt: str | None = None, record_set: dict | None = None,
               procedure: dict | None = None) -> AttemptEntry:
    """An entry with its own epsilon computed (for display) and the current time."""
    segs = tuple(s for s in segments if s.steps > 0)
    eps = None
    if dp and segs and delta and accountant:
        eps = get_accountant(accountant).epsilon(history=list(segs), delta=delta).epsilon
    elif dp:
        eps = 0.0
    return AttemptEntry(attempt_id=attempt_id, run_id=run_id, run_dir=run_dir, fingerprint=fingerprint,
                        source_fingerprint=source_fingerprint, status=status, dp=dp, privacy_unit=privacy_unit,
                        delta=delta, accountant=accountant, segments=segs, reproducible_noise=reproducible_noise,
                        parent_attempt=parent_attempt, epsilon=eps, time=_time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        record_set=record_set, procedure=procedure)


def _digests_and_users(current) -> tuple[list[bytes], tuple[str | None, ...] | None]:
    """``RecordIds`` (digests + users) or a plain sequence of digests."""
    if hasattr(current, "digests"):
        return list(current.digests), current.users
    return list(current), None


def _user_key(user: str) -> bytes:
    return b"user\0" + str(user).encode()


class DatasetLedger:
    def __init__(self, location: LedgerLocation | Path):
        if not isinstance(location, LedgerLocation):
            location = LedgerLocation(write=Path(location), read=(Path(location),))
        self.location = location
        self._salts: dict[Path, bytes | None] = {}

    @property
    def path(self) -> Path:
        return self.location.write

    # -------------------------------------------------------------------------------- files
    @staticmethod
    def salt_path(ledger_file: Path) -> Path:
        return Path(ledger_file).with_name(Path(ledger_file).name + ".salt")

    @staticmethod
    def records_dir(ledger_file: Path) -> Path:
        return Path(ledger_file).with_name(Path(ledger_file).name + ".records")

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive lock on the written ledger (``<ledger>.lock``): hold it from reading to appending."""
        path = self.path.with_name(self.path.name + ".lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def salt(self, ledger_file: Path, *, create: bool = False) -> bytes | None:
        """The ledger file's secret salt (None if it has none and ``create`` is false)."""
        ledger_file = Path(ledger_file)
        if self._salts.get(ledger_file) is not None:
            return self._salts[ledger_file]
        sp = self.salt_path(ledger_file)
        salt = sp.read_bytes() if sp.exists() else None
        if salt is None and create:
            sp.parent.mkdir(parents=True, exist_ok=True)
            tmp = sp.with_name(f".{sp.name}.tmp-{os.getpid()}-{uuid.uuid4().hex}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, os.urandom(SALT_BYTES))
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, sp)  # atomic: the first writer's salt wins, a reader never sees half of one
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
            salt = sp.read_bytes()
        if salt is not None and len(salt) != SALT_BYTES:
            if create:
                raise UserError(f"{sp}: the dataset ledger's salt is damaged ({len(salt)} bytes, not {SALT_BYTES}); "
                                "restore it from a backup, or move the ledger aside knowingly (its record sets then "
                                "charge every record)")
            salt = None
        self._salts[ledger_file] = salt
        return salt

    def keyed_ids(self, ledger_file: Path, digests: Sequence[bytes]) -> np.ndarray | None:
        """The ids as that ledger file stores them (keyed with its salt), aligned with ``digests``."""
        salt = self.salt(ledger_file)
        if salt is None:
            return None
        return np.array([hashlib.blake2b(d, key=salt, digest_size=ID_BYTES).digest() for d in digests],
                        dtype=_ID_DTYPE).reshape(-1)

    def keyed_users(self, ledger_file: Path, users: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray] | None:
        """(keyed user ids, has-a-user mask), aligned with ``users``."""
        salt = self.salt(ledger_file)
        if salt is None:
            return None
        keys = np.array([hashlib.blake2b(_user_key(u), key=salt, digest_size=ID_BYTES).digest() if u else b""
                         for u in users], dtype=_ID_DTYPE).reshape(-1)
        return keys, np.array([bool(u) for u in users], dtype=bool)

    def store_records(self, attempt_id: str, current, *, users: bool = False) -> dict:
        """Write the record set (and, for a user-level attempt, the user set) of an attempt beside the written
        ledger, keyed with its salt; returns the entry's ``record_set``."""
        digests, user_ids = _digests_and_users(current)
        salt = self.salt(self.path, create=True)
        if not digests:
            return {"records": 0}
        ids = np.unique(np.array([hashlib.blake2b(d, key=salt, digest_size=ID_BYTES).digest() for d in digests],
                                 dtype=_ID_DTYPE))
        rdir = self.records_dir(self.path)
        rdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        rs = {"records": int(ids.size), "file": f"{attempt_id}.npy"}
        write_bytes_atomic(rdir / rs["file"], _npy(ids), mode=0o600)
        if users and user_ids is not None:
            uids = np.unique(np.array([hashlib.blake2b(_user_key(u), key=salt, digest_size=ID_BYTES).digest()
                                       for u in user_ids if u], dtype=_ID_DTYPE))
            rs.update(users=int(uids.size), users_file=f"{attempt_id}.users.npy")
            write_bytes_atomic(rdir / rs["users_file"], _npy(uids), mode=0o600)
        return rs

    def load_set(self, entry: AttemptEntry, key: str = "file") -> np.ndarray | None:
        """A stored id set of an entry (sorted keyed ids), or None when it cannot be read."""
        rs = entry.record_set or {}
        if not rs.get(key) or entry.origin is None:
            return None
        try:
            with open(self.records_dir(entry.origin) / Path(rs[key]).name, "rb") as f:
                arr = np.load(f, allow_pickle=False)
        except (OSError, ValueError):
            return None
        return arr.astype(_ID_DTYPE, copy=False).reshape(-1) if arr.dtype.kind == "S" else None

    # ------------------------------------------------------------------------------ entries
    def entries(self, fingerprints: Iterable[str] | None = None) -> list[AttemptEntry]:
        """The latest line of every attempt in any of the ledger files (optionally of given fingerprints)."""
        fps = set(fingerprints) if fingerprints is not None else None
        latest: dict[str, AttemptEntry] = {}
        for path in self.location.read:
            if not path.exists():
                continue
            for n, line in enumerate(path.read_text().splitlines()):
                if not line.strip():
                    continue
                try:
                    e = AttemptEntry.from_dict(json.loads(line))
                except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
                    continue  # a torn last line after a crash
                if fps is not None and not ({e.fingerprint, e.source_fingerprint} & fps):
                    continue
                e = AttemptEntry(**{**e.__dict__, "origin": path, "seq": e.seq or n})  # seq 0: file order
                old = latest.get(e.attempt_id)
                if old is None or e.seq >= old.seq:
                    if e.record_set is None and old is not None and old.record_set is not None:
                        # a status line that did not repeat the set keeps its attempt's
                        e = AttemptEntry(**{**e.__dict__, "record_set": old.record_set, "origin": old.origin})
                    latest[e.attempt_id] = e
        return sorted(latest.values(), key=lambda e: e.seq)

    def record(self, entry: AttemptEntry, *, path: Path | None = None) -> None:
        """Append an entry's line to the written ledger (or to ``path``: the file holding its attempt)."""
        path = Path(path) if path is not None else self.location.write
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        append_jsonl(path, entry.to_dict())
        if new:
            os.chmod(path, 0o600)


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def compose_runs(entries: Sequence, *, delta: float, accountant: str = DEFAULT_ACCOUNTANT,
                 procedures: Mapping[str, AttemptEntry] | None = None, extra_rdp=None) -> dict:
    """Total epsilon at ``delta`` of all the given runs' (or attempts') mechanisms composed.

    ``entries`` are objects with ``dp``, ``segments``, ``privacy_unit`` and ``reproducible_noise``
    (``AttemptEntry``, or the sweep report's rows). The one cross-run composer of dpdiff.

    ``procedures`` (``selection_procedures``): tuning procedures that release only their best candidate. The
    entries of one (its candidates' attempts and its score releases) are charged together as one mechanism, by
    its RDP curve (``selection_group_rdp``: Papernot & Steinke's bound), and the total is the RDP composition of
    that curve with every other entry. ``extra_rdp``: one more mechanism given by its RDP curve at
    ``dpdiff.privacy.selection.ORDERS`` (a tuning procedure about to start), composed by RDP as well.
    """
    n = len(entries)
    if any(not e.dp for e in entries):
        return {"epsilon": math.inf, "delta": delta, "runs": n, "unit": "example", "accountant": accountant,
                "steps": None, "note": "a non-private run trained on this dataset: no finite guarantee remains"}
    if n > 1 and any(getattr(e, "reproducible_noise", False) for e in entries):
        return {"epsilon": math.inf, "delta": delta, "runs": n, "unit": "example", "accountant": accountant,
                "steps": None, "note": "a run with privacy.reproducible_noise=true (seeded noise) does not compose "
                                       "with other runs as an independent mechanism: no finite total"}
    units = sorted({e.privacy_unit for e in entries if any(s.steps > 0 for s in e.segments)})
    if len(units) > 1:
        return {"epsilon": math.inf, "delta": delta, "runs": n, "unit": "mixed", "accountant": accountant,
                "steps": None, "note": "runs per example and per user trained on the same records: their guarantees "
                                       "do not compose into either (removing one image of a multi-image user replaces "
                                       "that user's unit), so no finite total is claimed"}
    hist = [s for e in entries for s in e.segments]
    unit = "user" if entries and all(e.privacy_unit == "user" for e in entries) else "example"
    groups, rest = selection_members(entries, procedures or {})
    out = {"delta": delta, "runs": n, "unit": unit, "accountant": accountant,
           "steps": sum(s.steps for s in hist), "note": None}
    if not groups and extra_rdp is None:
        out["epsilon"] = get_accountant(accountant).epsilon(history=hist, delta=delta).epsilon if hist else 0.0
        return out
    # RDP: the procedures' bounds are RDP curves, which the PRV and PLD accountants cannot compose. Never the
    # smaller of this and the candidates composed as runs: which charge applies is fixed before K is drawn
    from dpdiff.privacy.selection import rdp_of, rdp_to_epsilon

    curve = rdp_of([s for e in rest for s in e.segments])
    for pid, members in groups.items():
        curve = curve + selection_group_rdp(procedures[pid], members)
    if extra_rdp is not None:
        curve = curve + np.asarray(extra_rdp, dtype=float)
    out["epsilon"], _ = rdp_to_epsilon(curve, delta=delta)
    out.update(accountant="rdp", selection_procedures=len(groups))
    return out


# ------------------------------------------------------------------------------ tuning procedures
SELECTION = "private_selection"
CANDIDATE_PREFIX = "candidate-"  # a procedure's candidates train into <its run dir>/candidate-*


def selection_procedures(entries: Iterable) -> dict[str, AttemptEntry]:
    """The tuning procedures among ``entries`` (``dpdiff tune``'s ledger lines), by attempt id."""
    return {e.attempt_id: e for e in entries
            if isinstance(e, AttemptEntry) and (e.procedure or {}).get("kind") == SELECTION}


def selection_members(entries: Sequence, procedures: Mapping[str, AttemptEntry]) -> tuple[dict[str, list], list]:
    """(procedure id -> its entries among ``entries``, the other entries). A procedure's entries are its own line
    (the score releases) and its candidates: the fresh attempts (no parent: a candidate continued later is a run
    of its own) in the candidate dirs the procedure's line lists (it lists a dir before launching a candidate
    there), recorded before the procedure's latest line or while the procedure's process still runs (its run dir
    locked). A crashed procedure's last candidate may therefore be charged as a run of its own as well: more, never
    less. Nothing a config or a command line sets makes a run a candidate."""
    from dpdiff.runtime import run_dir_locked

    by_dir = {Path(p.run_dir): p for p in procedures.values()}
    alive: dict[str, bool] = {}
    groups: dict[str, list] = {}
    rest = []
    for e in entries:
        pid = None
        if getattr(e, "attempt_id", None) in procedures:
            pid = e.attempt_id
        elif isinstance(e, AttemptEntry) and e.parent_attempt is None and not e.procedure:
            rd = Path(e.run_dir)
            p = by_dir.get(rd.parent)
            if p is not None and rd.name in (p.procedure.get("candidates") or ()):
                if p.attempt_id not in alive:
                    alive[p.attempt_id] = p.status == "planned" and run_dir_locked(rd.parent)
                if e.seq < p.seq or alive[p.attempt_id]:
                    pid = p.attempt_id
        (groups.setdefault(pid, []) if pid is not None else rest).append(e)
    return groups, rest


def selection_group_rdp(procedure: AttemptEntry, members: Sequence[AttemptEntry]) -> np.ndarray:
    """The RDP curve (at ``dpdiff.privacy.selection.ORDERS``) a tuning procedure charges a record whose charge
    holds ``members`` of it: Papernot & Steinke's Theorem 2 (``selection_rdp``, K ~ TNB(eta, gamma) unpublished)
    for candidates each at most ``one``: the worst grid point's training if a candidate trained on the record
    (or a candidate's own ledger, if worse than the grid it was drawn from), plus one score release if the record
    is scored.

    Fixed before the procedure runs, whatever K, the grid points drawn or the outcome: the bound averages over
    K and the draws, so charging less after seeing them (the composition of the few candidates a small K ran, or
    the realised grid points) would condition on the procedure's own randomness, which no guarantee covers. A
    procedure that ended early is charged the same (its candidates stay with the owner; publishing one is a
    release the selection does not cover)."""
    from dpdiff.privacy.selection import TruncatedNegativeBinomial, rdp_of, selection_rdp

    spec = procedure.procedure
    one = rdp_of([])
    candidates = [m for m in members if m.attempt_id != procedure.attempt_id]
    if candidates:
        for segs in spec.get("grid", []):
            one = np.maximum(one, rdp_of([MechanismSegment(**g) for g in segs]))
        for m in candidates:  # never below a candidate's own ledger (a grid point resolved otherwise than planned)
            one = np.maximum(one, rdp_of(m.segments))
    if any(m.attempt_id == procedure.attempt_id for m in members) and procedure.segments:
        release = procedure.segments[0]
        one = one + rdp_of([MechanismSegment(release.noise_multiplier, release.sample_rate, 1)])
    return selection_rdp(one, TruncatedNegativeBinomial(float(spec["eta"]), float(spec["gamma"])))


def charge_attempt(led: DatasetLedger, make: Callable[[dict | None], AttemptEntry], current, *, delta: float,
                   accountant: str, unit: str, planned: bool, budget: float | None, per_record: bool = True,
                   before: Callable[[], None] | None = None, what: str = "this run",
                   noun: str = "training record") -> RecordCharges:
    """Append one attempt's line to the dataset ledger, under its lock from reading the ledger to appending: the
    one charging path of every mechanism that reads private records (a training attempt, a tuning procedure's
    score releases).

    ``make(record_set)`` builds the entry (``record_set`` None: keep the entry's own); ``current`` holds the
    records (``RecordIds`` or digests) the mechanism reads. A ``planned`` DP entry is refused when one of those
    records was already charged to a DP attempt of another privacy unit (the guarantees do not compose) or when it
    would bring a record past ``budget``; it then stores the record set beside the ledger. ``before`` runs first,
    under the lock (a resume's correction of crashed attempts). Returns the records' charges with the new entry.
    """
    with led.lock():  # concurrent runs cannot both pass the checks
        if before is not None:
            before()
        entry = make(None)
        others = [e for e in led.entries() if e.attempt_id != entry.attempt_id]
        charges = record_charges(led, others, current, delta=delta, accountant=accountant, extra=entry,
                                 absent=False, conservative=not per_record)
        held = [c for c in charges.charges if c.records]
        where = (f"{charges.records} {noun}s" if per_record else "records (unknown to the ledger: every run counted)")
        if planned and entry.dp:
            clash = {a.attempt_id: a for c in held for a in c.attempts
                     if a is not entry and a.dp and a.steps > 0 and a.privacy_unit != unit}
            if clash:
                other = next(iter(clash.values())).privacy_unit
                hit = sum(c.records for c in held if any(a.attempt_id in clash for a in c.attempts))
                raise UserError(
                    f"privacy.unit={unit}: {hit if per_record else 'the'} of {what}'s {where} were already "
                    f"trained on per {other} by {len(clash)} DP run(s) (ledger {led.path}); a per-{unit} and a "
                    f"per-{other} guarantee do not compose into either (removing one image of a multi-image user "
                    f"replaces that user's unit), so no total could be stated. Keep privacy.unit={other} for this "
                    "data, or, only if the data owner accepts group-privacy reasoning across the two units, "
                    "account this run in a separate ledger with privacy.dataset_ledger=PATH")
        worst = charges.worst
        if planned and budget is not None and worst.epsilon > budget:
            spent = compose_runs([a for a in worst.attempts if a is not entry], delta=delta, accountant=accountant,
                                 procedures=charges.procedures)
            over = sum(c.records for c in held if c.epsilon > budget)
            shown = "inf" if worst.epsilon == float("inf") else f"{worst.epsilon:.3f}"
            raise UserError(
                f"privacy.dataset_budget={budget:g}: {what} would bring its most-charged {noun} to epsilon {shown} "
                f"at delta {delta:.3g} ({spent['epsilon']:.3f} already spent on it by {spent['runs']} run(s); "
                f"{over if per_record else 'the'} of its {where} would pass the budget; ledger {led.path}"
                + (f"; {worst.total['note']}" if worst.total.get("note") else "")
                + f"); lower {what}'s epsilon, leave those records out, or raise the budget knowingly")
        if planned and per_record:
            entry = make(led.store_records(entry.attempt_id, current, users=unit == "user"))
        led.record(entry)
    return charges


def worst_with_curve(led: DatasetLedger, current, *, curve, delta: float, accountant: str) -> float:
    """The worst epsilon over the records of ``current`` of what the ledger charged each, composed with one more
    mechanism given by its RDP curve at ``dpdiff.privacy.selection.ORDERS`` (a tuning procedure about to start,
    whose K candidates cost at most its selection bound)."""
    with led.lock():
        ch = record_charges(led, led.entries(), current, delta=delta, accountant=accountant, absent=False)
    held = [c for c in ch.charges if c.records] or [Charge((), 0, 0, {})]
    return max(float(compose_runs(c.attempts, delta=delta, accountant=accountant, procedures=ch.procedures,
                                  extra_rdp=curve)["epsilon"]) for c in held)


# ------------------------------------------------------------------------------ per-record charges
@dataclass(frozen=True)
class Charge:
    """A set of attempts, and the records carrying exactly that set (the records' *charge signature*)."""

    attempts: tuple[AttemptEntry, ...]
    records: int  # records of the given set carrying it
    absent: int  # ledger-known records absent from the given set carrying it
    total: dict  # compose_runs of the attempts

    @property
    def epsilon(self) -> float:
        return float(self.total["epsilon"])


@dataclass(frozen=True)
class RecordCharges:
    """What every record of a set (and every ledger-known record absent from it) has been charged."""

    charges: tuple[Charge, ...]  # worst first
    records: int  # records in the given set
    absent: int  # ledger-known records not in it (counted per ledger file)
    legacy: tuple[AttemptEntry, ...]  # attempts charged to every record: no record set, or one unreadable
    touching: dict  # attempt_id -> how many records of the given set it charged
    delta: float
    accountant: str
    extra: AttemptEntry | None = None  # the run about to train on every record of the set
    procedures: Mapping[str, AttemptEntry] = field(default_factory=dict)  # charged as private selections

    @property
    def worst(self) -> Charge:
        """The charge of the worst-charged record of the given set (an empty charge when the set is empty)."""
        held = [c for c in self.charges if c.records]
        return held[0] if held else Charge((), 0, 0, compose_runs([], delta=self.delta, accountant=self.accountant))

    @property
    def new_records(self) -> int:
        """Records of the given set no recorded attempt has charged (``extra`` at most)."""
        return sum(c.records for c in self.charges if all(a is self.extra for a in c.attempts))

    @property
    def absent_worst(self) -> float | None:
        held = [c.epsilon for c in self.charges if c.absent]
        return max(held) if held else None

    def histogram(self) -> list[dict]:
        """Records of the given set per charge, worst first: epsilon, records, attempts composed."""
        return [{"epsilon": c.epsilon, "records": c.records, "runs": len(c.attempts)} for c in self.charges
                if c.records]


def record_charges(ledger: DatasetLedger, entries: Sequence[AttemptEntry], current, *, delta: float,
                   accountant: str = DEFAULT_ACCOUNTANT, extra: AttemptEntry | None = None, absent: bool = True,
                   conservative: bool = False) -> RecordCharges:
    """Per-record composition: each record of ``current`` (``RecordIds`` or digests) is charged every attempt of
    ``entries`` whose record set holds it (user-level attempts: or its user), plus ``extra`` (a run about to
    train on all of them); records are grouped by that set of attempts and each group composed once.

    ``absent``: also charge the records the ledger knows that ``current`` lacks (they keep their history).
    ``conservative``: charge every entry to every record (the records of ``current`` are not those a ledger
    names, e.g. a placeholder for a run whose records are unknown). Memory is O(records), one record set
    loaded at a time.
    """
    digests, users = _digests_and_users(current)
    n = len(digests)
    entries = list(entries)
    kinds: list[str] = []  # per entry: "set" | "empty" | "all"
    for e in entries:
        rs = e.record_set
        if conservative or rs is None:
            kinds.append("all")
        elif not rs.get("records"):
            kinds.append("empty")
        elif e.origin is None or ledger.salt(e.origin) is None or not (
                ledger.records_dir(e.origin) / Path(str(rs.get("file"))).name).exists():
            kinds.append("all")  # the salt or the sidecar is gone: the set cannot be read, so charge everything
        else:
            kinds.append("set")
    files = list(dict.fromkeys(e.origin for e, k in zip(entries, kinds, strict=True) if k == "set"))
    cur_keys = {f: ledger.keyed_ids(f, digests) for f in files}
    cur_users = {f: ledger.keyed_users(f, users) for f in files} if users is not None else {}

    # the ledger-known records absent from the given set, per file (a file's ids are keyed with its own salt)
    absent_ids: dict[Path, np.ndarray] = {}
    if absent:
        for e, k in zip(entries, kinds, strict=True):
            if k != "set":
                continue
            ids = ledger.load_set(e)
            if ids is None:
                continue
            gone = np.setdiff1d(ids, cur_keys[e.origin], assume_unique=False)
            prev = absent_ids.get(e.origin)
            absent_ids[e.origin] = gone if prev is None else np.union1d(prev, gone)
    offsets, m = {}, n
    for f, ids in absent_ids.items():
        offsets[f] = m
        m += ids.size

    labels = np.zeros(m, dtype=np.int64)
    sigs: list[tuple[int, ...]] = [()]
    everyone = [*entries, *([extra] if extra is not None else [])]
    procedures = selection_procedures(everyone)
    legacy: list[AttemptEntry] = []
    touching: dict[str, int] = {}

    def charge(k: int, mask: np.ndarray) -> None:
        nonlocal labels, sigs
        if not mask.any():
            return
        uniq, inv = np.unique(labels * 2 + mask, return_inverse=True)
        sigs = [sigs[u // 2] + ((k,) if u % 2 else ()) for u in uniq.tolist()]
        labels = inv.reshape(-1).astype(np.int64)

    for k, (e, kind) in enumerate(zip(entries, kinds, strict=True)):
        if kind == "empty":
            continue
        mask = np.zeros(m, dtype=bool)
        if kind == "all":
            legacy.append(e)
            mask[:] = True
        else:
            ids = ledger.load_set(e)
            if ids is None:  # vanished since it was checked: charge everything
                legacy.append(e)
                mask[:] = True
            else:
                mask[:n] = np.isin(cur_keys[e.origin], ids)
                uset = ledger.load_set(e, "users_file") if cur_users.get(e.origin) is not None else None
                if uset is not None:
                    ukeys, has_user = cur_users[e.origin]
                    mask[:n] |= has_user & np.isin(ukeys, uset)
                if e.origin in absent_ids:
                    off = offsets[e.origin]
                    mask[off:off + absent_ids[e.origin].size] = np.isin(absent_ids[e.origin], ids)
        touching[e.attempt_id] = int(mask[:n].sum())
        charge(k, mask)
    if extra is not None:
        mask = np.zeros(m, dtype=bool)
        mask[:n] = True
        touching[extra.attempt_id] = n
        charge(len(entries), mask)

    cur_counts = np.bincount(labels[:n], minlength=len(sigs))
    abs_counts = np.bincount(labels[n:], minlength=len(sigs))
    out = []
    for lab, sig in enumerate(sigs):
        if not cur_counts[lab] and not abs_counts[lab]:
            continue
        attempts = tuple(everyone[i] for i in sig)
        out.append(Charge(attempts, int(cur_counts[lab]), int(abs_counts[lab]),
                          compose_runs(attempts, delta=delta, accountant=accountant, procedures=procedures)))
    out.sort(key=lambda c: (-c.epsilon, -c.records, -len(c.attempts)))
    return RecordCharges(charges=tuple(out), records=n, absent=m - n, legacy=tuple(legacy), touching=touching,
                         delta=delta, accountant=accountant, extra=extra, procedures=procedures)


def charges_summary(charges: RecordCharges, *, per_record: bool = True, limit: int = 50) -> dict:
    """The worst-charged record's total (``compose_runs`` keys, ``epsilon`` the worst record's) and the records
    carrying each charge: what a run's ``privacy.json`` and the sweep report show."""
    worst = charges.worst
    notes = [worst.total.get("note")]
    if charges.legacy:
        notes.append(f"{len(charges.legacy)} attempt(s) without a readable record set (recorded before per-record "
                     "ledgers, or their set was deleted) are charged to every record, conservatively")
    if not per_record:
        notes.append("this run's records are unknown to the ledger: every recorded attempt is counted")
    hist = charges.histogram() if per_record else None
    return {**worst.total, "note": "; ".join(x for x in notes if x) or None, "per_record": per_record,
            "records": charges.records if per_record else None,
            "records_charged": hist[:limit] if hist is not None else None,
            "new_records": charges.new_records if per_record else None,
            "legacy_attempts": len(charges.legacy)}
