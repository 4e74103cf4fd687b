"""dpdiff finetune: DP fine-tuning of a Stable Diffusion UNet, then probes and a report.

    dpdiff finetune [hydra overrides]                       # built-in tiny model + digits demo
    dpdiff finetune model.pretrained=DIR data.path=DIR privacy.target_epsilon=4
    accelerate launch --multi_gpu --num_processes 2 recipes/finetune.py [overrides]

Reads top to bottom like the run it performs (torchtune's recipe shape): setup (validate the
privacy settings before touching data, read and check the data, resolve the mechanism, load
the base, attach the adapter, encode the frozen features), train, save, probe, report.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from dpdiff.errors import UserError
from dpdiff.paths import config_dir

log = logging.getLogger("dpdiff")


class FinetuneRecipe:
    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.t_start = time.time()

    # ---------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        from dpdiff import __version__
        from dpdiff.data.prepare import prepare
        from dpdiff.models.adapters import KINDS
        from dpdiff.privacy.settings import PrivacySettings
        from dpdiff.probes.canaries import CanarySettings
        from dpdiff.runtime import process_context

        cfg = self.cfg
        self.version = __version__
        self.proc = process_context(cfg.train.device)
        # 1. privacy settings and every other config value, before any private data is read
        self.privacy = PrivacySettings.from_config(cfg.privacy)
        if cfg.adapter.kind not in KINDS:
            raise UserError(f"adapter={cfg.adapter.kind}: must be one of {', '.join(KINDS)}")
        self.canaries = CanarySettings.from_config(cfg.probes)
        _check_train_config(cfg.train, privacy_enabled=self.privacy.enabled)
        _check_data_config(cfg.data)
        # 2. the private data: read, check, group into units, split off the holdout
        self.data = prepare(cfg.data, unit=self.privacy.unit)
        if self.canaries.count:
            self.data = self.canaries.insert(self.data, run_dir=self.run_dir, seed=int(cfg.train.seed))
        # 3. resume state and the mechanism (calibration, refusal past the target epsilon)
        self.resume = self._load_resume()
        self._resolve_privacy()
        # 4. models: base pipeline, trainable part, frozen features
        self._setup_model()
        self._setup_training()
        # 5. the dataset ledger, last: a setup error (bad model path, bad option) leaves no planned
        # entry that would count against the dataset's budget; nothing has been trained yet
        self._record_in_dataset_ledger(status="planned")
        self.trainer.run_id = getattr(self, "run_id", None)
        log.info("setup done: %s", self._describe())

    def _load_resume(self) -> dict | None:
        from dpdiff.privacy.ledger import PrivacyLedger
        from dpdiff.training.checkpoint import load_checkpoint, resolve_checkpoint

        spec = self.cfg.train.resume_from
        if not spec:
            return None
        path = resolve_checkpoint(str(spec), self.run_dir)
        ckpt = load_checkpoint(path)
        ckpt["path"] = path
        led = ckpt["state"].get("ledger")
        ckpt["ledger"] = PrivacyLedger.from_dict(led) if led else None
        # Steps spent after that checkpoint (a crash) are still spent: keep the longer ledger.
        run_ledger = path.parent / "privacy_ledger.json"
        if ckpt["ledger"] is not None and run_ledger.exists():
            on_disk = PrivacyLedger.load(run_ledger)
            if on_disk.steps > ckpt["ledger"].steps:
                log.warning("the run's ledger records %d steps, its checkpoint %d: counting all %d (steps after "
                            "the checkpoint were spent even though their weights are discarded)",
                            on_disk.steps, ckpt["ledger"].steps, on_disk.steps)
                ckpt["ledger"] = on_disk
        fp = ckpt["state"].get("dataset_fingerprint")
        if fp is not None and fp != self.data.fingerprint:
            raise UserError(f"train.resume_from={spec}: that checkpoint was trained on another dataset (fingerprint "
                            f"{fp[:12]}, this data {self.data.fingerprint[:12]}); its privacy ledger does not apply")
        if self.privacy.enabled and ckpt["ledger"] is None:
            raise UserError(f"train.resume_from={spec}: that checkpoint is from a non-private run; "
                            "a DP run cannot continue from it")
        if not self.privacy.enabled and ckpt["ledger"] is not None:
            raise UserError(f"train.resume_from={spec}: that checkpoint is from a DP run; continuing it without "
                            "privacy would void its guarantee (use privacy=dp)")
        return ckpt

    def _resolve_privacy(self) -> None:
        from dpdiff.privacy.ledger import PrivacyLedger
        from dpdiff.privacy.settings import resolve_mechanism
        from dpdiff.training.trainer import PrivacyPlan

        train = self.cfg.train
        n = self.data.num_train_units
        if not self.privacy.enabled:
            if train.batch_size > n:
                raise UserError(f"train.batch_size={train.batch_size} is larger than the {n} training units")
            self.mech, self.ledger, self.plan = None, None, None
            return
        history = list(self.resume["ledger"].segments) if self.resume else []
        start = int(self.resume["state"]["step"]) if self.resume else 0
        self.mech = resolve_mechanism(self.privacy, num_units=n, batch_size=float(train.batch_size),
                                      steps=int(train.max_steps), history=history,
                                      remaining_steps=max(int(train.max_steps) - start, 0))
        self.ledger = PrivacyLedger(accountant=self.privacy.accountant, delta=self.mech.delta,
                                    target_epsilon=self.privacy.target_epsilon, segments=history)
        # resolve_mechanism refused any plan past the target, so the planned ledger steps are the budget
        budget = self.mech.steps
        self.plan = PrivacyPlan(self.mech.noise_multiplier, self.mech.sample_rate, budget)

    def _record_in_dataset_ledger(self, *, status: str) -> None:
        """Append this run to the dataset's ledger; refuse a run that would pass privacy.dataset_budget."""
        from dpdiff.privacy.accountants import MechanismSegment
        from dpdiff.privacy.dataset_ledger import DatasetLedger, compose, entry_for_run, ledger_path

        if not self.proc.is_main:
            return
        p = self.cfg.privacy
        self.dataset_ledger = DatasetLedger(ledger_path(data_root=self.data.root, fingerprint=self.data.fingerprint,
                                                        configured=p.get("dataset_ledger")))
        self.run_id = (self.resume["state"].get("run_id") if self.resume else None) or str(self.run_dir.resolve())
        if self.privacy.enabled:
            if status == "planned":
                segs = list(self.ledger.segments) + [MechanismSegment(
                    self.mech.noise_multiplier, self.mech.sample_rate, max(self.mech.steps - self.ledger.steps, 0))]
            else:
                segs = list(self.ledger.segments)
            entry = entry_for_run(run_id=self.run_id, fingerprint=self.data.fingerprint, status=status, dp=True,
                                  unit=self.privacy.unit, delta=self.mech.delta, accountant=self.privacy.accountant,
                                  segments=segs)
        else:
            entry = entry_for_run(run_id=self.run_id, fingerprint=self.data.fingerprint, status=status, dp=False,
                                  unit=self.privacy.unit, delta=None, accountant=None, segments=[])
        others = [e for e in self.dataset_ledger.entries(self.data.fingerprint) if e.run_id != self.run_id]
        delta = p.get("dataset_delta") or (self.mech.delta if self.mech else 1e-5)
        total = compose(others + [entry], delta=float(delta))
        self.dataset_total = total
        budget = p.get("dataset_budget")
        if status == "planned" and budget is not None and total["epsilon"] > float(budget):
            spent = compose(others, delta=float(delta))["epsilon"]
            raise UserError(
                f"privacy.dataset_budget={budget}: this run would bring the total epsilon spent on this dataset "
                f"to {total['epsilon']:.3f} ({spent:.3f} already spent by {len(others)} run(s), ledger "
                f"{self.dataset_ledger.path}); lower the run's epsilon or raise the budget knowingly")
        self.dataset_ledger.record(entry)

    def _setup_model(self) -> None:
        from dpdiff.models import adapters
        from dpdiff.models.loading import load_base
        from dpdiff.training.encode import encode_texts
        from dpdiff.training.precision import frozen_dtype

        cfg = self.cfg
        self.base = load_base(cfg.model.pretrained, device=self.proc.device,
                              allow_download=bool(cfg.model.allow_download),
                              dtype=frozen_dtype(cfg.model.frozen_dtype, self.proc.device))
        self.resolution = int(cfg.data.resolution or self.base.resolution)
        # the UNet is on its device already: attach after moving (PITFALLS: silent LoRA no-update).
        # The adapter's random init comes from the run's seed.
        torch.manual_seed(int(cfg.train.seed))
        if cfg.train.get("gradient_checkpointing"):
            self.base.unet.enable_gradient_checkpointing()
        self.params = adapters.attach(self.base.unet, kind=cfg.adapter.kind, rank=cfg.adapter.rank or 0,
                                      alpha=cfg.adapter.alpha, target_modules=cfg.adapter.target_modules,
                                      dropout=cfg.adapter.dropout or 0.0)
        if self.resume:
            named = dict(self.base.unet.named_parameters())
            missing = [k for k in self.resume["trainable"] if k not in named]
            if missing:
                raise UserError(f"checkpoint {self.resume['path']} does not match this adapter config "
                                f"(unknown weight {missing[0]}); resume with the same adapter settings")
            with torch.no_grad():
                for k, v in self.resume["trainable"].items():
                    named[k].copy_(v.to(named[k].device))
        train_recs = [self.data.records[i] for i in self.data.train_records()]
        self.train_index = {rec_idx: j for j, rec_idx in enumerate(self.data.train_records())}
        self.encoded = self._encode(train_recs)
        self.empty_text = encode_texts(self.base.tokenizer, self.base.text_encoder, [""], device=self.proc.device)[0]

    def _encode(self, records):
        """Frozen-encoder features of the training images, from the user-only disk cache when possible."""
        from dpdiff.paths import home
        from dpdiff.training.encode import cache_key, encode_dataset, load_encoded, save_encoded

        cfg = self.cfg
        kw = dict(resolution=self.resolution, center_crop=bool(cfg.data.center_crop), flips=bool(cfg.data.random_flip))
        if not cfg.data.get("cache", True):
            return encode_dataset(records, vae=self.base.vae, tokenizer=self.base.tokenizer,
                                  text_encoder=self.base.text_encoder, device=self.proc.device,
                                  progress=self.proc.is_main and cfg.train.progress, **kw)
        cache_dir = Path(cfg.data.cache_dir).expanduser() if cfg.data.get("cache_dir") else home() / "cache"
        key = cache_key(records=records, base_path=self.base.path, dtype=str(cfg.model.frozen_dtype), **kw)
        path = cache_dir / f"features-{key}.safetensors"
        # one process per machine encodes (the cache dir may be node-local); the others wait and read it
        if self.proc.local_rank == 0 and load_encoded(path) is None:
            enc = encode_dataset(records, vae=self.base.vae, tokenizer=self.base.tokenizer,
                                 text_encoder=self.base.text_encoder, device=self.proc.device,
                                 progress=cfg.train.progress, **kw)
            save_encoded(enc, path)
        self.proc.barrier()
        enc = load_encoded(path)
        if enc is None:
            raise RuntimeError(f"feature cache {path} could not be read back")
        self.cache_path = path
        log.info("frozen features: %s", path)
        return enc

    def _setup_training(self) -> None:
        import numpy as np
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        from dpdiff.data.records import PrivacyUnits
        from dpdiff.privacy.engine import DPSGDEngine, NonPrivateEngine, noise_generator
        from dpdiff.privacy.fast_clip import TwoPassDPSGDEngine
        from dpdiff.privacy.sampling import PoissonSampler, ShuffleSampler
        from dpdiff.training.checkpoint import set_generator_state
        from dpdiff.training.loss import DiffusionObjective
        from dpdiff.training.precision import autocast_dtype
        from dpdiff.training.rows import RowBuilder
        from dpdiff.training.tracking import build_tracker
        from dpdiff.training.trainer import Trainer

        cfg, train, proc = self.cfg, self.cfg.train, self.proc
        seed = int(train.seed)
        torch.manual_seed(seed)
        # train units, re-indexed onto the encoded (training-only) arrays
        tu = self.data.units.subset(self.data.train_units)
        units = PrivacyUnits(tu.kind, tuple(tuple(self.train_index[i] for i in m) for m in tu.members), tu.names)
        n = len(units)
        streams = np.random.SeedSequence(seed, spawn_key=(proc.rank,)).generate_state(2)
        row_gen = torch.Generator().manual_seed(int(streams[0]))
        secure = self.privacy.enabled and self.privacy.secure_rng
        self.noise_gen = noise_generator(seed=int(streams[1]), secure=secure, device=proc.device)
        self.row_builder = RowBuilder(self.encoded, units, augmult=self.privacy.augmult if self.privacy.enabled else 1,
                                      mitigation=self._caption_mitigation(),
                                      random_flip=bool(cfg.data.random_flip),
                                      num_train_timesteps=int(self.base.noise_scheduler.config.num_train_timesteps),
                                      timestep_range=self._timestep_range(),
                                      generator=row_gen, max_images_per_unit=self.privacy.max_images_per_user,
                                      caption_dropout=float(train.caption_dropout),
                                      empty_text_emb=self.empty_text.cpu())
        if self.privacy.enabled:
            self.sampler = PoissonSampler(n, self.mech.sample_rate, seed=seed, rank=proc.rank,
                                          world_size=proc.world_size, secure=secure)
            mode = str(train.get("per_sample", "auto"))
            if mode == "auto":
                per_unit_bytes = 4 * sum(p.numel() for p in self.params) * int(train.micro_batch_size)
                budget = float(train.get("per_sample_memory_gb", 2.0)) * 2**30
                mode = "hooks" if per_unit_bytes <= budget else "two_pass"
            if mode not in ("hooks", "two_pass"):
                raise UserError(f"train.per_sample={mode}: must be auto, hooks or two_pass")
            engine_cls = TwoPassDPSGDEngine if mode == "two_pass" else DPSGDEngine
            self.engine = engine_cls(self.base.unet, noise_multiplier=self.mech.noise_multiplier,
                                     max_grad_norm=self.privacy.max_grad_norm,
                                     expected_batch_size=self.mech.expected_batch_size,
                                     noise_generator=self.noise_gen, params=self.params)
            self.per_sample_mode = mode
        else:
            self.sampler = ShuffleSampler(n, int(train.batch_size), seed=seed, rank=proc.rank,
                                          world_size=proc.world_size)
            self.engine = NonPrivateEngine(self.base.unet, params=self.params)
        self.objective = DiffusionObjective(self.base.noise_scheduler, snr_gamma=train.snr_gamma)
        self.optimizer = torch.optim.AdamW(self.params, lr=float(train.lr), betas=(train.adam_beta1, train.adam_beta2),
                                           weight_decay=float(train.weight_decay), eps=float(train.adam_epsilon))
        self.lr_scheduler = get_scheduler(train.lr_scheduler, optimizer=self.optimizer,
                                          num_warmup_steps=int(train.lr_warmup_steps),
                                          num_training_steps=int(train.max_steps))
        self.ema = EMAModel(self.params, decay=float(train.ema.decay)) if train.ema.enabled else None
        start = 0
        if self.resume:
            st = self.resume["state"]
            start = int(st["step"])
            self.optimizer.load_state_dict(self.resume["optimizer"])
            self.lr_scheduler.load_state_dict(self.resume["lr_scheduler"])
            if self.ema is not None and self.resume.get("ema") is not None:
                self.ema.load_state_dict(self.resume["ema"])
            ranks = st.get("ranks", [])
            if len(ranks) == proc.world_size:
                self.sampler.load_state_dict(ranks[proc.rank]["sampler"])
                set_generator_state(row_gen, ranks[proc.rank]["row_generator"])
            else:
                log.warning("checkpoint from %d processes resumed on %d: sampling continues from fresh streams",
                            len(ranks), proc.world_size)
            if st.get("noise_generator") and not secure:
                set_generator_state(self.noise_gen, st["noise_generator"])
            if start >= int(train.max_steps):
                log.warning("checkpoint is at step %d >= train.max_steps=%d: nothing to train", start, train.max_steps)
        self.tracker = build_tracker(cfg.tracker, self.run_dir, is_main=proc.is_main,
                                     config=OmegaConf.to_container(cfg, resolve=True))
        self.trainer = Trainer(
            unet=self.base.unet, params=self.params, objective=self.objective, row_builder=self.row_builder,
            sampler=self.sampler, engine=self.engine, optimizer=self.optimizer, lr_scheduler=self.lr_scheduler,
            max_steps=int(train.max_steps), micro_batch_size=int(train.micro_batch_size), run_dir=self.run_dir,
            tracker=self.tracker, device=proc.device, ledger=self.ledger, plan=self.plan, ema=self.ema,
            is_main=proc.is_main, log_every=int(train.log_every), checkpoint_every=int(train.checkpoint_every),
            checkpoints_total_limit=train.checkpoints_total_limit, noise_generator=self.noise_gen,
            secure_rng=secure, autocast_dtype=autocast_dtype(train.mixed_precision, proc.device),
            start_step=start, progress=bool(train.progress))
        self.trainer.dataset_fingerprint = self.data.fingerprint

    def _timestep_range(self) -> tuple[int, int] | None:
        tr = self.cfg.train.get("timestep_range")
        if tr is None:
            return None
        total = int(self.base.noise_scheduler.config.num_train_timesteps)
        seq = list(tr) if isinstance(tr, (list, tuple, ListConfig)) else [tr]
        ok = len(seq) == 2 and all(isinstance(v, int) for v in seq) and 0 <= seq[0] < seq[1] <= total
        if not ok:
            raise UserError(f"train.timestep_range={seq}: must be [lo, hi] with 0 <= lo < hi <= {total} "
                            "(training timesteps drawn uniformly from lo..hi-1), or null for all")
        return int(seq[0]), int(seq[1])

    def _caption_mitigation(self):
        """Public-pool caption replacement / public-word insertion (see training.rows.CaptionMitigation)."""
        import numpy as np

        from dpdiff.training.encode import encode_texts
        from dpdiff.training.rows import PUBLIC_CAPTIONS, CaptionMitigation, insert_random_word

        rp = float(self.cfg.data.get("caption_replace_prob", 0.0) or 0.0)
        ip = float(self.cfg.data.get("caption_insert_prob", 0.0) or 0.0)
        if rp == 0 and ip == 0:
            return None
        rng = np.random.default_rng(int(self.cfg.train.seed) + 7)
        variants = 4
        texts = [insert_random_word(c, rng) for c in self.encoded.captions for _ in range(variants)]
        enc = lambda t: encode_texts(self.base.tokenizer, self.base.text_encoder, t, device=self.proc.device)
        var = enc(texts).view(len(self.encoded.captions), variants, *self.encoded.text_emb.shape[1:])
        return CaptionMitigation(caption_emb_variants=var, pool_emb=enc(list(PUBLIC_CAPTIONS)), replace_prob=rp,
                                 insert_prob=ip)

    def _describe(self) -> str:
        d = self.data
        s = (f"{d.num_train_units} training units ({self.privacy.unit}), {len(d.holdout_units)} held out; "
             f"adapter={self.cfg.adapter.kind}, {sum(p.numel() for p in self.params):,} trainable weights")
        if self.mech:
            s += (f"; DP-SGD q={self.mech.sample_rate:.4g} sigma={self.mech.noise_multiplier:.4g} "
                  f"C={self.privacy.max_grad_norm:g} K={self.privacy.augmult} planned epsilon "
                  f"{self.mech.epsilon_planned:.3f} (delta {self.mech.delta:.2g}, {self.privacy.accountant})")
        else:
            s += "; NO differential privacy"
        return s

    # ---------------------------------------------------------------------------------- train
    def train(self) -> None:
        self.trainer.run()
        self.trainer.checkpoint()

    # ----------------------------------------------------------------------------------- save
    def save(self) -> dict:
        from dpdiff.models import adapters
        from dpdiff.models.loading import build_pipeline
        from dpdiff.models.pipeline import sample_grid
        from dpdiff.report.privacy_json import privacy_record, write_privacy_json, write_run_json

        if not self.proc.is_main:
            return {}
        if self.ema is not None:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)
        self.weights_dir = adapters.save(self.base.unet, kind=self.cfg.adapter.kind, out_dir=self.run_dir)
        self._record_in_dataset_ledger(status="finished")
        self.privacy_record = privacy_record(self)
        write_privacy_json(self.run_dir, self.privacy_record)
        sc = self.cfg.train.sample
        pipe = build_pipeline(self.base, unet=self.base.unet)
        self.base.unet.eval()
        grid_kw = dict(per_prompt=int(sc.per_prompt), seed=int(sc.seed), steps=int(sc.steps),
                       guidance_scale=float(sc.guidance_scale))
        self.samples_path = sample_grid(pipe, self.data.sample_prompts, path=self.run_dir / "samples.png", **grid_kw)
        self.base_samples_path = None
        if self.cfg.adapter.kind == "lora":
            self.base.unet.disable_adapters()
            self.base_samples_path = sample_grid(pipe, self.data.sample_prompts,
                                                 path=self.run_dir / "samples_base.png", **grid_kw)
            self.base.unet.enable_adapters()
        # Samples are generated by the DP model, but prompts taken from the training captions are private
        # data: they (and images drawn from them) reach a tracker only with tracker.log_private_data=true.
        if self.data.sample_prompts_source != "training captions" or self.cfg.tracker.get("log_private_data"):
            self.tracker.log_image("samples", self.samples_path, step=self.trainer.step,
                                   caption=" | ".join(self.data.sample_prompts))
        write_run_json(self)
        return self.privacy_record

    # ---------------------------------------------------------------------------------- probe
    def probe(self) -> dict | None:
        if not self.proc.is_main or not self.cfg.probes.get("enabled", False):
            return None
        from dpdiff.probes.run import run_probes_after_training

        self.probe_results = run_probes_after_training(self)
        return self.probe_results

    # ------------------------------------------------------------------------------- evaluate
    def evaluate(self) -> dict | None:
        """Utility metrics (held-out loss, digit accuracy for the demo, FID when available)."""
        if not self.proc.is_main or not self.cfg.eval.get("enabled", False):
            return None
        from dpdiff.io import write_json_atomic
        from dpdiff.probes.run import context_from_recipe
        from dpdiff.report.utility import run_utility

        self.utility = run_utility(context_from_recipe(self), self.cfg.eval)
        write_json_atomic(self.run_dir / "utility.json", self.utility)
        return self.utility

    # --------------------------------------------------------------------------------- report
    def report(self) -> None:
        from dpdiff.report.run_report import write_run_report

        if not self.proc.is_main:
            return
        paths = write_run_report(self.run_dir)
        self.tracker.summary(_flat_summary(self.privacy_record, getattr(self, "probe_results", None)))
        log.info("report: %s", paths[0])

    def cleanup(self) -> None:
        for name in ("engine", "tracker"):
            obj = getattr(self, name, None)
            if obj is not None:
                try:
                    obj.close() if name == "engine" else obj.finish()
                except Exception:  # cleanup must not hide the real error
                    pass

    def print_summary(self) -> None:
        if not self.proc.is_main:
            return
        rec = self.privacy_record
        if rec["dp"]:
            guarantee = (f"({rec['epsilon']:.3f}, {rec['delta']:.2g})-DP per {rec['privacy_unit']} "
                         f"[{rec['accountant']}], target epsilon {rec['target_epsilon']}")
        else:
            guarantee = "NO PRIVACY GUARANTEE (privacy=none)"
        weights = self.weights_dir.relative_to(self.run_dir)
        lines = [
            "",
            f"dpdiff: finished {self.trainer.step} steps in {time.time() - self.t_start:.0f}s",
            f"  privacy : {guarantee}",
            f"  run dir : {self.run_dir}",
            f"  weights : {self.run_dir / weights}",
            f"  samples : {self.samples_path}",
            f"  report  : {self.run_dir / 'report.html'}",
        ]
        pr = getattr(self, "probe_results", None)
        if pr:
            ex, mia, audit = pr.get("extraction") or {}, pr.get("mia") or {}, pr.get("audit") or {}
            lines.append("  probes  : " + "; ".join(_probe_summary(ex, mia, audit)))
        if self.trainer.stopped_for_budget:
            lines.append("  note    : training stopped early: one more step would exceed the target epsilon")
        print("\n".join(lines), flush=True)


def _fmt(v, nd: int = 3) -> str:
    return "n/a" if v is None else (f"{v:.{nd}g}" if isinstance(v, float) else str(v))


def _probe_summary(ex: dict, mia: dict, audit: dict) -> list[str]:
    """One short clause per probe that ran, with the baseline it must be read against."""
    out = []
    if ex and "extracted_count" in ex:
        out.append(f"extraction {ex['extracted_count']} of {ex.get('training_items_probed')} training images matched "
                   f"(held-out false-match rate {_fmt(ex.get('heldout_false_match_rate'), 2)}), "
                   f"{ex.get('near_copy_count')} near copies")
    if mia and mia.get("auc") is not None:
        out.append(f"MIA AUC {_fmt(mia['auc'])}")
    if audit and audit.get("verdict") is not None:
        out.append(f"audit {audit['verdict']} (eps_lower {_fmt(audit.get('eps_lower'))})")
    return out or ["none ran"]


def _check_train_config(train, *, privacy_enabled: bool) -> None:
    for key in ("max_steps", "micro_batch_size"):
        v = train.get(key)
        if not isinstance(v, int) or v < 1:
            raise UserError(f"train.{key}={v}: must be an integer >= 1")
    if not (float(train.batch_size) > 0):
        raise UserError(f"train.batch_size={train.batch_size}: must be > 0")
    if not (float(train.lr) > 0):
        raise UserError(f"train.lr={train.lr}: must be > 0")
    if train.get("gradient_checkpointing") and privacy_enabled:
        raise UserError("train.gradient_checkpointing=true is not supported with DP: per-sample gradient hooks "
                        "and recomputed activations do not mix (with Opacus' hooks most LoRA weights got no "
                        "per-sample gradient); lower train.micro_batch_size to save memory instead")
    if str(train.mixed_precision) not in ("no", "bf16", "fp16", "False", "None"):
        raise UserError(f"train.mixed_precision={train.mixed_precision}: must be no, bf16 or fp16")


def _check_data_config(data) -> None:
    rp = float(data.get("caption_replace_prob", 0.0) or 0.0)
    ip = float(data.get("caption_insert_prob", 0.0) or 0.0)
    if rp < 0 or ip < 0 or rp + ip > 1:
        raise UserError(f"data.caption_replace_prob={rp} and data.caption_insert_prob={ip}: each must be >= 0 "
                        "and their sum <= 1")
    res = data.get("resolution")
    if res is not None and (not isinstance(res, int) or res < 8):
        raise UserError(f"data.resolution={res}: must be an integer >= 8 (or null for the model's own)")
    hf = data.get("holdout_fraction", 0.0) or 0.0
    if not 0 <= float(hf) < 1:
        raise UserError(f"data.holdout_fraction={hf}: must be in [0, 1)")


def _flat_summary(privacy: dict, probes: dict | None) -> dict:
    out = {f"privacy/{k}": v for k, v in privacy.items() if isinstance(v, (int, float, str, bool)) or v is None}
    for section, vals in (probes or {}).items():
        if isinstance(vals, dict):
            for k, v in vals.items():
                if isinstance(v, (int, float, str, bool)):
                    out[f"probes/{section}/{k}"] = v
    return out


def run(cfg: DictConfig) -> None:
    """Hydra task: one finetune run in Hydra's run dir."""
    from hydra.core.hydra_config import HydraConfig

    from dpdiff.runtime import RunDir

    run_dir = RunDir(Path(HydraConfig.get().runtime.output_dir))
    recipe = FinetuneRecipe(cfg, run_dir.path)
    started = False
    try:
        recipe.setup()
        started = True
        recipe.train()
        recipe.save()
        recipe.probe()
        recipe.evaluate()
        recipe.report()
        recipe.print_summary()
    except UserError:
        if not started:  # nothing was trained: leave no half-written run dir behind
            run_dir.discard_if_fresh()
        raise
    finally:
        recipe.cleanup()


@hydra.main(version_base=None, config_path=str(config_dir()), config_name="finetune")
def main(cfg: DictConfig) -> None:
    from dpdiff.cli import user_errors_exit

    with user_errors_exit():
        run(cfg)


if __name__ == "__main__":
    from dpdiff.cli import hydra_entry

    hydra_entry("finetune", main_fn=main)
