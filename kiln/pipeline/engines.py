"""The one engine adapter between the pipeline core and the declared components.

The core (kiln.pipeline.denoise) asks four things: encode text (one run per text encoder of the model's
family), predict noise, decode latents, encode an image. Each is one run of a component spec of the
family (kiln.export.specs.Family), and a *runner* executes runs on one backend: ONNX
Runtime in-process (here), a Triton BLS call (model_repository.triton_adapter), a TensorRT engine
(export.tensorrt), OpenVINO on the CPU (kiln.pipeline.openvino_runner, a peer `kiln bench` times) or
the PyTorch wrapper (here: the reference the GPU check times; TorchSession, the repository's `torch`
backend). Runners take and
return torch tensors on their `device` and convert at their own edge; the core sees nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Protocol

import numpy as np
import torch

from kiln.errors import ModelError
from kiln.export.specs import SD, ComponentSpec, Family


class Runner(Protocol):
    device: torch.device

    def __call__(self, spec: ComponentSpec, feeds: dict[str, torch.Tensor],
                 outputs: list[str]) -> dict[str, torch.Tensor]: ...


class Engines:
    """The core's calls as runs of `family`'s components: inputs fed in the spec's input order."""

    def __init__(self, run: Runner, components: Iterable[str] | None = None, family: Family | None = None):
        """`components`: what `run` can run (default: what it says it runs, else every component of
        `family`); `family`: default the runner's, else SD 1.x/2.x."""
        self.run = run
        self.family = family or getattr(run, "family", SD)
        self.components = set(getattr(run, "components", self.family.components) if components is None else components)

    @property
    def device(self) -> torch.device:
        return self.run.device

    def outputs(self, spec: ComponentSpec, *values: torch.Tensor, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """`names` (default: all) of the spec's outputs for inputs `values` in its declared order."""
        if spec.name not in self.components:
            raise ModelError(f"this export has no {spec.name}", hint="re-export the model: kiln export onnx MODEL_DIR ONNX_DIR")
        feeds = dict(zip(spec.input_names, values, strict=True))
        return self.run(spec, feeds, list(names or spec.output_names))

    def call(self, spec: ComponentSpec, *values: torch.Tensor) -> torch.Tensor:
        """The spec's first output."""
        first = spec.output_names[0]
        return self.outputs(spec, *values, names=[first])[first]

    def encode_text(self, encoder: str, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 77) int32 -> every output of the named text encoder: hidden states (B, 77, D) first."""
        return self.outputs(self.family.spec(encoder), input_ids)

    def predict_noise(self, sample: torch.Tensor, timestep: torch.Tensor, embeddings: torch.Tensor,
                      added: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """`added`: the UNet's inputs beyond the embeddings, by name (SDXL: text_embeds, time_ids; a
        controlled UNet's ControlNet residuals, zeros where left out)."""
        unet = self.family.spec("unet")
        return self.named(unet, {"sample": sample, "timestep": timestep, "encoder_hidden_states": embeddings,
                                 **(added or {})}, [unet.output_names[0]])[unet.output_names[0]]

    def control(self, controlnet: str, sample: torch.Tensor, timestep: torch.Tensor, embeddings: torch.Tensor,
                added: dict[str, torch.Tensor], image: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
        """A ControlNet's scaled residuals, by the UNet input they feed. `image`: (B, 3, H, W) in [0, 1];
        `scale`: (B,)."""
        spec = self.family.spec(controlnet)
        feeds = {"sample": sample, "timestep": timestep, "encoder_hidden_states": embeddings, **added,
                 "controlnet_cond": image, "conditioning_scale": scale}
        return self.named(spec, feeds, spec.output_names)

    def named(self, spec: ComponentSpec, feeds: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
        """`names` of the spec's outputs for inputs given by name: every required input, optional ones
        when present (the runner fills the others with zeros)."""
        if spec.name not in self.components:
            raise ModelError(f"this export has no {spec.name}", hint="re-export the model: kiln export onnx MODEL_DIR ONNX_DIR")
        missing = [t.name for t in spec.inputs if not t.optional and t.name not in feeds]
        if missing:
            raise ValueError(f"{spec.name} needs {missing}")
        return self.run(spec, {t.name: feeds[t.name] for t in spec.inputs if t.name in feeds}, list(names))

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:  # (B, 4, h, w) -> (B, 3, H, W) in [-1, 1]
        return self.call(self.family.spec("vae_decoder"), latents)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) in [-1, 1] -> (B, 2C, h, w)
        return self.call(self.family.spec("vae_encoder"), pixels)


class OnnxRuntimeRunner:
    """Exported components on ONNX Runtime in this process (the CPU, or `providers`), host arrays in
    and out."""

    device = torch.device("cpu")

    def __init__(self, onnx_dir: Path, threads: int = 0, arena: bool = True, providers: list[str] | None = None,
                 files: dict[str, Path] | None = None):
        """`files`: components' ONNX files to run in place of the export's (its fused graphs:
        kiln.export.optimize)."""
        from kiln.artifacts import exported_components, onnx_file, read_export
        from kiln.pipeline.onnx_session import ComponentSession

        self.family = read_export(onnx_dir).family
        files = files or {}
        self.sessions = {name: ComponentSession(self.family.spec(name), files.get(name, onnx_file(onnx_dir, name)),
                                                threads, arena, providers)
                         for name in exported_components(onnx_dir, self.family)}
        self.components = tuple(self.sessions)

    def __call__(self, spec: ComponentSpec, feeds: dict[str, torch.Tensor], outputs: list[str]) -> dict[str, torch.Tensor]:
        arrays = self.sessions[spec.name].run({k: np.asarray(v) for k, v in feeds.items()}, outputs)
        return {k: torch.from_numpy(v) for k, v in arrays.items()}


def onnx_engines(onnx_dir: Path, threads: int = 0) -> Engines:
    return Engines(OnnxRuntimeRunner(onnx_dir, threads))


TORCH_DEVICES = ("auto", "cpu", "cuda")  # auto: cuda when torch sees a GPU, else cpu
TORCH_DTYPES = ("auto", "float32", "float16", "bfloat16")  # auto: float16 on cuda, float32 on cpu


def torch_placement(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """Where and in what precision PyTorch modules run: `auto` picks CUDA in fp16 when torch sees a GPU,
    else the CPU in fp32. Raises ModelError for a choice this host cannot run."""
    if device not in TORCH_DEVICES and not device.startswith("cuda:"):
        raise ModelError(f"torch device {device!r} is not one of {TORCH_DEVICES} (or cuda:N)")
    if dtype not in TORCH_DTYPES:
        raise ModelError(f"torch dtype {dtype!r} is not one of {TORCH_DTYPES}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"torch device {device!r} was asked for, but torch sees no CUDA GPU here "
                         f"(torch {torch.__version__})", hint="rebuild the repository with --torch-device auto or cpu")
    if dtype == "auto":
        dtype = "float16" if device.startswith("cuda") else "float32"
    if device == "cpu" and dtype == "float16":
        raise ModelError("torch dtype float16 on the CPU: PyTorch's CPU kernels are slow or missing in fp16",
                         hint="--torch-dtype float32 or bfloat16 on the CPU")
    return torch.device(device), getattr(torch, dtype)


def attention_kind(module: torch.nn.Module) -> str:
    """How a wrapper's model computes attention, for the log: diffusers' processor classes
    (AttnProcessor2_0 is SDPA) or transformers' attn_implementation."""
    model = getattr(module, "model", None) or getattr(module, "vae", None)
    if hasattr(model, "attn_processors"):
        return ",".join(sorted({type(p).__name__ for p in model.attn_processors.values()})) or "none"
    return str(getattr(getattr(model, "config", None), "_attn_implementation", "unknown"))


class TorchComponent:
    """One component's PyTorch wrapper on `device`, in `dtype` where its spec allows reduced precision
    (fp32 otherwise: the VAE); inputs and outputs named as the spec, outputs back in fp32."""

    def __init__(self, spec: ComponentSpec, module: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                 compile: bool = False):
        self.spec, self.device = spec, torch.device(device)
        self.dtype = dtype if spec.reduced_precision else torch.float32
        self.module = module.to(self.device, self.dtype)
        if compile:  # opt-in: compiled per new input shape, at the first request of that shape
            self.module = torch.compile(self.module, dynamic=True)

    def __call__(self, feeds: dict[str, torch.Tensor], outputs: list[str] | None = None) -> dict[str, torch.Tensor]:
        from kiln.export.specs import complete_feeds

        feeds = complete_feeds(self.spec, {k: v.to(self.device) for k, v in feeds.items()})
        args = [feeds[t.name].to(self.device, self.dtype) if t.dtype.startswith("float") else feeds[t.name].to(self.device)
                for t in self.spec.inputs]
        with torch.inference_mode():
            result = self.module(*args)
        result = result if isinstance(result, tuple) else (result,)
        named = dict(zip(self.spec.output_names, result, strict=True))
        return {k: named[k].float() for k in (outputs or self.spec.output_names)}


class TorchRunner:
    """The components' PyTorch wrappers (the modules export traced), on `device` in `dtype`."""

    def __init__(self, model_dir: Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 components: Iterable[str] | None = None, controlnets: dict[str, Path] | None = None):
        """`controlnets`: ControlNet component names (CONTROLNET_PREFIX + name) -> their diffusers folders."""
        from kiln.export.specs import family
        from kiln.models.folder import controlled_dims, inspect_model, model_dims

        self.device, self.dtype = torch.device(device), dtype
        self.family = family(inspect_model(model_dir).family)
        if controlnets:
            self.family = self.family.controlled(controlled_dims(model_dir, model_dims(model_dir)), controlnets)
        specs = self.family.components
        names = [n for n, s in specs.items() if s.required] if components is None else list(components)
        self.modules = {n: TorchComponent(specs[n], specs[n].load_torch(model_dir), self.device, dtype) for n in names}
        for name, folder in (controlnets or {}).items():  # ControlNets live in their own folders
            spec = self.family.spec(name)
            self.modules[name] = TorchComponent(spec, spec.load_torch(model_dir, folder), self.device, dtype)
        self.components = tuple(self.modules)

    def __call__(self, spec: ComponentSpec, feeds: dict[str, torch.Tensor], outputs: list[str]) -> dict[str, torch.Tensor]:
        return self.modules[spec.name](feeds, outputs)


class TorchSession:
    """A component's PyTorch wrapper behind ONNX Runtime's session interface (host arrays in and out):
    the engine of the repository's `torch` backend. Takes no LoRA inputs (`layers` None)."""

    layers = None

    def __init__(self, component: TorchComponent, description: str = ""):
        self.component, self.description = component, description  # description: what was chosen, for the log

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items() if v is not None}
        return {k: v.cpu().numpy() for k, v in self.component(tensors, outputs).items()}
