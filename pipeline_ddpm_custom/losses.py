"""Seed `training_losses`: the per-sample loss of one training step, shared by training and tests."""

import math
from typing import Optional

import torch
import torch.nn.functional as F


def training_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the model should predict under ``scheduler.config.prediction_type``: eps, x_0 or v."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return x0
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    raise ValueError(f"Unknown prediction_type {kind!r}: use epsilon, sample or v_prediction.")


def signal_to_noise(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """abar / (1 - abar) at each timestep, on the CPU in float64: 1 - abar at t = 0 needs the digits."""
    abar = scheduler.alphas_cumprod[timesteps.cpu()]
    return abar / (1 - abar)


def background_haze(x0: torch.Tensor, max_gray_levels: float, probability: float = 0.5,
                    draw_on: Optional[torch.device] = None) -> torch.Tensor:
    """A faint smooth haze (x0 units, >= 0) over the exactly black background of each image of ``x0``
    (B, C, H, W in [-1, 1]): a bilinear-upsampled 4x4 random field scaled to [0, a] gray levels, a drawn
    uniformly from [0, max_gray_levels] for a ``probability`` share of the images, 0 for the rest.
    ``draw_on`` (default x0's device) is where the random numbers are drawn, as in the training step's other draws."""
    batch, draw_on = x0.shape[0], draw_on or x0.device
    coarse = torch.randn(batch, 1, 4, 4, device=draw_on).to(x0.device)
    field = F.interpolate(coarse, size=x0.shape[-2:], mode="bilinear", align_corners=False)
    low = field.amin(dim=(2, 3), keepdim=True)
    high = field.amax(dim=(2, 3), keepdim=True)
    field = (field - low) / (high - low).clamp(min=1e-6)
    amplitude = torch.rand(batch, 1, 1, 1, device=draw_on).to(x0.device) * max_gray_levels
    amplitude = amplitude * (torch.rand(batch, 1, 1, 1, device=draw_on).to(x0.device) < probability)
    black = x0 <= -1 + 1 / 255  # below half a gray level
    return field * amplitude * (2 / 255) * black


def garment_dimming(x0: torch.Tensor, max_fraction: float, probability: float = 0.5,
                    draw_on: Optional[torch.device] = None) -> torch.Tensor:
    """The offset (x0 units, <= 0) that darkens each image of ``x0`` (B, C, H, W in [-1, 1]) towards black by a
    fraction f of its brightness above black: -f * (x0 + 1), f drawn uniformly from [0, max_fraction] for a
    ``probability`` share of the images, 0 for the rest. Black stays black and every gray level loses the same
    share: a uniform darkening (the bundled model's chain, docs/bundled-model.md found, compresses the top of the
    tonal range instead, and a fine-tune with this made its samples too bright: a darkened image cannot be told from
    a dark one, so the model learns to brighten every input a little, which the chain compounds step by step).
    ``draw_on`` as in background_haze."""
    batch, draw_on = x0.shape[0], draw_on or x0.device
    fraction = torch.rand(batch, 1, 1, 1, device=draw_on).to(x0.device) * max_fraction
    fraction = fraction * (torch.rand(batch, 1, 1, 1, device=draw_on).to(x0.device) < probability)
    return -fraction * (x0 + 1)


def offset_as_noise(scheduler, offset: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The noise that puts ``offset`` (x0 units) into x_t: sqrt(abar) * offset = sqrt(1 - abar) * noise.
    Added to both the input's and the target's noise, it trains the model to remove the offset as noise."""
    scale = signal_to_noise(scheduler, timesteps).sqrt().float().to(offset.device)
    return offset * scale.view(-1, *([1] * (offset.dim() - 1)))


def x0_and_eps(kind: str, output: torch.Tensor, x_t: torch.Tensor, abar: torch.Tensor):
    """x_0 and eps implied by a model ``output`` at x_t, for per-sample ``abar`` broadcastable against x_t."""
    a, s = abar.sqrt(), (1 - abar).sqrt()
    if kind == "epsilon":
        return (x_t - s * output) / a, output
    if kind == "sample":
        return output, (x_t - a * output) / s
    return a * x_t - s * output, s * x_t + a * output  # v_prediction


@torch.no_grad()
def rollout_noise(model, scheduler, x0: torch.Tensor, start_noise: torch.Tensor, timesteps: torch.Tensor,
                  class_labels: Optional[torch.Tensor], hops: int, stride: int) -> torch.Tensor:
    """The noise that puts ``x0`` where the model's own DDIM chain lands at ``timesteps``: each image is noised to
    t + hops * stride (at most T - 1) with ``start_noise`` and taken down to t in ``hops`` deterministic DDIM steps
    (eta 0, no clipping) by ``model``. Trained with this as both the input's and the target's noise, the model learns
    to lead its own chain's x_t back to the real x_0, not only the forward process's (scheduled sampling against
    exposure bias). The noise is exact algebra: x_hat_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
    abar_table = scheduler.alphas_cumprod.to(x0.device)
    last = scheduler.config.num_train_timesteps - 1
    start = (timesteps + hops * stride).clamp(max=last)
    shape = (-1,) + (1,) * (x0.dim() - 1)
    x = scheduler.add_noise(x0.float(), start_noise.float(), start)
    kind = scheduler.config.prediction_type
    for k in range(hops):
        here = start - torch.div((start - timesteps) * k, hops, rounding_mode="floor")
        there = start - torch.div((start - timesteps) * (k + 1), hops, rounding_mode="floor")
        output = model(x, here, class_labels=class_labels).sample.float()[:, : x0.shape[1]]
        x0_hat, eps_hat = x0_and_eps(kind, output, x, abar_table[here].float().view(shape))
        moved = scheduler.add_noise(x0_hat, eps_hat, there)  # DDIM (eta 0): x0 and eps re-mixed at the next level
        x = torch.where((here > there).view(shape), moved, x)  # an image already at T - 1 has nowhere to come from
    abar_t = abar_table[timesteps].float().view(shape)
    return (x - abar_t.sqrt() * x0.float()) / (1 - abar_t).sqrt()


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), expressed for the configured prediction type."""
    snr = signal_to_noise(scheduler, timesteps)
    clipped = snr.clamp(max=gamma)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        weights = clipped / snr
    elif kind == "v_prediction":
        weights = clipped / (snr + 1)
    else:  # sample (x0) prediction
        weights = clipped
    return weights.float().to(timesteps.device)


def training_losses(
    model,
    scheduler,
    x0: torch.Tensor,
    timesteps: torch.Tensor,
    noise: Optional[torch.Tensor] = None,
    class_labels: Optional[torch.Tensor] = None,
    snr_gamma: Optional[float] = None,
    input_noise: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-sample loss (B,): MSE between the model's output on x_t = q_sample(x0, t, noise) and the
    scheduler's target (Ho et al. eq. 14 for eps), optionally Min-SNR weighted.

    ``input_noise`` (default ``noise``) is the noise x_t is formed with while the target keeps ``noise``:
    input perturbation (Ning et al. 2023, diffusers' ``--input_perturbation``) passes noise + gamma * xi,
    so that the model learns to denoise inputs a little off the forward process, as its own samples are.

    x_t is formed in float32 whatever the inputs' dtype, so mixed precision never loses the noise at
    small t. With ``variance_type="learned_range"`` the second half of the output channels is trained
    by the variational bound with a stopped-gradient mean (improved-diffusion's hybrid loss).
    """
    x0 = x0.float()
    noise = torch.randn_like(x0) if noise is None else noise.float()
    input_noise = noise if input_noise is None else input_noise.float()
    x_t = scheduler.add_noise(x0, input_noise, timesteps)
    output = model(x_t, timesteps, class_labels=class_labels).sample.float()
    channels = x0.shape[1]
    learned = output.shape[1] == 2 * channels
    prediction = output[:, :channels]
    target = training_target(scheduler, x0, noise, timesteps)
    loss = F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        loss = loss * min_snr_weights(scheduler, timesteps, snr_gamma)
    if learned:
        vlb = _variance_vlb(scheduler, x0, x_t, timesteps, prediction.detach(), output[:, channels:])
        loss = loss + vlb * scheduler.config.num_train_timesteps / 1000.0
    return loss


def _variance_vlb(scheduler, x0, x_t, timesteps, prediction, variance_values):
    """KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) in bits per dimension, only the variance trained
    (Nichol & Dhariwal 2021, section 3.1); the t = 0 decoder term is left out (weight 0)."""
    abar_table = scheduler.alphas_cumprod.to(x0.device)
    t = timesteps.long()
    abar = abar_table[t].float().view(-1, 1, 1, 1)
    abar_prev = torch.where(t > 0, abar_table[(t - 1).clamp(min=0)], torch.ones_like(abar_table[t])).float().view(-1, 1, 1, 1)
    beta = 1 - abar / abar_prev
    post_var = ((1 - abar_prev) / (1 - abar) * beta).clamp(min=1e-20)
    post_mean = (abar_prev.sqrt() * beta / (1 - abar)) * x0 + ((1 - beta).sqrt() * (1 - abar_prev) / (1 - abar)) * x_t
    x0_hat, _ = x0_and_eps(scheduler.config.prediction_type, prediction, x_t, abar)
    model_mean = (abar_prev.sqrt() * beta / (1 - abar)) * x0_hat + ((1 - beta).sqrt() * (1 - abar_prev) / (1 - abar)) * x_t
    frac = (variance_values + 1) / 2
    model_logvar = frac * beta.clamp(min=1e-20).log() + (1 - frac) * post_var.log()
    kl = 0.5 * (-1.0 + model_logvar - post_var.log() + post_var / model_logvar.exp()
                + (post_mean - model_mean) ** 2 / model_logvar.exp())
    kl = kl.mean(dim=(1, 2, 3)) / math.log(2.0)
    return torch.where(t > 0, kl, torch.zeros_like(kl))
