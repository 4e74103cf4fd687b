"""The privacy execution plan of a run: the one place where the target epsilon is enforced.

Built once, from validated ``PrivacySettings`` and the unit count, before any private pixel is
encoded (as jax_privacy's ``DPExecutionPlan`` bundles sampling, clipping, noise and the DP event).
It owns everything that decides or records the guarantee:

* the mechanism: sample rate q = B/N, delta, the noise multiplier calibrated so that the planned
  steps stay within ``privacy.target_epsilon`` (or a fixed one, checked against the target);
* resume reconciliation: a resumed run continues the ledger of its checkpoint (or the longer ledger
  its run dir holds after a crash), with the same unit, delta, data and sample rate, or is refused;
  a plan past the target is refused with the largest ``train.max_steps`` that fits;
* the stop rule (``may_step``) and the ledger (``record_step``, saved after every step);
* the DP event the run composes to (``event``, a ``dp_accounting.DpEvent``);
* the randomness of the mechanism (fresh OS entropy per run and process; ``dpdiff.privacy.randomness``);
* the sampler (Poisson for DP, never shuffled batches accounted as Poisson) and the clipping engine
  (hooks or book-keeping: a performance choice, both exact; ``choose_engine``), with its observers: the
  gradient-canary audit (``dpdiff.privacy.gradient_canaries``) is wired here, under the mechanism's rules;
* the dataset-ledger charge of this attempt (``dataset_charge``: ``dpdiff.privacy.dataset_charge``), with
  ``privacy.dataset_budget`` refused before training.

A non-private plan (``privacy=none``) has the same interface: no mechanism, a shuffle sampler, the
plain mean gradient, and a dataset-ledger entry that marks the data as exposed without a guarantee.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dpdiff.errors import UserError
from dpdiff.privacy.accountants import (
    EpsilonReport,
    MechanismSegment,
    calibrate_noise_multiplier,
    get_accountant,
    max_steps_within,
)
from dpdiff.privacy.dataset_charge import DatasetCharge
from dpdiff.privacy.gradient_canaries import GradientCanaries, GradientCanaryHook, check_gradient_canaries
from dpdiff.privacy.ledger import PrivacyLedger
from dpdiff.privacy.randomness import PrivacyRandomness
from dpdiff.privacy.settings import PrivacySettings, default_delta

log = logging.getLogger("dpdiff")

ENGINES = ("auto", "hooks", "bookkeeping")


@dataclass(frozen=True, kw_only=True)
class Mechanism:
    """The resolved DP-SGD mechanism of a run (what the accountant sees)."""

    noise_multiplier: float
    sample_rate: float
    num_units: float  # the count q is computed from (with audit canaries: users' units + expected canaries)
    expected_batch_size: float
    delta: float
    steps: int  # planned ledger steps: those already in the ledger plus this run's
    epsilon_planned: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class DatasetIdentity:
    """What the steps are spent on: the data folder, its two fingerprints and the ids of the records trained on
    (see ``dataset_ledger``)."""

    root: Path
    fingerprint: str  # the records trained on
    source_fingerprint: str  # every record the folder lists, as read
    # the records trained on (``RecordIds``, a sequence of ``record_ids`` digests, or a callable returning either,
    # called by the main process only, e.g. ``PreparedData.train_record_ids``); None: unknown, and every attempt in
    # the ledger is then charged to this run's records (conservative)
    # (never printed nor compared: a bound method's repr would print the whole dataset)
    record_ids: object | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, kw_only=True)
class AuditCanaries:
    """Audit canaries inserted among the training units (``dpdiff.probes.canaries``), each drawn in with probability
    ``inclusion_prob``: the mechanism's q and default delta are computed from the *expected* unit count
    ``user_units + count * inclusion_prob``, so the mechanism does not depend on the audit's coins (which canaries
    were drawn in)."""

    user_units: int
    count: int
    inclusion_prob: float

    @property
    def rate_units(self) -> float:
        return self.user_units + self.count * self.inclusion_prob


@dataclass(frozen=True, kw_only=True)
class ResumePoint:
    """What a checkpoint brings to the plan."""

    path: Path
    step: int  # the training step the checkpoint holds
    ledger: PrivacyLedger | None  # the longer of the checkpoint's ledger and its run dir's ledger file
    checkpoint_ledger_steps: int
    run_id: str | None
    dataset_fingerprint: str | None

    @property
    def discarded_steps(self) -> int:
        """Ledger steps spent after the checkpoint (a crash): counted, although their weights are gone."""
        return (self.ledger.steps - self.checkpoint_ledger_steps) if self.ledger is not None else 0

    @classmethod
    def from_checkpoint(cls, *, path: Path, state: dict) -> ResumePoint:
        led = PrivacyLedger.from_dict(state["ledger"]) if state.get("ledger") else None
        ckpt_steps = led.steps if led is not None else 0
        on_disk_path = Path(path).parent / "privacy_ledger.json"
        if led is not None and on_disk_path.exists():
            on_disk = PrivacyLedger.load(on_disk_path)
            if on_disk.steps > led.steps:
                log.warning("the run's ledger records %d steps, its checkpoint %d: counting all %d (steps after the "
                            "checkpoint were spent even though their weights are discarded)",
                            on_disk.steps, led.steps, on_disk.steps)
                led = on_disk
        return cls(path=Path(path), step=int(state["step"]), ledger=led, checkpoint_ledger_steps=ckpt_steps,
                   run_id=state.get("run_id"), dataset_fingerprint=state.get("dataset_fingerprint"))


def resolve_mechanism(settings: PrivacySettings, *, num_units: float, batch_size: float, max_steps: int,
                      start_step: int = 0, history: list[MechanismSegment] | None = None,
                      discarded_steps: int = 0) -> Mechanism:
    """Sample rate, delta and noise multiplier for a run that trains from ``start_step`` to ``max_steps``.

    ``history`` is the ledger of a resumed run (composed first); it may hold more steps than
    ``start_step`` when steps after the checkpoint were spent and discarded by a crash. A plan whose
    total would exceed the target epsilon is refused, naming the largest ``train.max_steps`` that fits.
    """
    if num_units < 1:
        raise UserError("the training set has no privacy units")
    shown_units = f"{num_units:g}"
    if batch_size <= 0:
        raise UserError(f"train.batch_size={batch_size}: must be > 0")
    q = batch_size / num_units
    if q > 1:
        raise UserError(f"train.batch_size={batch_size:g} is larger than the {shown_units} privacy units "
                        f"(sample rate q={q:.3g} > 1); lower train.batch_size to at most {int(num_units)}")
    delta = settings.delta if settings.delta is not None else default_delta(num_units)
    if delta >= 1.0 / num_units:
        raise UserError(f"privacy.delta={settings.delta}: must be < 1/num_units = {1.0 / num_units:.3g} ({shown_units} "
                        "units); with delta >= 1/N a mechanism may publish a whole unit. Lower privacy.delta")
    history = list(history or [])
    spent = sum(s.steps for s in history)
    remaining = max(max_steps - start_step, 0)
    acc = get_accountant(settings.accountant)
    if history and settings.noise_multiplier is None:
        sigma = history[-1].noise_multiplier
        if history[-1].sample_rate != q:
            raise UserError(f"resuming with sample rate {q:.6g} but the ledger was spent at "
                            f"{history[-1].sample_rate:.6g}; keep train.batch_size and the data unchanged")
    elif settings.noise_multiplier is not None:
        sigma = settings.noise_multiplier
    else:
        try:
            sigma = calibrate_noise_multiplier(target_epsilon=settings.target_epsilon, delta=delta, sample_rate=q,
                                               steps=max(remaining, 1), accountant=acc, history=history)
        except ValueError as err:
            raise UserError(f"privacy.target_epsilon={settings.target_epsilon:g}: {err}") from None
    report = acc.epsilon(history=[*history, MechanismSegment(sigma, q, remaining)], delta=delta)
    eps = report.epsilon
    if not report.meaningful:
        log.warning("privacy.noise_multiplier=%g over %d steps at q=%.4g: %s", sigma, spent + remaining, q,
                    report.describe())
    if settings.target_epsilon is not None and eps > settings.target_epsilon:
        fit = max_steps_within(target_epsilon=settings.target_epsilon, delta=delta, noise_multiplier=sigma,
                               sample_rate=q, accountant=acc, history=history)
        spent_note = ""
        if spent:
            spent_note = f" ({spent} steps already in the ledger"
            if discarded_steps:
                spent_note += (f", {discarded_steps} of them after the checkpoint at step {start_step}: spent, "
                               "although their weights were discarded")
            spent_note += ")"
        shown = "above any useful bound" if eps == float("inf") else f"{eps:.3f}"
        raise UserError(
            f"train.max_steps={max_steps} would spend epsilon {shown} > privacy.target_epsilon="
            f"{settings.target_epsilon:g}{spent_note}; at most {start_step + fit} steps fit: "
            f"set train.max_steps<={start_step + fit}" + (" or raise the target" if fit == 0 else ""))
    return Mechanism(noise_multiplier=float(sigma), sample_rate=q, num_units=num_units,
                     expected_batch_size=q * num_units, delta=delta, steps=spent + remaining,
                     epsilon_planned=float(eps))


def choose_engine(mode: str, *, trainable_numel: int, micro_batch_size: int, memory_gb: float) -> str:
    """``hooks`` (every trainable weight's per-unit gradient held at once: the least work per layer, LoRA's case)
    when a micro-batch's per-unit gradients fit in ``memory_gb``, else ``bookkeeping`` (one backward, per layer the
    cheaper of ghost norms and per-unit gradients: full fine-tuning's case). Both are exact."""
    if mode == "two_pass":
        raise UserError("train.per_sample=two_pass was retired (it could exceed the clip norm for weights also used "
                        "outside their layer); use bookkeeping, which does the same in one backward")
    if mode not in ENGINES:
        raise UserError(f"train.per_sample={mode}: must be one of {', '.join(ENGINES)}")
    if mode != "auto":
        return mode
    return "hooks" if 4 * trainable_numel * micro_batch_size <= memory_gb * 2**30 else "bookkeeping"


def _reproducible(settings: PrivacySettings, ledger: PrivacyLedger | None) -> bool:
    """Seeded noise: the ledger's flag (set once any attempt of the run used it), else the setting's."""
    return bool(ledger.reproducible_noise) if ledger is not None else settings.reproducible_noise


@dataclass(frozen=True, kw_only=True, eq=False)
class PrivacyPlan:
    """One run's privacy plan, decided before any private pixel is encoded and never changed after: build it with
    ``PrivacyPlan.build``.

    A frozen bundle in the style of jax_privacy's ``DPExecutionPlan`` (batch selection, clipping, noise addition and
    the DP event together): the mechanism (``mechanism``; None without privacy), its randomness, the sampler and the
    clipping engine it builds (``sampler``, ``engine``), the DP event it composes to (``event``), and where it
    stands in its run (identity, resume point). Two objects it holds keep the run's *state*, and nothing else does:
    ``ledger``, the run's privacy ledger (the accountant's state: ``record_step`` appends each step taken), and
    ``dataset_charge``, this attempt's lines in the dataset's ledger (``dpdiff.privacy.dataset_charge``).
    """

    settings: PrivacySettings
    dataset: DatasetIdentity
    mechanism: Mechanism | None
    ledger: PrivacyLedger | None
    randomness: PrivacyRandomness
    run_dir: Path
    run_id: str
    attempt_id: str
    start_step: int
    resume: ResumePoint | None
    is_main: bool
    ledger_start: int  # where this attempt's own steps begin in the ledger
    dataset_charge: DatasetCharge

    # ---------------------------------------------------------------------------------- build
    @classmethod
    def build(cls, *, settings: PrivacySettings, dataset: DatasetIdentity, num_units: int, batch_size: float,
              max_steps: int, seed: int, run_dir: Path, resume: ResumePoint | None = None, rank: int = 0,
              world_size: int = 1, canaries: AuditCanaries | None = None) -> PrivacyPlan:
        """Check the resume against the settings and data, resolve the mechanism, open the ledger.

        q and the default delta are computed from ``num_units``, or, with audit ``canaries`` among the units, from
        the expected unit count (``AuditCanaries.rate_units``).
        """
        rate_units = canaries.rate_units if canaries is not None and canaries.count else None
        cls._check_resume(settings, dataset, resume)
        start = resume.step if resume else 0
        run_id = (resume.run_id if resume else None) or str(Path(run_dir).resolve())
        attempt_id = uuid.uuid4().hex
        mech, ledger = None, None
        if settings.enabled:
            history = list(resume.ledger.segments) if resume and resume.ledger else []
            mech = resolve_mechanism(settings, num_units=rate_units or num_units, batch_size=float(batch_size),
                                     max_steps=max_steps,
                                     start_step=start, history=history,
                                     discarded_steps=resume.discarded_steps if resume else 0)
            prior = resume.ledger if resume and resume.ledger else None
            ledger = PrivacyLedger(accountant=settings.accountant, delta=mech.delta,
                                   target_epsilon=settings.target_epsilon, segments=history,
                                   privacy_unit=settings.unit, dataset_fingerprint=dataset.fingerprint,
                                   reproducible_noise=settings.reproducible_noise
                                   or bool(prior and prior.reproducible_noise),
                                   attempts=list(prior.attempts) if prior else [])
            ledger.attempts.append({"attempt_id": attempt_id, "start": ledger.steps})
        elif batch_size > num_units:
            raise UserError(f"train.batch_size={batch_size:g} is larger than the {num_units} training units")
        # a non-private run has no mechanism to protect: its draws follow train.seed, for reproducible baselines
        randomness = PrivacyRandomness(reproducible=settings.reproducible_noise or not settings.enabled,
                                       seed=int(seed), rank=rank,
                                       world_size=world_size, start_step=ledger.steps if ledger else start,
                                       secure=settings.secure_rng)
        ledger_start = ledger.steps if ledger is not None else 0
        charge = DatasetCharge(settings=settings, dataset=dataset, mechanism=mech, ledger=ledger,
                               run_dir=Path(run_dir), run_id=run_id, attempt_id=attempt_id,
                               ledger_start=ledger_start, resumed=resume is not None,
                               reproducible_noise=_reproducible(settings, ledger), is_main=rank == 0)
        return cls(settings=settings, dataset=dataset, mechanism=mech, ledger=ledger, randomness=randomness,
                   run_dir=Path(run_dir), run_id=run_id, attempt_id=attempt_id, start_step=start, resume=resume,
                   is_main=rank == 0, ledger_start=ledger_start, dataset_charge=charge)

    @staticmethod
    def _check_resume(settings: PrivacySettings, dataset: DatasetIdentity, resume: ResumePoint | None) -> None:
        if resume is None:
            return
        where = f"train.resume_from={resume.path}"
        if resume.dataset_fingerprint is not None and resume.dataset_fingerprint != dataset.fingerprint:
            raise UserError(f"{where}: that checkpoint was trained on another dataset (fingerprint "
                            f"{resume.dataset_fingerprint[:12]}, this data {dataset.fingerprint[:12]}); its privacy "
                            "ledger does not apply")
        led = resume.ledger
        if settings.enabled and led is None:
            raise UserError(f"{where}: that checkpoint is from a non-private run; a DP run cannot continue from it")
        if not settings.enabled and led is not None:
            raise UserError(f"{where}: that checkpoint is from a DP run; continuing it without privacy would void its "
                            "guarantee (use privacy=dp)")
        if led is None:
            return
        if led.privacy_unit != settings.unit:
            raise UserError(f"{where}: its ledger was spent per {led.privacy_unit}; resuming with "
                            f"privacy.unit={settings.unit} would compose two different guarantees. Keep "
                            f"privacy.unit={led.privacy_unit}")
        if settings.delta is not None and settings.delta != led.delta:
            raise UserError(f"{where}: its ledger states epsilon at delta {led.delta:g}; resuming with "
                            f"privacy.delta={settings.delta:g} would change the guarantee's meaning. Keep "
                            f"privacy.delta={led.delta:g} (or null)")
        if led.reproducible_noise != settings.reproducible_noise:
            raise UserError(f"{where}: its ledger was spent with privacy.reproducible_noise={led.reproducible_noise}; "
                            "resume with the same setting")

    # ------------------------------------------------------------------------ rank agreement
    def agreement(self) -> dict:
        """What every process of a run must agree on: the data trained on and the mechanism."""
        m = self.mechanism
        out = {"dataset_fingerprint": self.dataset.fingerprint, "privacy_unit": self.settings.unit,
               "dp": self.enabled, "max_grad_norm": self.settings.max_grad_norm, "augmult": self.settings.augmult,
               "accountant": self.settings.accountant}
        if m is not None:
            out.update(num_units=m.num_units, sample_rate=m.sample_rate, noise_multiplier=m.noise_multiplier,
                       delta=m.delta, steps=m.steps, expected_batch_size=m.expected_batch_size)
        return out

    def check_ranks_agree(self, gathered: list[dict] | None = None) -> None:
        """Refuse a multi-process run whose processes prepared different data or resolved different mechanisms
        (node-local copies of a folder that differ, another config on one node): each rank samples its share of
        the units by index with the same q, so a different N, q or unit order on one rank could sample one unit
        on two ranks, or at another rate than the accountant's. ``gathered``: every rank's :meth:`agreement`
        (collective: every rank calls this)."""
        from dpdiff.runtime import gather_objects

        gathered = gathered if gathered is not None else gather_objects(self.agreement())
        first = gathered[0]
        for rank, other in enumerate(gathered[1:], start=1):
            bad = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
            if bad:
                k = bad[0]
                raise UserError(f"process {rank} disagrees with process 0 on {', '.join(bad)} ({k}: "
                                f"{other.get(k)!r} vs {first.get(k)!r}); every process must read the same data "
                                "folder and config (a node-local copy that differs, or another data.path on one node)")

    # --------------------------------------------------------------------------- properties
    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    @property
    def reproducible_noise(self) -> bool:
        return _reproducible(self.settings, self.ledger)

    # ------------------------------------------------------------------------- the stop rule
    def may_step(self) -> bool:
        """False once one more step would pass the planned (target-respecting) ledger length. (The plan refuses a
        schedule past the target, so a loop that runs the planned steps never meets False: this is the guard.)"""
        return self.mechanism is None or self.ledger.steps < self.mechanism.steps

    def record_step(self) -> None:
        if self.ledger is not None:
            self.ledger.record_step(noise_multiplier=self.mechanism.noise_multiplier,
                                    sample_rate=self.mechanism.sample_rate)

    def epsilon(self) -> EpsilonReport | None:
        return self.ledger.epsilon() if self.ledger is not None else None

    @property
    def event(self):
        """The DP event this plan composes to when it runs its planned steps, as a ``dp_accounting.DpEvent``: the
        ledger's earlier segments (a resumed run's) and this run's, each a self-composed Poisson-subsampled Gaussian
        (``add or remove one unit``). Any dp_accounting accountant turns it into (epsilon, delta); composing it with
        other releases of the same data is the user's to do. None without privacy."""
        import dp_accounting

        m = self.mechanism
        if m is None:
            return None
        done = sum(g.steps for g in self.ledger.segments) if self.ledger is not None else 0
        segments = [*(self.ledger.segments if self.ledger is not None else []),
                    MechanismSegment(m.noise_multiplier, m.sample_rate, m.steps - done)]
        return dp_accounting.ComposedDpEvent([
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(g.sample_rate, dp_accounting.GaussianDpEvent(g.noise_multiplier)),
                int(g.steps)) for g in segments if g.steps > 0])

    def save_ledger(self) -> None:
        if self.ledger is not None and self.is_main:
            self.ledger.save(self.run_dir / "privacy_ledger.json")

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the plan (the RNG states are deliberately not part of it)."""
        return {"run_id": self.run_id, "dataset_fingerprint": self.dataset.fingerprint,
                "attempt_id": self.attempt_id, "ledger": self.ledger.to_dict() if self.ledger is not None else None}

    # ------------------------------------------------------------------- sampling and engine
    def sampler(self, *, num_units: int, batch_size: float, rank: int, world_size: int, seed: int):
        """Poisson sampling of units at rate q (DP), or shuffled fixed batches (non-private baselines only)."""
        from dpdiff.privacy.sampling import PoissonSampler, ShuffleSampler

        if self.mechanism is None:
            return ShuffleSampler(num_units, int(batch_size), seed=seed, rank=rank, world_size=world_size)
        return PoissonSampler(num_units, self.mechanism.sample_rate, rng=self.randomness.sampling_rng(), rank=rank,
                              world_size=world_size)

    def engine_kind(self, per_sample: str, *, trainable_numel: int, micro_batch_size: int, memory_gb: float) -> str:
        """The engine ``engine`` builds: ``none`` without privacy, ``unit_vectors`` for ``per_sample="given"``, else
        ``choose_engine``'s pick."""
        if self.mechanism is None:
            return "none"
        if per_sample == "given":
            return "unit_vectors"
        return choose_engine(per_sample, trainable_numel=trainable_numel, micro_batch_size=micro_batch_size,
                             memory_gb=memory_gb)

    def engine(self, model, *, params, device, per_sample: str, micro_batch_size: int, memory_gb: float,
               param_groups: dict[str, list[int]] | None = None, gradient_canaries: GradientCanaries | None = None):
        """The clipping engine for this plan (``dpdiff.privacy.engines``: hooks or book-keeping, both exact; its
        ``kind`` says which), its noise from fresh entropy, with its observers: ``param_groups`` for the SNR
        statistics, and the opt-in ``gradient_canaries`` audit, scored beside each step's released sum on the main
        process with this mechanism's q, sigma and C and coins from their own full-entropy stream (refused without
        privacy and on a resumed run, whose earlier steps' scores were never seen by this process).
        ``per_sample="given"``: the caller computes each unit's vector itself (``DPSGDEngine.add_unit_vectors``)."""
        from dpdiff.privacy.engines import DPSGDEngine, NonPrivateEngine, get_engine_class

        kind = self.engine_kind(per_sample, trainable_numel=sum(p.numel() for p in params),
                                micro_batch_size=micro_batch_size, memory_gb=memory_gb)
        hook = self._gradient_canary_hook(gradient_canaries, params) if gradient_canaries is not None else None
        if self.mechanism is None:
            return NonPrivateEngine(model, params=params)
        kw = dict(noise_multiplier=self.mechanism.noise_multiplier, max_grad_norm=self.settings.max_grad_norm,
                  expected_batch_size=self.mechanism.expected_batch_size, noise=self.randomness.noise(device),
                  params=params, param_groups=param_groups, gradient_canaries=hook)
        if kind == "unit_vectors":
            return DPSGDEngine(model, hooks=False, **kw)
        return get_engine_class(kind)(model, **kw)

    def _gradient_canary_hook(self, canaries: GradientCanaries, params) -> GradientCanaryHook | None:
        check_gradient_canaries(canaries.count, dp=self.mechanism is not None, resuming=self.resume is not None)
        if not self.is_main:  # the noise is added, and the released sum read, on the main process
            return None
        m = self.mechanism
        return GradientCanaryHook(canaries, shapes=[tuple(p.shape) for p in params],
                                  noise_multiplier=m.noise_multiplier, sample_rate=m.sample_rate,
                                  clip_norm=self.settings.max_grad_norm, rng=self.randomness.canary_rng())

    # -------------------------------------------------------------------------- description
    def describe(self) -> str:
        m = self.mechanism
        if m is None:
            return "NO differential privacy"
        s = self.settings
        return (f"DP-SGD q={m.sample_rate:.4g} sigma={m.noise_multiplier:.4g} C={s.max_grad_norm:g} K={s.augmult} "
                f"planned epsilon {m.epsilon_planned:.3f} (delta {m.delta:.2g}, {s.accountant})")
