"""The one engine adapter between the pipeline core and the declared components.

The core (kiln.pipeline.denoise) asks four things: encode text (one run per text encoder of the model's
family), predict noise, decode latents, encode an image. Each is one run of a component spec of the
family (kiln.export.specs.Family), and a *runner* executes runs on one backend: ONNX
Runtime in-process (here), a Triton BLS call (model_repository.triton_adapter), a TensorRT engine
(export.tensorrt) or the PyTorch wrapper (here, the reference the GPU check times). Runners take and
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

    def __init__(self, onnx_dir: Path, threads: int = 0, arena: bool = True, providers: list[str] | None = None):
        from kiln.artifacts import exported_components, onnx_file, read_export
        from kiln.pipeline.onnx_session import ComponentSession

        self.family = read_export(onnx_dir).family
        self.sessions = {name: ComponentSession(self.family.spec(name), onnx_file(onnx_dir, name), threads, arena, providers)
                         for name in exported_components(onnx_dir, self.family)}
        self.components = tuple(self.sessions)

    def __call__(self, spec: ComponentSpec, feeds: dict[str, torch.Tensor], outputs: list[str]) -> dict[str, torch.Tensor]:
        arrays = self.sessions[spec.name].run({k: np.asarray(v) for k, v in feeds.items()}, outputs)
        return {k: torch.from_numpy(v) for k, v in arrays.items()}


def onnx_engines(onnx_dir: Path, threads: int = 0) -> Engines:
    return Engines(OnnxRuntimeRunner(onnx_dir, threads))


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
        self.modules = {n: specs[n].load_torch(model_dir).to(self.device, self._dtype(specs[n])) for n in names}
        for name, folder in (controlnets or {}).items():  # ControlNets live in their own folders
            spec = self.family.spec(name)
            self.modules[name] = spec.load_torch(model_dir, folder).to(self.device, self._dtype(spec))
        self.components = tuple(self.modules)

    def _dtype(self, spec: ComponentSpec) -> torch.dtype:
        return self.dtype if spec.reduced_precision else torch.float32

    def __call__(self, spec: ComponentSpec, feeds: dict[str, torch.Tensor], outputs: list[str]) -> dict[str, torch.Tensor]:
        from kiln.export.specs import complete_feeds

        dtype = self._dtype(spec)
        feeds = complete_feeds(spec, {k: v.to(self.device) for k, v in feeds.items()})
        args = [feeds[t.name].to(self.device, dtype) if t.dtype.startswith("float") else feeds[t.name].to(self.device)
                for t in spec.inputs]
        with torch.inference_mode():
            result = self.modules[spec.name](*args)
        result = result if isinstance(result, tuple) else (result,)
        named = dict(zip(spec.output_names, result, strict=True))
        return {k: named[k].float() for k in outputs}
