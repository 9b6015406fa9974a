"""Local diffusers folders: what is in them (read from their configs, no weights loaded)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import ModelError

SDXL_TIME_IDS = 6  # original size, crop top-left, target size
REQUIRED_COMPONENTS = ("text_encoder", "tokenizer", "unet", "vae", "scheduler")
SDXL_COMPONENTS = ("text_encoder_2", "tokenizer_2")  # and a UNet conditioned on pooled text and sizes
FAMILIES = ("sd1", "sd2", "sdxl")
FAMILY_NAMES = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "Stable Diffusion XL"}


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
    family: str = "sd1"  # sd1 | sd2 | sdxl (see FAMILIES)
    # SDXL: an empty negative prompt is encoded as zeros (diffusers' force_zeros_for_empty_prompt)
    zero_empty_negative: bool = False
    path: Path | None = None  # the folder it was read from (an export's manifest records the source apart)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{path} is missing") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"{path} is not valid JSON: {e}") from None


def detect_family(unet: dict, text: dict) -> str:
    """SDXL's UNet takes pooled text and size conditioning (`addition_embed_type` text_time); SD 2.x's
    text encoder is OpenCLIP (GELU), SD 1.x's is OpenAI CLIP (quick GELU)."""
    if unet.get("addition_embed_type") == "text_time":
        return "sdxl"
    return "sd2" if text.get("hidden_act") == "gelu" else "sd1"


def _time_ids(model_dir: Path, unet: dict) -> int | None:
    """How many size-conditioning values an SDXL-style UNet takes (None: not one, or no second text
    encoder to tell by). Its class
    embedding's input is those values' embeddings plus the second text encoder's pooled projection
    (transformers' default projection_dim is 512)."""
    if unet.get("addition_embed_type") != "text_time":
        return None
    width, total = unet.get("addition_time_embed_dim"), unet.get("projection_class_embeddings_input_dim")
    for key, value in (("addition_time_embed_dim", width), ("projection_class_embeddings_input_dim", total)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ModelError(f"{model_dir / 'unet' / 'config.json'}: {key}={value!r} is invalid: expected a positive "
                             "integer (SDXL base: addition_time_embed_dim 256, projection_class_embeddings_input_dim 2816)")
    text_2 = model_dir / "text_encoder_2" / "config.json"
    if not text_2.is_file():
        return None  # cannot tell: the missing folder is reported instead
    return (total - _read_json(text_2).get("projection_dim", 512)) // width


def inspect_model(model_dir: Path) -> ModelInfo:
    """Validate a local Stable Diffusion 1.x, 2.x or XL diffusers folder and describe it, loading no weights."""
    model_dir = Path(model_dir)
    if not (model_dir / "model_index.json").is_file():
        raise ModelError(
            f"{model_dir} is not a diffusers folder (no model_index.json)",
            hint="pass a local folder saved with StableDiffusionPipeline.save_pretrained, "
            "or make one with: kiln model tiny OUT",
        )
    index = _read_json(model_dir / "model_index.json")
    unet_config = model_dir / "unet" / "config.json"
    unet = _read_json(unet_config) if unet_config.is_file() else {}
    time_ids = _time_ids(model_dir, unet)
    if "Img2Img" in str(index.get("_class_name", "")) or time_ids == SDXL_TIME_IDS - 1:
        raise ModelError(f"{model_dir} is an SDXL refiner ({index.get('_class_name')}: aesthetic-score conditioning, "
                         f"{time_ids} size-conditioning values where SDXL base takes {SDXL_TIME_IDS})",
                         hint="the refiner is not supported; use an SDXL base model")
    if time_ids not in (None, SDXL_TIME_IDS):
        text_2 = _read_json(model_dir / "text_encoder_2" / "config.json")
        raise ModelError(f"{model_dir}: unet projection_class_embeddings_input_dim="
                         f"{unet['projection_class_embeddings_input_dim']} and text_encoder_2 projection_dim="
                         f"{text_2.get('projection_dim', '<absent: 512>')} disagree: they leave {time_ids} size-conditioning "
                         f"values of width {unet['addition_time_embed_dim']}, where SDXL takes {SDXL_TIME_IDS}",
                         hint="the text encoder's pooled projection plus 6 x addition_time_embed_dim must equal the UNet's input")
    missing = [c for c in REQUIRED_COMPONENTS if not (model_dir / c).is_dir()]
    if missing:
        raise ModelError(f"{model_dir} lacks the component folders {missing}",
                         hint="a Stable Diffusion folder has text_encoder, tokenizer, unet, vae and scheduler "
                              "(SDXL also text_encoder_2 and tokenizer_2)")
    unet = _read_json(unet_config)
    vae = _read_json(model_dir / "vae" / "config.json")
    text = _read_json(model_dir / "text_encoder" / "config.json")
    scheduler = _read_json(model_dir / "scheduler" / "scheduler_config.json")
    tok = _read_json(model_dir / "tokenizer" / "tokenizer_config.json")
    vae_scale = 2 ** (len(vae["block_out_channels"]) - 1)
    prediction = scheduler.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise ModelError(f"scheduler prediction_type={prediction!r} is not supported (epsilon, v_prediction)")
    family = detect_family(unet, text)
    if family == "sdxl":
        missing = [c for c in SDXL_COMPONENTS if not (model_dir / c).is_dir()]
        if missing:
            raise ModelError(f"{model_dir} has an SDXL UNet but lacks {missing}",
                             hint="pass an SDXL base folder saved with StableDiffusionXLPipeline.save_pretrained")
    index = _read_json(model_dir / "model_index.json")
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
        family=family,
        zero_empty_negative=family == "sdxl" and bool(index.get("force_zeros_for_empty_prompt", True)),
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
    # SDXL (0 elsewhere): the second text encoder's width, its pooled projection, and the UNet's
    # cross-attention width (both encoders' hidden states side by side)
    hidden_size_2: int = 0
    pooled_size: int = 0
    cross_attention_dim: int = 0
    # ControlNet residuals the UNet takes (an export holding ControlNets; () elsewhere): per down-block
    # residual, then the mid block's, its channels and how far it is down-sampled from the latents
    control: tuple[tuple[int, int], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "control", tuple(tuple(int(v) for v in pair) for pair in self.control))

    @property
    def latent_parameters(self) -> int:
        return 2 * self.latent_channels  # mean and log-variance of the VAE posterior


def control_layout(unet: dict) -> tuple[tuple[int, int], ...]:
    """The residuals a ControlNet of this UNet config hands it, as diffusers' ControlNetModel makes them:
    the stem's, each resnet's and each down-sampler's of the down blocks, then the mid block's; each
    (channels, down-sampling factor)."""
    channels = list(unet["block_out_channels"])
    per_block = unet["layers_per_block"]
    per_block = [per_block] * len(channels) if isinstance(per_block, int) else list(per_block)
    layout, factor = [(channels[0], 1)], 1
    for i, width in enumerate(channels):
        layout += [(width, factor)] * per_block[i]
        if i < len(channels) - 1:
            factor *= 2
            layout.append((width, factor))
    return (*layout, (channels[-1], factor))


def controlled_dims(model_dir: Path, dims: ModelDims) -> ModelDims:
    """`dims` with the residual layout ControlNets of the model's UNet hand it (ModelDims.control)."""
    import dataclasses

    return dataclasses.replace(dims, control=control_layout(_read_json(Path(model_dir) / "unet" / "config.json")))


def model_dims(model_dir: Path, info: ModelInfo | None = None) -> ModelDims:
    model_dir = Path(model_dir)
    info = info or inspect_model(model_dir)
    unet = _read_json(model_dir / "unet" / "config.json")
    text = _read_json(model_dir / "text_encoder" / "config.json")
    sdxl = {}
    if info.family == "sdxl":
        text_2 = _read_json(model_dir / "text_encoder_2" / "config.json")
        sdxl = dict(hidden_size_2=text_2["hidden_size"], pooled_size=text_2["projection_dim"],
                    cross_attention_dim=unet["cross_attention_dim"])
        if sdxl["cross_attention_dim"] != text["hidden_size"] + text_2["hidden_size"]:
            raise ModelError(f"{model_dir}: the UNet's cross_attention_dim {unet['cross_attention_dim']} is not the two "
                             f"text encoders' widths side by side ({text['hidden_size']} + {text_2['hidden_size']})")
    return ModelDims(
        latent_channels=info.latent_channels,
        hidden_size=text["hidden_size"],
        sequence=info.max_length,
        vocab_size=text["vocab_size"],
        vae_scale_factor=info.vae_scale_factor,
        unet_factor=2 ** (len(unet["block_out_channels"]) - 1),
        default_latent=info.default_size // info.vae_scale_factor,
        **sdxl,
    )
