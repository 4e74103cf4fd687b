"""`dpdiff finetune model.pretrained=DIR` on an SDXL, an SD3 and a Flux pipeline dir, as a user runs it.

The dirs are tiny random pipelines saved with diffusers' ``save_pretrained`` (``tiny.write_family_pipeline``:
their real component classes, CLIP and T5 encoders, a T5 tokenizer built offline). Each run trains 2 DP steps,
probes the model, evaluates it and writes the report; the saved LoRA must load into the family's stock
pipeline and change what it generates.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_cli, write_image_folder

from dpdiff.models import tiny
from dpdiff.models.families import FAMILIES

FAMILY_NAMES = ("sdxl", "sd3", "flux")
FAST = ["train.max_steps=2", "train.batch_size=8", "train.micro_batch_size=8", "train.sample.per_prompt=1",
        "train.sample.steps=2", "train.log_every=1", "train.lr_warmup_steps=0", "train.progress=false",
        "data.resolution=32", "data.holdout_fraction=0.5", "privacy.target_epsilon=4"]
LIGHT_PROBES = ["probes.budget_images=null", "probes.extraction.captions=2", "probes.extraction.per_caption=2",
                "probes.extraction.steps=2", "probes.extraction.units=2",
                "probes.extraction.vae_floor_images=4", "probes.mia.members=8", "probes.mia.timesteps=[200]",
                "probes.mia.noise_draws=1", "probes.mia.bootstrap=20", "eval.metrics=[heldout_loss]"]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: tiny.write_family_pipeline(f, root / f) for f in FAMILY_NAMES}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("data") / "imgs", n=24, size=40)


def _generate(pipe, family: str):
    kw = dict(num_inference_steps=2, height=32, width=32, output_type="latent",
              generator=torch.Generator().manual_seed(0))
    if family != "sdxl":
        kw["max_sequence_length"] = tiny.T5_MAX_TOKENS
    with torch.no_grad():
        return pipe(["a photo number 1"], **kw).images


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_dp_lora_run_probes_and_loads_into_the_family_pipeline(tmp_path, family_dirs, images, family):
    import diffusers

    run_dir = tmp_path / "run"
    res = run_cli("finetune", *FAST, *LIGHT_PROBES, f"model.pretrained={family_dirs[family]}", f"data.path={images}",
                  f"model.max_sequence_length={'null' if family == 'sdxl' else tiny.T5_MAX_TOKENS}",
                  f"hydra.run.dir={run_dir}")
    assert res.returncode == 0, res.stderr[-3000:]
    priv = json.loads((run_dir / "privacy.json").read_text())
    assert priv["dp"] is True and priv["steps"] == 2 and 0 < priv["epsilon"] <= 4
    probes = json.loads((run_dir / "probes.json").read_text())
    for section in ("extraction", "mia"):
        assert probes[section]["verdict"] in ("PASS", "FAIL", "INCONCLUSIVE")
    # PIA through the family's objective; LiRA's shadows as second LoRA adapters on the family's denoiser
    assert set(probes["mia"]["attacks"]) == {"loss", "calibrated", "pia", "lira"}
    assert probes["mia"]["lira"]["shadows"] >= 2 and probes["mia"]["lira"]["shadow_adapter"] == "lora"
    utility = json.loads((run_dir / "utility.json").read_text())
    assert utility["heldout_loss"]["heldout_loss"] > 0
    assert (run_dir / "samples.png").exists() and (run_dir / "samples_base.png").exists()
    assert "differentially private" in (run_dir / "report.md").read_text()
    assert json.loads((run_dir / "run.json").read_text())["model_family"] == family

    fam = FAMILIES[family]
    pipe = getattr(diffusers, fam.pipeline).from_pretrained(family_dirs[family], local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    before = _generate(pipe, family)
    pipe.load_lora_weights(run_dir / "lora")
    loaded = [n for n, _ in getattr(pipe, fam.denoiser).named_parameters() if "lora_" in n]
    targets = {t.split(".")[0] for t in fam.lora_targets}
    assert loaded and {t for t in targets if any(f".{t}." in n for n in loaded)} == targets  # the family's defaults
    assert not torch.allclose(before, _generate(pipe, family), atol=1e-5)


@pytest.mark.slow  # 30 s: `make test-slow`
def test_full_fine_tuning_saves_a_transformer_the_pipeline_loads(tmp_path, family_dirs, images):
    import diffusers

    run_dir = tmp_path / "run"
    res = run_cli("finetune", *FAST, "adapter=full", "probes=none", "eval=none", f"data.path={images}",
                  f"model.pretrained={family_dirs['sd3']}", f"model.max_sequence_length={tiny.T5_MAX_TOKENS}",
                  f"hydra.run.dir={run_dir}")
    assert res.returncode == 0, res.stderr[-3000:]
    trained = diffusers.SD3Transformer2DModel.from_pretrained(run_dir / "transformer")
    base = diffusers.SD3Transformer2DModel.from_pretrained(family_dirs["sd3"] / "transformer")
    moved = [n for (n, a), (_, b) in zip(trained.named_parameters(), base.named_parameters()) if not torch.equal(a, b)]
    assert len(moved) == len(list(base.parameters()))  # DP noise reaches every weight
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(family_dirs["sd3"], transformer=trained,
                                                              local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert torch.isfinite(_generate(pipe, "sd3")).all()


@pytest.mark.parametrize("override,needle", [
    ("train.snr_gamma=5", "flow matching"),
    ("model.max_sequence_length=0", "model.max_sequence_length"),
    ("data.resolution=36", "multiple of 8"),
])
def test_bad_family_settings_are_one_clear_line(tmp_path, family_dirs, images, override, needle):
    res = run_cli("finetune", *FAST, "probes=none", "eval=none", f"data.path={images}",
                  f"model.pretrained={family_dirs['flux']}", override, f"hydra.run.dir={tmp_path / 'run'}")
    assert res.returncode != 0
    assert needle in res.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run" / "privacy.json").exists()


def test_sdxl_refuses_a_t5_length(tmp_path, family_dirs):
    res = run_cli("finetune", *FAST, f"model.pretrained={family_dirs['sdxl']}", "model.max_sequence_length=16",
                  f"hydra.run.dir={tmp_path / 'run'}")
    assert res.returncode != 0 and "no T5 encoder" in res.stderr.strip().splitlines()[-1]
