"""The txt2img request: its declared fields (from which the Triton configs and the client derive),
defaults, deployment limits and validation."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np

from kiln.errors import RequestError


@dataclass(frozen=True)
class RequestField:
    """Every input is optional on the wire, so that a missing one reaches Kiln's validation and gets
    a clear error instead of Triton's ensemble "deadlock" message; `required` is enforced there."""

    name: str
    datatype: str  # Triton wire type: BYTES, INT32, INT64, FP32, UINT8
    required: bool = False
    many: bool = False  # several values (one per ControlNet): shape [-1] on the wire, else [1]


TXT2IMG_INPUTS: tuple[RequestField, ...] = (
    RequestField("prompt", "BYTES", required=True),
    RequestField("negative_prompt", "BYTES"),
    RequestField("seed", "INT64"),
    RequestField("steps", "INT32"),
    RequestField("guidance_scale", "FP32"),
    # the fraction of the schedule after which classifier-free guidance stops (the UNet runs at batch 1,
    # as diffusers' SDCFGCutoffCallback does); 1: guided to the end
    RequestField("guidance_cutoff", "FP32"),
    # guidance only between these fractions of the schedule (a guidance interval); outside it the UNet
    # runs at batch 1 on the prompt alone
    RequestField("guidance_start", "FP32"),
    RequestField("guidance_end", "FP32"),
    RequestField("height", "INT32"),
    RequestField("width", "INT32"),
    RequestField("scheduler", "BYTES"),
    RequestField("num_images", "INT32"),
    RequestField("init_image", "BYTES"),  # img2img: an encoded PNG or JPEG
    RequestField("strength", "FP32"),  # img2img: how much of the schedule re-draws the image
    # SDXL's size conditioning (SizeConditioning); other families refuse them
    RequestField("original_height", "INT32"),
    RequestField("original_width", "INT32"),
    RequestField("crop_top", "INT32"),
    RequestField("crop_left", "INT32"),
    RequestField("target_height", "INT32"),
    RequestField("target_width", "INT32"),
    # LoRA adapters registered with the server: "name:scale,name2:scale2" (kiln.pipeline.adapters)
    RequestField("loras", "BYTES"),
    # ControlNets the model serves: which ("name,name2"; default all, in the repository's order), one
    # encoded control image each, and per ControlNet (or one for all) its scale and the fractions of
    # the schedule it acts between
    RequestField("controlnet", "BYTES"),
    RequestField("control_image", "BYTES", many=True),
    RequestField("control_scale", "FP32", many=True),
    RequestField("control_start", "FP32", many=True),
    RequestField("control_end", "FP32", many=True),
)
CONTROL_FIELDS = ("controlnet", "control_image", "control_scale", "control_start", "control_end")
SIZE_CONDITIONING = ("original_height", "original_width", "crop_top", "crop_left", "target_height", "target_width")
MAX_CONDITIONING_SIZE = 8192  # pixels: SDXL was trained on originals up to about 4096
# image: (N, H, W, 3), one row per image; seeds: the seed each image was drawn with (drawn when absent).
TXT2IMG_OUTPUTS: tuple[tuple[str, str, list[int]], ...] = (
    ("image", "UINT8", [-1, -1, -1, 3]),
    ("seeds", "INT64", [-1]),
)
# tokenizer -> pipeline, for each prompt side and each text encoder's tokenizer: 77-token chunks and
# per-token weights, shape (chunks, 77); the first tokenizer's names carry no suffix, the second's `_2`
PROMPT_SIDES = ("prompt", "negative_prompt")


def token_names(side: str, encoder: int = 0) -> tuple[str, str]:
    """The ids and weights tensors the tokenizer writes for one prompt side and text encoder (0, 1)."""
    suffix = f"_{encoder + 1}" if encoder else ""
    return f"{side}_ids{suffix}", f"{side}_weights{suffix}"


def token_tensors(encoders: int = 1) -> dict[str, str]:
    """Every tensor the tokenizer model writes for a family of `encoders` text encoders, with its wire type."""
    return {name: wire for side in PROMPT_SIDES for encoder in range(encoders)
            for name, wire in zip(token_names(side, encoder), ("INT32", "FP32"))}


NUMPY_DTYPES = {"BYTES": np.object_, "INT32": np.int32, "INT64": np.int64, "FP32": np.float32, "UINT8": np.uint8}
RANDOM_SEED = -1
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class Limits:
    """Per-deployment bounds, written into the repository by the builder."""

    max_steps: int = 150
    max_guidance: float = 30.0
    min_size: int = 64
    max_size: int = 0  # largest height or width; 0: this model's size_limit (resolved when a repository is built)
    max_prompt_chars: int = 4000
    max_prompt_tokens: int = 300  # four 77-token chunks
    max_prompt_chunks: int = 8  # BREAK adds chunks; prompt + negative chunks are one text-encoder batch (16)
    max_images: int = 4
    max_image_bytes: int = 8 << 20


def size_limit(native: int) -> int:
    """A model's largest side unless the deployment sets one: twice its native size, at least 1024
    (SD 1.5: 1024; SDXL: 2048, which holds its 1536x640 aspect buckets)."""
    return max(1024, 2 * native)


def limits_for(limits: Limits, native: int) -> Limits:
    """`limits` for one model of `native` size: max_size 0 becomes its size_limit, and a model whose
    native size is below min_size (the 32-pixel glyph demo) accepts its own size when it is asked for."""
    from dataclasses import replace

    limits = limits if limits.max_size else replace(limits, max_size=size_limit(native))
    return replace(limits, min_size=native) if 0 < native < limits.min_size else limits


@dataclass(frozen=True)
class Defaults:
    steps: int = 20
    guidance_scale: float = 7.5
    height: int = 512
    width: int = 512
    scheduler: str = "default"
    strength: float = 0.8
    guidance_cutoff: float = 1.0  # guided to the end
    guidance_start: float = 0.0  # the guidance interval: the whole schedule
    guidance_end: float = 1.0


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL's micro-conditioning; None: the generated size (diffusers' defaults)."""

    original: tuple[int, int] | None = None  # (height, width)
    crop_top_left: tuple[int, int] = (0, 0)
    target: tuple[int, int] | None = None

    def time_ids(self, height: int, width: int) -> list[float]:
        return [*(self.original or (height, width)), *self.crop_top_left, *(self.target or (height, width))]


@dataclass(frozen=True)
class ControlRequest:
    """One ControlNet's part in a request: its name in the repository, the encoded control image, the
    conditioning scale and the fractions of the schedule it acts between."""

    name: str
    image: bytes
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance_scale: float
    height: int
    width: int
    scheduler: str
    num_images: int = 1
    image: bytes | None = None
    strength: float = 1.0
    sizes: SizeConditioning = SizeConditioning()
    controls: tuple[ControlRequest, ...] = ()
    guidance_cutoff: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0

    @property
    def seeds(self) -> list[int]:
        """Image i is drawn with seed + i: each reproducible alone."""
        return [self.seed + i for i in range(self.num_images)]


def _single(raw: dict, name: str):
    """The one value a field holds, as sent (bytes stay bytes), or None when it is absent."""
    value = raw.get(name)
    if value is None:
        return None
    array = np.asarray(value)
    if array.size != 1:
        raise RequestError(name, f"shape {list(array.shape)}", "a single value, shape [1]")
    return array.reshape(-1)[0]


def _scalar(raw: dict, name: str):
    item = _single(raw, name)
    return item.decode("utf-8", errors="strict") if isinstance(item, bytes) else item


def text_field(raw: dict, name: str, default: str, limits: Limits) -> str:
    """A BYTES field as text. Its bytes are bounded before decoding (UTF-8 has at most 4 a character),
    then its characters."""
    item = _single(raw, name)
    if item is None:
        return default
    if isinstance(item, bytes):
        if len(item) > 4 * limits.max_prompt_chars:
            raise RequestError(name, f"<{len(item)} bytes>", f"at most {limits.max_prompt_chars} characters")
        try:
            item = item.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(name, "<bytes>", "UTF-8 text") from None
    if not isinstance(item, str):
        raise RequestError(name, item, "text (BYTES)")
    if len(item) > limits.max_prompt_chars:
        raise RequestError(name, f"<{len(item)} characters>", f"at most {limits.max_prompt_chars} characters")
    return item


def _integer(raw: dict, name: str, default: int, low: int, high: int, multiple: int = 1) -> int:
    value = _scalar(raw, name)
    if value is None:
        return default
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise RequestError(name, value, f"an integer in [{low}, {high}]")
    value = int(value)
    if not low <= value <= high or value % multiple:
        extra = f", a multiple of {multiple}" if multiple > 1 else ""
        raise RequestError(name, value, f"an integer in [{low}, {high}]{extra}")
    return value


def _number(raw: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = _scalar(raw, name)
    if value is None:
        return default
    bracket = "(" if low_open else "["
    allowed = f"a finite number in {bracket}{low:g}, {high:g}]"
    if isinstance(value, (bool, str, bytes)) or not isinstance(value, (float, int, np.floating, np.integer)):
        raise RequestError(name, value, allowed)
    value = float(value)
    if not math.isfinite(value) or not (low < value if low_open else low <= value) or value > high:
        raise RequestError(name, value, allowed)
    return value


def _image(raw: dict, limits: Limits) -> bytes | None:
    value = raw.get("init_image")
    if value is None:
        return None
    array = np.asarray(value)
    if array.size != 1 or not isinstance(array.reshape(-1)[0], bytes):
        raise RequestError("init_image", f"shape {list(array.shape)}", "one encoded PNG or JPEG file (BYTES, shape [1])")
    data = array.reshape(-1)[0]
    if not data or len(data) > limits.max_image_bytes:
        raise RequestError("init_image", f"<{len(data)} bytes>", f"a PNG or JPEG file of 1 to {limits.max_image_bytes} bytes")
    return data


def _sizes(raw: dict, conditioned: bool) -> SizeConditioning:
    given = [name for name in SIZE_CONDITIONING if raw.get(name) is not None]
    if given and not conditioned:
        raise RequestError(given[0], _scalar(raw, given[0]), "nothing: only SDXL models take size conditioning "
                           "(original/target size, crop); leave it out for this model")
    values = {name: _integer(raw, name, -1, 0 if name.startswith("crop") else 1, MAX_CONDITIONING_SIZE) for name in given}

    def pair(first: str, second: str, default):
        if (first in values) != (second in values):
            missing = second if first in values else first
            raise RequestError(missing, None, f"an integer given together with {first if missing == second else second}")
        return (values[first], values[second]) if first in values else default

    return SizeConditioning(pair("original_height", "original_width", None), pair("crop_top", "crop_left", (0, 0)),
                            pair("target_height", "target_width", None))


def _controls(raw: dict, served: tuple[str, ...], limits: Limits) -> tuple[ControlRequest, ...]:
    """The request's ControlNets: names (default every served one, in order), one image each, and
    scales, starts and ends given once for all or once per ControlNet."""
    from kiln.export.specs import MAX_CONTROL_SCALE

    given = [name for name in CONTROL_FIELDS if raw.get(name) is not None]
    if not given:
        return ()
    if not served:
        raise RequestError(given[0], "<given>", "nothing: this model serves no ControlNet (export it with "
                           "kiln export onnx MODEL_DIR ONNX_DIR --controlnet NAME=DIR, or leave the control fields out)")
    names = served
    if raw.get("controlnet") is not None:
        text = text_field(raw, "controlnet", "", limits)
        names = tuple(name.strip() for name in text.split(","))
        unknown = [name for name in names if name not in served]
        if unknown or not text.strip():
            raise RequestError("controlnet", text, f"names from {list(served)}, comma-separated")
        if len(set(names)) != len(names):
            raise RequestError("controlnet", text, "each ControlNet once")
    if raw.get("control_image") is None:
        raise RequestError("control_image", None, f"one encoded PNG or JPEG per ControlNet ({', '.join(names)}) "
                           f"when {given[0]} is given")
    images = np.asarray(raw["control_image"]).reshape(-1)
    if len(images) != len(names):
        raise RequestError("control_image", f"<{len(images)} images>", f"one image per ControlNet: {len(names)} for "
                           f"{list(names)} (name them with controlnet)")
    for data in images:
        if not isinstance(data, bytes) or not data or len(data) > limits.max_image_bytes:
            size = len(data) if isinstance(data, bytes) else type(data).__name__
            raise RequestError("control_image", f"<{size} bytes>",
                               f"encoded PNG or JPEG files of 1 to {limits.max_image_bytes} bytes (BYTES)")

    def per_control(field: str, default: float, low: float, high: float) -> list[float]:
        value = raw.get(field)
        if value is None:
            return [default] * len(names)
        values = np.asarray(value).reshape(-1)
        if len(values) not in (1, len(names)):
            raise RequestError(field, f"<{len(values)} values>", f"one value for every ControlNet, or one each ({len(names)})")
        out = [_number({field: v}, field, default, low, high) for v in values]
        return out * len(names) if len(out) == 1 else out

    scales = per_control("control_scale", 1.0, 0.0, MAX_CONTROL_SCALE)
    starts = per_control("control_start", 0.0, 0.0, 1.0)
    ends = per_control("control_end", 1.0, 0.0, 1.0)
    for start, end in zip(starts, ends):
        if start >= end:
            raise RequestError("control_start", start, f"a fraction below control_end ({end:g}): the ControlNet would "
                               "never act")
    return tuple(ControlRequest(name, bytes(image), scale, start, end)
                 for name, image, scale, start, end in zip(names, images, scales, starts, ends))


def _own_size(image: bytes, low: int, high: int, multiple: int) -> tuple[int, int]:
    """An init image's (height, width) from its header, each rounded down to `multiple`: img2img keeps
    the image's size unless the request gives one, as diffusers' img2img pipelines do."""
    import io

    from PIL import Image

    try:
        width, height = Image.open(io.BytesIO(image)).size  # the header only
    except Exception:
        raise RequestError("init_image", f"<{len(image)} bytes>", "a PNG or JPEG file") from None
    rounded = (height // multiple * multiple, width // multiple * multiple)
    if not all(low <= side <= high for side in rounded):
        raise RequestError("init_image", f"<{width}x{height} pixels>",
                           f"sides from {low} to {high} pixels once rounded down to multiples of {multiple}, "
                           "or height and width to resize it to")
    return rounded


def _interval(raw: dict, defaults: Defaults) -> tuple[float, float]:
    """guidance_start < guidance_end, both fractions of the schedule."""
    start = _number(raw, "guidance_start", defaults.guidance_start, 0.0, 1.0)
    end = _number(raw, "guidance_end", defaults.guidance_end, 0.0, 1.0)
    if start >= end:
        field = "guidance_start" if raw.get("guidance_start") is not None else "guidance_end"
        raise RequestError(field, float(f"{start if field == 'guidance_start' else end:.6g}"),
                           f"guidance_start below guidance_end (got {start:g} and {end:g}; for no guidance at all "
                           "send guidance_scale 1)")
    return start, end


def parse_request(raw: dict, defaults: Defaults, limits: Limits, size_multiple: int,
                  conditioned: bool = False, controlnets: tuple[str, ...] = ()) -> GenerationRequest:
    """Validate a request's raw tensors (name -> array, absent inputs missing or None). `conditioned`:
    the model takes SDXL's size conditioning; `controlnets`: the ControlNets it serves, by name."""
    from kiln.pipeline.schedulers import canonical_name

    if raw.get("prompt") is None:
        raise RequestError("prompt", None, "non-empty text (the prompt is required)")
    prompt = text_field(raw, "prompt", "", limits)
    if not prompt.strip():
        raise RequestError("prompt", prompt, "non-empty text")
    num_images = _integer(raw, "num_images", 1, 1, limits.max_images)
    seed = _integer(raw, "seed", RANDOM_SEED, RANDOM_SEED, MAX_SEED - limits.max_images)
    if seed == RANDOM_SEED:
        seed = secrets.randbelow(2**31)
    low_size = max(limits.min_size, size_multiple)
    image = _image(raw, limits)
    steps = _integer(raw, "steps", defaults.steps, 1, limits.max_steps)
    if image is None and raw.get("strength") is not None:
        raise RequestError("strength", _scalar(raw, "strength"), "nothing without init_image: strength is img2img's "
                           "(leave it out, or send init_image)")
    strength = _number(raw, "strength", defaults.strength, 0.0, 1.0, low_open=True) if image is not None else 1.0
    default_size = (defaults.height, defaults.width)
    if image is not None and (raw.get("height") is None or raw.get("width") is None):
        default_size = _own_size(image, low_size, limits.max_size, size_multiple)
    if int(steps * strength) < 1:  # img2img skips the first (1 - strength) of the schedule: nothing would be left
        raise RequestError("strength", strength, f"at least 1/steps = {1 / steps:.4g} at steps={steps} "
                           "(or more steps), so that a denoising step remains")
    start, end = _interval(raw, defaults)
    return GenerationRequest(
        prompt=prompt,
        negative_prompt=text_field(raw, "negative_prompt", "", limits),
        seed=seed,
        steps=steps,
        guidance_scale=_number(raw, "guidance_scale", defaults.guidance_scale, 0.0, limits.max_guidance),
        guidance_cutoff=_number(raw, "guidance_cutoff", defaults.guidance_cutoff, 0.0, 1.0),
        guidance_start=start,
        guidance_end=end,
        height=_integer(raw, "height", default_size[0], low_size, limits.max_size, size_multiple),
        width=_integer(raw, "width", default_size[1], low_size, limits.max_size, size_multiple),
        scheduler=canonical_name(text_field(raw, "scheduler", defaults.scheduler, limits)),
        num_images=num_images,
        image=image,
        strength=strength,
        sizes=_sizes(raw, conditioned),
        controls=_controls(raw, tuple(controlnets), limits),
    )
