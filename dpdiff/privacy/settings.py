"""Privacy settings: validated in one place, with uniform messages, before any private data is read.

Follows jax_privacy's split between the mechanism (this module: everything that changes the
guarantee) and performance knobs (micro-batch size, precision, caching), which cannot change
it. ``PrivacySettings.from_config`` checks what needs no data; ``resolve_mechanism`` checks
what needs the unit count (q <= 1, delta < 1/N) and calibrates the noise multiplier.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from dpdiff.errors import UserError
from dpdiff.privacy.accountants import (
    MechanismSegment,
    available_accountants,
    calibrate_noise_multiplier,
    epsilon_after,
    get_accountant,
    max_steps_within,
)

UNITS = ("example", "user")


def _fail(key: str, value, must: str) -> UserError:
    return UserError(f"privacy.{key}={value}: {must}")


@dataclass(frozen=True)
class PrivacySettings:
    enabled: bool
    target_epsilon: float | None
    delta: float | None  # None: chosen from the unit count (see default_delta)
    max_grad_norm: float
    accountant: str
    augmult: int
    unit: str
    max_images_per_user: int | None
    secure_rng: bool
    noise_multiplier: float | None  # None: calibrated to target_epsilon

    @classmethod
    def from_config(cls, cfg) -> PrivacySettings:
        get = (lambda k, d=None: cfg.get(k, d)) if hasattr(cfg, "get") else (lambda k, d=None: getattr(cfg, k, d))
        enabled = bool(get("enabled", True))
        s = cls(
            enabled=enabled,
            target_epsilon=_num(get("target_epsilon"), "target_epsilon"),
            delta=_num(get("delta"), "delta"),
            max_grad_norm=_num(get("max_grad_norm", 1.0), "max_grad_norm"),
            accountant=str(get("accountant", "prv")),
            augmult=_int(get("augmult", 1), "augmult"),
            unit=str(get("unit", "example")),
            max_images_per_user=_int(get("max_images_per_user"), "max_images_per_user"),
            secure_rng=bool(get("secure_rng", False)),
            noise_multiplier=_num(get("noise_multiplier"), "noise_multiplier"),
        )
        s.validate()
        return s

    def validate(self) -> None:
        if self.unit not in UNITS:
            raise _fail("unit", self.unit, f"must be one of {', '.join(UNITS)}")
        if self.augmult < 1:
            raise _fail("augmult", self.augmult, "must be an integer >= 1 (draws averaged per unit before clipping)")
        if self.max_images_per_user is not None and self.max_images_per_user < 1:
            raise _fail("max_images_per_user", self.max_images_per_user, "must be >= 1 or null")
        if not self.enabled:
            return
        if self.accountant not in available_accountants():
            raise _fail("accountant", self.accountant, f"must be one of {', '.join(available_accountants())}")
        if self.max_grad_norm is None or not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise _fail("max_grad_norm", self.max_grad_norm, "must be a positive number (the clipping bound C)")
        if self.target_epsilon is None and self.noise_multiplier is None:
            raise UserError("privacy: set privacy.target_epsilon (to calibrate the noise) or privacy.noise_multiplier; "
                            "for a non-private baseline use privacy=none")
        if self.target_epsilon is not None and not (self.target_epsilon > 0 and math.isfinite(self.target_epsilon)):
            raise _fail("target_epsilon", self.target_epsilon, "must be a positive finite number")
        sigma = self.noise_multiplier
        if sigma is not None and not (sigma > 0 and math.isfinite(sigma)):
            raise _fail("noise_multiplier", self.noise_multiplier,
                        "must be a positive number (for no noise at all use privacy=none, which is labelled "
                        "non-private)")
        if self.delta is not None and not (0 < self.delta < 1):
            raise _fail("delta", self.delta, "must be in (0, 1) and well below 1/num_units")

    def to_dict(self) -> dict:
        return asdict(self)


def _num(v, key):
    if v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        raise _fail(key, v, "must be a number") from None


def _int(v, key):
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise _fail(key, v, "must be an integer") from None
    if f != int(f):
        raise _fail(key, v, "must be an integer")
    return int(f)


def default_delta(num_units: int) -> float:
    """min(1e-5, 1/(10 N)): comfortably below 1/N, the level at which DP allows leaking one unit."""
    return min(1e-5, 1.0 / (10.0 * num_units))


@dataclass(frozen=True)
class Mechanism:
    """The resolved DP-SGD mechanism of a run (what the accountant sees)."""

    noise_multiplier: float
    sample_rate: float
    num_units: int
    expected_batch_size: float
    delta: float
    steps: int  # planned ledger steps: those already in the ledger plus this run's
    epsilon_planned: float

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_mechanism(settings: PrivacySettings, *, num_units: int, batch_size: float, steps: int,
                      history: list[MechanismSegment] | None = None, remaining_steps: int | None = None) -> Mechanism:
    """Sample rate, delta and noise multiplier for a run of ``steps`` total steps on ``num_units`` units.

    ``history`` is the ledger of a resumed run: its segments are composed first, and a run whose
    total would exceed the target epsilon is refused (with the number of steps that would fit).
    ``remaining_steps`` (default ``steps`` minus the ledger's steps) is what this run will still take;
    after a crash the ledger also counts steps whose weights were discarded, so it can be more.
    """
    if num_units < 1:
        raise UserError("the training set has no privacy units")
    if batch_size <= 0:
        raise UserError(f"train.batch_size={batch_size}: must be > 0")
    q = batch_size / num_units
    if q > 1:
        raise UserError(f"train.batch_size={batch_size:g} is larger than the {num_units} privacy units "
                        f"(sample rate q={q:.3g} > 1); lower train.batch_size to at most {num_units}")
    delta = settings.delta if settings.delta is not None else default_delta(num_units)
    if delta >= 1.0 / num_units:
        raise _fail("delta", settings.delta, f"must be < 1/num_units = {1.0 / num_units:.3g} ({num_units} units); "
                    "with delta >= 1/N a mechanism may publish a whole unit. Lower privacy.delta")
    history = list(history or [])
    done = sum(s.steps for s in history)
    remaining = steps - done if remaining_steps is None else remaining_steps
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
    eps = epsilon_after(accountant=acc, history=history, noise_multiplier=sigma, sample_rate=q,
                        steps=max(remaining, 0), delta=delta)
    if settings.target_epsilon is not None and eps > settings.target_epsilon:
        fit = max_steps_within(target_epsilon=settings.target_epsilon, delta=delta, noise_multiplier=sigma,
                               sample_rate=q, accountant=acc, history=history)
        raise UserError(
            f"train.max_steps={steps} would spend epsilon {eps:.3f} > privacy.target_epsilon="
            f"{settings.target_epsilon:g} ({done} steps already spent); at most {done + fit} steps fit: "
            f"set train.max_steps<={done + fit}")
    return Mechanism(noise_multiplier=float(sigma), sample_rate=q, num_units=num_units,
                     expected_batch_size=q * num_units, delta=delta, steps=done + max(remaining, 0),
                     epsilon_planned=float(eps))
