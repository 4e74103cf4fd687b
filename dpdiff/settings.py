"""Typed, validated settings of a fine-tuning run: one frozen, keyword-only class per config group.

``RunSettings.from_config(cfg)`` checks every key a user can set, with one message shape
(``group.key=value: what it must be``), before any private data is read; the recipe then reads these
objects, never the raw config. The privacy group lives in ``dpdiff.privacy.settings`` (the mechanism),
kept apart from the knobs here, several of which still shape the guarantee through the plan
(``train.batch_size`` sets q, ``train.max_steps`` the number of compositions) and are named so below.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from dpdiff.errors import UserError
from dpdiff.models.families import FAMILIES
from dpdiff.privacy.plan import ENGINES
from dpdiff.privacy.settings import PrivacySettings
from dpdiff.schema import required

ADAPTER_KINDS = ("lora", "full", "attn", "embedding")
EMBEDDING_MECHANISMS = ("dpsgd", "aggregate")
DEDUP_MODES = ("report", "drop", "group")
PRECISIONS = ("no", "bf16", "fp16")
FROZEN_DTYPES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


_get = required  # every key of a group is required (dpdiff.schema.required)


def _fail(group: str, key: str, value, must: str) -> UserError:
    return UserError(f"{group}.{key}={value}: {must}")


def _int(group, key, v, *, lo: int | None = None, allow_none: bool = False) -> int | None:
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or (lo is not None and v < lo):
        raise _fail(group, key, v, f"must be an integer >= {lo}" if lo is not None else "must be an integer")
    return int(v)


def _float(group, key, v, *, positive: bool = False, lo: float | None = None, hi: float | None = None,
           allow_none: bool = False) -> float | None:
    if v is None and allow_none:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise _fail(group, key, v, "must be a number") from None
    if not math.isfinite(f) or (positive and f <= 0) or (lo is not None and f < lo) or (hi is not None and f > hi):
        must = "must be > 0" if positive else f"must be in [{lo}, {hi}]"
        raise _fail(group, key, v, must)
    return f


def _bool(group, key, v) -> bool:
    if isinstance(v, bool):
        return v
    raise _fail(group, key, v, "must be true or false")


def _choice(group, key, v, options) -> str:
    if str(v) not in options:
        raise _fail(group, key, v, f"must be one of {', '.join(options)}")
    return str(v)


@dataclass(frozen=True, kw_only=True)
class SampleSettings:
    per_prompt: int
    steps: int
    guidance_scale: float
    seed: int


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """``train.*``. ``batch_size`` (q = B/N) and ``max_steps`` (compositions) shape the guarantee through the
    privacy plan; the rest (micro-batching, precision, the clipping engine) cannot change it."""

    max_steps: int | None  # None: auto, resolved from N by ``resolved`` before the privacy plan is built
    batch_size: float | None  # None: auto (as max_steps)
    micro_batch_size: int
    lr: float
    optimizer: str
    lr_scheduler: str
    lr_warmup_steps: int
    adam_beta1: float
    adam_beta2: float
    weight_decay: float
    adam_epsilon: float
    snr_gamma: float | None
    timestep_range: tuple[int, int] | None
    caption_dropout: float
    seed: int
    device: str
    mixed_precision: str
    per_sample: str
    per_sample_memory_gb: float
    gradient_checkpointing: bool
    ema_enabled: bool
    ema_decay: float
    log_every: int
    checkpoint_every: int
    checkpoints_total_limit: int | None
    resume_from: str | None
    progress: bool
    sample: SampleSettings

    @classmethod
    def from_config(cls, t, *, privacy_enabled: bool, num_train_timesteps: int | None = None) -> TrainSettings:
        g = "train"
        mp = str(_get(t, "mixed_precision"))
        mp = "no" if mp in ("False", "None", "fp32") else mp
        tr = _get(t, "timestep_range")
        ema = _get(t, "ema")
        smp = _get(t, "sample")
        s = cls(
            max_steps=None if _get(t, "max_steps") == "auto" else _int(g, "max_steps", _get(t, "max_steps"), lo=1),
            batch_size=None if _get(t, "batch_size") == "auto" else _float(g, "batch_size", _get(t, "batch_size"),
                                                                            positive=True),
            micro_batch_size=_int(g, "micro_batch_size", _get(t, "micro_batch_size"), lo=1),
            lr=_float(g, "lr", _get(t, "lr"), positive=True),
            optimizer=_choice(g, "optimizer", _get(t, "optimizer"), ("adamw", "sgd")),
            lr_scheduler=str(_get(t, "lr_scheduler")),
            lr_warmup_steps=_int(g, "lr_warmup_steps", _get(t, "lr_warmup_steps"), lo=0),
            adam_beta1=_float(g, "adam_beta1", _get(t, "adam_beta1"), lo=0.0, hi=1.0),
            adam_beta2=_float(g, "adam_beta2", _get(t, "adam_beta2"), lo=0.0, hi=1.0),
            weight_decay=_float(g, "weight_decay", _get(t, "weight_decay"), lo=0.0, hi=1e3),
            adam_epsilon=_float(g, "adam_epsilon", _get(t, "adam_epsilon"), positive=True),
            snr_gamma=_float(g, "snr_gamma", _get(t, "snr_gamma"), positive=True, allow_none=True),
            timestep_range=_timestep_range(tr, num_train_timesteps),
            caption_dropout=_float(g, "caption_dropout", _get(t, "caption_dropout"), lo=0.0, hi=1.0),
            seed=_int(g, "seed", _get(t, "seed")),
            device=str(_get(t, "device")),
            mixed_precision=_choice(g, "mixed_precision", mp, PRECISIONS),
            per_sample=_choice(g, "per_sample", _get(t, "per_sample"), ENGINES),
            per_sample_memory_gb=_float(g, "per_sample_memory_gb", _get(t, "per_sample_memory_gb"),
                                        positive=True),
            gradient_checkpointing=_bool(g, "gradient_checkpointing", _get(t, "gradient_checkpointing")),
            ema_enabled=_bool(g, "ema.enabled", _get(ema, "enabled")),
            ema_decay=_float(g, "ema.decay", _get(ema, "decay"), lo=0.0, hi=1.0),
            log_every=_int(g, "log_every", _get(t, "log_every"), lo=1),
            checkpoint_every=_int(g, "checkpoint_every", _get(t, "checkpoint_every"), lo=0),
            checkpoints_total_limit=_int(g, "checkpoints_total_limit", _get(t, "checkpoints_total_limit"), lo=1,
                                         allow_none=True),
            resume_from=None if _get(t, "resume_from") in (None, "") else str(_get(t, "resume_from")),
            progress=_bool(g, "progress", _get(t, "progress")),
            sample=SampleSettings(per_prompt=_int(g, "sample.per_prompt", _get(smp, "per_prompt"), lo=1),
                                  steps=_int(g, "sample.steps", _get(smp, "steps"), lo=1),
                                  guidance_scale=_float(g, "sample.guidance_scale", _get(smp, "guidance_scale"),
                                                        lo=0.0, hi=100.0),
                                  seed=_int(g, "sample.seed", _get(smp, "seed"))),
        )
        if s.gradient_checkpointing and privacy_enabled:
            raise UserError("train.gradient_checkpointing=true is not supported with DP: per-sample gradient hooks "
                            "and recomputed activations do not mix (with Opacus' hooks most LoRA weights got no "
                            "per-sample gradient); lower train.micro_batch_size to save memory instead")
        from diffusers.optimization import SchedulerType

        names = [e.value for e in SchedulerType]
        if s.lr_scheduler not in names:
            raise _fail(g, "lr_scheduler", s.lr_scheduler, f"must be one of {', '.join(names)}")
        return s

    def resolved(self, *, num_units: int) -> tuple[TrainSettings, dict]:
        """These settings with ``auto`` batch size and steps resolved for N training units
        (``dpdiff.privacy.planning.auto_schedule``), and the schedule record privacy.json carries."""
        from dataclasses import replace

        from dpdiff.privacy.planning import auto_schedule

        auto = {k for k in ("batch_size", "max_steps") if getattr(self, k) is None}
        rule = auto_schedule(num_units=num_units) if auto else {}
        out = replace(self, **{k: rule[k] for k in auto})
        record = {"batch_size": out.batch_size, "max_steps": out.max_steps, "auto": sorted(auto),
                  "rule": f"{' and '.join('train.' + k for k in sorted(auto))} = auto: {rule['rule']}" if auto
                  else None}
        return out, record


def _timestep_range(tr, total: int | None) -> tuple[int, int] | None:
    if tr is None:
        return None
    seq = list(tr) if not isinstance(tr, (str, int, float)) else [tr]
    hi_ok = total is None or (len(seq) == 2 and isinstance(seq[1], int) and seq[1] <= total)
    ok = (len(seq) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in seq)
          and 0 <= seq[0] < seq[1] and hi_ok)
    if not ok:
        bound = total if total is not None else "num_train_timesteps"
        raise UserError(f"train.timestep_range={seq}: must be [lo, hi] with 0 <= lo < hi <= {bound} "
                        "(training timesteps drawn uniformly from lo..hi-1), or null for all")
    return int(seq[0]), int(seq[1])


@dataclass(frozen=True, kw_only=True)
class DataSettings:
    """``data.*``: which images, how they are read, grouped, held out and cached."""

    path: str | None
    demo: str  # which built-in demo data.path=null means
    caption_column: str
    resolution: int | None
    center_crop: bool
    random_flip: bool
    holdout_fraction: float
    split_seed: int
    sample_prompts: tuple[str, ...] | None
    skip_bad_files: bool
    dedup: str
    dedup_hash_distance: int
    caption_replace_prob: float
    caption_insert_prob: float
    cache: bool
    cache_dir: str | None
    feature_dtype: str
    text_features: str  # cache | on_the_fly (captions encoded per batch, no text rows on disk)

    @classmethod
    def from_config(cls, d) -> DataSettings:
        g = "data"
        res = _get(d, "resolution")
        if res is not None and (isinstance(res, bool) or not isinstance(res, int) or res < 8):
            raise UserError(f"data.resolution={res}: must be an integer >= 8 (or null for the model's own)")
        hf = _get(d, "holdout_fraction") or 0.0
        try:
            hf = float(hf)
        except (TypeError, ValueError):
            hf = -1.0
        if not 0 <= hf < 1:
            raise UserError(f"data.holdout_fraction={_get(d, 'holdout_fraction')}: must be in [0, 1)")
        rp = _float(g, "caption_replace_prob", _get(d, "caption_replace_prob") or 0.0, lo=0.0, hi=1.0)
        ip = _float(g, "caption_insert_prob", _get(d, "caption_insert_prob") or 0.0, lo=0.0, hi=1.0)
        if rp + ip > 1:
            raise UserError(f"data.caption_replace_prob={rp} and data.caption_insert_prob={ip}: each must be >= 0 "
                            "and their sum <= 1")
        text_features = _choice(g, "text_features", _get(d, "text_features"), ("cache", "on_the_fly"))
        if text_features == "on_the_fly" and (rp or ip):
            raise UserError("data.caption_replace_prob / caption_insert_prob need data.text_features=cache (the "
                            "caption variants are encoded ahead of training)")
        prompts = _get(d, "sample_prompts")
        path = _get(d, "path")
        from dpdiff.data.demos import get_demo
        from dpdiff.data.formats import check_root

        if path not in (None, ""):
            check_root(Path(str(path)).expanduser())
        demo = str(_get(d, "demo"))
        get_demo(demo)
        return cls(
            path=None if path in (None, "") else str(path),
            demo=demo,
            caption_column=str(_get(d, "caption_column")),
            resolution=res,
            center_crop=_bool(g, "center_crop", _get(d, "center_crop")),
            random_flip=_bool(g, "random_flip", _get(d, "random_flip")),
            holdout_fraction=hf,
            split_seed=_int(g, "split_seed", _get(d, "split_seed")),
            sample_prompts=tuple(str(p) for p in prompts) if prompts else None,
            skip_bad_files=_bool(g, "skip_bad_files", _get(d, "skip_bad_files")),
            dedup=_choice(g, "dedup", _get(d, "dedup"), DEDUP_MODES),
            dedup_hash_distance=_int(g, "dedup_hash_distance", _get(d, "dedup_hash_distance"), lo=0),
            caption_replace_prob=rp,
            caption_insert_prob=ip,
            cache=_bool(g, "cache", _get(d, "cache")),
            cache_dir=None if _get(d, "cache_dir") in (None, "") else str(_get(d, "cache_dir")),
            feature_dtype=_choice(g, "feature_dtype", _get(d, "feature_dtype"),
                                  ("float16", "bfloat16", "float32")),
            text_features=text_features,
        )


@dataclass(frozen=True, kw_only=True)
class EmbeddingSettings:
    """``adapter.*`` of ``adapter=embedding`` (``dpdiff.training.concept``): a new token learned privately."""

    token: str
    init_word: str
    template: str
    mechanism: str
    unit_steps: int  # aggregate: textual-inversion steps per unit
    unit_lr: float  # aggregate: Adam's learning rate per unit

    def prompt(self, caption: str) -> str:
        return self.template.format(token=self.token, caption=caption)

    @classmethod
    def from_config(cls, a) -> EmbeddingSettings:
        g = "adapter"
        token = str(_get(a, "token") or "")
        if not token.strip() or any(c.isspace() or c in "{}" for c in token):
            raise _fail(g, "token", token, "must be one word without spaces (e.g. <my-look>)")
        template = str(_get(a, "template") or "")
        if "{token}" not in template or "{caption}" not in template:
            raise _fail(g, "template", template, "must hold {token} and {caption}")
        try:
            template.format(token="t", caption="c")
        except (KeyError, IndexError, ValueError):
            raise _fail(g, "template", template, "must name only {token} and {caption}") from None
        return cls(token=token, init_word=str(_get(a, "init_word")), template=template,
                   mechanism=_choice(g, "mechanism", _get(a, "mechanism"), EMBEDDING_MECHANISMS),
                   unit_steps=_int(g, "unit_steps", _get(a, "unit_steps"), lo=1),
                   unit_lr=_float(g, "unit_lr", _get(a, "unit_lr"), positive=True))


@dataclass(frozen=True, kw_only=True)
class AdapterSettings:
    """``adapter.*``: what part of the model is trained."""

    kind: str
    rank: int | None
    alpha: float | None
    target_modules: tuple[str, ...] | None
    dropout: float
    embedding: EmbeddingSettings | None = None  # adapter=embedding

    @classmethod
    def from_config(cls, a) -> AdapterSettings:
        g = "adapter"
        kind = _get(a, "kind")
        if kind not in ADAPTER_KINDS:
            raise UserError(f"adapter={kind}: must be one of {', '.join(ADAPTER_KINDS)}")
        rank = _get(a, "rank")
        if kind == "lora":
            rank = _int(g, "rank", rank, lo=1)
        tm = _get(a, "target_modules")
        return cls(kind=kind, rank=rank, alpha=_float(g, "alpha", _get(a, "alpha"), positive=True, allow_none=True),
                   target_modules=tuple(str(m) for m in tm) if tm else None,
                   dropout=_float(g, "dropout", _get(a, "dropout") or 0.0, lo=0.0, hi=1.0),
                   embedding=EmbeddingSettings.from_config(a) if kind == "embedding" else None)


@dataclass(frozen=True, kw_only=True)
class ModelSettings:
    """``model.*``: the base pipeline (a local directory unless downloads are allowed)."""

    pretrained: str  # resolved: an absolute directory, or a hub id when allow_download
    allow_download: bool
    frozen_dtype: str
    num_train_timesteps: int | None  # from the scheduler config, when the pipeline is local
    family: str | None  # sd | sdxl | sd3 | flux, from model_index.json, when the pipeline is local
    max_sequence_length: int | None  # T5 tokens of SD3 / Flux prompts; None = the pipeline's default

    @classmethod
    def from_config(cls, m) -> ModelSettings:
        from omegaconf import DictConfig, OmegaConf

        from dpdiff.models.families import detect_family
        from dpdiff.models.loading import resolve_pretrained

        expected = _get(m, "family")
        if isinstance(m, DictConfig) and OmegaConf.is_missing(m, "pretrained"):
            raise UserError(f"model.pretrained is required with model={expected or 'this config'}: pass the local "
                            "pipeline dir (model.pretrained=DIR)")
        allow = _bool("model", "allow_download", _get(m, "allow_download"))
        path = resolve_pretrained(_get(m, "pretrained"), allow_download=allow)
        total = family = None
        fam = None
        sched = Path(path) / "scheduler" / "scheduler_config.json"
        if sched.exists():
            total = int(json.loads(sched.read_text()).get("num_train_timesteps", 1000))
        if Path(path).is_dir():
            fam = detect_family(path)
            family = fam.name
        if expected is not None and family is not None and family != expected:
            raise UserError(f"model.family={expected} (model={expected}) but {path} holds a "
                            f"{detect_family(path).pipeline} ({family}); use model={family}")
        msl = _int("model", "max_sequence_length", _get(m, "max_sequence_length"), lo=1, allow_none=True)
        if msl is not None and fam is not None and not fam.t5_text:
            raise UserError(f"model.max_sequence_length={msl}: {family} pipelines have no T5 encoder (CLIP prompts are "
                            "always padded to the tokenizer's model_max_length); set it to null")
        return cls(pretrained=path, allow_download=allow,
                   frozen_dtype=_choice("model", "frozen_dtype", _get(m, "frozen_dtype"), FROZEN_DTYPES),
                   num_train_timesteps=total, family=family, max_sequence_length=msl)


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    """Every validated group of a finetune run."""

    privacy: PrivacySettings
    train: TrainSettings
    data: DataSettings
    adapter: AdapterSettings
    model: ModelSettings

    @classmethod
    def defaults(cls, overrides=()) -> RunSettings:
        """The settings ``dpdiff finetune OVERRIDES`` runs with: the shipped config composed with ``overrides``
        (the same files, the same defaults), validated. For library users:
        ``RunSettings.defaults(["data.path=/my/images", "privacy.target_epsilon=4"])``."""
        from dpdiff.schema import compose

        return cls.from_config(compose(list(overrides)))

    @classmethod
    def from_config(cls, cfg) -> RunSettings:
        privacy = PrivacySettings.from_config(cfg.privacy)
        model = ModelSettings.from_config(cfg.model)
        train = TrainSettings.from_config(cfg.train, privacy_enabled=privacy.enabled,
                                          num_train_timesteps=model.num_train_timesteps)
        if model.family is not None and FAMILIES[model.family].objective == "flow" and train.snr_gamma is not None:
            raise UserError(f"train.snr_gamma={train.snr_gamma}: min-SNR weighting is for DDPM models; {model.family} "
                            "is trained by flow matching (set train.snr_gamma=null)")
        return cls(privacy=privacy, train=train, data=DataSettings.from_config(cfg.data),
                   adapter=AdapterSettings.from_config(cfg.adapter), model=model)
