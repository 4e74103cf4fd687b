"""dpdiff finetune: DP fine-tuning of a diffusion model's denoiser, then probes and a report.

    dpdiff finetune [hydra overrides]                       # built-in tiny model + digits demo
    dpdiff finetune model.pretrained=DIR data.path=DIR privacy.target_epsilon=4
    dpdiff finetune model=sdxl|sd3|flux model.pretrained=DIR data.path=DIR   # the family's defaults
    accelerate launch --multi_gpu --num_processes 2 -m recipes.finetune [overrides]

Reads top to bottom like the run it performs (torchtune's recipe shape): setup (every setting
validated before any private data is read; the data read and checked; the privacy plan built,
which refuses a run past the target epsilon or the dataset's budget before any pixel is encoded;
the base loaded, the adapter attached, the frozen features encoded), train, save, probe, evaluate,
report. Privacy policy lives in ``dpdiff.privacy.plan``; this file only wires the parts together.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import hydra
import numpy as np
import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from dpdiff import __version__
from dpdiff.cli import hydra_entry, user_errors_exit
from dpdiff.data.prepare import prepare
from dpdiff.errors import UserError
from dpdiff.io import write_json_atomic
from dpdiff.models import adapters
from dpdiff.models.loading import load_base, sampling_pipeline
from dpdiff.models.pipeline import sample_grid
from dpdiff.paths import config_dir
from dpdiff.privacy.gradient_canaries import GradientCanaries, check_gradient_canaries
from dpdiff.privacy.plan import AuditCanaries, DatasetIdentity, PrivacyPlan, ResumePoint
from dpdiff.privacy.planning import run_plan
from dpdiff.probes.canaries import CanarySettings
from dpdiff.probes.run import build_probe_context, check_probe_settings, run_probes
from dpdiff.report.privacy_json import (
    owner_record,
    privacy_record,
    run_record,
    write_model_card,
    write_owner_json,
    write_privacy_json,
    write_run_json,
)
from dpdiff.report.run_report import write_run_report
from dpdiff.report.summary import flat_summary, terminal_summary
from dpdiff.report.utility import check_metric_names, run_utility
from dpdiff.runtime import (
    PhaseClock,
    RunDir,
    gather_objects,
    hold_run_dir,
    process_context,
    refuse_if_running,
    resolve_device,
)
from dpdiff.schema import register as register_schemas
from dpdiff.schema import required
from dpdiff.settings import RunSettings
from dpdiff.training.checkpoint import load_checkpoint, resolve_checkpoint
from dpdiff.training.concept import ConceptToken, ConceptTrainer
from dpdiff.training.encode import FeatureCache, encode_captions, encode_dataset
from dpdiff.training.launch import relaunch_if_requested
from dpdiff.training.loss import make_objective
from dpdiff.training.precision import autocast_dtype, frozen_dtype
from dpdiff.training.rows import PUBLIC_CAPTIONS, CaptionMitigation, RowBuilder, insert_random_word
from dpdiff.training.tracking import build_tracker, check_tracker, truncate_metrics
from dpdiff.training.trainer import Trainer

log = logging.getLogger("dpdiff")


class FinetuneRecipe:
    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.t_start = time.time()
        self.plan = None
        self.trainer = None

        self.clock = PhaseClock()  # per-phase wall time and memory of this process (run.json "phases")

    # ---------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        self.version = __version__
        # 1. every setting, before any private data is read
        if self.cfg.probes.get("enabled", False):
            check_probe_settings(self.cfg.probes)
        if self.cfg.eval.get("enabled", False):
            check_metric_names(self.cfg.eval)
        audit = self.cfg.probes.audit
        self.gradient_canary_count = int(required(audit, "gradient_canaries"))
        check_gradient_canaries(self.gradient_canary_count, dp=bool(self.cfg.privacy.enabled),
                                resuming=self.cfg.train.resume_from not in (None, ""))
        self.settings = s = RunSettings.from_config(self.cfg)
        self.canaries = CanarySettings.from_config(self.cfg.probes)
        check_tracker(self.cfg.tracker)
        autocast_dtype(s.train.mixed_precision, resolve_device(s.train.device))  # fp16 without a GPU: refused now
        self.embedding = s.adapter.embedding  # adapter=embedding (dpdiff.training.concept), else None
        self.aggregate = self.embedding is not None and self.embedding.mechanism == "aggregate"
        if self.embedding is not None:
            if s.train.resume_from:
                raise UserError("adapter=embedding runs are not resumable (they take minutes); start a new run")
            if s.train.ema_enabled:
                raise UserError("adapter=embedding: train.ema.enabled is not supported; set it to false")
            if s.data.caption_replace_prob or s.data.caption_insert_prob or s.train.caption_dropout:
                raise UserError("adapter=embedding conditions on its own prompts (caption + token): set "
                                "data.caption_replace_prob, data.caption_insert_prob and train.caption_dropout to 0")
            if self.canaries.count or self.gradient_canary_count:
                raise UserError("adapter=embedding: the canary audit is not supported; set probes.audit.canaries=0 "
                                "and probes.audit.gradient_canaries=0")
        self.proc = process_context(s.train.device)
        if self.proc.is_main:
            self.run_lock = hold_run_dir(self.run_dir, resuming=s.train.resume_from is not None)
        # 2. the private data: read, check, group into units, split off the holdout
        with self.clock.phase("read, check, deduplicate, split"):
            self.data = prepare(s.data, unit=s.privacy.unit)
        user_units = self.data.num_train_units
        # train.batch_size / max_steps = auto: the plan's rule for this N (public), before the privacy plan
        train, self.schedule = s.train.resolved(num_units=user_units)
        self.settings = s = replace(s, train=train)
        if self.schedule["auto"]:
            log.info("%s -> train.batch_size=%g, train.max_steps=%d", self.schedule["rule"], train.batch_size,
                     train.max_steps)
        if self.canaries.count:
            self.data = self.canaries.insert(self.data, run_dir=self.run_dir, seed=s.train.seed)
        # 3. the privacy plan: resume reconciliation, calibration, refusal past the target, dataset budget
        self.resume = self._load_resume()
        batch_size, max_steps = s.train.batch_size, s.train.max_steps
        if self.aggregate:  # one Gaussian mechanism: every unit once (q = 1), one step
            batch_size, max_steps = self.data.num_train_units, 1
            self.schedule = {"batch_size": batch_size, "max_steps": 1, "auto": [],
                             "rule": "adapter.mechanism=aggregate: every unit once, in one release"}
        with self.clock.phase("privacy plan"):
            self.plan = PrivacyPlan.build(
                settings=s.privacy, num_units=self.data.num_train_units, batch_size=batch_size,
                max_steps=max_steps, seed=s.train.seed, run_dir=self.run_dir, resume=self.resume,
                rank=self.proc.rank, world_size=self.proc.world_size,
                canaries=AuditCanaries(user_units=user_units, count=self.canaries.count,
                                       inclusion_prob=self.canaries.inclusion_prob),
                dataset=DatasetIdentity(root=self.data.root, fingerprint=self.data.fingerprint,
                                        source_fingerprint=self.data.source_fingerprint,
                                        record_ids=self.data.train_record_ids))  # hashed once, by the main process
            self.plan.check_ranks_agree()  # collective: every rank read the same data and resolved one mechanism
            self.plan.dataset_charge.charge(status="planned")
        # 4. models: base pipeline, trainable part, frozen features (private pixels are read from here on)
        self._setup_model()
        with self.clock.phase("training setup"):
            self._setup_training()
        log.info("setup done: %s", self._describe())

    def _load_resume(self):
        spec = self.settings.train.resume_from
        if not spec:
            return None
        path = resolve_checkpoint(spec, self.run_dir)
        if path.parent.resolve() != self.run_dir.resolve():
            refuse_if_running(path.parent)
        ckpt = load_checkpoint(path)
        self.checkpoint = ckpt
        return ResumePoint.from_checkpoint(path=path, state=ckpt["state"])

    def _setup_model(self) -> None:
        s = self.settings
        self.base = load_base(s.model.pretrained, device=self.proc.device, allow_download=s.model.allow_download,
                              dtype=frozen_dtype(s.model.frozen_dtype, self.proc.device))
        self.resolution = int(s.data.resolution or self.base.resolution)
        self.base.check_resolution(self.resolution)
        self.denoiser = self.base.denoiser
        # the denoiser is on its device already: attach after moving (moving a peft-wrapped model afterwards can
        # leave the optimizer holding stale LoRA tensors). The adapter's random init comes from the run's seed.
        torch.manual_seed(s.train.seed)
        if s.train.gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
        a = s.adapter
        if self.embedding is not None:  # a new token's embedding; the denoiser and text encoder stay frozen

            self.concept = ConceptToken(self.base.pipe, self.base.family, self.embedding)
            self.denoiser.requires_grad_(False)
            self.base.pipe.text_encoder.requires_grad_(False)
            self.params = [torch.nn.Parameter(self.concept.init.clone().to(self.proc.device))]
        else:
            self.params = adapters.attach(self.denoiser, kind=a.kind, rank=a.rank or 0, alpha=a.alpha,
                                          target_modules=list(a.target_modules or self.base.family.lora_targets),
                                          dropout=a.dropout)
        if self.resume:
            named = dict(self.denoiser.named_parameters())
            trainable = self.checkpoint["trainable"]
            missing = [k for k in trainable if k not in named]
            if missing:
                raise UserError(f"checkpoint {self.resume.path} does not match this adapter config "
                                f"(unknown weight {missing[0]}); resume with the same adapter settings")
            with torch.no_grad():
                for k, v in trainable.items():
                    named[k].copy_(v.to(named[k].device))
        train_ids = self.data.train_records()
        train_recs = [self.data.records[i] for i in train_ids]
        # record index -> row of the encoded (training-only) arrays; -1 for records not trained on
        self.train_index = np.full(len(self.data.records), -1, dtype=np.int64)
        self.train_index[train_ids] = np.arange(len(train_ids))
        with self.clock.phase("encode frozen features"):
            self.encoded = self._encode(train_recs)
            self.empty_text = self._encode_captions([""])

    def _encode_captions(self, captions: list[str]) -> dict:
        return encode_captions(self.base, captions, device=self.proc.device,
                               max_sequence_length=self.settings.model.max_sequence_length)

    def _encode(self, records):
        """Frozen-encoder features of the training images, from the user-only disk cache when possible."""

        d = self.settings.data
        kw = dict(base=self.base, device=self.proc.device, resolution=self.resolution, center_crop=d.center_crop,
                  flips=d.random_flip, max_sequence_length=self.settings.model.max_sequence_length,
                  text=d.text_features == "cache", progress=self.proc.is_main and self.settings.train.progress)
        if not d.cache:
            return encode_dataset(records, **kw)
        # collective: every rank calls it, also when the store exists
        enc, path = FeatureCache.for_data(d.cache_dir).features(
            records, frozen_dtype=self.settings.model.frozen_dtype, feature_dtype=d.feature_dtype, proc=self.proc, **kw)
        self.cache_path = path
        log.info("frozen features: %s", path)
        return enc

    def _setup_training(self) -> None:
        s, t, proc = self.settings, self.settings.train, self.proc
        # train units, re-indexed onto the encoded (training-only) arrays
        units = self.data.units.subset(self.data.train_units).reindexed(self.train_index)
        # augmentation draws (timesteps, diffusion noise, flips, images of a large user) keyed per unit and step
        # (training.rows): one unit's presence changes no other unit's rows
        self.row_builder = RowBuilder(
            self.encoded, units, augmult=s.privacy.augmult if s.privacy.enabled else 1,
            mitigation=self._caption_mitigation(), random_flip=s.data.random_flip,
            num_train_timesteps=int(self.base.noise_scheduler.config.num_train_timesteps),
            timestep_range=t.timestep_range, key=self.plan.randomness.augmentation_key(),
            max_images_per_unit=s.privacy.max_images_per_user,
            caption_dropout=t.caption_dropout, empty_text=self.empty_text,
            text_encoder=None if s.data.text_features == "cache" else self._encode_captions)
        self.sampler = self.plan.sampler(num_units=len(units), batch_size=t.batch_size, rank=proc.rank,
                                         world_size=proc.world_size, seed=t.seed)
        self.gradient_canaries = self._gradient_canaries()
        self.engine = self.plan.engine(self.denoiser, params=self.params, device=proc.device,
                                       per_sample="given" if self.embedding else t.per_sample,
                                       micro_batch_size=t.micro_batch_size, memory_gb=t.per_sample_memory_gb,
                                       param_groups=({"embedding": [0]} if self.embedding else
                                                     adapters.parameter_groups(self.denoiser, self.params)),
                                       gradient_canaries=self.gradient_canaries)
        self.objective = make_objective(self.base.family, self.base.noise_scheduler, snr_gamma=t.snr_gamma)
        if t.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(self.params, lr=t.lr, momentum=t.adam_beta1, weight_decay=t.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(self.params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                                               weight_decay=t.weight_decay, eps=t.adam_epsilon)
        self.lr_scheduler = get_scheduler(t.lr_scheduler, optimizer=self.optimizer,
                                          num_warmup_steps=t.lr_warmup_steps, num_training_steps=t.max_steps)
        self.ema = EMAModel(self.params, decay=t.ema_decay) if t.ema_enabled else None
        start = self.plan.start_step
        if self.resume:
            self._restore_training_state()
            if start >= t.max_steps:
                log.warning("checkpoint is at step %d >= train.max_steps=%d: nothing to train", start, t.max_steps)
        self.tracker = build_tracker(self.cfg.tracker, self.run_dir, is_main=proc.is_main,
                                     config=OmegaConf.to_container(self.cfg, resolve=True))
        loop = dict(
            denoiser=self.denoiser, objective=self.objective, row_builder=self.row_builder,
            sampler=self.sampler, engine=self.engine, optimizer=self.optimizer, lr_scheduler=self.lr_scheduler,
            max_steps=t.max_steps, micro_batch_size=t.micro_batch_size, run_dir=self.run_dir, tracker=self.tracker,
            device=proc.device, privacy=self.plan, ema=self.ema, is_main=proc.is_main, log_every=t.log_every,
            checkpoint_every=t.checkpoint_every, checkpoints_total_limit=t.checkpoints_total_limit,
            autocast_dtype=autocast_dtype(t.mixed_precision, proc.device), start_step=start, progress=t.progress)
        if self.embedding is not None:

            e = self.embedding
            loop.update(max_steps=1 if self.aggregate else t.max_steps, checkpoint_every=0, autocast_dtype=None)
            self.trainer = ConceptTrainer(concept=self.concept, vector=self.params[0], captions=self.encoded.captions,
                                          mechanism=e.mechanism, unit_steps=e.unit_steps, unit_lr=e.unit_lr, **loop)
        else:
            self.trainer = Trainer(params=self.params, **loop)

    def _gradient_canaries(self) -> GradientCanaries | None:
        """Opt-in white-box gradient canaries for the audit (``probes.audit.gradient_canaries=m``): drawn over the
        trainable weights here; the plan wires them to the engine under the mechanism's rules."""
        if self.gradient_canary_count <= 0:
            return None
        return GradientCanaries(count=self.gradient_canary_count, num_params=sum(p.numel() for p in self.params),
                                seed=int(required(self.cfg.probes.audit, "seed")))

    def _restore_training_state(self) -> None:
        ckpt, proc = self.checkpoint, self.proc
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
        if self.ema is not None and ckpt.get("ema") is not None:
            self.ema.load_state_dict(ckpt["ema"])
        ranks = ckpt["state"].get("ranks", [])
        if len(ranks) == proc.world_size:  # else every stream starts afresh (never replaying earlier masks)
            mine = ranks[proc.rank]
            if mine.get("sampler") is not None:  # non-private runs, or reproducible noise (debugging)
                self.sampler.load_state_dict(mine["sampler"])
            noise = ckpt["state"].get("noise")
            if noise is not None and self.plan.reproducible_noise:
                self.engine.noise.load_state_dict(noise)
        if self.proc.is_main:

            truncate_metrics(self.run_dir / "metrics.jsonl", after_step=self.plan.start_step)

    def _caption_mitigation(self):
        """Public-pool caption replacement / public-word insertion (see training.rows.CaptionMitigation)."""

        d = self.settings.data
        rp, ip = d.caption_replace_prob, d.caption_insert_prob
        if rp == 0 and ip == 0:
            return None
        rng = np.random.default_rng(self.settings.train.seed + 7)
        variants = 4
        texts = [insert_random_word(c, rng) for c in self.encoded.captions for _ in range(variants)]
        var = {k: v.view(len(self.encoded.captions), variants, *v.shape[1:])
               for k, v in self._encode_captions(texts).items()}
        return CaptionMitigation(caption_variants=var, pool=self._encode_captions(list(PUBLIC_CAPTIONS)),
                                 replace_prob=rp, insert_prob=ip)

    def _run_plan(self) -> dict | None:
        """The run's noise-to-signal budget, as `dpdiff plan` computes it (None without DP)."""

        m = self.plan.mechanism
        if m is None:
            return None
        captions = [self.data.records[u[0]].text for u in (self.data.units.members[i] for i in self.data.train_units)]
        return run_plan(num_units=self.data.num_train_units, batch_size=m.expected_batch_size, steps=m.steps,
                        noise_multiplier=m.noise_multiplier, max_grad_norm=self.settings.privacy.max_grad_norm,
                        trainable=sum(p.numel() for p in self.params), captions=captions)

    def _describe(self) -> str:
        d = self.data
        return (f"{d.num_train_units} training units ({self.settings.privacy.unit}), {len(d.holdout_units)} held "
                f"out; adapter={self.settings.adapter.kind}, {sum(p.numel() for p in self.params):,} trainable "
                f"weights; {self.plan.describe()}")

    # ---------------------------------------------------------------------------------- train
    def train(self) -> None:
        with self.clock.phase("train"):
            self.trainer.run()
            self.trainer.checkpoint()
        self.phases = gather_objects(self.clock.records)  # collective: every rank's phases, rank order
        if self.gradient_canaries is not None and self.proc.is_main:
            self.gradient_canaries.save(self.run_dir)

    # ----------------------------------------------------------------------------------- save
    def save(self) -> dict:
        if not self.proc.is_main:
            return {}
        s = self.settings
        if self.ema is not None:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)
        if self.embedding is not None:
            self.weights_dir = self.concept.save(self.params[0], self.run_dir / "embedding").parent
            self.concept.use(self.params[0])  # samples, probes and eval prompt with the learned token
        else:
            self.weights_dir = adapters.save(self.denoiser, kind=s.adapter.kind, out_dir=self.run_dir,
                                             family=self.base.family)
        dataset_total = self.plan.dataset_charge.charge(status="finished")
        # privacy.json and the model card are published with the weights: the mechanism and the guarantee only;
        # what was computed from the data beyond N goes to data_owner.json (0600)
        self.privacy_record = privacy_record(plan=self.plan, data=self.data, world_size=self.proc.world_size,
                                             train_steps=self.trainer.step, engine=self.engine.kind,
                                             stopped_for_budget=self.trainer.stopped_for_budget,
                                             schedule=self.schedule)
        write_privacy_json(self.run_dir, self.privacy_record)
        write_owner_json(self.run_dir, owner_record(plan=self.plan, data=self.data, canaries=self.canaries.summary(),
                                                    dataset_total=dataset_total, planning=self._run_plan()))
        write_model_card(self.weights_dir, self.privacy_record, base_name=self.base.path, adapter=s.adapter.kind)
        sc = s.train.sample
        pipe = sampling_pipeline(self.base, self.denoiser, resolution=self.resolution,
                                 max_sequence_length=s.model.max_sequence_length)
        self.denoiser.eval()
        grid_kw = dict(per_prompt=sc.per_prompt, seed=sc.seed, steps=sc.steps, guidance_scale=sc.guidance_scale)
        prompts = [self._prompt(p) for p in self.data.sample_prompts]
        self.samples_path = sample_grid(pipe, prompts, path=self.run_dir / "samples.png", **grid_kw)
        self.base_samples_path = None
        if self.embedding is not None:  # the base is the same pipeline prompted without the token
            self.base_samples_path = sample_grid(pipe, self.data.sample_prompts,
                                                 path=self.run_dir / "samples_base.png", **grid_kw)
        elif s.adapter.kind == "lora":
            self.denoiser.disable_adapters()
            self.base_samples_path = sample_grid(pipe, self.data.sample_prompts,
                                                 path=self.run_dir / "samples_base.png", **grid_kw)
            self.denoiser.enable_adapters()
        # Samples are generated by the DP model, but prompts taken from the training captions are private
        # data: they (and images drawn from them) reach a tracker only with tracker.log_private_data=true.
        if self.data.sample_prompts_source != "training captions" or self.cfg.tracker.get("log_private_data"):
            self.tracker.log_image("samples", self.samples_path, step=self.trainer.step, caption=" | ".join(prompts))
        write_run_json(self.run_dir, run_record(
            version=self.version, base_model=self.base.path, model_family=self.base.family.name, data=self.data,
            adapter=s.adapter.kind, resolution=self.resolution, weights=str(self.weights_dir.relative_to(self.run_dir)),
            samples="samples.png", samples_base="samples_base.png" if self.base_samples_path else None,
            sample_prompts=prompts, wall_seconds=time.time() - self.t_start,
            train_steps=self.trainer.step, resumed_from=str(self.resume.path) if self.resume else None,
            device=str(self.proc.device), world_size=self.proc.world_size,
            phases=getattr(self, "phases", None)))
        return self.privacy_record

    # ---------------------------------------------------------------------------------- probe
    def _probe_context(self):
        """A probe context over the model just trained (EMA weights if saved)."""

        return build_probe_context(
            run_dir=self.run_dir, base=self.base, denoiser=self.denoiser, data=self.data, cfg=self.cfg,
            probes=self.cfg.probes, privacy=self.privacy_record, resolution=self.resolution, device=self.proc.device,
            schedule=self.schedule, embedding=self.embedding)

    def _prompt(self, caption: str) -> str:
        """A caption as the run conditions on it (an embedding adapter's template; else itself)."""
        return self.embedding.prompt(caption) if self.embedding is not None else caption

    def probe(self) -> dict | None:
        if not self.proc.is_main or not self.cfg.probes.get("enabled", False):
            return None

        self.probe_results = run_probes(self._probe_context(), self.cfg.probes)
        return self.probe_results

    # ------------------------------------------------------------------------------- evaluate
    def evaluate(self) -> dict | None:
        """Utility metrics (held-out loss, digit accuracy for the demo, FID when available)."""
        if not self.proc.is_main or not self.cfg.eval.get("enabled", False):
            return None

        self.utility = run_utility(self._probe_context(), self.cfg.eval)
        write_json_atomic(self.run_dir / "utility.json", self.utility)
        return self.utility

    # --------------------------------------------------------------------------------- report
    def report(self) -> None:
        if not self.proc.is_main:
            return
        paths = write_run_report(self.run_dir)
        self.tracker.summary(flat_summary(self.privacy_record, getattr(self, "probe_results", None)))
        log.info("report: %s", paths[0])

    def cleanup(self) -> None:
        for name in ("engine", "tracker"):
            obj = getattr(self, name, None)
            if obj is not None:
                try:
                    obj.close() if name == "engine" else obj.finish()
                except Exception:  # cleanup must not hide the real error
                    pass
        lock = getattr(self, "run_lock", None)
        if lock is not None:
            lock.release()

    def print_summary(self) -> None:
        if not self.proc.is_main:
            return
        print(terminal_summary(privacy=self.privacy_record, probes=getattr(self, "probe_results", None),
                               steps=self.trainer.step, seconds=time.time() - self.t_start, run_dir=self.run_dir,
                               weights_dir=self.weights_dir, samples_path=self.samples_path,
                               stopped_for_budget=self.trainer.stopped_for_budget), flush=True)


def _timed(name: str, fn) -> None:
    t = time.time()
    fn()
    log.info("%s: %.0f s", name, time.time() - t)


def run(cfg: DictConfig) -> None:
    """Hydra task: one finetune run in Hydra's run dir."""

    run_dir = RunDir(Path(HydraConfig.get().runtime.output_dir))
    recipe = FinetuneRecipe(cfg, run_dir.path)
    started = False
    try:
        _timed("setup", recipe.setup)
        started = True
        for name in ("train", "save", "probe", "evaluate", "report"):
            _timed(name, getattr(recipe, name))
        recipe.print_summary()
    except UserError:
        if not started:  # nothing was trained: no charge to the dataset, no half-written run dir
            if recipe.plan is not None:
                recipe.plan.dataset_charge.release()
            recipe.cleanup()
            run_dir.discard_if_fresh()
        raise
    finally:
        recipe.cleanup()


register_schemas()  # the config groups' typed schemas, before hydra.main composes configs/ (dpdiff.schema)


@hydra.main(version_base=None, config_path=str(config_dir()), config_name="finetune")
def main(cfg: DictConfig) -> None:
    with user_errors_exit():
        if relaunch_if_requested(cfg):
            return
        run(cfg)


if __name__ == "__main__":
    hydra_entry("finetune", main_fn=main)
