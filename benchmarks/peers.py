"""The runtimes a user would pick instead of Kiln's, for `kiln bench` (kiln.benchmarks.latency): diffusers'
pipeline under torch.compile, and Kiln's own core on the export's fused-attention graphs
(kiln.export.optimize), on OpenVINO (kiln.pipeline.openvino_runner) and on ONNX Runtime's OpenVINO
provider. Each is measured as latency.py measures Kiln's paths and returns its Measured; one that
cannot run here raises one of latency.PEER_FAILURES and the bench reports it as skipped."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from kiln.benchmarks.latency import BenchSpec, Measured, bench_kiln, diffusers_stages, end_to_end_diffusers
from kiln.export.specs import Family

def compile_in_place(pipe, backend: str) -> None:
    """diffusers' torch.compile recipe: each text encoder and the UNet compiled, and the VAE's decode."""
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module) and module is not pipe.vae:
            module.compile(backend=backend)
    pipe.vae.decode = torch.compile(pipe.vae.decode, backend=backend)


def bench_torch_compile(model_dir: Path, family: Family, spec: BenchSpec, size: int, x: dict) -> Measured:
    """diffusers' pipeline with its modules compiled. Compiling (every call until one compiles no new
    graph) is reported as compile_s, apart from the timed runs."""
    from torch._dynamo.utils import counters

    from kiln.pipeline.reference import load_diffusers_pipeline

    pipe = load_diffusers_pipeline(model_dir)
    compile_in_place(pipe, spec.compile_backend)
    spent = []

    def warmup(fn: Callable, limit: int = 4) -> None:
        start = time.perf_counter()
        for _ in range(max(limit, spec.warmup)):
            graphs = counters["stats"]["unique_graphs"]
            fn()
            if counters["stats"]["unique_graphs"] == graphs:
                break
        spent.append(time.perf_counter() - start)

    measured, unet_out = diffusers_stages(pipe, family, spec, x, warmup)
    end, image = end_to_end_diffusers(pipe, spec, size, warmup)
    return Measured(measured, end, unet_out, image, {"compile_s": round(sum(spent), 2), "backend": spec.compile_backend})


def bench_onnx_fused(model_dir: Path, onnx_dir: Path, out_dir: Path, family: Family, spec: BenchSpec, size: int,
                     x: dict) -> Measured:
    """The export's fused-attention graphs (kiln.export.optimize, checked against PyTorch) on ONNX Runtime."""
    from kiln.export.optimize import fuse_export
    from kiln.pipeline.engines import OnnxRuntimeRunner
    from kiln.pipeline.onnx_pipeline import OnnxPipeline

    fused = fuse_export(model_dir, onnx_dir, out_dir)
    runner = OnnxRuntimeRunner(onnx_dir, files={name: f.path for name, f in fused.items()})
    extra = {"fuse_s": round(sum(f.seconds for f in fused.values()), 2),
             "fused_ops": {name: f.fused_ops for name, f in fused.items()}}
    return bench_kiln(OnnxPipeline(onnx_dir, runner=runner), family, spec, size, x, extra)


def bench_openvino(onnx_dir: Path, family: Family, spec: BenchSpec, size: int, x: dict, precision: str) -> Measured:
    """The export's ONNX files read by OpenVINO's CPU plugin, through Kiln's core."""
    from kiln.pipeline.onnx_pipeline import OnnxPipeline
    from kiln.pipeline.openvino_runner import OpenVinoRunner, default_precision

    start = time.perf_counter()
    runner = OpenVinoRunner(onnx_dir, precision=precision)
    extra = {"load_s": round(time.perf_counter() - start, 2),
             "precision": default_precision() if precision == "default" else precision}
    return bench_kiln(OnnxPipeline(onnx_dir, runner=runner), family, spec, size, x, extra)


OPENVINO_PROVIDER = "OpenVINOExecutionProvider"


def bench_onnx_openvino(onnx_dir: Path, family: Family, spec: BenchSpec, size: int, x: dict) -> Measured:
    """ONNX Runtime's OpenVINO execution provider (the onnxruntime-openvino build), through Kiln's core."""
    import onnxruntime

    from kiln.pipeline.engines import OnnxRuntimeRunner
    from kiln.pipeline.onnx_pipeline import OnnxPipeline

    if OPENVINO_PROVIDER not in onnxruntime.get_available_providers():
        raise ImportError(f"onnxruntime {onnxruntime.__version__} here has no {OPENVINO_PROVIDER}: that is the "
                          "onnxruntime-openvino build, a separate distribution of the same `onnxruntime` module, "
                          "which would overwrite the CPU build Kiln pins")
    runner = OnnxRuntimeRunner(onnx_dir, providers=[OPENVINO_PROVIDER, "CPUExecutionProvider"])
    return bench_kiln(OnnxPipeline(onnx_dir, runner=runner), family, spec, size, x)
