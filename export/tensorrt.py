"""`kiln export trt ONNX_DIR OUT_DIR`: TensorRT engines from a Kiln ONNX export (GPU only).

The plan is pure and tested on the CPU: optimisation profiles come from the component specs (batch
doubled for classifier-free guidance, latent sides from the pixel range), precision per component
(fp16 keeps the VAE and the attention softmax in fp32; int8 engines are built from `kiln export qdq`'s
ModelOpt-calibrated Q/DQ UNet, the text encoder then fp16 and the VAE fp32),
and a manifest that records TensorRT's version, the GPU and the profiles. An engine whose manifest
does not match the runtime (another TensorRT, another GPU, another export) is refused, never loaded.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from kiln.artifacts import fingerprint, onnx_file, read_export, read_manifest, write_json_atomically
from kiln.errors import ExportError
from kiln.export.engine_runtime import Runtime, check_runtime
from kiln.export.specs import SD, QDQ_PRECISION, ComponentSpec, Family, ShapePoint, concrete_shape
from kiln.models.folder import ModelDims

log = logging.getLogger("kiln.export")

ENGINE_FORMAT = 1  # bump when the build code changes what it writes
ENGINE_NAME = "model.plan"
TIMING_CACHE = "timing.cache"
# ONNX node-name patterns TensorRT keeps in fp32 under --fp16: softmax inside attention overflows
# in half precision on long sequences (the TensorRT demo and diffusers both keep it fp32).
FP32_LAYER_PATTERNS = (r"[Ss]oftmax",)


@dataclass(frozen=True)
class ProfilePoint:
    """Images per request and pixel sides, before classifier-free guidance doubles the batch."""

    images: int
    height: int
    width: int


@dataclass(frozen=True)
class Profile:
    min: ProfilePoint
    opt: ProfilePoint
    max: ProfilePoint


PROFILE_SYNTAX = "IMAGESxSIZE:IMAGESxSIZE:IMAGESxSIZE (min:opt:max), SIZE as SIDE or HEIGHTxWIDTH, e.g. 1x256:1x512:4x768"


def parse_profile(text: str, multiple: int) -> Profile:
    """`1x256:1x512:4x768` (images x square side) or `1x256x256:1x512x512:2x512x768`."""
    parts = text.split(":")
    if len(parts) != 3:
        raise ExportError(f"--profile {text!r} is invalid: expected {PROFILE_SYNTAX}")
    points = []
    for part in parts:
        match = re.fullmatch(r"(\d+)x(\d+)(?:x(\d+))?", part.strip())
        if not match:
            raise ExportError(f"--profile {text!r} is invalid: {part!r} is not IMAGESxSIZE; expected {PROFILE_SYNTAX}")
        images, height = int(match[1]), int(match[2])
        width = int(match[3]) if match[3] else height
        for name, side in (("height", height), ("width", width)):
            if side <= 0 or side % multiple:
                raise ExportError(f"--profile {text!r}: {name} {side} is not a positive multiple of {multiple}",
                                  hint=f"image sides must be multiples of {multiple} for this model")
        if images < 1:
            raise ExportError(f"--profile {text!r}: images must be at least 1")
        points.append(ProfilePoint(images, height, width))
    lo, opt, hi = points
    for attr in ("images", "height", "width"):
        if not getattr(lo, attr) <= getattr(opt, attr) <= getattr(hi, attr):
            raise ExportError(f"--profile {text!r}: {attr} must satisfy min <= opt <= max")
    return Profile(lo, opt, hi)


def default_profile(dims: ModelDims, max_images: int = 4) -> Profile:
    """Batch 1 to `max_images`, sides from half to 1.5x the native size, optimised for one native image."""
    native = dims.default_latent * dims.vae_scale_factor
    multiple = dims.vae_scale_factor * dims.unet_factor
    lo = max(multiple, native // 2 // multiple * multiple)
    hi = max(native, (native * 3 // 2) // multiple * multiple)
    return Profile(ProfilePoint(1, lo, lo), ProfilePoint(1, native, native), ProfilePoint(max_images, hi, hi))


def _point(spec: ComponentSpec, p: ProfilePoint, dims: ModelDims, guidance: bool) -> ShapePoint:
    f = dims.vae_scale_factor
    return ShapePoint(spec.batch(p.images, guidance), p.height // f, p.width // f)


@dataclass(frozen=True)
class ComponentPlan:
    component: str
    precision: str  # fp32 | fp16 | int8
    profiles: list[dict[str, list[list[int]]]]  # per optimisation profile: input -> [min, opt, max] shapes
    fp32_layers: tuple[str, ...] = ()  # name patterns kept fp32 under reduced precision


# An export with LoRA inputs (kiln.pipeline.adapters): each adapted layer's rank is a profile dimension,
# the sum of the ranks of one request's adapters (four rank-16 adapters at most, by default).
ENGINE_RANKS = (1, 16, 64)  # min (no adapter: rank-1 zeros), opt (one rank-16 adapter), max


def profile_shapes(spec: ComponentSpec, dims: ModelDims, profile: Profile, guidance: bool = True,
                   layers=None) -> dict[str, list[list[int]]]:
    points = [_point(spec, p, dims, guidance) for p in (profile.min, profile.opt, profile.max)]
    shapes = {t.name: [list(concrete_shape(t, pt, dims)) for pt in points] for t in spec.inputs}
    from kiln.pipeline.adapters import live

    for layer in live(layers):
        a, b = layer.inputs
        shapes[a] = [[rank, layer.in_features] for rank in ENGINE_RANKS]
        shapes[b] = [[layer.out_features, rank] for rank in ENGINE_RANKS]
    return shapes


def plan_component(spec: ComponentSpec, dims: ModelDims, profiles: list[Profile], precision: str,
                   guidance: bool = True, layers=None) -> ComponentPlan:
    """One engine per component, one TensorRT optimisation profile per `profiles` entry; `layers`:
    the component's adapted layers (an export with LoRA inputs)."""
    shapes = [profile_shapes(spec, dims, p, guidance, layers) for p in profiles]
    if precision == "fp32" or not spec.reduced_precision:  # the VAE: fp16 VAEs decode to black (overflow)
        return ComponentPlan(spec.name, "fp32", shapes)
    if precision == "int8" and not spec.quantisable:  # only the quantised component carries Q/DQ nodes
        precision = "fp16"
    return ComponentPlan(spec.name, precision, shapes, fp32_layers=FP32_LAYER_PATTERNS)


@dataclass
class EnginePlan:
    precision: str
    profiles: list[Profile]
    components: list[ComponentPlan] = field(default_factory=list)
    export_key: str = ""
    workspace_gib: float = 8.0

    def to_json(self) -> dict:
        return {"precision": self.precision, "profiles": [asdict(p) for p in self.profiles],
                "components": [asdict(c) for c in self.components], "export_key": self.export_key,
                "workspace_gib": self.workspace_gib}


def plan_engines(onnx_dir: Path, precision: str = "fp16", profiles: list[str] | None = None,
                 components: tuple[str, ...] | None = None) -> EnginePlan:
    """Read the export manifest and derive every engine's profiles and precision (every exported
    component of its family, or `components`). No GPU needed."""
    if precision not in ("fp32", "fp16", "int8"):
        raise ExportError(f"precision {precision!r} is invalid: expected fp32, fp16 or int8")
    manifest = read_export(Path(onnx_dir))
    exported = manifest.precision
    if precision == "int8" and exported != QDQ_PRECISION:
        raise ExportError(f"{onnx_dir} is a {exported} export: int8 engines are built from a calibrated Q/DQ export",
                          hint=f"kiln export qdq {onnx_dir} QDQ_DIR (fp32 export in), then kiln export trt QDQ_DIR OUT --int8")
    if precision != "int8" and exported != "fp32":
        raise ExportError(f"{onnx_dir} is a {exported} ONNX export; TensorRT {precision} engines are built from the fp32 export",
                          hint="--int8 for a Q/DQ export" if exported == QDQ_PRECISION else
                          "kiln export onnx MODEL ONNX_DIR (without --fp16/--int8), then kiln export trt")
    dims = manifest.dims
    parsed = [parse_profile(p, manifest.size_multiple) for p in profiles] if profiles else [default_profile(dims)]
    plan = EnginePlan(precision, parsed, export_key=manifest.key)
    layout = manifest.family
    components = tuple(layout.components) if components is None else components
    unknown = [name for name in components if name not in layout.components]
    if unknown:
        raise ExportError(f"unknown components {unknown}: a {manifest.model.family} export has {list(layout.components)}")
    from kiln.pipeline.adapters import read_layers

    plan.components = [plan_component(layout.spec(name), dims, parsed, precision, layers=read_layers(Path(onnx_dir) / name))
                       for name in components if onnx_file(onnx_dir, name).is_file()]
    if not plan.components:
        raise ExportError(f"{onnx_dir} holds none of the components {list(components)}")
    return plan


# ---------------------------------------------------------------- runtime identity and manifests


def engine_manifest(plan: EnginePlan, runtime: Runtime, parity: dict) -> dict:
    return {"format": ENGINE_FORMAT, "runtime": asdict(runtime), "plan": plan.to_json(), "parity": parity,
            "key": fingerprint({"plan": plan.to_json(), "runtime": asdict(runtime), "format": ENGINE_FORMAT})}


def read_engines(engine_dir: Path, export_key: str | None = None) -> dict:
    """An engine folder's manifest, refused when it is missing, of another Kiln engine format, or (with
    `export_key`) built from another ONNX export; its runtime is checked where the engines run."""
    manifest = read_manifest(Path(engine_dir))
    if not manifest:
        raise ExportError(f"{engine_dir} has no engine manifest", hint="kiln export trt ONNX_DIR ENGINE_DIR")
    if manifest.get("format") != ENGINE_FORMAT:
        raise ExportError(f"{engine_dir} was written by another Kiln engine format ({manifest.get('format')})",
                          hint="rebuild: kiln export trt ONNX_DIR ENGINE_DIR")
    if export_key is not None and manifest["plan"]["export_key"] != export_key:
        raise ExportError(f"stale engines in {engine_dir}: built from another ONNX export",
                          hint="rebuild: kiln export trt ONNX_DIR ENGINE_DIR")
    return manifest


def check_engines(engine_dir: Path, runtime: Runtime, export_key: str | None = None) -> dict:
    """Refuse engines built by another TensorRT, for another GPU, or from another export."""
    manifest = read_engines(engine_dir, export_key)
    check_runtime(Runtime(**manifest["runtime"]), runtime, f"in {engine_dir}")
    return manifest


# ---------------------------------------------------------------- building and checking (GPU)

def _fp32_layers(network, patterns) -> list[str]:
    import tensorrt as trt

    kept = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if any(re.search(p, layer.name) for p in patterns) or layer.type == trt.LayerType.SOFTMAX:
            layer.precision = trt.float32
            for k in range(layer.num_outputs):
                layer.set_output_type(k, trt.float32)
            kept.append(layer.name)
    return kept


def build_engine(onnx_path: Path, out_path: Path, plan: ComponentPlan, cache_path: Path, workspace_gib: float) -> dict:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    kept = []
    if plan.precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        kept = _fp32_layers(network, plan.fp32_layers)
    if plan.precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)  # explicit quantisation: the Q/DQ scales come from calibration
    for shapes in plan.profiles:
        profile = builder.create_optimization_profile()
        for tensor, (lo, opt, hi) in shapes.items():
            profile.set_shape(tensor, lo, opt, hi)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build {plan.component}")
    tmp = out_path.with_suffix(".partial")
    tmp.write_bytes(bytes(serialized))
    tmp.replace(out_path)
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"fp32_layers": len(kept), "bytes": out_path.stat().st_size}


class TrtRunner:
    """A deserialised engine run on torch CUDA tensors (one optimisation profile)."""

    def __init__(self, engine_path: Path):
        import tensorrt as trt
        import torch

        self.torch = torch
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        self.context = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.trt = trt

    def __call__(self, feeds: dict) -> dict:
        torch, trt = self.torch, self.trt
        stream = torch.cuda.current_stream()
        inputs = {k: (v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v))).cuda().contiguous()
                  for k, v in feeds.items()}
        for name, tensor in inputs.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.names:
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                dtype = {trt.float32: torch.float32, trt.float16: torch.float16}[self.engine.get_tensor_dtype(name)]
                outputs[name] = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=dtype, device="cuda")
                self.context.set_tensor_address(name, outputs[name].data_ptr())
        self.context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        return outputs


def _rel_l2(a, b) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def trt_parity_check(component: str, onnx_path: Path, engine_path: Path) -> dict:
    """The engine against ONNX Runtime (CPU) running the same ONNX file, at the native shape with one
    guided image (and a rank-16 adapter when it takes LoRA inputs); raises ParityError beyond the spec's
    TensorRT tolerance."""
    import onnxruntime as ort

    from kiln.errors import ParityError
    from kiln.export.specs import dummy_inputs

    manifest = read_export(onnx_path.parent.parent)
    spec = manifest.family.spec(component)
    dims = manifest.dims
    feeds = dummy_inputs(spec, ShapePoint(spec.batch(1), dims.default_latent, dims.default_latent), dims)
    from kiln.export.onnx_export import lora_dummies
    from kiln.pipeline.adapters import read_layers

    feeds.update(lora_dummies(read_layers(onnx_path.parent), rank=ENGINE_RANKS[1]))  # an adapted export: with an adapter
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    reference = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    got = TrtRunner(engine_path)(feeds)
    tolerance = spec.trt_tolerance(manifest.precision)
    out = {}
    for name, ref in reference.items():
        value = got[name].float().cpu().numpy()
        out[name] = {"max_abs": float(np.abs(value - ref).max()), "rel_l2": _rel_l2(value, ref),
                     "finite": bool(np.isfinite(value).all()), "tolerance_rel_l2": tolerance}
        if not out[name]["finite"] or out[name]["rel_l2"] > tolerance:
            raise ParityError(f"{component}.{name}: TensorRT vs ONNX Runtime rel L2 {out[name]['rel_l2']:.2e} "
                              f"(finite: {out[name]['finite']}) exceeds {tolerance:.0e}")
    return out


class EngineRunner:
    """Built engines as a kiln.pipeline.engines runner: torch tensors on the GPU in and out (float32)."""

    def __init__(self, engine_dir: Path, components=None, family: Family = SD):
        import torch

        self.device = torch.device("cuda")
        self.family = family
        names = [n for n in (components or family.components) if (Path(engine_dir) / n / ENGINE_NAME).is_file()]
        self.engines = {n: TrtRunner(Path(engine_dir) / n / ENGINE_NAME) for n in names}
        self.components = tuple(self.engines)

    def __call__(self, spec: ComponentSpec, feeds: dict, outputs: list[str]) -> dict:
        from kiln.export.specs import complete_feeds

        result = self.engines[spec.name](complete_feeds(spec, feeds))  # an engine binds every input: zeros for optional ones
        return {k: result[k].float() for k in outputs}


def export_engines(onnx_dir: Path, out_dir: Path, plan: EnginePlan, parity_check=None) -> Path:
    """Build every planned engine into out_dir/<component>/model.plan, check each against ONNX
    Runtime with `parity_check(component, onnx_path, engine_path) -> dict`, then write the manifest."""
    from tqdm import tqdm

    runtime = Runtime.detect()
    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parity = {}
    for c in tqdm(plan.components, desc="build TensorRT engines", unit="engine"):
        (out_dir / c.component).mkdir(exist_ok=True)
        source = onnx_file(onnx_dir, c.component)
        info = build_engine(source, out_dir / c.component / ENGINE_NAME, c, out_dir / TIMING_CACHE, plan.workspace_gib)
        parity[c.component] = {**info, **(parity_check(c.component, source, out_dir / c.component / ENGINE_NAME)
                                           if parity_check else {})}
        log.info("%s engine built (%s, %d layers kept fp32)", c.component, c.precision, info["fp32_layers"])
    write_json_atomically(out_dir / "manifest.json", engine_manifest(plan, runtime, parity))
    return out_dir
