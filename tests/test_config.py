"""Every config composes, and every override of the user contract (README: the CLI and the run dir) exists."""

from __future__ import annotations

import pytest

from dpdiff.paths import config_dir
from dpdiff.schema import compose

GROUPS = ["model", "data", "adapter", "privacy", "train", "probes", "eval", "tracker", "launcher", "debug"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def _compose(overrides: list[str]):
    return compose(overrides)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_option_composes(group, option):
    cfg = _compose([f"{group}={option}"])
    if group == "debug":  # a global package: it sets keys of other groups
        assert cfg.train.max_steps == 2 and not cfg.probes.enabled and not cfg.eval.enabled
    else:
        assert cfg[group] is not None


@pytest.mark.parametrize("override", [
    "model.pretrained=/some/dir", "data.path=/my/images", "adapter=lora", "adapter=full", "adapter.rank=4",
    "privacy=none", "privacy.target_epsilon=3", "privacy.delta=1e-6", "privacy.max_grad_norm=0.5",
    "privacy.accountant=prv", "privacy.accountant=rdp", "privacy.accountant=pld", "privacy.augmult=2",
    "train.max_steps=5", "train.lr=1e-4", "train.batch_size=8", "train.seed=3", "probes=none",
    "probes=default", "tracker=local", "tracker=wandb", "privacy.unit=user", "train.micro_batch_size=4",
    "train.resume_from=latest", "privacy.reproducible_noise=true", "train.optimizer=sgd", "data.demo=handwritten59",
])
def test_contract_overrides_exist(override):
    key, value = override.split("=", 1)
    cfg = _compose([override])
    node = cfg
    parts = key.split(".")
    for p in parts[:-1]:
        node = node[p]
    got = node[parts[-1]]
    if "." in key:  # a value override: the key existed and now holds the value
        assert str(got).lower() == value or float(got) == float(value)
    else:  # a group choice
        assert got is not None


def test_defaults_are_the_private_demo():
    cfg = _compose([])
    assert cfg.privacy.enabled is True
    assert cfg.model.pretrained is None and cfg.data.path is None
    assert cfg.adapter.kind == "lora"
    assert cfg.privacy.accountant == "prv"


def test_privacy_none_is_labelled_non_private():
    assert _compose(["privacy=none"]).privacy.enabled is False


@pytest.mark.parametrize("launcher", ["dpdiff_slurm", "dpdiff_local"])
def test_cluster_launchers_compose(launcher):
    cfg = compose([f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert "submitit" in cfg.hydra.launcher._target_
    assert cfg.hydra.launcher.timeout_min == 720


@pytest.mark.parametrize("name", sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml")))
def test_experiments_compose_and_validate(name, tmp_path):
    """Every experiment composes and passes the settings validation once its required paths are given."""
    from dpdiff.settings import RunSettings

    cfg = _compose([f"experiment={name}", "model.pretrained=null", f"data.path={tmp_path}"])
    RunSettings.from_config(cfg)


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_family_model_configs_validate_on_their_family_and_refuse_another(family, tmp_path):
    """model=sdxl|sd3|flux composes and validates on a pipeline dir of that family; another family's dir, or no
    dir at all, is one clear error."""
    from dpdiff.errors import UserError
    from dpdiff.models import tiny
    from dpdiff.settings import RunSettings

    other = "sd3" if family != "sd3" else "sdxl"
    for f in (family, other):
        tiny.write_family_pipeline(f, tmp_path / f)
    s = RunSettings.from_config(_compose([f"model={family}", f"model.pretrained={tmp_path / family}"]))
    assert s.model.family == family and s.model.frozen_dtype == "bfloat16"
    with pytest.raises(UserError, match=f"holds a .* \\({other}\\); use model={other}"):
        RunSettings.from_config(_compose([f"model={family}", f"model.pretrained={tmp_path / other}"]))
    with pytest.raises(UserError, match="model.pretrained is required"):
        RunSettings.from_config(_compose([f"model={family}"]))


@pytest.mark.parametrize("name", sorted(p.stem for p in (config_dir() / "hparams_search").glob("*.yaml")))
def test_hparams_searches_are_multiruns(name):
    cfg = compose([f"hparams_search={name}"], return_hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    params = cfg.hydra.sweeper.params
    assert params and all("," in str(v) for v in params.values())


def test_launcher_group_is_read(monkeypatch):
    """launcher.num_processes is what starts several processes (it is read from the composed config)."""
    from dpdiff.training import launch

    cmd = launch.accelerate_command(num_processes=3, extra_args=[], module="recipes.finetune",
                                    overrides=["train.max_steps=2"], run_dir="/tmp/r")
    assert cmd[cmd.index("--num_processes") + 1] == "3" and cmd[-1] == "hydra.run.dir=/tmp/r"
    assert _compose(["launcher=accelerate"]).launcher.num_processes == 2
    assert _compose([]).launcher.num_processes == 1


@pytest.mark.parametrize("override,message", [
    ("probes.mia.primary_attack=calbrated", "primary_attack must be auto or one of"),
    ("probes.mia.lira.shadows=1", "at least|>= 2"),
    ("probes.confidence=1.5", "probes.confidence must be in"),
    ("eval.metrics=[heldout_los]", "unknown metric 'heldout_los'"),
    ("privacy=none probes.audit.gradient_canaries=100", "audit a DP run's noisy sums"),
    ("train.resume_from=latest probes.audit.gradient_canaries=100", "resumed run cannot be audited"),
])
def test_probe_and_eval_typos_are_refused_before_any_data_is_read(tmp_path, override, message):
    """The data folder does not exist: an error about it would mean the settings were read after the data."""
    from dpdiff.errors import UserError
    from recipes.finetune import FinetuneRecipe

    cfg = _compose([*override.split(), f"data.path={tmp_path / 'no_such_folder'}"])
    recipe = FinetuneRecipe(cfg, tmp_path / "run")
    try:
        with pytest.raises(UserError, match=message):
            recipe.setup()
    finally:
        recipe.cleanup()


def test_text_on_the_fly_refuses_caption_mitigation(tmp_path):
    from dpdiff.errors import UserError
    from dpdiff.settings import DataSettings

    cfg = _compose(["data.text_features=on_the_fly", "data.caption_insert_prob=0.1"])
    with pytest.raises(UserError, match="text_features=cache"):
        DataSettings.from_config(cfg.data)
    assert DataSettings.from_config(_compose(["data.text_features=on_the_fly"]).data).text_features == "on_the_fly"


@pytest.mark.parametrize("group", ["train", "data", "privacy", "adapter", "model"])
def test_settings_hold_no_second_set_of_defaults(group):
    """Every key a settings class reads comes from the composed config: with any one key removed, building the
    settings is refused (a fallback default in Python would drift from the YAML's, as four once did)."""
    from omegaconf import OmegaConf

    from dpdiff.errors import UserError
    from dpdiff.privacy.settings import PrivacySettings
    from dpdiff.settings import AdapterSettings, DataSettings, ModelSettings, TrainSettings

    build = {"train": lambda c: TrainSettings.from_config(c, privacy_enabled=True),
             "data": DataSettings.from_config, "privacy": PrivacySettings.from_config,
             "adapter": AdapterSettings.from_config, "model": ModelSettings.from_config}[group]
    options = {"adapter": ["adapter=embedding"]}.get(group, [])  # the embedding adapter's own keys too
    full = OmegaConf.to_container(_compose(options)[group], resolve=True)
    build(OmegaConf.create(full))  # the whole group builds
    leaves = [(k,) for k in full] + [(k, j) for k, v in full.items() if isinstance(v, dict) for j in v]
    checked = 0
    for path in leaves:
        if len(path) == 1 and isinstance(full[path[0]], dict):
            continue
        cut = OmegaConf.create(full)
        node = cut
        for p in path[:-1]:
            node = node[p]
        del node[path[-1]]
        with pytest.raises(UserError, match=f"config key '{path[-1]}' is missing"):
            build(cut)
        checked += 1
    assert checked >= len(full) - 2


def test_library_settings_are_the_clis():
    """RunSettings.defaults() builds what `dpdiff finetune` composes; the four defaults that once drifted between
    Python and YAML are the YAML's."""
    from dpdiff.settings import RunSettings

    s = RunSettings.defaults()
    assert s == RunSettings.from_config(_compose([]))
    assert s.privacy.max_grad_norm == 0.01 and s.train.lr_scheduler == "constant_with_warmup"
    assert s.train.checkpoint_every == 100 and _compose([]).probes.mia.noise_draws == 2
    assert RunSettings.defaults(["train.lr=0.001"]).train.lr == 0.001


@pytest.mark.parametrize("override", ["train.lr=abc", "train.ema.enabled=maybe", "data.cache=often",
                                      "privacy.augmult=1.5", "adapter.rank=four", "model.allow_download=sometimes",
                                      "probes.mia.members=many", "probes.mia.lira.shadows=x", "eval.per_digit=all",
                                      "tracker.kind=[a]", "launcher.num_processes=two", "train.lrr=1"])
def test_the_schema_refuses_wrong_types_and_unknown_keys_at_compose(override):
    from dpdiff.errors import UserError

    with pytest.raises(UserError, match="bad override"):
        _compose([override])


def test_every_key_documented_as_nullable_accepts_null():
    """A key whose comment says what null means (``null = no cap``) is Optional in its schema: setting it to null
    composes (a schema typed stricter than its documentation refused probes.budget_images=null)."""
    import re

    from dpdiff.commandline import all_keys

    keys = [k for k in all_keys() if k.value not in ("", "null") and re.search(r"(?<![=.\w])null\b\s*[=:)]", k.doc)
            and "." in k.key and not k.key.startswith(("hydra", "defaults"))]
    assert len(keys) >= 2, [k.key for k in keys]
    for k in keys:
        _compose([f"{k.key}=null"])  # raises UserError ("bad override") if the schema refuses null
