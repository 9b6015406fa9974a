"""The math every method shares: noise (with offset), the target for the model's objective, and
min-SNR loss weighting."""

from __future__ import annotations

import torch
import torch.nn.functional as F

PREDICTION_TYPES = ("epsilon", "v_prediction")


def sample_noise(latents: torch.Tensor, noise_offset: float) -> torch.Tensor:
    """Gaussian noise; a per-channel offset lets the model learn very dark and very bright images
    (https://www.crosslabs.org/blog/diffusion-with-offset-noise)."""
    noise = torch.randn_like(latents)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1, dtype=latents.dtype)
    return noise


def target_for(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet must predict: the noise (epsilon) or the velocity (v-prediction, SD 2.x 768)."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction_type {kind!r} is not trainable here: expected one of {PREDICTION_TYPES}")


def snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023, https://arxiv.org/abs/2303.09556): min(SNR, gamma)/SNR
    for epsilon, min(SNR, gamma)/(SNR + 1) for v-prediction."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def diffusion_loss(prediction, target, noise_scheduler, timesteps, snr_gamma: float | None) -> torch.Tensor:
    """Mean squared error, optionally min-SNR weighted per sample."""
    if snr_gamma is None:
        return F.mse_loss(prediction.float(), target.float(), reduction="mean")
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * snr_weights(noise_scheduler, timesteps, snr_gamma)).mean()
