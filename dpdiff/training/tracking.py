"""Experiment trackers: ``local`` (metrics.jsonl, always written) and ``wandb`` (offline by default).

Private training images and captions are never sent to a tracker unless the user sets
``tracker.log_private_data=true``; what is logged are metrics, the config, epsilon and images
*generated* by the trained model from the sample prompts.
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


class WandbTracker:
    """wandb in offline mode unless ``tracker.mode=online`` (and the user has logged in)."""

    def __init__(self, run_dir: Path, *, config: dict, project: str, mode: str = "offline",
                 name: str | None = None, tags: list[str] | None = None):
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.wandb = wandb
        self.run = wandb.init(project=project, dir=str(run_dir), mode=mode, config=config, name=name,
                              tags=tags, reinit="finish_previous")

    def log(self, metrics: dict, *, step: int) -> None:
        self.run.log(metrics, step=step)

    def log_image(self, key: str, path: Path, *, step: int, caption: str = "") -> None:
        self.run.log({key: self.wandb.Image(str(path), caption=caption)}, step=step)

    def summary(self, values: dict) -> None:
        for k, v in values.items():
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
                                                 tags=list(cfg.get("tags") or []))])
    from dpdiff.errors import UserError

    raise UserError(f"tracker={kind}: must be local or wandb")
