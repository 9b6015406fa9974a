"""Local diffusers folders: what is in them (read from their configs, no weights loaded)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import ModelError

REQUIRED_COMPONENTS = ("text_encoder", "tokenizer", "unet", "vae", "scheduler")


@dataclass(frozen=True)
class ModelInfo:
    """What the export and serving stages need to know about a Stable Diffusion folder."""

    prediction_type: str  # epsilon | v_prediction
    scheduler_class: str
    vae_scale_factor: int
    latent_channels: int
    default_size: int  # pixels: unet sample_size * vae_scale_factor
    text_hidden_size: int
    max_length: int
    scaling_factor: float
    path: Path | None = None  # the folder it was read from (an export's manifest records the source apart)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{path} is missing") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"{path} is not valid JSON: {e}") from None


def inspect_model(model_dir: Path) -> ModelInfo:
    """Validate a local Stable Diffusion 1.x/2.x diffusers folder and describe it, loading no weights."""
    model_dir = Path(model_dir)
    if not (model_dir / "model_index.json").is_file():
        raise ModelError(
            f"{model_dir} is not a diffusers folder (no model_index.json)",
            hint="pass a local folder saved with StableDiffusionPipeline.save_pretrained, "
            "or make one with: kiln model tiny OUT",
        )
    missing = [c for c in REQUIRED_COMPONENTS if not (model_dir / c).is_dir()]
    if missing:
        raise ModelError(f"{model_dir} lacks the component folders {missing}")
    unet = _read_json(model_dir / "unet" / "config.json")
    vae = _read_json(model_dir / "vae" / "config.json")
    text = _read_json(model_dir / "text_encoder" / "config.json")
    scheduler = _read_json(model_dir / "scheduler" / "scheduler_config.json")
    tok = _read_json(model_dir / "tokenizer" / "tokenizer_config.json")
    vae_scale = 2 ** (len(vae["block_out_channels"]) - 1)
    prediction = scheduler.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise ModelError(f"scheduler prediction_type={prediction!r} is not supported (epsilon, v_prediction)")
    sample_size = unet["sample_size"]
    sample_size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
    return ModelInfo(
        path=model_dir,
        prediction_type=prediction,
        scheduler_class=scheduler["_class_name"],
        vae_scale_factor=vae_scale,
        latent_channels=vae["latent_channels"],
        default_size=sample_size * vae_scale,
        text_hidden_size=text["hidden_size"],
        max_length=min(int(tok.get("model_max_length", 77)), text.get("max_position_embeddings", 77)),
        scaling_factor=float(vae.get("scaling_factor", 0.18215)),
    )


@dataclass(frozen=True)
class ModelDims:
    """Constants of one model that fill the non-dynamic symbols of the component specs."""

    latent_channels: int
    hidden_size: int
    sequence: int
    vocab_size: int
    vae_scale_factor: int
    unet_factor: int  # latent sides must be multiples of this (UNet down-sampling)
    default_latent: int  # latent side at the model's native resolution
    image_channels: int = 3

    @property
    def latent_parameters(self) -> int:
        return 2 * self.latent_channels  # mean and log-variance of the VAE posterior


def model_dims(model_dir: Path, info: ModelInfo | None = None) -> ModelDims:
    model_dir = Path(model_dir)
    info = info or inspect_model(model_dir)
    unet = _read_json(model_dir / "unet" / "config.json")
    text = _read_json(model_dir / "text_encoder" / "config.json")
    return ModelDims(
        latent_channels=info.latent_channels,
        hidden_size=text["hidden_size"],
        sequence=info.max_length,
        vocab_size=text["vocab_size"],
        vae_scale_factor=info.vae_scale_factor,
        unet_factor=2 ** (len(unet["block_out_channels"]) - 1),
        default_latent=info.default_size // info.vae_scale_factor,
    )
