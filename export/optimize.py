"""Fused-attention graphs of an export for ONNX Runtime on the CPU, by onnxruntime's transformer
optimizer (the model type per component is on its declaration: ComponentSpec.fusion).

Only fusions with CPU kernels are asked for: Attention and MultiHeadAttention, (Skip)LayerNormalization,
Gelu. GroupNorm, SkipGroupNorm, BiasSplitGelu, BiasAdd and NhwcConv are CUDA-only kernels, and packed
QKV/KV only feed the CUDA attention kernel: a graph holding them does not load on CPUExecutionProvider.
The optimizer's own ONNX Runtime pass stays off (opt_level 0): it rewrites the attention scale's
Shape/Transpose path so that the UNet attention pattern no longer matches. Each fused graph keeps the
spec's tensor names and is checked against PyTorch with the component's own tolerance, as export
checks the plain one."""

from __future__ import annotations

import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import ExportError

log = logging.getLogger(__name__)

CUDA_ONLY_FUSIONS = ("enable_nhwc_conv", "enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu",
                     "enable_bias_add", "enable_packed_qkv", "enable_packed_kv")


@dataclass(frozen=True)
class FusedComponent:
    name: str
    path: Path
    fused_ops: dict[str, int]  # operators the optimizer added (Attention: 6, MultiHeadAttention: 6, ...)
    parity: list[dict]  # per parity shape, as the export manifest records it
    seconds: float


def cpu_fusion_options(model_type: str):
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions(model_type)
    for name in CUDA_ONLY_FUSIONS:
        setattr(options, name, False)
    return options


def fuse_graph(model_type: str, source: Path, out: Path) -> dict[str, int]:
    """Write `source`'s fused graph to `out`; the operators it added, by type."""
    from onnxruntime.transformers.optimizer import optimize_model

    from kiln.export.precision import is_large, save_model

    logging.disable(logging.INFO)  # the optimizer logs every pattern it removes at INFO
    try:
        optimized = optimize_model(str(source), model_type=model_type, optimization_options=cpu_fusion_options(model_type),
                                   opt_level=0, use_gpu=False)
    finally:
        logging.disable(logging.NOTSET)
    before = Counter(n.op_type for n in _graph_nodes(source))
    after = Counter(n.op_type for n in optimized.model.graph.node)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_model(optimized.model, out, is_large(source))
    return {op: n - before[op] for op, n in sorted(after.items()) if n > before[op]}


def _graph_nodes(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=False).graph.node


def _check_names(spec, path: Path) -> None:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inputs, outputs = [i.name for i in graph.input], [o.name for o in graph.output]
    if inputs[:len(spec.inputs)] != spec.input_names or outputs != spec.output_names:
        raise ExportError(f"{spec.name}'s fused graph renamed its tensors: inputs {inputs}, outputs {outputs} "
                          f"(declared: {spec.input_names}, {spec.output_names})")


def fuse_export(model_dir: Path, onnx_dir: Path, out_dir: Path) -> dict[str, FusedComponent]:
    """Fused graphs of each fusable component of the export at `onnx_dir`, written to
    out_dir/<component>/model.onnx and checked against the PyTorch modules of `model_dir`; raises
    ParityError beyond the component's tolerance. Run them with OnnxRuntimeRunner(files=...)."""
    from kiln.artifacts import exported_components, onnx_file, read_export
    from kiln.export.onnx_export import check_parity
    from kiln.pipeline.adapters import ADAPTED_LAYERS_NAME

    manifest = read_export(onnx_dir)
    fused = {}
    for name in exported_components(onnx_dir, manifest.family):
        spec = manifest.family.spec(name)
        if spec.fusion is None:
            continue
        start = time.perf_counter()
        source, out = onnx_file(onnx_dir, name), onnx_file(out_dir, name)
        added = fuse_graph(spec.fusion, source, out)
        _check_names(spec, out)
        if (source.parent / ADAPTED_LAYERS_NAME).is_file():  # the session feeds its LoRA inputs zeros
            shutil.copy2(source.parent / ADAPTED_LAYERS_NAME, out.parent / ADAPTED_LAYERS_NAME)
        report = check_parity(spec.load_torch(model_dir), spec, out, manifest.dims, manifest.precision)
        fused[name] = FusedComponent(name, out, added, report, round(time.perf_counter() - start, 2))
        log.info("%s: fused %s in %.1f s", name, added or "nothing", fused[name].seconds)
    return fused
