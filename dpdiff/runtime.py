"""Process, device and run-dir plumbing shared by recipes."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dpdiff.errors import UserError


@dataclass
class ProcessContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()


def resolve_device(spec: str) -> torch.device:
    if spec in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise UserError(f"train.device={spec}: not a device (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device={spec}: CUDA is not available on this machine; use train.device=cpu")
    return dev


def process_context(device_spec: str) -> ProcessContext:
    """Rank, world size and device; sets up the process group when launched with several processes.

    accelerate's ``PartialState`` reads the launcher's environment (``accelerate launch`` or
    ``torchrun``) and initialises the process group (NCCL on GPUs, gloo on CPU).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        from accelerate import PartialState

        if device_spec in (None, "auto"):
            cpu = not torch.cuda.is_available()
        else:
            cpu = torch.device(device_spec).type == "cpu"
        # PartialState(cpu=True) is what makes a gloo process group on CPU: without it, accelerate
        # 1.15 leaves a CPU process launched with WORLD_SIZE=2 un-distributed (every rank a "rank 0").
        state = PartialState(cpu=cpu)
        if state.num_processes != world:
            raise RuntimeError(f"launched with WORLD_SIZE={world} but accelerate formed a group of "
                               f"{state.num_processes}; refusing to train (ranks would not share one noise draw)")
        device = state.device if device_spec in (None, "auto") else resolve_device(device_spec)
        if device.type == "cpu":
            device = torch.device("cpu")  # accelerate says cpu:0
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", state.local_process_index)
        return ProcessContext(state.process_index, state.num_processes, state.local_process_index, device)
    return ProcessContext(0, 1, 0, resolve_device(device_spec))


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


RUN_OUTPUTS = ("privacy_ledger.json", "privacy.json", "metrics.jsonl", "run.json")
LOCK_NAME = ".dpdiff.lock"


def previous_run_outputs(run_dir: Path) -> list[str]:
    """Files of an earlier run in ``run_dir`` (empty for a new run dir)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    found += sorted(p.name for p in run_dir.glob("checkpoint-*"))[:1]
    return found


def refuse_reused_run_dir(run_dir: Path) -> None:
    """A run dir that holds a run is resumed or left alone: a second fresh run there would mix two runs'
    metrics and overwrite the first one's weights, report and privacy.json."""
    found = previous_run_outputs(run_dir)
    if found:
        raise UserError(f"hydra.run.dir={run_dir} already holds a run ({', '.join(found)}); continue it with "
                        "train.resume_from=latest, or choose a new hydra.run.dir")


class RunDirLock:
    """An exclusive lock on a run dir while a process trains into it (``fcntl.flock``: released by the OS
    when the process dies, so a crashed run never leaves a stale lock)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._fh = None

    def acquire(self, *, shared: bool = False) -> bool:
        """Take the lock without waiting: exclusive (a trainer or prober), or ``shared`` (a check that nobody
        holds it exclusively: the ranks of one resuming run check the run they resume from together, and
        exclusive tries would refuse each other)."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh.fileno(), (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            return False
        if not shared:
            fh.seek(0)
            fh.truncate()
            fh.write(f"{os.getpid()}\n")
            fh.flush()
        self._fh = fh
        return True

    def release(self) -> None:
        if self._fh is not None:
            import fcntl

            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


def run_dir_locked(run_dir: Path) -> bool:
    """Whether a live process holds the run dir's lock (a missing lock file: nobody; creates nothing)."""
    import fcntl

    path = Path(run_dir) / LOCK_NAME
    try:
        fh = open(path)
    except OSError:
        return False
    with fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        return False


def hold_run_dir(run_dir: Path, *, resuming: bool) -> RunDirLock:
    """Refuse a reused run dir (unless resuming) and one another process is training into; lock it."""
    if not resuming:
        refuse_reused_run_dir(run_dir)
    lock = RunDirLock(run_dir)
    if not lock.acquire():
        raise UserError(f"run dir {run_dir} is in use by a running dpdiff process; wait for it or choose another "
                        "hydra.run.dir")
    return lock


def refuse_if_running(run_dir: Path) -> None:
    """A checkpoint of a run that is still training is not resumed: its ledger is still growing."""
    if not (Path(run_dir) / LOCK_NAME).exists():
        return
    lock = RunDirLock(run_dir)
    if not lock.acquire(shared=True):
        raise UserError(f"{run_dir} is being trained by a running dpdiff process; resume it once that run has "
                        "stopped")
    lock.release()


class RunDir:
    """The run directory, and the promise to leave nothing half-written after a user error.

    A run dir counts as *fresh* when it held only Hydra's own files when the run began; a
    user error before training then removes it again instead of leaving an empty shell.
    """

    HYDRA_FILES = {".hydra", "finetune.log", "probe.log", "report.log", LOCK_NAME}

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.fresh = all(p.name in self.HYDRA_FILES for p in self.path.iterdir())

    def discard_if_fresh(self) -> None:
        if self.fresh and self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)


def gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (just ``[obj]`` without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class PhaseClock:
    """Wall time and memory of this process at the end of each phase of a run (run.json's ``phases``;
    ``benchmarks/scale.py`` reads them): ``rss_mib`` (resident set), ``private_mib`` (its anonymous part: memory
    the process owns, without the page-cache pages of memory-mapped files such as the feature store, which the
    processes of a node share and the kernel can drop), and ``peak_rss_mib`` (the lifetime peak, ``getrusage``;
    a phase that raised it shows by its jump). Linux reads ``/proc/self/status``; elsewhere only the peak."""

    def __init__(self):
        self.records: list[dict] = []

    @staticmethod
    def memory_mib() -> dict:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20 if sys.platform == "darwin" else 1 << 10)
        out = {"rss_mib": None, "private_mib": None, "peak_rss_mib": round(peak, 1)}
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                key, _, val = line.partition(":")
                if key in ("VmRSS", "RssAnon"):
                    out["rss_mib" if key == "VmRSS" else "private_mib"] = round(int(val.split()[0]) / 1024, 1)
        except (OSError, ValueError, IndexError):
            pass
        return out

    @contextlib.contextmanager
    def phase(self, name: str):
        t0 = time.time()
        yield
        self.records.append({"phase": name, "seconds": round(time.time() - t0, 3), **self.memory_mib()})
