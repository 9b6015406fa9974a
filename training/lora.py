"""LoRA through peft on the UNet's attention projections (and optionally the text encoder's).
Saved in diffusers' format with the adapter metadata, so alpha survives a reload."""

from __future__ import annotations

from pathlib import Path

from kiln.training.config import LoraConfig, TrainConfig
from kiln.training.loop import MethodSetup, Models

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def add_lora(models: Models, spec: LoraConfig) -> list:
    from peft import LoraConfig as PeftLoraConfig

    alpha = spec.alpha if spec.alpha is not None else spec.rank
    models.unet.add_adapter(PeftLoraConfig(r=spec.rank, lora_alpha=alpha, lora_dropout=spec.dropout,
                                           init_lora_weights="gaussian", target_modules=list(spec.target_modules)))
    encoders = text_encoders(models, spec)
    for name in encoders:
        from peft import inject_adapter_in_model

        # peft directly: transformers 5's add_adapter demands a peft release newer than any published
        layers = models.used_layers(name) if hasattr(models, "used_layers") else None
        config = PeftLoraConfig(r=spec.rank, lora_alpha=alpha, lora_dropout=spec.dropout, init_lora_weights="gaussian",
                                target_modules=list(spec.text_encoder_target_modules),
                                layers_to_transform=list(range(layers)) if layers else None,
                                layers_pattern="layers" if layers else None)
        inject_adapter_in_model(config, getattr(models, name), adapter_name="default")
        getattr(models, name).kiln_lora_config = config
    return ["unet"] + encoders


def text_encoders(models: Models, spec: LoraConfig) -> list[str]:
    """The text encoders that get a LoRA: `text_encoder` (SD's one, SDXL's CLIP ViT-L) and
    `text_encoder_2` (SDXL's OpenCLIP bigG)."""
    if spec.text_encoder_2 and getattr(models, "family", "sd1") != "sdxl":
        from kiln.errors import ConfigError

        raise ConfigError("lora.text_encoder_2=true needs an SDXL model (SD 1.x and 2.x have one text encoder)",
                          hint="use lora.text_encoder=true")
    return [name for name, wanted in (("text_encoder", spec.text_encoder), ("text_encoder_2", spec.text_encoder_2))
            if wanted]


def save_lora(models: Models, output_dir: Path, spec: LoraConfig) -> Path:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    def metadata(module):
        config = getattr(module, "kiln_lora_config", None) or module.peft_config["default"]
        return config.to_dict()

    unet_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(models.unet))
    kwargs = {"unet_lora_layers": unet_layers, "unet_lora_adapter_metadata": metadata(models.unet)}
    for name in text_encoders(models, spec):
        encoder = getattr(models, name)
        kwargs[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(encoder))
        kwargs[f"{name}_lora_adapter_metadata"] = metadata(encoder)
    cls = StableDiffusionXLPipeline if getattr(models, "family", "sd1") == "sdxl" else StableDiffusionPipeline
    cls.save_lora_weights(str(output_dir), weight_name=WEIGHTS_NAME, **kwargs)
    return Path(output_dir) / WEIGHTS_NAME


def save_lora_files(models: Models, output_dir: Path, spec: LoraConfig, base: Path) -> list[Path]:
    """The diffusers-format file, and with `format=kohya` the same LoRA in kohya's layout beside it."""
    saved = [save_lora(models, output_dir, spec)]
    if spec.format == "kohya":
        from kiln.models.lora_files import KOHYA_NAME, to_kohya

        saved.append(to_kohya(saved[0], base, Path(output_dir) / KOHYA_NAME))
    return saved


def build(config: TrainConfig, models: Models) -> MethodSetup:
    trainable = add_lora(models, config.lora)
    parameters = [p for name in trainable for p in getattr(models, name).parameters() if p.requires_grad]
    return MethodSetup(
        trainable=trainable,
        parameters=parameters,
        save=lambda m, out: save_lora_files(m, out, config.lora, config.model),
    )
