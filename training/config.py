"""The typed training configuration: YAML plus `key=value` overrides, validated before any model loads.
Unknown keys are errors; each message names the field, the value received and what is expected.

The same reading serves every other `key=value` argument of the CLI (`kiln train base` settings,
`--also`, `--endpoint`): split once (split_setting), validated by pydantic (validate)."""

from __future__ import annotations

from dataclasses import MISSING, fields as dataclass_fields
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal, get_args, get_type_hints

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, create_model, model_validator

from kiln.errors import ConfigError

METHODS = ("lora", "dreambooth", "textual-inversion", "full", "controlnet")
EXAMPLE = "optim.learning_rate=1e-4"


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
    text_encoder_2: bool = False  # SDXL's second text encoder (OpenCLIP bigG)
    text_encoder_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
    # kohya: also write lora_kohya.safetensors, the layout A1111 and ComfyUI load
    format: Literal["diffusers", "kohya"] = "diffusers"


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


class ControlNetConfig(Strict):
    # start from this diffusers ControlNet folder (fine-tune it); default: a new one copied from the
    # UNet's encoder, as diffusers' ControlNetModel.from_unet makes it (zero convolutions: starts inert)
    controlnet: Path | None = None
    # the control-image encoder's widths; one entry per VAE level (default: diffusers' (16, 32, 96, 256)
    # cut to the VAE's depth: three for SD's 8x VAE plus one)
    conditioning_embedding_out_channels: tuple[int, ...] | None = None

    @model_validator(mode="after")
    def _channels(self):
        channels = self.conditioning_embedding_out_channels
        if channels is not None and (not channels or min(channels) < 1):
            raise ValueError(f"conditioning_embedding_out_channels {channels} must be positive widths")
        return self


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
    method: Literal["lora", "dreambooth", "textual-inversion", "full", "controlnet"]
    model: Path
    output_dir: Path
    data: DataConfig
    seed: int = 0
    max_train_steps: int = Field(1000, ge=1)
    train_batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    gradient_checkpointing: bool = False
    # Memory and time savers for large models (SDXL): encode each image's VAE posterior and each
    # caption's text embeddings once, then reuse them (the VAE and text encoders can then stay off the
    # training device's hot path). Latents need data.augment.enabled=false; text embeddings need
    # frozen text encoders.
    cache_latents: bool = False
    cache_text_embeddings: bool = False
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
    controlnet: ControlNetConfig | None = None

    @model_validator(mode="after")
    def _method_section(self):
        needs = {"dreambooth": "dreambooth", "textual-inversion": "textual_inversion"}
        section = needs.get(self.method)
        if section and getattr(self, section) is None:
            raise ValueError(f"method {self.method} needs a `{section}:` section")
        if self.validation_steps and not self.validation_prompts:
            raise ValueError("validation_steps is set but validation_prompts is empty")
        if self.cache_latents and self.data.augment.enabled:
            raise ValueError("cache_latents=true needs data.augment.enabled=false: augmented images differ every step")
        lora = self.lora if self.method == "lora" else None
        if self.method == "dreambooth" and self.dreambooth and self.dreambooth.use_lora:
            lora = self.lora
        training_text = (self.method == "textual-inversion"
                         or (lora is not None and (lora.text_encoder or lora.text_encoder_2))
                         or (self.method == "full" and self.full is not None and self.full.train_text_encoder))
        if self.cache_text_embeddings and training_text:
            raise ValueError("cache_text_embeddings=true needs frozen text encoders, but this run trains one "
                             "(lora.text_encoder / lora.text_encoder_2, full.train_text_encoder or textual-inversion)")
        return self


def split_setting(item: str, what: str = "override", example: str = EXAMPLE) -> tuple[str, str]:
    """The one reading of a `key=value` argument; `what` (the flag) and `example` word the error."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{what} {item!r} is not key=value", hint=f"for example: {example}")
    return key.strip(), value


def _set(tree: dict, dotted: str, raw: str, what: str) -> None:
    *sections, last = dotted.split(".")
    node = tree
    for key in sections:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{what} {dotted}={raw}: {key} is not a section")
    try:
        node[last] = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or "unreadable"
        raise ConfigError(f"{what} {dotted}={raw}: the value is not valid YAML ({problem})",
                          hint=f"quote text in YAML: {dotted}='\"...\"'") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        shown = raw if len(raw) <= 40 else f"{raw[:40]}... ({len(raw)} characters)"
        raise ConfigError(f"{what} {dotted}={shown}: the value cannot be read ({e})") from None


def parse_overrides(items: Iterable[str], tree: dict | None = None, what: str = "override",
                    example: str = EXAMPLE) -> dict:
    """Dotted `a.b=value` settings, each value read as YAML, set into `tree` (a new dict by default)."""
    tree = {} if tree is None else tree
    for item in items:
        key, raw = split_setting(item, what, example)
        _set(tree, key, raw, what)
    return tree


def parse_named(items: Iterable[str], what: str, example: str) -> dict[str, str]:
    """`NAME=VALUE` arguments -> {name: value}: names as written (dots and all), each given once,
    values non-empty text (paths, host:port), in the order given."""
    named: dict[str, str] = {}
    for item in items:
        name, value = split_setting(item, what, example)
        if name in named:
            raise ConfigError(f"{what} {item!r}: the name {name!r} is given twice", hint="give each name once")
        named[name] = value
    return validate(dict[str, Annotated[str, Field(min_length=1)]], named, what, hint=f"for example: {example}")


def _known_fields(schema, loc: tuple) -> list[str]:
    """The settings a pydantic model accepts at `loc` (a nested section), for an unknown key's message."""
    model = schema
    for key in loc:
        field = getattr(model, "model_fields", {}).get(key)
        if field is None:
            return []
        model = next((t for t in (field.annotation, *get_args(field.annotation))
                      if isinstance(t, type) and issubclass(t, BaseModel)), None)
    return list(getattr(model, "model_fields", {}))


def _describe(error: ValidationError, schema=None) -> str:
    parts = []
    for e in error.errors():
        where = ".".join(str(p) for p in e["loc"]) or "config"
        value = e.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        known = _known_fields(schema, e["loc"][:-1]) if e["type"] == "extra_forbidden" else []
        parts.append(f"{where}: {e['msg']}{shown}" + (f"; expected one of {', '.join(known)}" if known else ""))
    return "; ".join(parts)


def validate(schema: Any, tree: Any, what: str, hint: str | None = None) -> Any:
    """`tree` as `schema` (a pydantic model, or any type pydantic validates); the error names each
    field, the value received and what is expected (for an unknown key: the known ones)."""
    try:
        return TypeAdapter(schema).validate_python(tree)
    except ValidationError as e:
        raise ConfigError(f"invalid {what}: {_describe(e, schema)}", hint=hint) from None


def settings_model(cls: type, **extra: tuple[Any, Any]) -> type[BaseModel]:
    """A strict pydantic model with a dataclass's fields (and `extra` ones, name=(type, default)), so
    `key=value` settings for a dataclass spec are validated as the training config is."""
    def default(f):
        if f.default_factory is not MISSING:
            return Field(default_factory=f.default_factory)
        return ... if f.default is MISSING else f.default  # ...: required

    hints = get_type_hints(cls)
    fields = {f.name: (hints[f.name], default(f)) for f in dataclass_fields(cls)}
    return create_model(cls.__name__, __base__=Strict, **fields, **extra)


def build_config(method: str, tree: dict) -> TrainConfig:
    """A settings tree (what the YAML file holds, with Python values) -> a validated TrainConfig for
    `method`, with the method's own section filled in when left out."""
    tree = dict(tree)
    if tree.setdefault("method", method) != method:
        raise ConfigError(f"the config says method: {tree['method']} but the command is `kiln train {method}`")
    config = validate(TrainConfig, tree, "training config", hint="see `kiln train --help` and README")
    if method == "lora" and config.lora is None:
        config = config.model_copy(update={"lora": LoraConfig()})
    if method == "full" and config.full is None:
        config = config.model_copy(update={"full": FullConfig()})
    if method == "controlnet" and config.controlnet is None:
        config = config.model_copy(update={"controlnet": ControlNetConfig()})
    if method == "dreambooth" and config.dreambooth.use_lora and config.lora is None:
        config = config.model_copy(update={"lora": LoraConfig()})
    return config


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
    return build_config(method, parse_overrides(overrides, tree))
