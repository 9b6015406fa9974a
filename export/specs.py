"""One declared spec per exported component. ONNX export, parity checks, TensorRT profiles, Triton
config.pbtxt dims and the client schema all read these declarations; tensor names follow optimum's
ONNX layout for Stable Diffusion (text_encoder/, unet/, vae_decoder/, vae_encoder/)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kiln.models.folder import ModelInfo

# Axes that vary per request. Every other symbolic name is a constant of the model (ModelDims).
DYNAMIC_AXES = ("batch", "sequence", "latent_height", "latent_width", "height", "width")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy name: float32, int32
    shape: tuple[str | int, ...]  # symbolic names from DYNAMIC_AXES or ModelDims, or fixed ints
    sampler: str = "normal"  # how a dummy input is drawn: normal | token_ids | timestep

    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if d in DYNAMIC_AXES}


@dataclass(frozen=True)
class Tolerance:
    """Stated bound for ONNX-vs-source parity: max|a-b| <= atol + rtol*max|b| and, when set,
    ||a-b|| / ||b|| <= max_rel_l2."""

    atol: float
    rtol: float
    max_rel_l2: float | None = None

# An export whose UNet carries calibrated int8 Q/DQ nodes (`kiln export qdq`); the configs and the
# TensorRT planner read it from the export manifest.
QDQ_PRECISION = "int8-qdq"


@dataclass(frozen=True)
class ComponentSpec:
    name: str  # folder and Triton model name: text_encoder, unet, vae_decoder, vae_encoder
    source: str  # diffusers subfolder the weights come from
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    tolerance: Tolerance
    reduced_precision: bool = True  # converted by --fp16/--int8; the VAE stays fp32 (fp16 overflow)
    cache_outputs: bool = False  # served with Kiln's per-row output cache (identical prompts skip the encoder)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def tensor(self, name: str) -> TensorSpec:
        for t in self.inputs + self.outputs:
            if t.name == name:
                return t
        raise KeyError(f"{self.name} has no tensor {name!r}")

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: t.dynamic_axes() for t in self.inputs + self.outputs if t.dynamic_axes()}


@dataclass(frozen=True)
class ModelDims:
    """Constants of one model that fill the non-dynamic symbols of the specs."""

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

    @classmethod
    def from_model(cls, info: ModelInfo, unet_config: dict, text_config: dict) -> "ModelDims":
        return cls(
            latent_channels=info.latent_channels,
            hidden_size=text_config["hidden_size"],
            sequence=info.max_length,
            vocab_size=text_config["vocab_size"],
            vae_scale_factor=info.vae_scale_factor,
            unet_factor=2 ** (len(unet_config["block_out_channels"]) - 1),
            default_latent=info.default_size // info.vae_scale_factor,
        )


@dataclass(frozen=True)
class ShapePoint:
    """One concrete assignment of the dynamic axes."""

    batch: int
    latent_height: int
    latent_width: int

    def axes(self, dims: ModelDims) -> dict[str, int]:
        return {
            "batch": self.batch,
            "sequence": dims.sequence,
            "latent_height": self.latent_height,
            "latent_width": self.latent_width,
            "height": self.latent_height * dims.vae_scale_factor,
            "width": self.latent_width * dims.vae_scale_factor,
        }


def concrete_shape(tensor: TensorSpec, point: ShapePoint, dims: ModelDims) -> tuple[int, ...]:
    values = {**point.axes(dims), **_model_constants(dims)}
    return tuple(d if isinstance(d, int) else values[d] for d in tensor.shape)


def _model_constants(dims: ModelDims) -> dict[str, int]:
    return {
        "latent_channels": dims.latent_channels,
        "latent_parameters": dims.latent_parameters,
        "hidden_size": dims.hidden_size,
        "image_channels": dims.image_channels,
    }


def config_dims(tensor: TensorSpec, dims: ModelDims) -> list[int]:
    """Triton dims (batch axis excluded): dynamic axes are -1, model constants are filled in."""
    constants = _model_constants(dims)
    out = []
    for d in tensor.shape[1:] if tensor.shape and tensor.shape[0] == "batch" else tensor.shape:
        if isinstance(d, int):
            out.append(d)
        elif d in DYNAMIC_AXES:
            out.append(-1)
        else:
            out.append(constants[d])
    return out


MAX_ABS_INPUT = 1e4  # latents, embeddings, pixels and timesteps all stay far below; 3e38 overflows to NaN inside


def input_problem(tensor: TensorSpec, value: np.ndarray, dims: ModelDims, limits) -> str | None:
    """What is wrong with one served input (Triton has checked dtype and rank), or None. Everything a
    pipeline sends passes: token ids inside the vocabulary, at most one 77-token window per call (and
    at most as many as prompt and negative chunks make), embeddings of at most `limits.max_prompt_chunks`
    windows, spatial sides that the UNet's down-sampling divides, within `limits.max_size`, at most as
    many images as a guided request of `limits.max_images` makes, floats finite and within MAX_ABS_INPUT.
    `limits` is a kiln.pipeline.request.Limits."""
    axes = dict(zip(tensor.shape, value.shape))
    if 0 in value.shape:
        return "a non-empty tensor"
    longest = dims.sequence if tensor.sampler == "token_ids" else limits.max_prompt_chunks * dims.sequence
    if "sequence" in axes and axes["sequence"] > longest:
        return f"a sequence of at most {longest} tokens"
    largest_batch = 2 * (limits.max_prompt_chunks if tensor.sampler == "token_ids" else limits.max_images)
    if axes.get("batch", 1) > largest_batch:
        return f"a batch of at most {largest_batch} in one request"
    latent_step, pixel_step = dims.unet_factor, dims.unet_factor * dims.vae_scale_factor
    for axis, step, bound in (("latent_height", latent_step, limits.max_size // dims.vae_scale_factor),
                              ("latent_width", latent_step, limits.max_size // dims.vae_scale_factor),
                              ("height", pixel_step, limits.max_size), ("width", pixel_step, limits.max_size)):
        if axis in axes and (axes[axis] > bound or axes[axis] % step):
            return f"{axis} a multiple of {step}, at most {bound}"
    if tensor.sampler == "token_ids" and (value.min() < 0 or value.max() >= dims.vocab_size):
        return f"token ids in [0, {dims.vocab_size})"
    if tensor.dtype.startswith("float") and not (np.abs(value) <= MAX_ABS_INPUT).all():  # NaN fails too
        return f"finite numbers within +-{MAX_ABS_INPUT:g}"
    return None


def dummy_inputs(spec: ComponentSpec, point: ShapePoint, dims: ModelDims, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for t in spec.inputs:
        shape = concrete_shape(t, point, dims)
        if t.sampler == "token_ids":
            feeds[t.name] = rng.integers(0, dims.vocab_size, size=shape).astype(t.dtype)
        elif t.sampler == "timestep":
            feeds[t.name] = rng.uniform(0, 1000, size=shape).astype(t.dtype)
        else:
            feeds[t.name] = rng.standard_normal(shape).astype(t.dtype)
    return feeds


def parity_points(dims: ModelDims) -> tuple[ShapePoint, ShapePoint]:
    """The two shapes every export is checked at: the native square size at batch 1, and a
    smaller non-square size at batch 2 (the classifier-free-guidance pair)."""
    side = dims.default_latent
    small = max(dims.unet_factor, (side // 2) // dims.unet_factor * dims.unet_factor)
    return ShapePoint(1, side, side), ShapePoint(2, small, small + dims.unet_factor)


_FP32 = Tolerance(atol=1e-4, rtol=1e-4)

TEXT_ENCODER = ComponentSpec(
    name="text_encoder",
    source="text_encoder",
    inputs=(TensorSpec("input_ids", "int32", ("batch", "sequence"), "token_ids"),),
    outputs=(
        TensorSpec("last_hidden_state", "float32", ("batch", "sequence", "hidden_size")),
        TensorSpec("pooler_output", "float32", ("batch", "hidden_size")),
    ),
    tolerance=_FP32,
    cache_outputs=True,
)

UNET = ComponentSpec(
    name="unet",
    source="unet",
    inputs=(
        TensorSpec("sample", "float32", ("batch", "latent_channels", "latent_height", "latent_width")),
        TensorSpec("timestep", "float32", ("batch",), "timestep"),
        TensorSpec("encoder_hidden_states", "float32", ("batch", "sequence", "hidden_size")),
    ),
    outputs=(TensorSpec("out_sample", "float32", ("batch", "latent_channels", "latent_height", "latent_width")),),
    tolerance=_FP32,
)

VAE_DECODER = ComponentSpec(
    name="vae_decoder",
    source="vae",
    inputs=(TensorSpec("latent_sample", "float32", ("batch", "latent_channels", "latent_height", "latent_width")),),
    outputs=(TensorSpec("sample", "float32", ("batch", "image_channels", "height", "width")),),
    tolerance=Tolerance(atol=1e-3, rtol=1e-3),
    reduced_precision=False,
)

VAE_ENCODER = ComponentSpec(
    name="vae_encoder",
    source="vae",
    inputs=(TensorSpec("sample", "float32", ("batch", "image_channels", "height", "width")),),
    outputs=(
        TensorSpec("latent_parameters", "float32", ("batch", "latent_parameters", "latent_height", "latent_width")),
    ),
    tolerance=Tolerance(atol=1e-3, rtol=1e-3),
    reduced_precision=False,
)

COMPONENTS: dict[str, ComponentSpec] = {s.name: s for s in (TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER)}

# Bounds for converted weights, measured as relative L2 against the fp32 source.
PRECISION_TOLERANCE = {
    "fp16": Tolerance(atol=float("inf"), rtol=0.0, max_rel_l2=1e-2),
    "int8": Tolerance(atol=float("inf"), rtol=0.0, max_rel_l2=5e-2),
}
