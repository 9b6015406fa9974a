"""One declaration per exported component: its tensors and everything the later stages do with it.

ONNX export (the PyTorch wrapper it traces), parity checks and their tolerances per precision,
precision conversion and quantisation, TensorRT profiles (its batch under classifier-free guidance),
Triton config.pbtxt dims, input validation, the embedding cache and the engine adapter that runs it
(kiln.pipeline.engines) all read these declarations. Adding a component is one ComponentSpec here and
its wrapper in kiln.export.wrappers; a model family (SD 1.x/2.x, SDXL) is the tuple of specs its
export holds (Family). Tensor names follow optimum's ONNX layout for Stable Diffusion."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Mapping

import numpy as np

from kiln.models.folder import SDXL_TIME_IDS, ModelDims

# Axes that vary per request. Every other symbolic name is a constant of the model (ModelDims), or one
# of these divided by a power of two ("latent_height/4": a ControlNet residual's side).
DYNAMIC_AXES = ("batch", "sequence", "latent_height", "latent_width", "height", "width")


def is_dynamic(axis) -> bool:
    return isinstance(axis, str) and axis.split("/")[0] in DYNAMIC_AXES


def axis_value(axis: str, values: dict[str, int]) -> int:
    """A (possibly derived) axis' size given the base axes' sizes."""
    base, _, divisor = axis.partition("/")
    return values[base] // int(divisor) if divisor else values[base]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy name: float32, int32
    shape: tuple[str | int, ...]  # symbolic names from DYNAMIC_AXES or ModelDims, or fixed ints
    sampler: str = "normal"  # how a dummy input is drawn: normal | token_ids | timestep | sizes | image | scale
    optional: bool = False  # zeros when left out (a UNet's ControlNet residuals when a request has no control)

    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if is_dynamic(d)}


@dataclass(frozen=True)
class Tolerance:
    """Stated bound for ONNX-vs-source parity: max|a-b| <= atol + rtol*max|b| and, when set,
    ||a-b|| / ||b|| <= max_rel_l2."""

    atol: float
    rtol: float
    max_rel_l2: float | None = None

# An export whose quantisable component carries calibrated int8 Q/DQ nodes (`kiln export qdq`); the
# configs and the TensorRT planner read it from the export manifest.
QDQ_PRECISION = "int8-qdq"
EXPORT_PRECISIONS = ("fp32", "fp16", "int8")  # what `kiln export onnx` writes


@dataclass(frozen=True)
class Tolerances:
    """A component's stated bounds per precision.

    `onnx`: the exported file against the fp32 PyTorch module, by export precision (fp32, fp16, int8);
    `tensorrt`: relative L2 of a TensorRT engine against ONNX Runtime running the same ONNX file, by
    the precision of the export it was built from (an fp32 export makes fp16 engines; an int8-qdq one
    int8 engines of its quantised component)."""

    onnx: Mapping[str, Tolerance]
    tensorrt: Mapping[str, float]


@dataclass(frozen=True)
class ComponentSpec:
    name: str  # folder and Triton model name
    source: str  # diffusers subfolder the weights come from
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    wrapper: str = field(repr=False)  # its class in kiln.export.wrappers: `.load(folder)`, module(inputs) -> outputs
    tolerances: Tolerances = field(repr=False)
    guided: bool = False  # sees prompt and negative prompt together: its batch doubles under guidance
    reduced_precision: bool = True  # converted by --fp16/--int8; False: stays fp32 (the VAE overflows in fp16)
    quantisable: bool = False  # `kiln export qdq` calibrates it to int8 Q/DQ
    cache_outputs: bool = False  # served with Kiln's per-row output cache (identical prompts skip the encoder)
    required: bool = True  # a complete export has it; optional ones enable a feature (img2img)
    adaptable: bool = False  # `--lora-inputs` gives it per-request LoRA inputs (kiln.pipeline.adapters)
    # onnxruntime's transformer optimizer's model type for its fused-attention graph (kiln.export.optimize);
    # None: nothing of it fuses
    fusion: str | None = None

    def precision(self, requested: str) -> str:
        """The precision this component is exported at when `requested` is asked for."""
        return requested if self.reduced_precision else "fp32"

    def onnx_tolerance(self, precision: str) -> Tolerance:
        return self.tolerances.onnx[self.precision(precision)]

    def trt_tolerance(self, exported_precision: str) -> float:
        """Bound for its engine built from an export of `exported_precision`."""
        quantised = exported_precision == QDQ_PRECISION and self.quantisable
        return self.tolerances.tensorrt[QDQ_PRECISION if quantised else "fp32"]

    def batch(self, images: int, guidance: bool = True) -> int:
        """The batch it sees for `images` images of one request."""
        return 2 * images if guidance and self.guided else images

    def load_torch(self, model_dir: Path, folder: Path | None = None):
        """The fp32 PyTorch module whose forward matches the inputs and outputs (torch is imported
        here, not with the specs: the CLI and the clients read them without it). `folder`: where its
        weights are when not in the model's subfolder (a ControlNet's own folder)."""
        from kiln.export import wrappers

        return getattr(wrappers, self.wrapper).load(Path(folder or Path(model_dir) / self.source)).eval()

    def identity(self) -> dict:
        """What its exported file depends on, for artifact keys."""
        return {"name": self.name, "source": self.source, "inputs": [asdict(t) for t in self.inputs],
                "outputs": [asdict(t) for t in self.outputs], "tolerance": asdict(self.onnx_tolerance("fp32")),
                "reduced_precision": self.reduced_precision, "cache_outputs": self.cache_outputs}

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


# the shapes a component is warmed up at when it loads (python_models on the embedded target, Triton's
# model_warmup on the ngc target): one image, 8x8 latents
WARMUP_POINT = ShapePoint(batch=1, latent_height=8, latent_width=8)


def concrete_shape(tensor: TensorSpec, point: ShapePoint, dims: ModelDims) -> tuple[int, ...]:
    values = {**point.axes(dims), **_model_constants(dims)}
    return tuple(d if isinstance(d, int) else axis_value(d, values) for d in tensor.shape)


def _model_constants(dims: ModelDims) -> dict[str, int]:
    return {
        "latent_channels": dims.latent_channels,
        "latent_parameters": dims.latent_parameters,
        "hidden_size": dims.hidden_size,
        "image_channels": dims.image_channels,
        "hidden_size_2": dims.hidden_size_2,
        "pooled_size": dims.pooled_size,
        "cross_attention_dim": dims.cross_attention_dim,
    }


def config_dims(tensor: TensorSpec, dims: ModelDims) -> list[int]:
    """Triton dims (batch axis excluded): dynamic axes are -1, model constants are filled in."""
    constants = _model_constants(dims)
    out = []
    for d in tensor.shape[1:] if tensor.shape and tensor.shape[0] == "batch" else tensor.shape:
        if isinstance(d, int):
            out.append(d)
        elif is_dynamic(d):
            out.append(-1)
        else:
            out.append(constants[d])
    return out


MAX_CONTROL_SCALE = 2.0  # a ControlNet's conditioning scale (A1111's weight slider spans 0 to 2 too)
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
    if tensor.sampler == "image" and not ((value >= 0) & (value <= 1)).all():  # NaN fails too
        return "pixel values in [0, 1]"
    if tensor.sampler == "scale" and not ((value >= 0) & (value <= MAX_CONTROL_SCALE)).all():
        return f"scales in [0, {MAX_CONTROL_SCALE:g}]"
    if tensor.dtype.startswith("float") and not (np.abs(value) <= MAX_ABS_INPUT).all():  # NaN fails too
        return f"finite numbers within +-{MAX_ABS_INPUT:g}"
    return None


def axes_problem(spec: ComponentSpec, feeds: dict[str, np.ndarray], dims: ModelDims | None = None) -> str | None:
    """What makes a call's inputs disagree with each other (each one alone may pass input_problem):
    one size per axis across every input, each derived axis its base divided as declared (a
    ControlNet residual a quarter of the latents' side), and with `dims` pixel sides the latents'
    times the VAE's factor (a ControlNet's control image). Optional inputs come all together or not
    at all (a ControlNet hands the UNet every residual)."""
    optional = [t.name for t in spec.inputs if t.optional]
    given = [name for name in optional if feeds.get(name) is not None]
    if given and len(given) != len(optional):
        missing = [name for name in optional if name not in given]
        return (f"the inputs {optional} come all together or not at all: {len(given)} of {len(optional)} given "
                f"({missing[0]} missing)")
    seen: dict[str, tuple[int, str]] = {}
    for t in spec.inputs:
        value = feeds.get(t.name)
        if value is None:
            continue
        for axis, size in zip(t.shape, np.shape(value)):
            if not is_dynamic(axis):
                continue
            base, _, divisor = axis.partition("/")
            if divisor:
                if base in seen and seen[base][0] // int(divisor) != size:
                    return (f"{t.name}'s {axis} is {size}: {seen[base][1]} makes {base} {seen[base][0]}, so it must be "
                            f"{seen[base][0] // int(divisor)}")
                continue
            if base in seen and seen[base][0] != size:
                return f"{t.name}'s {base} is {size}, {seen[base][1]}'s is {seen[base][0]}: they must agree"
            seen.setdefault(base, (size, t.name))
    for pixels, latent in (("height", "latent_height"), ("width", "latent_width")):
        if dims and pixels in seen and latent in seen and seen[pixels][0] != seen[latent][0] * dims.vae_scale_factor:
            return (f"{seen[pixels][1]}'s {pixels} is {seen[pixels][0]}: {seen[latent][1]} makes {latent} "
                    f"{seen[latent][0]}, so it must be {seen[latent][0] * dims.vae_scale_factor}")
    return None


def complete_feeds(spec: ComponentSpec, feeds: dict) -> dict:
    """`feeds` with every optional input left out filled with zeros of its shape, sized from the other
    inputs' axes (numpy arrays, or torch tensors on their device)."""
    missing = [t for t in spec.inputs if t.optional and feeds.get(t.name) is None]
    if not missing:
        return feeds
    values = {}
    for t in spec.inputs:
        if feeds.get(t.name) is not None:
            values.update({axis: size for axis, size in zip(t.shape, feeds[t.name].shape) if axis in DYNAMIC_AXES})
    first = feeds[spec.inputs[0].name]
    out = dict(feeds)
    for t in missing:
        shape = tuple(d if isinstance(d, int) else axis_value(d, values) for d in t.shape)
        if isinstance(first, np.ndarray):
            out[t.name] = np.zeros(shape, dtype=t.dtype)
        else:
            import torch

            out[t.name] = torch.zeros(shape, dtype=getattr(torch, t.dtype), device=first.device)
    return out


def dummy_inputs(spec: ComponentSpec, point: ShapePoint, dims: ModelDims, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for t in spec.inputs:
        shape = concrete_shape(t, point, dims)
        if t.sampler == "token_ids":
            feeds[t.name] = rng.integers(0, dims.vocab_size, size=shape).astype(t.dtype)
        elif t.sampler == "timestep":
            feeds[t.name] = rng.uniform(0, 1000, size=shape).astype(t.dtype)
        elif t.sampler == "sizes":  # SDXL's size conditioning: pixel sizes and crop offsets
            feeds[t.name] = rng.integers(0, 2048, size=shape).astype(t.dtype)
        elif t.sampler == "image":  # a ControlNet's control image: pixels in [0, 1]
            feeds[t.name] = rng.uniform(0, 1, size=shape).astype(t.dtype)
        elif t.sampler == "scale":
            feeds[t.name] = rng.uniform(0.5, 1.5, size=shape).astype(t.dtype)
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
_VAE = Tolerance(atol=1e-3, rtol=1e-3)
# Converted weights, measured as relative L2 against the fp32 source.
_FP16 = Tolerance(atol=float("inf"), rtol=0.0, max_rel_l2=1e-2)
_INT8 = Tolerance(atol=float("inf"), rtol=0.0, max_rel_l2=5e-2)

TEXT_ENCODER = ComponentSpec(
    name="text_encoder",
    source="text_encoder",
    inputs=(TensorSpec("input_ids", "int32", ("batch", "sequence"), "token_ids"),),
    outputs=(
        TensorSpec("last_hidden_state", "float32", ("batch", "sequence", "hidden_size")),
        TensorSpec("pooler_output", "float32", ("batch", "hidden_size")),
    ),
    wrapper="TextEncoder",
    tolerances=Tolerances(onnx={"fp32": _FP32, "fp16": _FP16, "int8": _INT8}, tensorrt={"fp32": 2e-2}),
    guided=True,
    cache_outputs=True,
    adaptable=True,
    fusion="clip",
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
    wrapper="UNet",
    # int8 engine vs ONNX Runtime running the same Q/DQ file: the scales are shared, so what differs is
    # TensorRT's fp16 between the quantised layers and its int8 kernels' rounding
    tolerances=Tolerances(onnx={"fp32": _FP32, "fp16": _FP16, "int8": _INT8},
                          tensorrt={"fp32": 2e-2, QDQ_PRECISION: 5e-2}),
    guided=True,
    quantisable=True,
    adaptable=True,
    fusion="unet",
)

VAE_DECODER = ComponentSpec(
    name="vae_decoder",
    source="vae",
    inputs=(TensorSpec("latent_sample", "float32", ("batch", "latent_channels", "latent_height", "latent_width")),),
    outputs=(TensorSpec("sample", "float32", ("batch", "image_channels", "height", "width")),),
    wrapper="VaeDecoder",
    tolerances=Tolerances(onnx={"fp32": _VAE}, tensorrt={"fp32": 1e-2}),
    reduced_precision=False,
)

VAE_ENCODER = ComponentSpec(
    name="vae_encoder",
    source="vae",
    inputs=(TensorSpec("sample", "float32", ("batch", "image_channels", "height", "width")),),
    outputs=(
        TensorSpec("latent_parameters", "float32", ("batch", "latent_parameters", "latent_height", "latent_width")),
    ),
    wrapper="VaeEncoder",
    tolerances=Tolerances(onnx={"fp32": _VAE}, tensorrt={"fp32": 1e-2}),
    reduced_precision=False,
    required=False,  # img2img only
)

# SDXL: two text encoders whose penultimate hidden states sit side by side (the first CLIP ViT-L, the
# second OpenCLIP ViT-bigG with its pooled, projected `text_embeds`), and a UNet that also takes the
# pooled embedding and six size-conditioning values per image (diffusers' added_cond_kwargs).
SDXL_TEXT_ENCODER = ComponentSpec(
    name="text_encoder",
    source="text_encoder",
    inputs=(TensorSpec("input_ids", "int32", ("batch", "sequence"), "token_ids"),),
    outputs=(TensorSpec("hidden_states", "float32", ("batch", "sequence", "hidden_size")),),
    wrapper="PenultimateTextEncoder",
    tolerances=TEXT_ENCODER.tolerances,
    guided=True,
    cache_outputs=True,
    adaptable=True,
    fusion="clip",
)

SDXL_TEXT_ENCODER_2 = ComponentSpec(
    name="text_encoder_2",
    source="text_encoder_2",
    inputs=(TensorSpec("input_ids", "int32", ("batch", "sequence"), "token_ids"),),
    outputs=(
        TensorSpec("hidden_states", "float32", ("batch", "sequence", "hidden_size_2")),
        TensorSpec("text_embeds", "float32", ("batch", "pooled_size")),
    ),
    wrapper="PenultimateTextEncoderWithProjection",
    tolerances=TEXT_ENCODER.tolerances,
    guided=True,
    cache_outputs=True,
    adaptable=True,
    fusion="clip",
)

SDXL_UNET = ComponentSpec(
    name="unet",
    source="unet",
    inputs=(
        TensorSpec("sample", "float32", ("batch", "latent_channels", "latent_height", "latent_width")),
        TensorSpec("timestep", "float32", ("batch",), "timestep"),
        TensorSpec("encoder_hidden_states", "float32", ("batch", "sequence", "cross_attention_dim")),
        TensorSpec("text_embeds", "float32", ("batch", "pooled_size")),
        TensorSpec("time_ids", "float32", ("batch", SDXL_TIME_IDS), "sizes"),
    ),
    outputs=UNET.outputs,
    wrapper="ConditionedUNet",
    tolerances=UNET.tolerances,
    guided=True,
    quantisable=True,
    adaptable=True,
    fusion="unet",
)


@dataclass(frozen=True)
class Family:
    """The component layout of a model family: which specs an export holds, which text encoders run
    on which tokenizer's ids (in the order their hidden states are concatenated), and which encoder's
    pooled output the UNet also takes."""

    name: str  # sd | sdxl
    specs: tuple[ComponentSpec, ...]
    tokenizers: tuple[str, ...]  # tokenizer folder per text encoder
    text_encoders: tuple[str, ...]
    pooled: tuple[str, str] | None = None  # (component, output) the UNet takes as text_embeds (first chunk, unweighted)
    controlnets: tuple[str, ...] = ()  # ControlNet components (controlled()), whose residuals the UNet adds

    def controlled(self, dims: ModelDims, controlnets) -> "Family":
        """This layout with ControlNets (component names, CONTROLNET_PREFIX + a name): each one a
        component that reads what the UNet reads plus a control image and a scale, and the UNet
        taking their summed residuals as optional inputs (zeros: the plain UNet's output exactly)."""
        names = tuple(controlnets)
        if not names:
            return self
        if not dims.control:
            raise KeyError("these model dimensions have no ControlNet residual layout (ModelDims.control)")
        unet = self.spec("unet")
        controlled_unet = replace(unet, inputs=unet.inputs + residual_tensors(dims, optional=True),
                                  wrapper=f"Controlled{unet.wrapper}")
        specs = tuple(controlled_unet if s.name == "unet" else s for s in self.specs)
        return replace(self, specs=specs + tuple(controlnet_spec(name, unet, dims) for name in names), controlnets=names)

    @property
    def components(self) -> dict[str, ComponentSpec]:
        return {s.name: s for s in self.specs}

    def spec(self, name: str) -> ComponentSpec:
        try:
            return self.components[name]
        except KeyError:
            raise KeyError(f"the {self.name} family has no component {name!r}: it has {list(self.components)}") from None

    @property
    def quantised(self) -> ComponentSpec:
        """What `kiln export qdq` calibrates."""
        return next(s for s in self.specs if s.quantisable)

    @property
    def cached(self) -> tuple[ComponentSpec, ...]:
        return tuple(s for s in self.specs if s.cache_outputs)


SD = Family("sd", (TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER), ("tokenizer",), ("text_encoder",))
SDXL = Family("sdxl", (SDXL_TEXT_ENCODER, SDXL_TEXT_ENCODER_2, SDXL_UNET, VAE_DECODER, VAE_ENCODER),
              ("tokenizer", "tokenizer_2"), ("text_encoder", "text_encoder_2"), pooled=("text_encoder_2", "text_embeds"))
FAMILIES: dict[str, Family] = {"sd1": SD, "sd2": SD, "sdxl": SDXL}  # by kiln.models.folder's family names


CONTROLNET_PREFIX = "controlnet_"  # a ControlNet's component (and Triton model) name: controlnet_<name>


def residual_names(count: int) -> list[str]:
    """The residual tensors of a ControlNet with `count` of them: the down blocks', then the mid block's."""
    return [f"down_block_res_{i}" for i in range(count - 1)] + ["mid_block_res"]


def residual_tensors(dims: ModelDims, optional: bool = False) -> tuple[TensorSpec, ...]:
    def side(axis: str, factor: int) -> str:
        return axis if factor == 1 else f"{axis}/{factor}"

    return tuple(TensorSpec(name, "float32", ("batch", channels, side("latent_height", factor), side("latent_width", factor)),
                            optional=optional)
                 for name, (channels, factor) in zip(residual_names(len(dims.control)), dims.control))


def controlnet_spec(name: str, unet: ComponentSpec, dims: ModelDims) -> ComponentSpec:
    """A ControlNet beside `unet`: the UNet's inputs, the control image (pixels in [0, 1]) and a
    conditioning scale per row; the scaled residuals out (diffusers' ControlNetModel)."""
    return ComponentSpec(
        name=name,
        source="controlnet",  # its own folder, given at export (not a subfolder of the model)
        inputs=unet.inputs + (TensorSpec("controlnet_cond", "float32", ("batch", "image_channels", "height", "width"), "image"),
                              TensorSpec("conditioning_scale", "float32", ("batch",), "scale")),
        outputs=residual_tensors(dims),
        wrapper="ControlNet",
        tolerances=Tolerances(onnx=unet.tolerances.onnx, tensorrt={"fp32": 2e-2}),
        guided=True,
        required=False,
    )


def served_family(settings: dict) -> Family:
    """The layout a served model's settings describe: its family, with its ControlNets when it has some."""
    layout = family(settings.get("family", "sd"))
    if settings.get("controlnets"):
        layout = layout.controlled(ModelDims(**settings["dims"]), settings["controlnets"])
    return layout


def family(name: str) -> Family:
    """The component layout of a model family (sd1, sd2, sdxl; sd and sdxl name the layouts too)."""
    layouts = {**FAMILIES, "sd": SD}
    if name not in layouts:
        raise KeyError(f"unknown model family {name!r}: expected one of {list(FAMILIES)}")
    return layouts[name]


COMPONENTS: dict[str, ComponentSpec] = SD.components  # the SD 1.x/2.x layout; any family's: family(name).components
