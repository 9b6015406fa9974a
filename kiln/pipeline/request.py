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
    name: str
    datatype: str  # Triton wire type: BYTES, INT32, INT64, FP32, UINT8
    optional: bool = True


TXT2IMG_INPUTS: tuple[RequestField, ...] = (
    RequestField("prompt", "BYTES", optional=False),
    RequestField("negative_prompt", "BYTES"),
    RequestField("seed", "INT64"),
    RequestField("steps", "INT32"),
    RequestField("guidance_scale", "FP32"),
    RequestField("height", "INT32"),
    RequestField("width", "INT32"),
    RequestField("scheduler", "BYTES"),
)
# image: (N, H, W, 3), one row per image; seeds: the seed each image was drawn with (drawn when absent).
TXT2IMG_OUTPUTS: tuple[tuple[str, str, list[int]], ...] = (
    ("image", "UINT8", [-1, -1, -1, 3]),
    ("seeds", "INT64", [-1]),
)
NUMPY_DTYPES = {"BYTES": np.object_, "INT32": np.int32, "INT64": np.int64, "FP32": np.float32, "UINT8": np.uint8}
RANDOM_SEED = -1
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class Limits:
    """Per-deployment bounds, written into the repository by the builder."""

    max_steps: int = 150
    max_guidance: float = 30.0
    min_size: int = 64
    max_size: int = 1024
    max_prompt_chars: int = 4000


@dataclass(frozen=True)
class Defaults:
    steps: int = 20
    guidance_scale: float = 7.5
    height: int = 512
    width: int = 512
    scheduler: str = "default"


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


def _scalar(raw: dict, name: str):
    value = raw.get(name)
    if value is None:
        return None
    array = np.asarray(value)
    if array.size != 1:
        raise RequestError(name, f"shape {list(array.shape)}", "a single value, shape [1]")
    item = array.reshape(-1)[0]
    return item.decode("utf-8", errors="strict") if isinstance(item, bytes) else item


def _text(raw: dict, name: str, default: str, limits: Limits) -> str:
    try:
        value = _scalar(raw, name)
    except UnicodeDecodeError:
        raise RequestError(name, "<bytes>", "UTF-8 text") from None
    value = default if value is None else value
    if not isinstance(value, str):
        raise RequestError(name, value, "text (BYTES)")
    if len(value) > limits.max_prompt_chars:
        raise RequestError(name, f"<{len(value)} characters>", f"at most {limits.max_prompt_chars} characters")
    return value


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


def parse_request(raw: dict, defaults: Defaults, limits: Limits, size_multiple: int) -> GenerationRequest:
    """Validate a request's raw tensors (name -> array, absent inputs missing or None)."""
    from kiln.pipeline.schedulers import canonical_name

    prompt = _text(raw, "prompt", "", limits)
    if not prompt.strip():
        raise RequestError("prompt", prompt, "non-empty text")
    seed = _integer(raw, "seed", RANDOM_SEED, RANDOM_SEED, MAX_SEED)
    if seed == RANDOM_SEED:
        seed = secrets.randbelow(2**31)
    guidance = _scalar(raw, "guidance_scale")
    if guidance is None:
        guidance = defaults.guidance_scale
    if not isinstance(guidance, (float, int, np.floating, np.integer)) or not math.isfinite(float(guidance)) or not (
        0.0 <= float(guidance) <= limits.max_guidance
    ):
        raise RequestError("guidance_scale", guidance, f"a finite number in [0, {limits.max_guidance}]")
    low_size = max(limits.min_size, size_multiple)
    return GenerationRequest(
        prompt=prompt,
        negative_prompt=_text(raw, "negative_prompt", "", limits),
        seed=seed,
        steps=_integer(raw, "steps", defaults.steps, 1, limits.max_steps),
        guidance_scale=float(guidance),
        height=_integer(raw, "height", defaults.height, low_size, limits.max_size, size_multiple),
        width=_integer(raw, "width", defaults.width, low_size, limits.max_size, size_multiple),
        scheduler=canonical_name(_text(raw, "scheduler", defaults.scheduler, limits)),
    )
