"""DreamBooth (https://arxiv.org/abs/2208.12242): an instance prompt bound to a few images, with
prior preservation on class images the base model draws itself when they are missing."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from kiln.dataset.augment import Augmentations
from kiln.dataset.captions import IMAGE_SUFFIXES
from kiln.training.config import TrainConfig
from kiln.training.data import ImageBatches, read_examples
from kiln.training.full import save_pipeline
from kiln.training.lora import add_lora, save_lora_files
from kiln.training.loop import MethodSetup, Models

log = logging.getLogger("kiln.training")


def ensure_class_images(models: Models, config: TrainConfig) -> Path:
    """Draw the missing class images with the base model (main process first, the others then read them)."""
    from accelerate import PartialState
    from tqdm import tqdm

    from kiln.training.loop import inference_pipeline

    spec = config.dreambooth
    folder = Path(spec.class_data_dir)
    state = PartialState()
    with state.main_process_first():
        folder.mkdir(parents=True, exist_ok=True)
        have = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
        missing = spec.num_class_images - len(have)
        if missing > 0 and state.is_main_process:
            pipe = inference_pipeline(models)
            size = config.data.resolution
            for i in tqdm(range(missing), desc="class images", unit="image"):
                generator = torch.Generator().manual_seed(config.seed * 100_003 + len(have) + i)
                image = pipe(spec.class_prompt, num_inference_steps=spec.class_generation_steps, height=size,
                             width=size, generator=generator).images[0]
                image.save(folder / f"class-{len(have) + i:05d}.png")
            log.info("drew %d class images for %r into %s", missing, spec.class_prompt, folder)
    return folder


def build(config: TrainConfig, models: Models) -> MethodSetup:
    from accelerate import PartialState

    spec = config.dreambooth
    prior = None
    if spec.prior_preservation:
        folder = ensure_class_images(models, config)
        state = PartialState()
        prior = ImageBatches(read_examples(folder, spec.class_prompt)[: spec.num_class_images], config.data.resolution,
                             Augmentations(enabled=False), config.seed + 1, config.train_batch_size,
                             state.num_processes, state.process_index)
    if spec.use_lora:
        trainable = add_lora(models, config.lora)

        def save(m: Models, out: Path) -> list[Path]:
            return save_lora_files(m, out, config.lora, config.model)
    else:
        models.unet.requires_grad_(True)
        trainable = ["unet"]

        def save(m: Models, out: Path) -> list[Path]:
            return [save_pipeline(m, out)]

    parameters = [p for name in trainable for p in getattr(models, name).parameters() if p.requires_grad]
    return MethodSetup(trainable=trainable, parameters=parameters, save=save, prior=prior)
