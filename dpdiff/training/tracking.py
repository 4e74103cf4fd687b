"""Experiment trackers: ``local`` (metrics.jsonl, always written) and ``wandb`` (offline by default).

Nothing computed from the private data outside the DP mechanism leaves the machine unless the user
sets ``tracker.log_private_data=true``: a remote tracker (wandb) receives the config, the privacy
accounting (epsilon per step, the learning rate, batch sizes, which are Binomial draws that depend
only on N and q) and images *generated* by the trained model from public prompts. Training losses,
gradient-norm and signal-to-noise statistics, probe and utility summaries, and prompts taken from the
training captions are non-private statistics of the data: they stay in the run dir's metrics.jsonl
(for the data owner) unless that flag is set.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from dpdiff.io import append_jsonl


class Tracker(Protocol):
    def log(self, metrics: dict, *, step: int) -> None: ...
    def log_image(self, key: str, path: Path, *, step: int, caption: str = "") -> None: ...
    def summary(self, values: dict) -> None: ...
    def finish(self) -> None: ...


def truncate_metrics(path: Path, *, after_step: int) -> None:
    """Drop the lines of steps after ``after_step`` (a resume redoes them; their weights were discarded)."""
    import json

    from dpdiff.io import write_text_atomic

    path = Path(path)
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line).get("step", 0)) <= after_step:
                keep.append(line)
        except (json.JSONDecodeError, TypeError, ValueError, AttributeError):
            continue  # a torn line after a crash
    write_text_atomic(path, "\n".join(keep) + ("\n" if keep else ""))


class LocalTracker:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"

    def log(self, metrics: dict, *, step: int) -> None:
        append_jsonl(self.path, {"step": step, **metrics})

    def log_image(self, key: str, path: Path, *, step: int, caption: str = "") -> None:
        pass  # images are already files in the run dir

    def summary(self, values: dict) -> None:
        pass

    def finish(self) -> None:
        pass


PUBLIC_METRICS = frozenset({"epsilon", "lr", "seconds", "units", "rows"})
PUBLIC_SUMMARY_PREFIXES = ("privacy/",)


def public_part(values: dict, *, prefixes: tuple[str, ...] = ()) -> dict:
    """The entries that are not statistics of the private data (see the module docstring)."""
    return {k: v for k, v in values.items() if k in PUBLIC_METRICS or k.startswith(prefixes)}


class WandbTracker:
    """wandb in offline mode unless ``tracker.mode=online`` (and the user has logged in)."""

    def __init__(self, run_dir: Path, *, config: dict, project: str, mode: str = "offline",
                 name: str | None = None, tags: list[str] | None = None, log_private_data: bool = False):
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.wandb = wandb
        self.log_private_data = log_private_data
        self.run = wandb.init(project=project, dir=str(run_dir), mode=mode, config=config, name=name,
                              tags=tags, reinit="finish_previous")

    def log(self, metrics: dict, *, step: int) -> None:
        self.run.log(metrics if self.log_private_data else public_part(metrics), step=step)

    def log_image(self, key: str, path: Path, *, step: int, caption: str = "") -> None:
        self.run.log({key: self.wandb.Image(str(path), caption=caption)}, step=step)

    def summary(self, values: dict) -> None:
        shown = values if self.log_private_data else public_part(values, prefixes=PUBLIC_SUMMARY_PREFIXES)
        for k, v in shown.items():
            self.run.summary[k] = v

    def finish(self) -> None:
        self.run.finish()


class MultiTracker:
    def __init__(self, trackers: list):
        self.trackers = trackers

    def log(self, metrics: dict, *, step: int) -> None:
        for t in self.trackers:
            t.log(metrics, step=step)

    def log_image(self, key: str, path: Path, *, step: int, caption: str = "") -> None:
        for t in self.trackers:
            t.log_image(key, path, step=step, caption=caption)

    def summary(self, values: dict) -> None:
        for t in self.trackers:
            t.summary(values)

    def finish(self) -> None:
        for t in self.trackers:
            t.finish()


class NullTracker:
    """For non-main ranks: they log nothing."""

    def log(self, metrics: dict, *, step: int) -> None:
        pass

    def log_image(self, key: str, path: Path, *, step: int, caption: str = "") -> None:
        pass

    def summary(self, values: dict) -> None:
        pass

    def finish(self) -> None:
        pass


def build_tracker(cfg, run_dir: Path, *, config: dict, is_main: bool):
    if not is_main:
        return NullTracker()
    kind = cfg.get("kind", "local")
    local = LocalTracker(run_dir)
    if kind == "local":
        return local
    if kind == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            from dpdiff.errors import UserError

            raise UserError("tracker=wandb needs the wandb package: pip install 'dpdiff[wandb]'") from None
        return MultiTracker([local, WandbTracker(run_dir, config=config, project=cfg.get("project", "dpdiff"),
                                                 mode=cfg.get("mode", "offline"), name=cfg.get("name"),
                                                 tags=list(cfg.get("tags") or []),
                                                 log_private_data=bool(cfg.get("log_private_data", False)))])
    from dpdiff.errors import UserError

    raise UserError(f"tracker={kind}: must be local or wandb")
