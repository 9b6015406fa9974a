"""Validation images drawn with the weights being trained, saved per step and logged to TensorBoard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


@torch.no_grad()
def write_validation_images(models, config, step: int, accelerator, controls: list[Path] | None = None) -> list[Path]:
    """One image per validation prompt; `controls`: control images for a ControlNet in training, prompt i
    drawn with control image i (cycling), by diffusers' ControlNet pipeline."""
    from PIL import Image

    from kiln.training.loop import inference_pipeline

    unet = accelerator.unwrap_model(models.unet)
    encoders = {name: accelerator.unwrap_model(getattr(models, name)) for name in models.text_encoders}
    controlnet = accelerator.unwrap_model(models.controlnet) if models.controlnet is not None else None
    modes = {m: m.training for m in (unet, *encoders.values(), *([controlnet] if controlnet is not None else []))}
    for module in modes:
        module.eval()
    pipe = inference_pipeline(models, unet, encoders)
    extra = lambda i: {}  # noqa: E731
    if controlnet is not None:
        import diffusers

        cls = diffusers.StableDiffusionXLControlNetPipeline if models.family == "sdxl" else diffusers.StableDiffusionControlNetPipeline
        pipe = cls(**{**pipe.components, "controlnet": controlnet})
        pipe.set_progress_bar_config(disable=True)
        extra = lambda i: {"image": Image.open(controls[i % len(controls)]).convert("RGB")}  # noqa: E731
    folder = Path(config.output_dir) / "validation" / f"step-{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    paths, arrays = [], []
    state = torch.random.get_rng_state()
    for i, prompt in enumerate(config.validation_prompts):
        image = pipe(prompt, num_inference_steps=config.validation_inference_steps, height=config.data.resolution,
                     width=config.data.resolution, generator=torch.Generator().manual_seed(config.seed + i),
                     **extra(i)).images[0]
        paths.append(folder / f"{i:02d}.png")
        image.save(paths[-1])
        arrays.append(np.asarray(image))
    torch.random.set_rng_state(state)
    for module, training in modes.items():
        module.train(training)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack(arrays), step, dataformats="NHWC")
    return paths
