"""The ``dpdiff`` command in-process: --help everywhere (and never acting), dpdiff clean asking first, dpdiff explain
reading the configs' own documentation, dpdiff plan composing the finetune config."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from dpdiff import cli


def run(argv, capsys) -> tuple[int, str, str]:
    try:
        cli.main(list(argv))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DPDIFF_HOME", str(tmp_path / "home"))
    cache = tmp_path / "home" / "cache"
    cache.mkdir(parents=True)
    (cache / "features-x.safetensors").write_bytes(b"private")
    return tmp_path / "home"


@pytest.mark.parametrize("argv", [["--help"], ["help"], ["finetune", "--help"], ["plan", "--help"],
                                  ["probe", "--help"], ["report", "--help"], ["data", "check", "--help"],
                                  ["budget", "--help"], ["sweep-report", "--help"], ["clean", "--help"],
                                  ["explain", "--help"], ["clean", "-h", "--yes"]])
def test_every_command_has_help_and_help_never_acts(argv, capsys, home):
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert "usage: dpdiff" in out
    assert (home / "cache" / "features-x.safetensors").exists()  # --help deleted nothing


def test_finetune_help_lists_the_groups_and_the_keys(capsys):
    code, out, _ = run(["finetune", "--help"], capsys)
    assert code == 0
    assert "adapter         lora | attn | embedding | full" in out and "privacy.target_epsilon = 8.0" in out
    assert "probes.mia.lira.shadows = 4" in out


def test_clean_asks_first_and_deletes_nothing_unconfirmed(capsys, home, monkeypatch):
    from dpdiff.report.cli import clean_command

    code, _, err = run(["clean"], capsys)  # not a terminal, no --yes
    assert code == 2 and "--yes" in err and (home / "cache").exists()
    assert clean_command([], ask=lambda q: "n") == [] and (home / "cache").exists()
    assert clean_command([], ask=lambda q: "y") == [str(home / "cache")] and not (home / "cache").exists()
    code, out, _ = run(["clean", "--yes"], capsys)
    assert code == 0 and "nothing to remove" in out


def test_clean_removes_a_runs_checkpoints_and_refuses_other_folders(capsys, home, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoint-10").mkdir(parents=True)
    (run_dir / "privacy.json").write_text("{}")
    other = tmp_path / "photos"
    other.mkdir()
    code, _, err = run(["clean", "--yes", str(other)], capsys)
    assert code == 2 and "not a dpdiff run dir" in err and (home / "cache").exists()  # nothing deleted
    code, out, _ = run(["clean", "--yes", str(run_dir)], capsys)
    assert code == 0 and not (run_dir / "checkpoint-10").exists() and (run_dir / "privacy.json").exists()
    assert not (home / "cache").exists()


def test_explain_reads_the_documentation_and_covers_every_default_key(capsys):
    from dpdiff.commandline import all_keys
    from dpdiff.schema import compose

    code, out, _ = run(["explain", "privacy.max_grad_norm"], capsys)
    assert code == 0 and out.startswith("privacy.max_grad_norm = 0.01") and "configs/privacy/dp.yaml" in out
    code, _, err = run(["explain", "privacy.max_grad_nrom"], capsys)
    assert code == 2 and "did you mean privacy.max_grad_norm" in err
    code, out, _ = run(["explain", "probes.mia"], capsys)
    assert "probes.mia.primary_attack = auto" in out
    # the line reader sees exactly the keys Hydra composes (hydra's own settings aside), with the same values
    cfg = OmegaConf.to_container(compose([]), resolve=False)

    def flat(d, prefix=""):
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and v:
                yield from flat(v, key + ".")
            else:
                yield key, v

    composed = dict(flat(cfg))
    documented = {k.key: k.value for k in all_keys() if k.value != "" or k.key in composed}
    assert set(composed) == set(documented)
    for key, value in composed.items():
        assert OmegaConf.create({"v": OmegaConf.create(f"v: {documented[key]}").v}).v == value, key


def test_plan_takes_the_finetune_overrides_and_defaults(capsys):
    code, out, err = run(["plan", "--units", "5000", "--trainable", "20000"], capsys)
    assert code == 0, err
    # the finetune defaults: 75 steps of 512, the PRV accountant, C = 0.01
    assert "train.max_steps=75 x train.batch_size=512" in out and "(prv)" in out and "C=0.01" in out
    assert "recommended: train.batch_size=" in out
    code, out, _ = run(["plan", "--units", "5000", "--trainable", "20000", "privacy.target_epsilon=4",
                        "train.max_steps=100", "train.batch_size=128", "privacy.accountant=rdp"], capsys)
    assert code == 0 and "epsilon 4 at delta" in out and "100 x train.batch_size=128" in out and "(rdp)" in out
    code, _, err = run(["plan", "--units", "5000", "privacy.target_epsilonn=4"], capsys)
    assert code == 2 and "bad override" in err
    code, _, err = run(["plan", "--units", "5000", "privacy=none"], capsys)
    assert code == 2 and "no mechanism to plan" in err
    code, _, err = run(["plan", "--unitz", "5"], capsys)
    assert code == 2 and "unrecognized arguments" in err


def test_plan_for_small_sets_and_the_embedding_adapter(capsys):
    """100 units at epsilon 1: DP-LoRA's noise/signal warns and the embedding adapter's is printed beside it; the
    aggregate mechanism is one Gaussian release (sigma of a single Gaussian mechanism at epsilon 1, delta 1e-5)."""
    code, out, err = run(["plan", "--units", "100", "privacy.target_epsilon=1"], capsys)
    assert code == 0 and "warning: cannot learn" in out and "suggestion: for a look or a concept" in out, err
    code, out, err = run(["plan", "--units", "100", "experiment=private_look", "adapter.mechanism=aggregate",
                          "privacy.max_grad_norm=1", "privacy.target_epsilon=1"], capsys)
    assert code == 0 and "one release of every unit's clipped embedding offset" in out, err
    sigma = float(out.split("sigma ")[1].split(";")[0])
    assert 3.5 < sigma < 4.0  # the analytic Gaussian mechanism's 3.73 (Balle & Wang 2018), PRV-calibrated


def test_plan_search_scale_prints_a_search_config_the_finetune_settings_accept(capsys):
    """--search-scale 8: the search keys keep the full-size sigma/B and steps; they validate as finetune settings
    (a fixed noise multiplier instead of a target epsilon); and the search run's own epsilon is printed."""
    from dpdiff.privacy.settings import PrivacySettings
    from dpdiff.schema import compose

    code, out, err = run(["plan", "--units", "3612", "--trainable", "20000", "--search-scale", "8",
                          "privacy.target_epsilon=8", "privacy.accountant=rdp"], capsys)
    assert code == 0, err
    full = next(ln for ln in out.splitlines() if ln.strip().startswith("full size :"))
    search = next(ln for ln in out.splitlines() if ln.strip().startswith("search    :"))
    assert "train.batch_size=512 train.max_steps=75" in full
    keys = [w for w in search.split(":", 1)[1].split() if "=" in w]
    kv = dict(k.split("=", 1) for k in keys)
    sigma_full = float(full.split("sigma ")[1].split(",")[0])
    assert kv["train.batch_size"] == "64" and kv["train.max_steps"] == "75"
    assert float(kv["privacy.noise_multiplier"]) / 64 == pytest.approx(sigma_full / 512, rel=1e-3)
    assert "spends epsilon" in out and "charges it to the dataset ledger" in out
    priv = PrivacySettings.from_config(compose(keys).privacy)
    priv.validate()
    assert priv.target_epsilon is None and priv.noise_multiplier == float(kv["privacy.noise_multiplier"])
    code, _, err = run(["plan", "--units", "3612", "--search-scale", "1"], capsys)
    assert code == 2 and "--search-scale must be at least 2" in err


def test_commands_refuse_unknown_options_with_one_error_line(capsys, tmp_path):
    code, _, err = run(["report", "--colour", str(tmp_path)], capsys)
    assert code == 2 and "dpdiff: error:" in err
    code, _, err = run(["report", str(tmp_path / "missing")], capsys)
    assert code == 2 and "is not a directory" in err
    code, _, err = run(["probe", "--foo", str(tmp_path)], capsys)
    assert code == 2 and "unknown option '--foo'" in err
    code, _, err = run(["frobnicate"], capsys)
    assert code == 2 and "invalid choice" in err
