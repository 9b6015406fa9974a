"""What diffusers' own StableDiffusionPipeline draws in-process: the reference every served image
is compared with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kiln.pipeline.schedulers import make_scheduler


def load_diffusers_pipeline(model_dir: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_image(pipe, scheduler: str, prompt: str, negative: str, seed: int, steps: int,
                    guidance: float, height: int, width: int) -> np.ndarray:
    """(1, H, W, 3) uint8, with the scheduler swapped in the way diffusers' docs do it."""
    pipe.scheduler = make_scheduler(scheduler, dict(pipe.scheduler.config))
    images = pipe(
        prompt,
        negative_prompt=negative,
        generator=torch.Generator().manual_seed(seed),
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=height,
        width=width,
        output_type="np",
    ).images
    return (images * 255).round().astype(np.uint8)
