"""The config schema: one typed dataclass per config group, registered in Hydra's ConfigStore.

The shipped YAML files (``configs/``) hold every default value and its documentation (the comment above the
key, which ``dpdiff explain`` prints); each group option extends its group's schema here (``defaults: [
train_schema, _self_]``), so Hydra refuses at compose time a key the schema does not know or a value of the wrong
type (``train.lr=abc``), in the CLI, in ``dpdiff plan`` and in Python alike. The schema holds types and structure
only, never a value (every field is ``MISSING`` until a YAML file sets it): a default is written once, in the
YAML. Hydra's "structured config schema for a YAML file" pattern
(https://hydra.cc/docs/tutorials/structured_config/schema/). Ranges, choices and the checks that depend on the
model family are ``dpdiff.settings``' (``RunSettings.from_config``), run before any private data is read.

Library users get the CLI's defaults from :func:`compose` (``dpdiff.settings.RunSettings.defaults``): the same
files, composed the same way.
"""

# ruff: noqa: UP006, UP007, UP035, UP045
# (typing.List and Optional, no PEP 604 unions and no postponed annotations: OmegaConf reads these at run time)

from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import MISSING

from dpdiff.errors import UserError


@dataclass
class EmaSchema:
    enabled: bool = MISSING
    decay: float = MISSING


@dataclass
class SampleSchema:
    per_prompt: int = MISSING
    steps: int = MISSING
    guidance_scale: float = MISSING
    seed: int = MISSING


@dataclass
class TrainSchema:
    max_steps: Any = MISSING  # an integer or "auto"
    batch_size: Any = MISSING  # a number or "auto"
    micro_batch_size: int = MISSING
    lr: float = MISSING
    optimizer: str = MISSING
    lr_scheduler: str = MISSING
    lr_warmup_steps: int = MISSING
    adam_beta1: float = MISSING
    adam_beta2: float = MISSING
    weight_decay: float = MISSING
    adam_epsilon: float = MISSING
    snr_gamma: Optional[float] = MISSING
    timestep_range: Optional[List[int]] = MISSING
    caption_dropout: float = MISSING
    seed: int = MISSING
    device: str = MISSING
    mixed_precision: str = MISSING
    per_sample: str = MISSING
    per_sample_memory_gb: float = MISSING
    gradient_checkpointing: bool = MISSING
    ema: EmaSchema = field(default_factory=EmaSchema)
    log_every: int = MISSING
    checkpoint_every: int = MISSING
    checkpoints_total_limit: Optional[int] = MISSING
    resume_from: Optional[str] = MISSING
    progress: bool = MISSING
    sample: SampleSchema = field(default_factory=SampleSchema)


@dataclass
class DataSchema:
    path: Optional[str] = MISSING
    demo: str = MISSING
    caption_column: str = MISSING
    resolution: Optional[int] = MISSING
    center_crop: bool = MISSING
    random_flip: bool = MISSING
    holdout_fraction: float = MISSING
    split_seed: int = MISSING
    sample_prompts: Optional[List[str]] = MISSING
    skip_bad_files: bool = MISSING
    dedup: str = MISSING
    dedup_hash_distance: int = MISSING
    caption_replace_prob: float = MISSING
    caption_insert_prob: float = MISSING
    cache: bool = MISSING
    cache_dir: Optional[str] = MISSING
    feature_dtype: str = MISSING
    text_features: str = MISSING


@dataclass
class PrivacySchema:
    enabled: bool = MISSING
    target_epsilon: Optional[float] = MISSING
    delta: Optional[float] = MISSING
    max_grad_norm: Optional[float] = MISSING
    accountant: str = MISSING
    augmult: int = MISSING
    unit: str = MISSING
    max_images_per_user: Optional[int] = MISSING
    noise_multiplier: Optional[float] = MISSING
    reproducible_noise: bool = MISSING
    secure_rng: bool = MISSING
    dataset_budget: Optional[float] = MISSING
    dataset_delta: Optional[float] = MISSING
    dataset_ledger: Optional[str] = MISSING


@dataclass
class AdapterSchema:
    kind: str = MISSING
    rank: Optional[int] = MISSING
    alpha: Optional[float] = MISSING
    target_modules: Optional[List[str]] = MISSING
    dropout: float = MISSING


@dataclass
class EmbeddingAdapterSchema(AdapterSchema):
    token: str = MISSING
    init_word: str = MISSING
    template: str = MISSING
    mechanism: str = MISSING
    unit_steps: int = MISSING
    unit_lr: float = MISSING


@dataclass
class ModelSchema:
    pretrained: Optional[str] = MISSING
    allow_download: bool = MISSING
    frozen_dtype: str = MISSING
    max_sequence_length: Optional[int] = MISSING
    family: Optional[str] = MISSING


@dataclass
class ExtractionSchema:
    enabled: bool = MISSING
    units: int = MISSING
    captions: Optional[int] = MISSING  # 0 or null: no cap
    per_caption: int = MISSING
    steps: int = MISSING
    guidance_scale: float = MISSING
    batch_size: int = MISSING
    l2_threshold: float = MISSING
    max_heldout_false_match_rate: float = MISSING
    clique_threshold: float = MISSING
    clique_min_size: int = MISSING
    tile_grid: int = MISSING
    vae_floor: bool = MISSING
    vae_floor_images: int = MISSING
    feature_extractor: Optional[str] = MISSING
    feature_threshold: float = MISSING
    max_flagged: int = MISSING
    match_resolution: Optional[int] = MISSING  # null: the run's resolution
    batch_images: int = MISSING
    calibration_heldout: int = MISSING
    delta_if_no_dp: float = MISSING


@dataclass
class LiraSchema:
    shadows: int = MISSING
    steps: Optional[int] = MISSING  # null: the run's own (as batch_size, lr)
    batch_size: Optional[int] = MISSING
    lr: Optional[float] = MISSING
    pool_units: int = MISSING
    shadow_fraction: float = MISSING
    per_example_variance_from: int = MISSING


@dataclass
class MiaSchema:
    enabled: bool = MISSING
    members: int = MISSING
    min_nonmembers: int = MISSING
    timesteps: List[int] = MISSING
    noise_draws: int = MISSING
    calibrated: bool = MISSING
    primary_attack: str = MISSING
    pia: bool = MISSING
    pia_timestep: int = MISSING
    pia_lp: float = MISSING
    bootstrap: int = MISSING
    delta_if_no_dp: float = MISSING
    lira: LiraSchema = field(default_factory=LiraSchema)


@dataclass
class AuditSchema:
    canaries: int = MISSING
    gradient_canaries: int = MISSING
    seed: int = MISSING
    k_plus: Optional[int] = MISSING
    k_minus: Optional[int] = MISSING
    timesteps: List[int] = MISSING
    noise_draws: int = MISSING
    delta_if_no_dp: float = MISSING


@dataclass
class ProbesSchema:
    enabled: bool = MISSING
    budget_images: Optional[int] = MISSING  # null: no cap
    seed: int = MISSING
    confidence: float = MISSING
    extraction: ExtractionSchema = field(default_factory=ExtractionSchema)
    mia: MiaSchema = field(default_factory=MiaSchema)
    audit: AuditSchema = field(default_factory=AuditSchema)


@dataclass
class EvalSchema:
    enabled: bool = MISSING
    metrics: List[str] = MISSING
    heldout_images: int = MISSING
    timesteps: List[int] = MISSING
    noise_draws: int = MISSING
    per_digit: int = MISSING
    steps: int = MISSING
    guidance_scale: float = MISSING
    fid_images: int = MISSING
    inception_weights: Optional[str] = MISSING


@dataclass
class TrackerSchema:
    kind: str = MISSING


@dataclass
class WandbTrackerSchema(TrackerSchema):
    mode: str = MISSING
    project: str = MISSING
    name: Optional[str] = MISSING
    tags: List[str] = MISSING
    log_private_data: bool = MISSING


@dataclass
class LauncherSchema:
    num_processes: int = MISSING
    extra_args: List[str] = MISSING


_ABSENT = object()


def required(cfg, key: str):
    """A key of a config group, which must be there: the defaults live in the YAML files alone, so a config built
    by hand without a key is refused rather than completed by a second set of defaults."""
    value = cfg.get(key, _ABSENT) if hasattr(cfg, "get") else getattr(cfg, key, _ABSENT)
    if value is _ABSENT:
        raise UserError(f"config key {key!r} is missing: build settings from the composed config "
                        "(dpdiff.settings.RunSettings.defaults(overrides) or dpdiff.schema.compose(overrides)), whose "
                        "YAML files hold every default")
    return value


#: (group, schema name, schema): the YAML options name the schema in their defaults list
SCHEMAS = (
    ("train", "train_schema", TrainSchema),
    ("data", "data_schema", DataSchema),
    ("privacy", "privacy_schema", PrivacySchema),
    ("adapter", "adapter_schema", AdapterSchema),
    ("adapter", "embedding_schema", EmbeddingAdapterSchema),
    ("model", "model_schema", ModelSchema),
    ("probes", "probes_schema", ProbesSchema),
    ("eval", "eval_schema", EvalSchema),
    ("tracker", "tracker_schema", TrackerSchema),
    ("tracker", "wandb_schema", WandbTrackerSchema),
    ("launcher", "launcher_schema", LauncherSchema),
)


def register() -> None:
    """Store the schemas in Hydra's ConfigStore (idempotent). :func:`compose` calls it; a Hydra app over
    ``configs/`` (``recipes.finetune``) calls it before ``hydra.main`` composes."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for group, name, node in SCHEMAS:
        cs.store(group=group, name=name, node=node)


def compose(overrides=(), *, name: str = "finetune", return_hydra_config: bool = False):
    """The config ``dpdiff finetune`` composes from these overrides (Hydra's compose API over the shipped configs):
    the defaults of the CLI, for ``dpdiff plan``, ``dpdiff tune``, ``dpdiff probe`` and library users. A bad
    override (unknown key, wrong type, unknown group option) is one ``UserError`` line."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from dpdiff.paths import config_dir

    register()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
            return hydra_compose(name, overrides=list(overrides), return_hydra_config=return_hydra_config)
    except (HydraException, OmegaConfBaseException) as err:
        raise UserError(f"bad override: {compose_error(err)}") from None


def compose_error(err: Exception) -> str:
    """Hydra's and OmegaConf's multi-line composition errors as one line: what failed and why."""
    text = str(err) + ("\n" + str(err.__cause__) if err.__cause__ is not None else "")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("full_key:", "object_type", "reference_type"))]
    return "; ".join(lines[:2])
