"""Experiment trackers: ``local`` (metrics.jsonl, always written) and ``wandb`` (offline by default).

A remote tracker is a publication channel: its logs may be sent to a team or synced to a server. The
threat model is the standard DP adversary, who knows the whole config, every other record and everything
published, so without ``tracker.log_private_data=true`` the remote tracker (wandb) receives only values
that the DP guarantee covers or that do not depend on the data:

* per logged step: ``epsilon`` (a function of the config and N, which is released as public) and ``lr``
  (the schedule), with the step number. Never ``units`` or ``rows`` (the realised Poisson batch: a
  data-dependent count outside the accountant; with user-level units ``rows`` jumps when a user with many
  images is sampled) and never ``seconds`` (the step time grows with ``rows``: the same count again);
* the run summary: the scalars of privacy.json (the public guarantee; see ``dpdiff.report.privacy_json``,
  which keeps every data-dependent field but N in data_owner.json; ``flat_summary`` passes its public keys
  only);
* the config, with local paths redacted (``data.path``, ``data.cache_dir``, ``model.pretrained``,
  ``privacy.dataset_ledger``, ``train.resume_from``, the other file options, the ``hydra`` node and any
  absolute path) to ``"<redacted: local path>"``;
* images *generated* by the trained model from public prompts (post-processing of the DP weights).

wandb's own side channels are closed too: every entry is held back and sent when the tracker finishes
(wandb stamps each row with its arrival time, ``_runtime``, which would time every step: only the run's
total duration remains visible, an aggregate the guarantee does not cover either); no console capture
(log lines name files and counts); no system metrics (memory and utilisation follow the realised batch
size); no machine metadata (the command line holds ``data.path=...``); no code, git state or requirements.
wandb's local debug logs (``wandb/debug*.log``, not uploaded) name the run dir they are written in.

Training losses, gradient-norm and signal-to-noise statistics, batch sizes, step times, probe and
utility summaries, and prompts taken from the training captions are non-private statistics of the data:
they stay in the run dir's metrics.jsonl (for the data owner) unless ``tracker.log_private_data=true``,
which sends everything as is.
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


#: per-step metrics a remote tracker receives without tracker.log_private_data (the step is sent with them)
PUBLIC_METRICS = frozenset({"epsilon", "lr"})
PUBLIC_SUMMARY_PREFIXES = ("privacy/",)


def public_part(values: dict, *, prefixes: tuple[str, ...] = ()) -> dict:
    """The entries that are not statistics of the private data (see the module docstring). The ``privacy/``
    summary entries are privacy.json's scalars (``dpdiff.report.summary.flat_summary``: its public keys only)."""
    return {k: v for k, v in values.items() if k in PUBLIC_METRICS or k.startswith(prefixes)}


REDACTED = "<redacted: local path>"
#: config keys that hold local paths (file options); their non-null values are redacted
PATH_KEYS = frozenset({"data.path", "data.cache_dir", "model.pretrained", "privacy.dataset_ledger",
                       "train.resume_from", "probes.extraction.feature_extractor", "eval.inception_weights"})


def _looks_like_path(v) -> bool:
    return isinstance(v, str) and (v.startswith(("/", "~", "./", "../", "\\\\")) or
                                   (len(v) > 2 and v[1] == ":" and v[2] in "/\\"))


def redact_config(config, _prefix: str = ""):
    """A copy of the (resolved) config for a remote tracker: the values of ``PATH_KEYS``, the whole ``hydra``
    node (run dir, cwd, the command line's overrides) and any absolute path replaced by ``REDACTED``. The
    built-in demo's ``data.path`` (null, ``demo`` or ``demo:NAME``) is not a local path and is kept."""
    if isinstance(config, dict):
        out = {}
        for k, v in config.items():
            key = f"{_prefix}{k}"
            if key == "hydra" or (key in PATH_KEYS and v not in (None, "")
                                  and not (key == "data.path" and str(v).split(":", 1)[0] == "demo")):
                out[k] = REDACTED
            else:
                out[k] = redact_config(v, f"{key}.")
        return out
    if isinstance(config, (list, tuple)):
        return [redact_config(v, _prefix) for v in config]
    return REDACTED if _looks_like_path(config) else config


def _private_settings(wandb):
    """wandb settings that keep its side channels closed (see the module docstring)."""
    return wandb.Settings(console="off", x_disable_meta=True, x_disable_stats=True, x_disable_machine_info=True,
                          disable_git=True, disable_code=True, save_code=False, x_save_requirements=False)


class WandbTracker:
    """wandb in offline mode unless ``tracker.mode=online`` (and the user has logged in)."""

    def __init__(self, run_dir: Path, *, config: dict, project: str, mode: str = "offline",
                 name: str | None = None, tags: list[str] | None = None, log_private_data: bool = False):
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.wandb = wandb
        self.log_private_data = log_private_data
        extra = {} if log_private_data else {"settings": _private_settings(wandb)}
        self.run = wandb.init(project=project, dir=str(run_dir), mode=mode,
                              config=config if log_private_data else redact_config(config), name=name,
                              tags=tags, reinit="finish_previous", **extra)
        # Without log_private_data every entry waits for finish(): wandb stamps each row with its arrival
        # time (``_runtime``, which a row cannot override), so rows sent as the steps happen would time the
        # steps, and a step's time grows with its realised batch size (see the module docstring).
        self._pending: list[tuple] = []

    def _send(self, *entry) -> None:
        if self.log_private_data:
            self._write(entry)
        else:
            self._pending.append(entry)

    def _write(self, entry: tuple) -> None:
        kind, payload, step = entry
        if kind == "log":
            self.run.log(payload, step=step)
        elif kind == "image":
            key, path, caption = payload
            self.run.log({key: self.wandb.Image(str(path), caption=caption)}, step=step)
        else:
            for k, v in payload.items():
                self.run.summary[k] = v

    def log(self, metrics: dict, *, step: int) -> None:
        self._send("log", dict(metrics if self.log_private_data else public_part(metrics)), step)

    def log_image(self, key: str, path: Path, *, step: int, caption: str = "") -> None:
        self._send("image", (key, Path(path), caption), step)

    def summary(self, values: dict) -> None:
        shown = values if self.log_private_data else public_part(values, prefixes=PUBLIC_SUMMARY_PREFIXES)
        self._send("summary", dict(shown), None)

    def finish(self) -> None:
        pending, self._pending = self._pending, []
        try:
            for entry in pending:
                self._write(entry)
        finally:
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


def check_tracker(cfg) -> str:
    """``tracker.*`` checked before any private data is read: the kind, wandb's mode, and that wandb is installed.
    Returns the kind."""
    from dpdiff.errors import UserError

    kind = str(cfg.kind)
    if kind not in ("local", "wandb"):
        raise UserError(f"tracker={kind}: must be local or wandb")
    if kind == "wandb":
        if str(cfg.mode) not in ("offline", "online", "disabled"):
            raise UserError(f"tracker.mode={cfg.mode}: must be offline, online or disabled")
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError("tracker=wandb needs the wandb package: pip install 'dpdiff[wandb]'") from None
    return kind


def build_tracker(cfg, run_dir: Path, *, config: dict, is_main: bool):
    if not is_main:
        return NullTracker()
    kind = check_tracker(cfg)
    local = LocalTracker(run_dir)
    if kind == "local":
        return local
    return MultiTracker([local, WandbTracker(run_dir, config=config, project=str(cfg.project), mode=str(cfg.mode),
                                             name=cfg.name, tags=list(cfg.tags or []),
                                             log_private_data=bool(cfg.log_private_data))])
