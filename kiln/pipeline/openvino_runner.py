"""Exported components on OpenVINO's CPU plugin: a runner for Kiln's core (kiln.pipeline.engines),
so the same denoising loop runs on it. OpenVINO reads the export's ONNX files directly (no IR
conversion step); `kiln bench` times it beside ONNX Runtime. Needs the `bench` extra."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kiln.export.specs import ComponentSpec

# OpenVINO's CPU plugin runs in bf16 by default where the CPU has bf16 instructions (AMX, AVX512-BF16):
# "f32" keeps the exported model's precision; "default" leaves the plugin's choice.
PRECISIONS = ("f32", "default")


class OpenVinoComponent:
    """One component compiled for the CPU, inputs cast to the spec's dtypes, outputs named as the spec.
    An export with LoRA inputs runs without adapters (zeros), as ComponentSession does."""

    def __init__(self, core, spec: ComponentSpec, model_path: Path, config: dict):
        from kiln.pipeline.adapters import read_layers, zero_feeds

        self.spec = spec
        self.model = core.compile_model(str(model_path), "CPU", config)
        self.request = self.model.create_infer_request()
        layers = read_layers(Path(model_path).parent)
        self.no_adapters = zero_feeds(layers) if layers else {}

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        from kiln.export.specs import complete_feeds

        feeds = complete_feeds(self.spec, feeds)
        typed = {t.name: np.ascontiguousarray(feeds[t.name], dtype=t.dtype) for t in self.spec.inputs}
        typed.update({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.no_adapters.items()})
        self.request.infer(typed)
        return {name: self.request.get_tensor(name).data.copy() for name in outputs}  # the request reuses its buffers


class OpenVinoRunner:
    """The export's components on OpenVINO's CPU plugin in this process, host arrays in and out.
    `threads` 0 lets OpenVINO choose; `precision`: one of PRECISIONS."""

    device = torch.device("cpu")

    def __init__(self, onnx_dir: Path, threads: int = 0, precision: str = "f32"):
        import openvino

        from kiln.artifacts import exported_components, onnx_file, read_export

        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS}")
        config = {"PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        if precision == "f32":
            config["INFERENCE_PRECISION_HINT"] = "f32"
        core = openvino.Core()
        self.family = read_export(onnx_dir).family
        self.parts = {name: OpenVinoComponent(core, self.family.spec(name), onnx_file(onnx_dir, name), config)
                      for name in exported_components(onnx_dir, self.family)}
        self.components = tuple(self.parts)

    def __call__(self, spec: ComponentSpec, feeds: dict[str, torch.Tensor], outputs: list[str]) -> dict[str, torch.Tensor]:
        arrays = self.parts[spec.name].run({k: np.asarray(v) for k, v in feeds.items()}, outputs)
        return {k: torch.from_numpy(v) for k, v in arrays.items()}


def default_precision() -> str:
    """What OpenVINO's CPU plugin computes in on this machine when not told (bf16 or f32)."""
    import openvino

    return openvino.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()
