"""ControlNets of a base model: checking that a diffusers ControlNet folder fits the base it is exported
beside, and the tiny random-weight ControlNet the tests and the default deploy use."""

from __future__ import annotations

import json
import re
from pathlib import Path

from kiln.errors import ExportError, ModelError

CONTROLNET_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")  # a Triton model name after the controlnet_ prefix
CONTROLNET_CLASSES = ("ControlNetModel",)  # diffusers' class in the folder's config.json
# what a ControlNet shares with the UNet it steers: its residuals' layout and the inputs it reads
SHARED_CONFIG = ("in_channels", "block_out_channels", "layers_per_block", "cross_attention_dim",
                 "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim")


def _config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ExportError(f"ControlNet folder {folder} has no config.json",
                          hint="pass a diffusers ControlNetModel folder (ControlNetModel.save_pretrained)")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{path} is not valid JSON ({e})", hint="re-save the ControlNet with save_pretrained") from e
    if not isinstance(config, dict) or config.get("_class_name") not in CONTROLNET_CLASSES:
        found = config.get("_class_name") if isinstance(config, dict) else type(config).__name__
        raise ExportError(f"{folder} holds a {found}, not a ControlNet ({', '.join(CONTROLNET_CLASSES)})",
                          hint="pass the folder ControlNetModel.save_pretrained wrote")
    return config


def _normalised(value):
    """Config values as diffusers reads them: lists and tuples alike; a per-block int as that int."""
    return list(value) if isinstance(value, (list, tuple)) else value


WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def _check_weights(name: str, folder: Path) -> None:
    """The folder's weights file is there and readable (a safetensors header and its tensors' extents
    are checked without loading them), so a broken folder is refused before any export work."""
    found = [folder / f for f in WEIGHT_FILES if (folder / f).is_file()]
    if not found:
        raise ExportError(f"ControlNet {name} ({folder}) has no weights: expected {' or '.join(WEIGHT_FILES)}",
                          hint="copy the whole folder ControlNetModel.save_pretrained wrote")
    path = found[0]
    if path.suffix != ".safetensors":
        return  # a pickle: read (and checked) when it loads
    try:
        from safetensors import safe_open

        with safe_open(str(path), "np") as weights:  # checks the header covers the file exactly
            if not list(weights.keys()):
                raise ValueError("it holds no tensors")
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same refusal
        raise ExportError(f"ControlNet {name}: {path} cannot be read ({exc})",
                          hint="copy the file again; it is damaged or incomplete") from None


def check_controlnets(controlnets: dict[str, Path], model_dir: Path) -> dict[str, Path]:
    """Each name -> folder checked before any export work: a name Triton and the request field accept,
    a diffusers ControlNet folder, and one built for this base (same residual layout, same inputs, and
    a conditioning embedding that brings a control image down to the latents' size)."""
    model_dir = Path(model_dir)
    unet = json.loads((model_dir / "unet" / "config.json").read_text())
    vae = json.loads((model_dir / "vae" / "config.json").read_text())
    vae_scale = 2 ** (len(vae["block_out_channels"]) - 1)
    checked = {}
    for name, folder in controlnets.items():
        if not isinstance(name, str) or not CONTROLNET_NAME.fullmatch(name):
            raise ExportError(f"ControlNet name {name!r} is invalid: expected lower-case letters, digits and _, "
                              f"starting with a letter, at most 32 characters",
                              hint="for example --controlnet canny=DIR")
        folder = Path(folder)
        if not folder.is_dir():
            raise ExportError(f"ControlNet {name}: {folder} is not a folder",
                              hint="pass a diffusers ControlNetModel folder (ControlNetModel.save_pretrained)")
        config = _config(folder)
        for key in SHARED_CONFIG:
            theirs, ours = _normalised(config.get(key)), _normalised(unet.get(key))
            if key == "layers_per_block" and isinstance(ours, list) and isinstance(theirs, int):
                theirs = [theirs] * len(ours)
            if key == "layers_per_block" and isinstance(theirs, list) and isinstance(ours, int):
                ours = [ours] * len(theirs)
            if theirs != ours:
                raise ExportError(f"ControlNet {name} ({folder}) was built for another base: its {key} is {theirs}, "
                                  f"the UNet's in {model_dir} is {ours}",
                                  hint="use a ControlNet trained on this base's family (SD 1.x, 2.x or SDXL) and width")
        embedding = config.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)
        if 2 ** (len(embedding) - 1) != vae_scale:
            raise ExportError(f"ControlNet {name} ({folder}) brings control images down {2 ** (len(embedding) - 1)}x, "
                              f"the base's VAE {vae_scale}x", hint="use a ControlNet built for this base")
        if config.get("conditioning_channels", 3) != 3:
            raise ExportError(f"ControlNet {name} ({folder}) takes {config['conditioning_channels']}-channel control "
                              f"images; Kiln feeds RGB", hint="use a ControlNet with conditioning_channels=3")
        if config.get("global_pool_conditions"):
            raise ExportError(f"ControlNet {name} ({folder}) has global_pool_conditions=true (a shuffle-style "
                              "ControlNet: pooled residuals, applied to the prompted half only); Kiln serves "
                              "ControlNets whose residuals keep their spatial size",
                              hint="use a ControlNet with global_pool_conditions=false")
        _check_weights(name, folder)
        checked[name] = folder
    return checked


def build_tiny_controlnet(model_dir: Path, seed: int = 0, strength: float = 0.1, image_gain: float = 16.0):
    """A ControlNet of the model in `model_dir` (its UNet's layout, weights copied as diffusers'
    from_unet does) that acts as a trained one does: its zero convolutions drawn at random with
    `strength`, so that control moves the image from the first step, and its control-image encoder
    He-initialised (variance kept through each layer; with default weights the control image's signal
    dies in the encoder and every image steers alike), its last layer `image_gain` times louder so that
    the control image, not the ControlNet's own copy of the UNet, decides most of what it adds (on the
    tiny model, two different control images move the image about as far from each other as from none)."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(Path(model_dir) / "unet")
    vae = json.loads((Path(model_dir) / "vae" / "config.json").read_text())
    levels = len(vae["block_out_channels"])  # 8x VAE: three stride-2 convolutions in the conditioning embedding
    embedding = tuple(8 * 2 ** min(i, 2) for i in range(levels))
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=embedding)
    generator = torch.Generator().manual_seed(seed)
    zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    with torch.no_grad():
        for conv in controlnet.controlnet_cond_embedding.modules():
            if isinstance(conv, torch.nn.Conv2d):
                fan_in = conv.weight[0].numel()
                gain = image_gain if conv is controlnet.controlnet_cond_embedding.conv_out else 1.0
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * gain * (2 / fan_in) ** 0.5)
                conv.bias.zero_()
        for conv in zero_convs:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * strength)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator) * strength)
    return controlnet


def write_tiny_controlnet(model_dir: Path, out: Path, seed: int = 0) -> Path:
    """build_tiny_controlnet saved as a diffusers folder (atomically)."""
    from kiln.artifacts import write_folder_atomically

    if not (Path(model_dir) / "unet" / "config.json").is_file():
        raise ModelError(f"{model_dir} has no unet/config.json", hint="pass a diffusers model folder (kiln model tiny OUT)")
    controlnet = build_tiny_controlnet(model_dir, seed)
    with write_folder_atomically(Path(out), replaces=("config.json",)) as tmp:
        controlnet.save_pretrained(tmp, safe_serialization=True)
    return Path(out)
