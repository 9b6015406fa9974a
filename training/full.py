"""Full fine-tuning of the UNet (and optionally the text encoder), with an EMA of the UNet's weights
whose average, not the last step, is what gets saved."""

from __future__ import annotations

from pathlib import Path

from kiln.training.config import TrainConfig
from kiln.training.loop import MethodSetup, Models

MODEL_FOLDER = "model"


def save_pipeline(models: Models, output_dir: Path) -> Path:
    """A plain diffusers folder that every later stage (merge, export) takes as it is."""
    import shutil

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from kiln.artifacts import write_folder_atomically

    target = Path(output_dir) / MODEL_FOLDER
    encoders = {name: getattr(models, name) for name in models.text_encoders}
    if models.family == "sdxl":
        pipe = StableDiffusionXLPipeline.from_pretrained(str(models.model_dir), unet=models.unet, **encoders)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(str(models.model_dir), unet=models.unet, safety_checker=None,
                                                       requires_safety_checker=False, **encoders)
    with write_folder_atomically(target) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for tokenizer in ("tokenizer", "tokenizer_2"):
            if (models.model_dir / tokenizer).is_dir():
                shutil.rmtree(tmp / tokenizer)
                shutil.copytree(models.model_dir / tokenizer, tmp / tokenizer)
    return target


def build(config: TrainConfig, models: Models) -> MethodSetup:
    from diffusers.training_utils import EMAModel

    models.unet.requires_grad_(True)
    trainable = ["unet"]
    if config.full.train_text_encoder:
        for name in models.text_encoders:
            getattr(models, name).requires_grad_(True)
            models.freeze_unused(name)
            trainable.append(name)
    ema = None
    if config.full.ema:
        ema = EMAModel(models.unet.parameters(), decay=config.full.ema_decay, model_cls=type(models.unet),
                       model_config=models.unet.config)

    def after_step(m: Models) -> None:
        if ema is not None:
            ema.step(m.unet.parameters())

    def save(m: Models, output_dir: Path) -> list[Path]:
        if ema is not None:
            ema.copy_to(m.unet.parameters())
        return [save_pipeline(m, output_dir)]

    parameters = [p for name in trainable for p in getattr(models, name).parameters() if p.requires_grad]
    return MethodSetup(trainable=trainable, parameters=parameters, save=save, after_step=after_step,
                       checkpoint_objects=[ema] if ema is not None else [])
