"""ONNX Runtime sessions for exported components, run against their declared spec."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kiln.export.specs import ComponentSpec


def make_session(model_path: Path, threads: int = 0, arena: bool = True):
    """A CPU session; `threads` 0 lets ONNX Runtime choose (one per core). Without `arena`, memory a
    run allocates is freed when it ends instead of kept for the next (a long-lived server wants that)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = arena
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


class ComponentSession:
    """Runs one exported component: inputs cast to the spec's dtypes, outputs named as the spec."""

    def __init__(self, spec: ComponentSpec, model_path: Path, threads: int = 0, arena: bool = True):
        self.spec = spec
        self.session = make_session(model_path, threads, arena)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        typed = {t.name: np.ascontiguousarray(feeds[t.name], dtype=t.dtype) for t in self.spec.inputs}
        outputs = self.session.run(self.spec.output_names, typed)
        return dict(zip(self.spec.output_names, outputs))
