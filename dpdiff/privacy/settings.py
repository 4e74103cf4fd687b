"""Privacy settings: every ``privacy.*`` key validated in one place, with uniform messages, before any
private data is read.

Follows jax_privacy's split between the mechanism (this module: everything that changes the
guarantee) and performance knobs (micro-batch size, precision, caching, the clipping engine),
which cannot change it (``_validate.py`` there: one function per concern, one message shape). What
needs the data (q <= 1, delta < 1/N, the noise calibration) is checked when the privacy plan is
built (``dpdiff.privacy.plan``), still before any pixel is encoded.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from dpdiff.errors import UserError
from dpdiff.privacy.accountants import available_accountants

UNITS = ("example", "user")


def _fail(key: str, value, must: str) -> UserError:
    return UserError(f"privacy.{key}={value}: {must}")


@dataclass(frozen=True, kw_only=True)
class PrivacySettings:
    enabled: bool
    target_epsilon: float | None
    delta: float | None  # None: chosen from the unit count (see default_delta)
    max_grad_norm: float | None
    accountant: str
    augmult: int
    unit: str
    max_images_per_user: int | None
    noise_multiplier: float | None  # None: calibrated to target_epsilon
    reproducible_noise: bool  # noise and masks from train.seed: debugging only, no guarantee across runs
    secure_rng: bool  # noise and masks from a ChaCha20 keystream (randomness.py), not PCG64DXSM/Philox
    dataset_budget: float | None  # cap on the dataset's composed epsilon over all runs
    dataset_delta: float | None  # delta at which the dataset's total is stated
    dataset_ledger: str | None  # ledger file; None = next to the data (or under DPDIFF_HOME)

    @classmethod
    def from_config(cls, cfg) -> PrivacySettings:
        from dpdiff.schema import required

        get = lambda k: required(cfg, k)  # noqa: E731 (every key required: the defaults are the YAML's alone)
        s = cls(
            enabled=bool(get("enabled")),
            target_epsilon=_num(get("target_epsilon"), "target_epsilon"),
            delta=_num(get("delta"), "delta"),
            max_grad_norm=_num(get("max_grad_norm"), "max_grad_norm"),
            accountant=str(get("accountant")),
            augmult=_int(get("augmult"), "augmult"),
            unit=str(get("unit")),
            max_images_per_user=_int(get("max_images_per_user"), "max_images_per_user"),
            noise_multiplier=_num(get("noise_multiplier"), "noise_multiplier"),
            reproducible_noise=_bool(get("reproducible_noise"), "reproducible_noise"),
            secure_rng=_bool(get("secure_rng"), "secure_rng"),
            dataset_budget=_num(get("dataset_budget"), "dataset_budget"),
            dataset_delta=_num(get("dataset_delta"), "dataset_delta"),
            dataset_ledger=None if get("dataset_ledger") in (None, "") else str(get("dataset_ledger")),
        )
        s.validate()
        return s

    def validate(self) -> None:
        if self.unit not in UNITS:
            raise _fail("unit", self.unit, f"must be one of {', '.join(UNITS)}")
        if self.augmult is None or self.augmult < 1:
            raise _fail("augmult", self.augmult, "must be an integer >= 1 (draws averaged per unit before clipping)")
        if self.max_images_per_user is not None and self.max_images_per_user < 1:
            raise _fail("max_images_per_user", self.max_images_per_user, "must be >= 1 or null")
        if self.dataset_budget is not None and not (self.dataset_budget > 0 and math.isfinite(self.dataset_budget)):
            raise _fail("dataset_budget", self.dataset_budget, "must be a positive finite number or null")
        if self.dataset_delta is not None and not (0 < self.dataset_delta < 1):
            raise _fail("dataset_delta", self.dataset_delta, "must be in (0, 1) or null")
        if self.accountant not in available_accountants():
            raise _fail("accountant", self.accountant, f"must be one of {', '.join(available_accountants())}")
        if not self.enabled:
            return
        if self.secure_rng:
            import numpy as np

            from dpdiff.privacy.randomness import secure_bit_generator

            secure_bit_generator(np.random.SeedSequence(0))  # refuses now, not after the data is read
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
    if not math.isfinite(f) or f != int(f):
        raise _fail(key, v, "must be an integer")
    return int(f)


def _bool(v, key):
    if isinstance(v, bool):
        return v
    raise _fail(key, v, "must be true or false")


def default_delta(num_units: int) -> float:
    """min(1e-5, 1/(10 N)): comfortably below 1/N, the level at which DP allows leaking one unit."""
    return min(1e-5, 1.0 / (10.0 * num_units))
