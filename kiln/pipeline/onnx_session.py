"""ONNX Runtime sessions for exported components, run against their declared spec."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kiln.export.specs import ComponentSpec


def make_session(model_path: Path, threads: int = 0, arena: bool = True, providers: list[str] | None = None):
    """A session on `providers` (default the CPU); `threads` 0 lets ONNX Runtime choose (one per core).
    Without `arena`, memory a run allocates is freed when it ends instead of kept for the next (a
    long-lived server wants that)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = arena
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(model_path), options, providers=providers or ["CPUExecutionProvider"])


class ComponentSession:
    """Runs one exported component: inputs cast to the spec's dtypes, outputs named as the spec. An
    export with LoRA inputs (`layers`, read from beside the file) runs without adapters unless its
    `lora_A.*` / `lora_B.*` feeds are given."""

    def __init__(self, spec: ComponentSpec, model_path: Path, threads: int = 0, arena: bool = True,
                 providers: list[str] | None = None):
        from kiln.pipeline.adapters import read_layers, zero_feeds

        self.spec = spec
        self.session = make_session(model_path, threads, arena, providers)
        self.layers = read_layers(Path(model_path).parent)
        self.no_adapters = zero_feeds(self.layers) if self.layers else {}

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Every declared output, or only `outputs`."""
        from kiln.export.specs import complete_feeds

        feeds = complete_feeds(self.spec, feeds)  # optional inputs left out are zeros
        typed = {t.name: np.ascontiguousarray(feeds[t.name], dtype=t.dtype) for t in self.spec.inputs}
        for name, zeros in self.no_adapters.items():
            typed[name] = np.ascontiguousarray(feeds.get(name, zeros), dtype=np.float32)
        names = self.spec.output_names if outputs is None else outputs
        return dict(zip(names, self.session.run(names, typed), strict=True))
