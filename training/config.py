"""The typed training configuration: YAML plus `key=value` overrides, validated before any model loads.
Unknown keys are errors; each message names the field, the value received and what is expected."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kiln.errors import ConfigError

METHODS = ("lora", "dreambooth", "textual-inversion", "full")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AugmentConfig(Strict):
    enabled: bool = True
    crop_scale: tuple[float, float] = (0.8, 1.0)
    flip_probability: float = Field(0.5, ge=0, le=1)
    rotation_degrees: float = Field(15.0, ge=0, le=180)
    brightness: float = Field(0.2, ge=0, le=1)
    contrast: float = Field(0.2, ge=0, le=1)
    hue: float = Field(0.1, ge=0, le=0.5)

    @model_validator(mode="after")
    def _crop(self):
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop_scale {self.crop_scale} must satisfy 0 < low <= high <= 1")
        return self


class DataConfig(Strict):
    path: Path  # a folder written by `kiln data prepare` (or any imagefolder with metadata.jsonl)
    resolution: int = Field(512, ge=8)
    caption_dropout: float = Field(0.0, ge=0, le=1)  # empty captions teach the unconditional branch
    augment: AugmentConfig = AugmentConfig()


class LoraConfig(Strict):
    rank: int = Field(4, ge=1)
    alpha: float | None = None  # default: equal to rank (scale 1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0")
    text_encoder: bool = False
    text_encoder_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")


class DreamBoothConfig(Strict):
    instance_prompt: str
    class_prompt: str | None = None
    class_data_dir: Path | None = None
    prior_preservation: bool = True
    prior_loss_weight: float = Field(1.0, ge=0)
    num_class_images: int = Field(100, ge=1)
    class_generation_steps: int = Field(25, ge=1)
    use_lora: bool = True  # False: train the whole UNet

    @model_validator(mode="after")
    def _prior(self):
        if self.prior_preservation and (not self.class_prompt or self.class_data_dir is None):
            raise ValueError("prior_preservation needs class_prompt and class_data_dir")
        return self


class TextualInversionConfig(Strict):
    placeholder_token: str
    initializer_token: str
    num_vectors: int = Field(1, ge=1, le=64)
    # How a caption becomes a training prompt; {token} is the placeholder, {caption} the image's caption.
    caption_template: str = "{caption}, in the style of {token}"

    @model_validator(mode="after")
    def _template(self):
        if "{token}" not in self.caption_template:
            raise ValueError(f"caption_template {self.caption_template!r} must contain {{token}}")
        return self


class FullConfig(Strict):
    ema: bool = True
    ema_decay: float = Field(0.9999, gt=0, lt=1)
    train_text_encoder: bool = False


class OptimConfig(Strict):
    learning_rate: float = Field(1e-4, gt=0)
    scale_lr: bool = False  # multiply by batch size x accumulation x processes
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant_with_warmup"
    lr_warmup_steps: int = Field(0, ge=0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = Field(1.0, gt=0)
    use_8bit_adam: bool = False


class TrainConfig(Strict):
    method: Literal["lora", "dreambooth", "textual-inversion", "full"]
    model: Path
    output_dir: Path
    data: DataConfig
    seed: int = 0
    max_train_steps: int = Field(1000, ge=1)
    train_batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    gradient_checkpointing: bool = False
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    noise_offset: float = Field(0.0, ge=0)
    snr_gamma: float | None = Field(None, gt=0)  # min-SNR weighting, 5.0 is the paper's choice
    checkpointing_steps: int = Field(500, ge=1)
    checkpoints_total_limit: int | None = Field(3, ge=1)
    validation_steps: int | None = Field(None, ge=1)
    validation_prompts: tuple[str, ...] = ()
    validation_inference_steps: int = Field(20, ge=1)
    logging_steps: int = Field(1, ge=1)
    tensorboard: bool = True
    optim: OptimConfig = OptimConfig()
    lora: LoraConfig | None = None
    dreambooth: DreamBoothConfig | None = None
    textual_inversion: TextualInversionConfig | None = None
    full: FullConfig | None = None

    @model_validator(mode="after")
    def _method_section(self):
        needs = {"dreambooth": "dreambooth", "textual-inversion": "textual_inversion"}
        section = needs.get(self.method)
        if section and getattr(self, section) is None:
            raise ValueError(f"method {self.method} needs a `{section}:` section")
        if self.validation_steps and not self.validation_prompts:
            raise ValueError("validation_steps is set but validation_prompts is empty")
        return self


def _set(tree: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}={raw}: {key} is not a section")
    node[keys[-1]] = yaml.safe_load(raw) if raw != "" else ""


def _describe(error: ValidationError) -> str:
    parts = []
    for e in error.errors():
        where = ".".join(str(p) for p in e["loc"]) or "config"
        value = e.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        parts.append(f"{where}: {e['msg']}{shown}")
    return "; ".join(parts)


def load_config(method: str, path: Path | None, overrides: list[str]) -> TrainConfig:
    """YAML file (optional) + `a.b=value` overrides -> a validated TrainConfig for `method`."""
    if method not in METHODS:
        raise ConfigError(f"method {method!r} is not one of {METHODS}")
    tree: dict = {}
    if path is not None:
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"--config {path} does not exist") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path} is not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"--config {path} must hold a mapping of settings")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value", hint="for example: optim.learning_rate=1e-4")
        key, raw = item.split("=", 1)
        _set(tree, key.strip(), raw)
    if tree.setdefault("method", method) != method:
        raise ConfigError(f"the config says method: {tree['method']} but the command is `kiln train {method}`")
    try:
        config = TrainConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(f"invalid training config: {_describe(e)}", hint="see `kiln train --help` and README") from None
    if method == "lora" and config.lora is None:
        config = config.model_copy(update={"lora": LoraConfig()})
    if method == "full" and config.full is None:
        config = config.model_copy(update={"full": FullConfig()})
    if method == "dreambooth" and config.dreambooth.use_lora and config.lora is None:
        config = config.model_copy(update={"lora": LoraConfig()})
    return config
