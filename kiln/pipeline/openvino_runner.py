"""Exported components on OpenVINO's CPU plugin: a runner for Kiln's core (kiln.pipeline.engines),
so the same denoising loop runs on it. OpenVINO reads the export's ONNX files directly (no IR
conversion step); `kiln bench` times it beside ONNX Runtime, and `kiln repo build --backend openvino`
serves each component on it. Needs the `openvino` extra (in `bench`; `make setup` installs it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kiln.export.specs import ComponentSpec

# OpenVINO's CPU plugin runs in bf16 by default where the CPU has bf16 instructions (AMX, AVX512-BF16):
# "f32" keeps the exported model's precision; "default" leaves the plugin's choice.
PRECISIONS = ("f32", "default")


class OpenVinoComponent:
    """One component compiled for the CPU behind ONNX Runtime's session interface (kiln.pipeline.onnx_session):
    inputs cast to the spec's dtypes, outputs named as the spec. An export with LoRA inputs (`layers`)
    runs without adapters (zeros) unless its lora_A/lora_B feeds are given, as ComponentSession does.
    The engine of the embedded target's `openvino` backend, and of OpenVinoRunner."""

    def __init__(self, core, spec: ComponentSpec, model_path: Path, config: dict):
        from kiln.pipeline.adapters import read_layers, zero_feeds

        self.spec = spec
        self.model = core.compile_model(str(model_path), "CPU", config)
        self.request = self.model.create_infer_request()
        self.layers = read_layers(Path(model_path).parent)
        self.no_adapters = zero_feeds(self.layers) if self.layers else {}
        self.description = (f"{spec.name}: OpenVINO {core.get_versions('CPU')['CPU'].build_number} on the CPU in "
                            f"{self.model.get_property('INFERENCE_PRECISION_HINT').to_string()}")

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Every declared output, or only `outputs`."""
        from kiln.export.specs import complete_feeds

        feeds = complete_feeds(self.spec, feeds)
        typed = {t.name: np.ascontiguousarray(feeds[t.name], dtype=t.dtype) for t in self.spec.inputs}
        for name, zeros in self.no_adapters.items():
            typed[name] = np.ascontiguousarray(feeds.get(name, zeros), dtype=np.float32)
        self.request.infer(typed)
        names = self.spec.output_names if outputs is None else outputs
        return {name: self.request.get_tensor(name).data.copy() for name in names}  # the request reuses its buffers


def plugin_config(threads: int = 0, precision: str = "f32") -> dict:
    """The CPU plugin's settings: `threads` 0 lets OpenVINO choose; `precision` one of PRECISIONS."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS}")
    config = {"PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    if precision == "f32":
        config["INFERENCE_PRECISION_HINT"] = "f32"
    return config


def open_component(spec: ComponentSpec, model_path: Path, threads: int = 0, precision: str = "f32") -> OpenVinoComponent:
    """One exported component on OpenVINO (`kiln repo build --backend openvino`)."""
    import openvino

    return OpenVinoComponent(openvino.Core(), spec, model_path, plugin_config(threads, precision))


class OpenVinoRunner:
    """The export's components on OpenVINO's CPU plugin in this process, host arrays in and out.
    `threads` 0 lets OpenVINO choose; `precision`: one of PRECISIONS."""

    device = torch.device("cpu")

    def __init__(self, onnx_dir: Path, threads: int = 0, precision: str = "f32"):
        import openvino

        from kiln.artifacts import exported_components, onnx_file, read_export

        config = plugin_config(threads, precision)
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
