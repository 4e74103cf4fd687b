"""The denoising objectives (DDPM for SD/SDXL, flow matching for SD3/Flux), one loss per row.

A *row* is one (image, augmentation draw): a latent, a noise draw, a timestep, a horizontal
flip and its text embedding. Rows belong to privacy units; the DP engine averages a unit's
rows before clipping. The objective matches diffusers' ``train_text_to_image_lora.py``:
epsilon or v targets as the scheduler's ``prediction_type`` says, optional min-SNR-gamma
weighting (Hang et al. 2023), MSE averaged over latent dimensions, here kept per row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dpdiff.models.families import FAMILIES, Family, predict


@dataclass
class RowBatch:
    """Rows of one micro-batch. ``unit_pos[r]`` is row r's unit (0..num_units-1)."""

    latents: torch.Tensor  # [R, C, H, W], already scaled by the VAE's scaling_factor
    noise: torch.Tensor  # [R, C, H, W]
    timesteps: torch.Tensor  # [R] long
    encoder_hidden_states: torch.Tensor  # [R, T, D]
    unit_pos: torch.Tensor  # [R] long
    row_weight: torch.Tensor  # [R]; the rows of a unit sum to 1
    num_units: int
    added: dict[str, torch.Tensor] = field(default_factory=dict)  # per-row conditioning: SDXL's text_embeds
    #                                       and time_ids, SD3's and Flux's pooled_projections ([R, ...] each)
    caption: torch.Tensor | None = None  # [R] long: each row's caption (a row of the features' caption table)

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    def to(self, device, dtype=None) -> RowBatch:
        f = lambda t: t.to(device=device, dtype=dtype) if dtype is not None and t.is_floating_point() else t.to(device)
        return RowBatch(f(self.latents), f(self.noise), self.timesteps.to(device), f(self.encoder_hidden_states),
                        self.unit_pos.to(device), self.row_weight.to(device), self.num_units,
                        {k: f(v) for k, v in self.added.items()}, self.caption)

    def select(self, rows: torch.Tensor, *, unit_pos: torch.Tensor, num_units: int) -> RowBatch:
        """The rows ``rows`` (indices), renumbered into ``num_units`` units by ``unit_pos``."""
        return RowBatch(self.latents[rows], self.noise[rows], self.timesteps[rows], self.encoder_hidden_states[rows],
                        unit_pos, self.row_weight[rows], num_units, {k: v[rows] for k, v in self.added.items()},
                        None if self.caption is None else self.caption[rows.cpu()])


def _added(cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in cond.items() if k != "encoder_hidden_states"}


def epsilon_from_prediction(pred: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor, *,
                            prediction_type: str) -> torch.Tensor:
    """The noise estimate behind a UNet output: itself for epsilon prediction; for v prediction
    (Salimans & Ho 2022, ``v = sqrt(a) eps - sqrt(1 - a) x0``) ``eps = sqrt(a) v + sqrt(1 - a) x_t``."""
    if prediction_type == "epsilon":
        return pred
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * pred + (1 - alpha_bar).sqrt() * x_t
    raise ValueError(f"unsupported prediction_type {prediction_type!r} (epsilon or v_prediction)")


class DiffusionObjective:
    def __init__(self, noise_scheduler, *, prediction_type: str | None = None, snr_gamma: float | None = None,
                 family: Family | None = None):
        self.family = family or FAMILIES["sd"]
        if self.family.objective != "ddpm":
            raise ValueError(f"{self.family.name} is trained by flow matching: use FlowMatchingObjective")
        self.scheduler = noise_scheduler
        self.prediction_type = prediction_type or noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r} (epsilon or v_prediction)")
        self.snr_gamma = snr_gamma
        self.num_train_timesteps = int(noise_scheduler.config.num_train_timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        return self.scheduler.get_velocity(latents, noise, timesteps)

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, timesteps)

    def noise_estimate(self, model, x_t: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]
                       ) -> torch.Tensor:
        """The noise the model sees in ``x_t`` at ``timesteps`` (PIA's epsilon_theta), float32."""
        pred = predict(model, family=self.family, noisy=x_t, timesteps=timesteps,
                       encoder_hidden_states=cond["encoder_hidden_states"], added=_added(cond)).float()
        abar = self.scheduler.alphas_cumprod.to(x_t.device)[timesteps.long()].float()
        return epsilon_from_prediction(pred, x_t.float(), abar.view(-1, *[1] * (x_t.dim() - 1)),
                                       prediction_type=self.prediction_type)

    def row_losses(self, unet, rows: RowBatch) -> torch.Tensor:
        """Per-row MSE between the UNet's prediction and the target, shape [R]."""
        noisy = self.noisy(rows.latents, rows.noise, rows.timesteps)
        pred = predict(unet, family=self.family, noisy=noisy, timesteps=rows.timesteps,
                       encoder_hidden_states=rows.encoder_hidden_states, added=rows.added)
        target = self.target(rows.latents, rows.noise, rows.timesteps)
        loss = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
        if self.snr_gamma is not None:
            from diffusers.training_utils import compute_snr

            snr = compute_snr(self.scheduler, rows.timesteps)
            weight = torch.clamp(snr, max=self.snr_gamma) / snr
            if self.prediction_type == "v_prediction":
                weight = torch.clamp(snr, max=self.snr_gamma) / (snr + 1)
            loss = loss * weight.to(loss)
        return loss


class FlowMatchingObjective:
    """Rectified flow as SD3 and Flux are trained (``train_dreambooth_lora_sd3.py`` / ``_flux.py``): row r's step
    ``rows.timesteps`` t in 0..N-1 selects sigma and the model's timestep of the training copy of the
    ``FlowMatchEulerDiscreteScheduler`` (its shift included), ordered as DDPM's: t = 0 is the least noise, N-1 the
    most (the scheduler stores them the other way round), so ``train.timestep_range`` and the probes' timesteps
    mean the same on every family. ``x_t = (1 - sigma) x_0 + sigma * noise``, the target is ``noise - x_0``, the
    loss the per-row MSE. Steps are drawn uniformly (the scripts' ``weighting_scheme="none"``); their
    logit-normal density is not offered."""

    prediction_type = "flow"

    def __init__(self, noise_scheduler, *, family: Family):
        if family.objective != "flow":
            raise ValueError(f"{family.name} is not a flow-matching model")
        self.family, self.scheduler = family, noise_scheduler
        self.num_train_timesteps = int(noise_scheduler.config.num_train_timesteps)
        self._sigmas = torch.as_tensor(noise_scheduler.sigmas, dtype=torch.float32)[: self.num_train_timesteps]
        self._timesteps = torch.as_tensor(noise_scheduler.timesteps, dtype=torch.float32)[: self.num_train_timesteps]

    def _sigma_and_time(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sigma (broadcastable to ``like``) and the model's timestep of steps t (0 = least noise)."""
        idx = self.num_train_timesteps - 1 - timesteps.long().cpu()
        sigma = self._sigmas[idx].to(like.device, like.dtype).view(-1, *([1] * (like.dim() - 1)))
        return sigma, self._timesteps[idx].to(like.device, like.dtype)

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        s, _ = self._sigma_and_time(timesteps, latents)
        return (1.0 - s) * latents + s * noise

    def noise_estimate(self, model, x_t: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]
                       ) -> torch.Tensor:
        """The noise behind ``x_t`` by the predicted velocity v = noise - x0: ``x_t + (1 - sigma) v``, float32."""
        s, t = self._sigma_and_time(timesteps, x_t)
        v = predict(model, family=self.family, noisy=x_t, timesteps=t,
                    encoder_hidden_states=cond["encoder_hidden_states"], added=_added(cond)).float()
        return x_t.float() + (1.0 - s.float()) * v

    def row_losses(self, model, rows: RowBatch) -> torch.Tensor:
        _, t = self._sigma_and_time(rows.timesteps, rows.latents)
        noisy = self.noisy(rows.latents, rows.noise, rows.timesteps)
        pred = predict(model, family=self.family, noisy=noisy, timesteps=t,
                       encoder_hidden_states=rows.encoder_hidden_states, added=rows.added)
        target = rows.noise - rows.latents
        return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def make_objective(family: Family, noise_scheduler, *, snr_gamma: float | None = None):
    """The family's training objective: DDPM (epsilon / v, optional min-SNR weighting) or flow matching."""
    if family.objective == "flow":
        if snr_gamma is not None:
            from dpdiff.errors import UserError

            raise UserError(f"train.snr_gamma applies to DDPM models; {family.name} is trained by flow matching "
                            "(set train.snr_gamma=null)")
        return FlowMatchingObjective(noise_scheduler, family=family)
    return DiffusionObjective(noise_scheduler, snr_gamma=snr_gamma, family=family)
