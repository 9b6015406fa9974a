"""What diffusers' own pipelines draw in-process: the reference every served image is compared with.
Plain prompts go to diffusers as text; weighted or long prompts go as embeddings computed with
Kiln's weighting on the PyTorch text encoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kiln.pipeline.prompt_weights import apply_weights, tokenize_pair
from kiln.pipeline.schedulers import make_scheduler


def load_diffusers_pipeline(model_dir: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def weighted_embeddings(pipe, prompt: str, negative: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 77k, D) each, from the PyTorch text encoder with Kiln's chunking and weights."""
    first, second = tokenize_pair(pipe.tokenizer, prompt, negative)

    def encode(ids):
        return pipe.text_encoder(torch.from_numpy(ids).long())[0]

    return apply_weights(encode(first.ids), first.weights), apply_weights(encode(second.ids), second.weights)


def diffusers_image(pipe, scheduler: str, prompt: str, negative: str, seed: int, steps: int, guidance: float,
                    height: int, width: int, num_images: int = 1, weighted: bool = False,
                    image=None, strength: float = 0.8) -> np.ndarray:
    """(N, H, W, 3) uint8, image i drawn with seed + i; `image` (PIL) makes it img2img."""
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe.scheduler = make_scheduler(scheduler, dict(pipe.scheduler.config))
    generators = [torch.Generator().manual_seed(seed + i) for i in range(num_images)]
    kwargs = dict(num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                  generator=generators[0] if num_images == 1 else generators)
    if weighted:
        cond, uncond = weighted_embeddings(pipe, prompt, negative)
        kwargs.update(prompt_embeds=cond.repeat(num_images, 1, 1), negative_prompt_embeds=uncond.repeat(num_images, 1, 1))
    else:
        kwargs.update(prompt=prompt, negative_prompt=negative, num_images_per_prompt=num_images)
    if image is None:
        images = pipe(height=height, width=width, **kwargs).images
    else:
        img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
        img2img.set_progress_bar_config(disable=True)
        images = img2img(image=image, strength=strength, **kwargs).images
    return (images * 255).round().astype(np.uint8)
