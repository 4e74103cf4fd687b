"""LiRA: the likelihood-ratio membership attack with shadow models (Carlini et al., "Membership Inference
Attacks From First Principles", IEEE S&P 2022), in its offline (OUT-shadows-only) form, for diffusion models.

For each probed image x (members and held-out non-members alike) and each of T fixed timesteps, the
feature is ``log`` of the denoising loss averaged over D noise draws shared by every image and model (the
same draws as the loss attacks'). K *shadow* adapters are trained the way the run was (same adapter, rank,
optimizer, learning rate, steps and batch size; without clipping and noise) on images that no probed image
is among; each shadow thus gives an OUT observation of every probed image. Per image and timestep the OUT
observations are fitted by a Gaussian ``N(mu_x, sigma^2)`` (Carlini et al.'s "fixed variance" pooled over
images below ``per_example_variance_from`` shadows, which their Fig. 8 finds better with few shadows), and the
score is the mean over timesteps of ``(mu_x - obs_x) / sigma``: how far below its OUT distribution the target's
loss lies, in OUT standard deviations (a one-sided Gaussian likelihood ratio; higher = member).

Why the verdict stays valid. The one-run analysis of the member / held-out split needs the score of a probed
image to depend on the split only through the target model. The shadows' training images are drawn
content-blind from the units that are *not* probed (members and held-out: the standard DP adversary knows
every other record), with the attack's own seeded randomness, so they are the same whatever the probed
units' coins. Online LiRA (IN shadows, trained on half of the probed images each) is not implemented: it
doubles the cost and, for a DP-trained target, Carlini et al. found offline within a few points of online at
low FPR.

Cost: ``shadows x steps x batch_size`` training rows (forward and backward, no per-sample gradients), plus
``shadows x 2n x T x D`` denoiser evaluations for the scores. LoRA shadows are a second adapter on the same
denoiser (no copy of the base weights); full and attention fine-tuning copy the base denoiser per shadow.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from dpdiff.errors import UserError
from dpdiff.probes.context import ProbeContext, denoising_losses, encode_captions, encode_images
from dpdiff.schema import required

log = logging.getLogger("dpdiff")

SHADOW_ADAPTER = "dpdiff_lira_shadow"
#: fewest images outside the probed units from which shadows are trained (each on a share of them)
MIN_POOL = 8


@dataclass(frozen=True)
class ShadowRecipe:
    """How the run was trained (read from its config): what each shadow repeats."""

    adapter_kind: str
    rank: int
    alpha: float | None
    target_modules: tuple[str, ...] | None
    optimizer: str
    lr: float
    betas: tuple[float, float]
    weight_decay: float
    adam_epsilon: float
    lr_scheduler: str
    warmup_steps: int
    steps: int
    batch_size: int
    micro_batch_size: int
    mixed_precision: str  # the run's train.mixed_precision: shadows run their forward the same way

    @classmethod
    def shipped(cls, adapter_kind: str = "lora", **changes) -> ShadowRecipe:
        """The recipe of a run trained with the shipped defaults (configs/, ``auto`` schedule at the demo's size),
        with ``changes``: for a context that does not say how its run was trained."""
        from dataclasses import replace

        from dpdiff.privacy.planning import AUTO_BATCH, AUTO_STEPS
        from dpdiff.schema import compose

        r = cls.from_config(compose([f"adapter={adapter_kind}"]),
                            schedule={"batch_size": AUTO_BATCH, "max_steps": AUTO_STEPS})
        return replace(r, **changes)

    @classmethod
    def from_config(cls, cfg, *, schedule: dict | None = None) -> ShadowRecipe:
        """From a run's composed config (its ``adapter`` and ``train`` groups) and the batch size and steps it
        trained with (``schedule``, privacy.json's record: what ``auto`` resolved to)."""
        a, t = required(cfg, "adapter"), dict(required(cfg, "train"))
        for k in ("batch_size", "max_steps"):
            if schedule is not None and schedule.get(k) is not None:
                t[k] = schedule[k]
            elif t.get(k) == "auto":
                raise ValueError(f"train.{k}=auto: the run's resolved schedule (privacy.json) is needed")
        tm = required(a, "target_modules")
        alpha = required(a, "alpha")
        return cls(adapter_kind=str(required(a, "kind")), rank=int(required(a, "rank") or 4),
                   alpha=None if alpha is None else float(alpha),
                   target_modules=None if tm is None else tuple(str(x) for x in tm),
                   optimizer=str(required(t, "optimizer")), lr=float(required(t, "lr")),
                   betas=(float(required(t, "adam_beta1")), float(required(t, "adam_beta2"))),
                   weight_decay=float(required(t, "weight_decay") or 0.0),
                   adam_epsilon=float(required(t, "adam_epsilon")),
                   lr_scheduler=str(required(t, "lr_scheduler")),
                   warmup_steps=int(required(t, "lr_warmup_steps") or 0), steps=int(required(t, "max_steps")),
                   batch_size=int(float(required(t, "batch_size"))),
                   micro_batch_size=int(required(t, "micro_batch_size")),
                   mixed_precision=str(required(t, "mixed_precision")))


@dataclass(frozen=True)
class LiraSettings:
    """``probes.mia.lira.*`` (configs/probes/default.yaml holds the defaults and what each key means)."""

    shadows: int
    steps: int | None  # None: the run's steps
    batch_size: int | None  # None: the run's (expected) batch size
    lr: float | None  # None: the run's
    pool_units: int  # images the shadows draw their training sets from (encoded once)
    # each shadow trains on this random share of the pool (Carlini et al.: half), at most as many images as the
    # run trained on (a shadow on fewer images over-fits them more than the target did its own)
    shadow_fraction: float
    per_example_variance_from: int  # shadows from which sigma is fitted per image rather than pooled

    @property
    def runs(self) -> bool:
        """Whether LiRA is asked for (the two shadows a variance needs; shadows=0 switches it off)."""
        return self.shadows >= 2

    @classmethod
    def from_config(cls, cfg) -> LiraSettings:
        c = dict(cfg or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(c) - known)
        if unknown:
            raise UserError(f"probes.mia.lira: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
        s = cls(**{k: required(c, k) for k in cls.__dataclass_fields__})
        if s.shadows < 0 or s.shadows == 1:
            raise UserError(f"probes.mia.lira.shadows must be 0 (off) or >= 2 (a variance needs two), got {s.shadows}")
        if not 0.0 < s.shadow_fraction <= 1.0:
            raise UserError(f"probes.mia.lira.shadow_fraction must be in (0, 1], got {s.shadow_fraction}")
        if s.pool_units < 2:
            raise UserError(f"probes.mia.lira.pool_units must be >= 2, got {s.pool_units}")
        return s


def shadow_pool(ctx: ProbeContext, probed: list[int], *, size: int, seed: int) -> list[int]:
    """Up to ``size`` records, drawn uniformly (seeded, content-blind) among the records of units not probed."""
    probed_units = {ctx.unit_key(i) for i in probed}
    candidates = [i for i in sorted(set(ctx.member_records) | set(ctx.nonmember_records))
                  if ctx.unit_key(i) not in probed_units]
    if len(candidates) <= size:
        return candidates
    rng = np.random.default_rng([seed, 0x11A])
    return sorted(rng.choice(candidates, size=size, replace=False).tolist())


@contextlib.contextmanager
def _shadow_denoiser(ctx: ProbeContext, recipe: ShadowRecipe):
    """A fresh shadow: a new LoRA adapter on the target's denoiser (the target's own adapter inactive), or a
    copy of the base denoiser with the run's trainable part. Yields (model, trainable parameters); afterwards
    the target denoiser is as it was."""
    from dpdiff.models.adapters import attach

    if ctx.adapter_kind == "lora" and recipe.adapter_kind == "lora":
        from peft import LoraConfig

        den = ctx.denoiser
        active = list(den.active_adapters())
        grad_flags = {n: p.requires_grad for n, p in den.named_parameters()}
        was_training = den.training
        targets = list(recipe.target_modules or ["to_q", "to_k", "to_v", "to_out.0"])
        with warnings.catch_warnings():  # peft warns that the model now holds two adapters: that is the point
            warnings.simplefilter("ignore", UserWarning)
            den.add_adapter(LoraConfig(r=recipe.rank, lora_alpha=float(recipe.alpha if recipe.alpha is not None
                                                                    else recipe.rank),
                                       init_lora_weights="gaussian", target_modules=targets),
                            adapter_name=SHADOW_ADAPTER)
        try:
            den.set_adapters([SHADOW_ADAPTER])
            params = []
            for name, p in den.named_parameters():
                mine = f".{SHADOW_ADAPTER}." in name
                p.requires_grad_(mine)
                if mine:
                    p.data = p.data.float()
                    params.append(p)
            yield den, params
        finally:
            with warnings.catch_warnings():  # "the active adapter was deleted": it is set back just below
                warnings.simplefilter("ignore", UserWarning)
                den.delete_adapters(SHADOW_ADAPTER)
            den.set_adapters(active)
            for n, p in den.named_parameters():
                p.requires_grad_(grad_flags.get(n, False))
            den.train(was_training)
        return
    with ctx.base_model() as base:
        shadow = copy.deepcopy(base)
    params = attach(shadow, kind=recipe.adapter_kind, rank=recipe.rank, alpha=recipe.alpha,
                    target_modules=list(recipe.target_modules) if recipe.target_modules else None)
    try:
        yield shadow, params
    finally:
        del shadow


def train_shadow(ctx: ProbeContext, model, params, *, latents: torch.Tensor, records: list[int], recipe: ShadowRecipe,
                 steps: int, batch_size: int, lr: float, seed: int) -> list[float]:
    """Train one shadow, as the run trained (its objective, optimizer, schedule), without clipping and noise:
    ``steps`` steps of ``batch_size`` images drawn without replacement from ``records`` (whose latents are
    ``latents``), split into micro-batches. Returns the loss per step."""
    from diffusers.optimization import get_scheduler

    from dpdiff.training.loss import RowBatch

    if recipe.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=recipe.betas[0], weight_decay=recipe.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=lr, betas=recipe.betas, weight_decay=recipe.weight_decay,
                                eps=recipe.adam_epsilon)
    sched = get_scheduler(recipe.lr_scheduler, optimizer=opt, num_warmup_steps=min(recipe.warmup_steps, steps),
                          num_training_steps=steps)
    obj = ctx.objective()
    g = torch.Generator().manual_seed(int(seed))
    rng = np.random.default_rng(int(seed))
    n_timesteps = int(obj.num_train_timesteps)
    micro = max(1, int(recipe.micro_batch_size))
    from dpdiff.training.precision import autocast_dtype

    amp = autocast_dtype(recipe.mixed_precision, torch.device(ctx.device))
    autocast = (lambda: torch.autocast(device_type=torch.device(ctx.device).type, dtype=amp)) if amp is not None \
        else contextlib.nullcontext
    model.train()
    losses = []
    for _ in range(int(steps)):
        pick = rng.choice(len(records), size=min(batch_size, len(records)), replace=False)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for s in range(0, len(pick), micro):
            part = pick[s : s + micro]
            recs = [ctx.records[records[i]] for i in part]
            lat = latents[torch.as_tensor(part)]
            cond = encode_captions(ctx, [r.text for r in recs], recs)
            rows = RowBatch(latents=lat, noise=torch.randn(lat.shape, generator=g),
                            timesteps=torch.randint(0, n_timesteps, (len(part),), generator=g),
                            encoder_hidden_states=cond["encoder_hidden_states"], unit_pos=torch.arange(len(part)),
                            row_weight=torch.ones(len(part)), num_units=len(part),
                            added={k: v for k, v in cond.items() if k != "encoder_hidden_states"}).to(ctx.device)
            with autocast():  # as the run's trainer does (frozen low-precision weights, fp32 trainable ones)
                loss = obj.row_losses(model, rows).float().sum() / len(pick)
            loss.backward()
            total += float(loss.detach())
        opt.step()
        sched.step()
        losses.append(total)
    model.eval()
    return losses


def lira_scores(target_losses: torch.Tensor, shadow_losses: torch.Tensor, *, per_example_variance_from: int = 16
                ) -> tuple[np.ndarray, dict]:
    """Offline LiRA scores (higher = member) from the target's losses ``[N, T, D]`` and the OUT shadows'
    ``[K, N, T, D]`` (the same images, timesteps and noise draws).

    Feature per (image, timestep): log of the loss averaged over the draws (log makes a loss's spread across
    models close to Gaussian, as Carlini et al.'s logit scaling does for confidences). sigma per timestep is
    pooled over images (fixed variance) below ``per_example_variance_from`` shadows, else per image. Score:
    the mean over timesteps of ``(mu_out - obs) / sigma``."""
    obs = torch.log(target_losses.double().mean(-1).clamp_min(1e-30)).numpy()  # [N, T]
    out = torch.log(shadow_losses.double().mean(-1).clamp_min(1e-30)).numpy()  # [K, N, T]
    k = out.shape[0]
    if k < 2:
        raise ValueError("LiRA needs at least two shadow models to fit a variance")
    mu = out.mean(0)
    resid = out - mu
    per_example = k >= int(per_example_variance_from)
    if per_example:
        sigma = resid.std(0, ddof=1)
    else:  # pooled over images, per timestep: N (K - 1) degrees of freedom
        sigma = np.sqrt((resid**2).sum(axis=(0, 1)) / (out.shape[1] * (k - 1)))[None, :]
    sigma = np.maximum(sigma, 1e-12)
    z = (mu - obs) / sigma
    info = {"variance": "per image" if per_example else "pooled over images (fixed variance)",
            "sigma_log_loss_median": float(np.median(sigma)),
            "mean_log_loss_gap": float(np.mean(mu - obs))}
    return z.mean(1), info


def run_lira(ctx: ProbeContext, settings: LiraSettings, recipe: ShadowRecipe, *, probed: list[int],
             latents: torch.Tensor, cond: dict[str, torch.Tensor], target_losses: torch.Tensor, timesteps: list[int],
             noises: torch.Tensor) -> tuple[np.ndarray, dict]:
    """Train ``settings.shadows`` OUT shadows and score the ``probed`` records (their ``latents`` / ``cond``,
    the target's ``target_losses`` at ``timesteps`` under ``noises``). Returns the scores (order of ``probed``)
    and what was done (for probes.json)."""
    import time

    t0 = time.time()
    pool = shadow_pool(ctx, probed, size=settings.pool_units, seed=ctx.seed)
    if len(pool) < MIN_POOL:
        raise UserError(f"probes.mia.lira: {len(pool)} images outside the probed units to train shadows on, fewer "
                        f"than {MIN_POOL}; probe fewer members (probes.mia.members) or set probes.mia.lira.shadows=0")
    trained_units = len({ctx.unit_key(i) for i in ctx.member_records})
    per_shadow = max(1, min(trained_units, int(round(settings.shadow_fraction * len(pool)))))
    steps = int(settings.steps if settings.steps is not None else recipe.steps)
    batch = min(int(settings.batch_size if settings.batch_size is not None else recipe.batch_size), per_shadow)
    lr = float(settings.lr if settings.lr is not None else recipe.lr)
    log.info("LiRA: %d shadow %s models, %d steps of %d images each, from %d images outside the probed units",
             settings.shadows, recipe.adapter_kind, steps, batch, len(pool))
    pool_latents = encode_images(ctx, [ctx.records[i] for i in pool])
    obj = ctx.objective()
    shadow_losses, final_losses = [], []
    for k in range(settings.shadows):
        rng = np.random.default_rng([ctx.seed, 0x5AD, k])
        subset = np.sort(rng.choice(len(pool), size=per_shadow, replace=False))
        with _shadow_denoiser(ctx, recipe) as (model, params):
            if not params:
                raise UserError("probes.mia.lira: the shadow model has no trainable weights")
            curve = train_shadow(ctx, model, params, latents=pool_latents[torch.as_tensor(subset)],
                                 records=[pool[i] for i in subset], recipe=recipe, steps=steps, batch_size=batch,
                                 lr=lr, seed=int(rng.integers(2**62)))
            with torch.no_grad():
                shadow_losses.append(denoising_losses(model, obj, latents, cond, timesteps=timesteps, noises=noises,
                                                      device=ctx.device))
        final_losses.append(float(np.mean(curve[-max(1, len(curve) // 10):])) if curve else math.nan)
    scores, info = lira_scores(target_losses, torch.stack(shadow_losses),
                               per_example_variance_from=settings.per_example_variance_from)
    return scores, {
        "shadows": settings.shadows, "kind": "offline (OUT shadows only)", "shadow_adapter": recipe.adapter_kind,
        "steps": steps, "batch_size": batch, "lr": lr, "pool_images": len(pool), "images_per_shadow": per_shadow,
        "training_rows": settings.shadows * steps * batch,
        "denoiser_evaluations": settings.shadows * int(target_losses.numel()),
        "shadow_final_loss": final_losses, "seconds": round(time.time() - t0, 2), **info,
        "note": ("shadows trained as the run was (adapter, optimizer, learning rate, steps, batch) but without "
                 "clipping and noise, on images of units that are not probed; score: the target's log loss below "
                 "the shadows' Gaussian fit, in their standard deviations, averaged over the timesteps"),
    }
