"""ControlNet training (diffusers' ControlNetModel): a trainable copy of the UNet's encoder, started from
the UNet (from_unet: zero convolutions, so it starts inert) or from a ControlNet folder, learns to
steer the frozen UNet with control images (conditioning_file_name beside each image). Saved as a
diffusers ControlNet folder, which `kiln export onnx --controlnet NAME=DIR` takes."""

from __future__ import annotations

import json
from pathlib import Path

from kiln.training.config import TrainConfig
from kiln.training.loop import MethodSetup, Models

CONTROLNET_FOLDER = "controlnet"
DEFAULT_EMBEDDING = (16, 32, 96, 256)  # diffusers' control-image encoder widths for SD's 8x VAE


def embedding_channels(config: TrainConfig, model_dir: Path) -> tuple[int, ...]:
    """The control-image encoder's widths: the config's, or diffusers' default cut to the VAE's depth
    (one stride-2 layer per VAE down-sampling, so control images arrive at the latents' size)."""
    from kiln.errors import ConfigError

    levels = len(json.loads((Path(model_dir) / "vae" / "config.json").read_text())["block_out_channels"])
    chosen = config.controlnet.conditioning_embedding_out_channels
    if chosen is None:
        return DEFAULT_EMBEDDING[:levels] if levels <= len(DEFAULT_EMBEDDING) else DEFAULT_EMBEDDING + (256,) * (levels - 4)
    if len(chosen) != levels:
        raise ConfigError(f"controlnet.conditioning_embedding_out_channels={list(chosen)} has {len(chosen)} widths; "
                          f"this model's VAE has {levels} levels", hint=f"give {levels} widths, or leave it out")
    return tuple(chosen)


def build(config: TrainConfig, models: Models) -> MethodSetup:
    from diffusers import ControlNetModel

    spec = config.controlnet
    if spec.controlnet is not None:
        from kiln.errors import ConfigError, ExportError
        from kiln.models.controlnet import check_controlnets

        try:
            check_controlnets({"start": spec.controlnet}, models.model_dir)
        except ExportError as exc:
            raise ConfigError(f"controlnet.controlnet: {exc}", hint=exc.hint) from None
        controlnet = ControlNetModel.from_pretrained(str(spec.controlnet))
    else:
        controlnet = ControlNetModel.from_unet(models.unet, conditioning_embedding_out_channels=embedding_channels(
            config, models.model_dir))
    controlnet.requires_grad_(True)
    controlnet.train()
    models.controlnet = controlnet

    def save(m: Models, output_dir: Path) -> list[Path]:
        from kiln.artifacts import write_folder_atomically

        target = Path(output_dir) / CONTROLNET_FOLDER
        with write_folder_atomically(target, replaces=("config.json",)) as tmp:
            m.controlnet.save_pretrained(tmp, safe_serialization=True)
        return [target]

    return MethodSetup(trainable=["controlnet"], parameters=list(controlnet.parameters()), save=save)
