"""The denoising loop in plain Python around single-step engines.

The same function runs inside Triton's BLS model (engines called through Triton) and in-process
(engines called through ONNX Runtime). It reproduces diffusers' StableDiffusionPipeline step for
step: the same latent noise from a seeded torch.Generator, diffusers' own scheduler classes,
classifier-free guidance, and the same VAE post-processing.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch


class Engines(Protocol):
    """One call per component. Arrays in, arrays out, shapes as in the component specs."""

    def encode_text(self, input_ids: np.ndarray) -> np.ndarray: ...  # (B, 77) int32 -> (B, 77, D)

    def predict_noise(self, sample: np.ndarray, timestep: np.ndarray, embeddings: np.ndarray) -> np.ndarray: ...

    def decode_latents(self, latents: np.ndarray) -> np.ndarray: ...  # (B, 4, h, w) -> (B, 3, H, W) in [-1, 1]


@dataclass(frozen=True)
class ModelConstants:
    latent_channels: int
    vae_scale_factor: int
    scaling_factor: float


def step_kwargs(scheduler, generator: torch.Generator) -> dict:
    """The extra arguments diffusers' pipeline passes to `scheduler.step` (eta=0 for DDIM)."""
    params = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = 0.0
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, as diffusers' image processor does."""
    images = np.clip(images / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
    return (images * 255).round().astype(np.uint8)


def generate(
    engines: Engines,
    scheduler,
    constants: ModelConstants,
    prompt_ids: np.ndarray,
    negative_ids: np.ndarray,
    seed: int,
    steps: int,
    guidance_scale: float,
    height: int,
    width: int,
    on_step: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Draw one image per prompt row; returns (B, H, W, 3) uint8."""
    batch = prompt_ids.shape[0]
    guided = guidance_scale > 1.0
    ids = np.concatenate([negative_ids, prompt_ids]) if guided else prompt_ids  # (2B, 77) | (B, 77)
    embeddings = engines.encode_text(ids)

    generator = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps)
    shape = (batch, constants.latent_channels, height // constants.vae_scale_factor, width // constants.vae_scale_factor)
    latents = torch.randn(shape, generator=generator, dtype=torch.float32) * scheduler.init_noise_sigma
    extra = step_kwargs(scheduler, generator)
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        model_input = torch.cat([latents] * 2) if guided else latents  # (2B, 4, h, w)
        model_input = scheduler.scale_model_input(model_input, t)
        timestep = np.full((model_input.shape[0],), float(t), dtype=np.float32)
        noise = torch.from_numpy(engines.predict_noise(model_input.numpy(), timestep, embeddings))
        if guided:
            uncond, text = noise.chunk(2)
            noise = uncond + guidance_scale * (text - uncond)
        latents = scheduler.step(noise, t, latents, **extra, return_dict=False)[0]
        if on_step is not None:
            on_step(i + 1, len(timesteps))
    images = engines.decode_latents((latents / constants.scaling_factor).numpy())
    return to_uint8(images)
