"""The GPU check's ONNX-file backends (benchmarks/gpu_check.py): TensorRT engines and ONNX Runtime's
CUDA provider, timed through Kiln's loop when they are installed (`make gpu-setup`) over an ONNX
export of the very weights the PyTorch cases ran. Without them nothing is exported: each is reported
as skipped, with why."""

from __future__ import annotations

import gc
import importlib.util
import time
from pathlib import Path

def onnx_wanted(mode: str, cuda: bool) -> tuple[list[str], dict]:
    """The ONNX-file backends to time and why each other one is skipped. `auto`: those a CUDA host has
    installed (TensorRT, ONNX Runtime's CUDA provider); `on`: also ONNX Runtime's CPU provider on a
    host without a GPU (how the tests keep this path alive); `off`: none."""
    if mode == "off":
        return [], {"tensorrt": "--onnx off", "onnxruntime": "--onnx off"}
    wanted, skipped = [], {}
    if importlib.util.find_spec("tensorrt") is None:
        skipped["tensorrt"] = "TensorRT is not installed (no module tensorrt; `make gpu-setup` installs the gpu extra)"
    elif not cuda:
        skipped["tensorrt"] = "no CUDA GPU: TensorRT builds engines on the GPU that runs them"
    else:
        wanted.append("tensorrt")
    name = "onnxruntime_cuda" if cuda else "onnxruntime_cpu"
    provider = "CUDAExecutionProvider" if cuda else "CPUExecutionProvider"
    if not cuda and mode == "auto":
        skipped["onnxruntime_cuda"] = "no CUDA GPU (--onnx on times ONNX Runtime's CPU provider)"
    elif importlib.util.find_spec("onnxruntime") is None:
        skipped[name] = "onnxruntime is not installed"
    else:
        import onnxruntime as ort

        if provider in ort.get_available_providers():
            wanted.append(name)
        else:
            skipped[name] = (f"onnxruntime {ort.__version__} has no {provider} (the CPU build; `make gpu-setup` "
                             "installs onnxruntime-gpu)")
    return wanted, skipped


def onnx_runtime_engines(onnx_dir: Path, provider: str):
    """ONNX Runtime on `provider`, host arrays in and out (as a plain ORT deployment runs)."""
    import onnxruntime as ort

    from kiln.errors import KilnError
    from kiln.pipeline.engines import Engines, OnnxRuntimeRunner

    if provider == "CUDAExecutionProvider" and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # CUDA and cuDNN from the nvidia-* wheels torch brought
    runner = OnnxRuntimeRunner(onnx_dir, providers=[provider])
    used = {s.session.get_providers()[0] for s in runner.sessions.values()}
    if used != {provider}:  # ONNX Runtime falls back to the CPU when CUDA's libraries do not load
        raise KilnError(f"ONNX Runtime asked for {provider} ran on {sorted(used)}")
    return Engines(runner)


def time_engines(engines, generation, dims, runs: int) -> dict:
    """A UNet step at batch 2 (the guided pair) and a whole one-image generation through the engines."""
    import torch

    from kiln.benchmarks.timing import timed
    from kiln.export.specs import ShapePoint, dummy_inputs

    sync = torch.cuda.synchronize if engines.device.type == "cuda" else None
    unet = engines.family.spec("unet")
    latent = generation.size // dims.vae_scale_factor
    feeds = dummy_inputs(unet, ShapePoint(unet.batch(1), latent, latent), dims)
    args = [torch.from_numpy(feeds[name]).to(engines.device) for name in unet.input_names]
    step = timed(lambda: engines.call(unet, *args), runs * 5, warmup=2, sync=sync)
    whole = timed(lambda: generation(engines), runs, warmup=1, sync=sync)
    # every generation above checked its latents and image: an fp16 overflow (inf/NaN) raised GenerationError
    return {"unet_step_ms": round(step.median_ms, 3), "end_to_end_s": round(whole.median_ms / 1000, 4),
            "spread": round(whole.spread, 3)}


def onnx_backends(model, work: Path, runs: int, wanted: list[str]) -> tuple[dict, dict]:
    """The same weights exported to ONNX (fp32) and timed through Kiln's loop on each wanted backend,
    one image; TensorRT's fp16 engines for the family's size are checked against ONNX Runtime first.
    `model`: a gpu_check_models.LoadedFamily. Returns (timings, failures by backend): a failing backend
    costs only its own numbers."""
    import torch

    from kiln.artifacts import read_export
    from kiln.export.onnx_export import export_onnx
    from kiln.models.tiny import save_pipeline
    from kiln.pipeline.engines import Engines

    check, root = model.check, work / model.check.name
    model.weights = save_pipeline(model.pipe, root / "weights")
    started = time.perf_counter()
    onnx_dir = export_onnx(model.weights, root / "onnx").out_dir
    timings, failures, makers = {"onnx_export_s": round(time.perf_counter() - started, 1)}, {}, {}
    manifest = read_export(onnx_dir)
    if "tensorrt" in wanted:
        try:
            from kiln.export.tensorrt import (ENGINE_NAME, EngineRunner, Runtime, check_engines, export_engines,
                                              plan_engines, trt_parity_check)

            required = tuple(n for n, spec in manifest.family.components.items() if spec.required)
            size = f"1x{check.size}"
            plan = plan_engines(onnx_dir, "fp16", [f"{size}:{size}:{size}"], components=required)
            started = time.perf_counter()
            export_engines(onnx_dir, root / "engines", plan, trt_parity_check)
            timings["engine_build_s"] = round(time.perf_counter() - started, 1)
            timings["engine_parity"] = check_engines(root / "engines", Runtime.detect(), plan.export_key)["parity"]
            model.plain_engine = root / "engines" / "unet" / ENGINE_NAME
            makers["tensorrt"] = lambda: Engines(EngineRunner(root / "engines", required, manifest.family))
        except Exception as exc:  # a failed build or parity: said in the report, the rest runs
            failures["tensorrt"] = exc
    for name in wanted:
        if name.startswith("onnxruntime"):
            provider = "CUDAExecutionProvider" if name.endswith("cuda") else "CPUExecutionProvider"
            makers[name] = lambda provider=provider: onnx_runtime_engines(onnx_dir, provider)
    for name, make in makers.items():  # one backend in memory at a time
        try:
            timings[name] = time_engines(make(), model.generation, manifest.dims, runs)
        except Exception as exc:
            failures[name] = exc
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return timings, failures
