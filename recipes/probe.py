"""dpdiff probe: run the probes on an existing run dir, then rebuild its report.

    dpdiff probe runs/2026-11-23/12-00-00 [probes.extraction.per_caption=64 ...]

Reloads what the run used (its .hydra/config.yaml: base model, data, split, adapter), the
trained weights from the run dir, and runs ``probes=default`` (or the run's own probe settings
merged with the overrides given here). Writes probes.json and the report in the run dir.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from omegaconf import OmegaConf

from dpdiff.data.prepare import prepare
from dpdiff.errors import UserError
from dpdiff.models.loading import build_pipeline, load_base
from dpdiff.probes.run import build_probe_context, run_probes
from dpdiff.report.run_report import write_run_report
from dpdiff.report.summary import probe_clauses
from dpdiff.runtime import RunDirLock, resolve_device
from dpdiff.schema import ProbesSchema, compose
from dpdiff.settings import DataSettings, EmbeddingSettings

log = logging.getLogger("dpdiff")


class ProbeRecipe:
    def __init__(self, run_dir: Path, overrides: list[str]):
        self.run_dir = Path(run_dir)
        self.overrides = overrides

    def setup(self) -> None:
        cfg_path = self.run_dir / ".hydra" / "config.yaml"
        for need in (cfg_path, self.run_dir / "privacy.json", self.run_dir / "run.json"):
            if not need.exists():
                raise UserError(f"{self.run_dir} is not a finished dpdiff run dir (missing {need.name})")
        if any(not o.startswith("probes.") for o in self.overrides):
            raise UserError(f"dpdiff probe takes probes.KEY=VALUE overrides only, got {self.overrides}")
        # the run's config over today's defaults: a key added since the run was trained takes its default
        cfg = OmegaConf.merge(OmegaConf.to_container(compose([]), resolve=False), OmegaConf.load(cfg_path))
        try:  # the probes group checked against its schema: an unknown key or a wrong type is refused
            probes = OmegaConf.merge(OmegaConf.structured(ProbesSchema), cfg.probes, {"enabled": True},
                                     OmegaConf.from_dotlist(self.overrides).get("probes") or {})
        except Exception as err:  # omegaconf raises many types for a bad dotlist
            raise UserError(f"bad override ({str(err).splitlines()[0]}); use probes.KEY=VALUE") from None
        self.cfg, self.probes_cfg = cfg, probes
        run = json.loads((self.run_dir / "run.json").read_text())
        privacy = json.loads((self.run_dir / "privacy.json").read_text())
        device = resolve_device(cfg.train.get("device", "auto"))
        base = load_base(run["base_model"], device=device)
        denoiser = self._trained_denoiser(base, cfg.adapter.kind, device)
        emb = None
        if cfg.adapter.kind == "embedding":  # the learned token in the base's text encoder; prompts carry it
            emb = EmbeddingSettings.from_config(cfg.adapter)
            path = self.run_dir / "embedding" / "learned_embeds.safetensors"
            if not path.exists():
                raise UserError(f"{path} is missing: the run saved no learned embedding")
            base.pipe.load_textual_inversion(str(path))
        data = prepare(DataSettings.from_config(cfg.data), unit=cfg.privacy.unit)
        self._check_same_data(data.fingerprint)
        self.ctx = build_probe_context(
            run_dir=self.run_dir, base=base, denoiser=denoiser, data=data, cfg=cfg, probes=probes, privacy=privacy,
            resolution=int(run.get("resolution") or base.resolution), device=device,
            schedule=privacy.get("schedule"), embedding=emb)

    def _check_same_data(self, fp: str) -> None:
        """The probes' members are the units the run trained on only if the data folder still holds exactly that
        data: refuse a folder whose fingerprint (after skipped files and deduplication) is not the run's."""
        owner_path = self.run_dir / "data_owner.json"
        owner = json.loads(owner_path.read_text()) if owner_path.exists() else {}
        trained = owner.get("dataset_fingerprint")
        if trained is None:
            log.warning("%s records no dataset fingerprint: cannot check that the data folder is the one trained on",
                        self.run_dir)
        elif trained != fp:
            raise UserError(f"the data folder {self.cfg.data.get('path') or '(built-in demo)'} is not the data this "
                            "run trained on (its fingerprint differs from data_owner.json's: files were added, "
                            "removed or edited since); the probes' members would not be the trained units. "
                            "Restore that data, or probe a run trained on this folder")

    def _trained_denoiser(self, base, kind: str, device):
        """The run's fine-tuned denoiser: its LoRA loaded by the family's pipeline, or its saved folder."""
        den = base.family.denoiser
        if kind == "embedding":  # the denoiser was never trained
            return base.denoiser.eval()
        if kind == "lora":

            pipe = build_pipeline(base)
            lora = self.run_dir / "lora"
            if not (lora / "pytorch_lora_weights.safetensors").exists():
                raise UserError(f"{lora} holds no pytorch_lora_weights.safetensors")
            pipe.load_lora_weights(str(lora))
            return getattr(pipe, den).eval()
        path = self.run_dir / den
        if not path.exists():
            raise UserError(f"{path} is missing: the run saved no fine-tuned {den}")
        return type(base.denoiser).from_pretrained(path, use_safetensors=True).to(device).eval()

    def run(self) -> dict:
        return run_probes(self.ctx, self.probes_cfg)

    def report(self) -> None:
        write_run_report(self.run_dir)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    flags = [a for a in args if a.startswith("-")]
    if flags:
        raise UserError(f"unknown option {flags[0]!r}: dpdiff probe RUN_DIR [probes.KEY=VALUE ...] "
                        "(dpdiff probe --help)")
    run_dirs = [a.split("=", 1)[1] for a in args if a.startswith("run_dir=")] + [a for a in args if "=" not in a]
    rest = [a for a in args if "=" in a and not a.startswith("run_dir=")]
    if len(run_dirs) != 1:
        raise UserError("dpdiff probe needs one run dir: dpdiff probe RUN_DIR [probes.KEY=VALUE ...]")
    bad = [a for a in rest if not a.startswith("probes.") or "=" not in a]
    if bad:
        raise UserError(f"unexpected argument {bad[0]!r}: dpdiff probe takes RUN_DIR and probes.KEY=VALUE")
    recipe = ProbeRecipe(Path(run_dirs[0]).expanduser(), rest)

    lock = RunDirLock(recipe.run_dir)
    if not recipe.run_dir.is_dir():
        raise UserError(f"{recipe.run_dir} is not a directory")
    if not lock.acquire():  # a training or another probe process holds it: attempts would interleave
        raise UserError(f"another dpdiff process is training into or probing {recipe.run_dir}; wait for it")
    try:
        recipe.setup()
        out = recipe.run()
        recipe.report()
    finally:
        lock.release()

    print("probes:\n  " + "\n  ".join(probe_clauses(out)))
    print(f"wrote {recipe.run_dir / 'probes.json'} and {recipe.run_dir / 'report.html'}")


if __name__ == "__main__":
    from dpdiff.cli import user_errors_exit

    with user_errors_exit():
        main()
