"""`make gpu-check`: the GPU target measured in one script (one H100 or A100, about 8 minutes).

1. full SD 1.5 architecture with random weights -> ONNX (fp32, parity-checked against PyTorch);
2. fp16 TensorRT engines at 512x512 (batch 1 image, guidance doubling the UNet batch), each checked
   against ONNX Runtime (max |diff| and relative L2, stated tolerance below);
3. one UNet step and a 30-step generation timed for TensorRT, ONNX Runtime's CUDA provider and
   PyTorch fp16 (medians of several runs after warm-up);
4. a JSON report naming the GPU and the versions.

Published reference for the same shape: TensorRT about 0.82-0.86 s for 50 steps at 512x512 fp16 on
an A100 (NVIDIA's TensorRT demo). Run: python -m kiln.benchmarks.gpu_check OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

NEEDS = ("tensorrt", "onnxruntime-gpu", "polygraphy")


def ensure_installed() -> dict:
    """Install what the check needs when it is missing (a GPU host with PyPI access)."""
    import importlib.util

    missing = [p for p, mod in zip(NEEDS, ("tensorrt", "onnxruntime", "polygraphy")) if importlib.util.find_spec(mod) is None]
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *missing], check=True)
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():  # the CPU wheel shadows the GPU one
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "--quiet", "-y", "onnxruntime"], check=False)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--force-reinstall", "onnxruntime-gpu"], check=True)
    return {"installed": missing}


def _median_seconds(fn, runs: int, warmup: int = 2) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_backends(model_dir: Path, onnx_dir: Path, engine_dir: Path, steps: int, runs: int) -> dict:
    """One UNet step (batch 2, 64x64 latents) and a `steps`-step generation per backend."""
    import onnxruntime as ort
    import torch
    from diffusers import StableDiffusionPipeline

    from kiln.export.specs import COMPONENTS, ModelDims, ShapePoint, dummy_inputs
    from kiln.pipeline.onnx_pipeline import read_export

    dims = ModelDims(**read_export(onnx_dir)["dims"])
    feeds = dummy_inputs(COMPONENTS["unet"], ShapePoint(2, dims.default_latent, dims.default_latent), dims)
    results = {}
    # TensorRT: the UNet engine; a generation is text encoder + steps x UNet + VAE decoder engines
    from kiln.export.tensorrt import TrtRunner

    runners = {c: TrtRunner(engine_dir / c / "model.plan") for c in ("text_encoder", "unet", "vae_decoder")}
    unet_in = {k: torch.from_numpy(v).cuda() for k, v in feeds.items()}
    ids = torch.zeros((2, dims.sequence), dtype=torch.int32, device="cuda")
    latents = torch.randn((1, dims.latent_channels, dims.default_latent, dims.default_latent), device="cuda")

    def trt_generation():
        emb = runners["text_encoder"]({"input_ids": ids})["last_hidden_state"]
        x = latents
        for _ in range(steps):
            noise = runners["unet"]({"sample": torch.cat([x, x]), "timestep": unet_in["timestep"],
                                     "encoder_hidden_states": emb.float()})["out_sample"].float()
            x = x - 0.01 * noise.chunk(2)[0]
        runners["vae_decoder"]({"latent_sample": x})

    results["tensorrt"] = {"unet_step_s": _median_seconds(lambda: runners["unet"](unet_in), runs * 5),
                           "generation_s": _median_seconds(trt_generation, runs)}
    # ONNX Runtime, CUDA provider, fp32 export
    sessions = {c: ort.InferenceSession(str(onnx_dir / c / "model.onnx"), providers=["CUDAExecutionProvider"])
                for c in ("text_encoder", "unet", "vae_decoder")}

    def ort_generation():
        emb = sessions["text_encoder"].run(["last_hidden_state"], {"input_ids": np.zeros((2, dims.sequence), np.int32)})[0]
        x = feeds["sample"][:1]
        for _ in range(steps):
            noise = sessions["unet"].run(None, {"sample": np.concatenate([x, x]), "timestep": feeds["timestep"],
                                                "encoder_hidden_states": emb})[0]
            x = x - 0.01 * noise[:1]
        sessions["vae_decoder"].run(None, {"latent_sample": x})

    results["onnxruntime_cuda"] = {"unet_step_s": _median_seconds(lambda: sessions["unet"].run(None, feeds), runs * 5),
                                   "generation_s": _median_seconds(ort_generation, runs)}
    sessions.clear()  # free the GPU memory before PyTorch loads
    # PyTorch fp16, diffusers' own pipeline
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, torch_dtype=torch.float16, safety_checker=None).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    unet_half = {k: v.half() if v.is_floating_point() else v for k, v in unet_in.items()}

    def torch_step():
        with torch.no_grad():
            pipe.unet(unet_half["sample"], unet_half["timestep"], unet_half["encoder_hidden_states"])

    results["pytorch_fp16"] = {
        "unet_step_s": _median_seconds(torch_step, runs * 5),
        "generation_s": _median_seconds(lambda: pipe("a red digit 7", num_inference_steps=steps, height=512, width=512,
                                                     output_type="np"), runs),
    }
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    report = {"setup": ensure_installed()}
    import importlib.metadata

    import torch

    from kiln.export.onnx_export import export_onnx
    from kiln.export.tensorrt import TRT_TOLERANCE, Runtime, check_engines, export_engines, plan_engines, trt_parity_check
    from kiln.models.benchmark import write_sd15_model

    runtime = Runtime.detect()
    report["gpu"] = runtime.gpu
    report["versions"] = {p: importlib.metadata.version(p) for p in ("tensorrt", "onnxruntime-gpu", "torch", "diffusers")}
    out = args.out_dir
    model_dir = out / "sd15" if (out / "sd15" / "model_index.json").is_file() else write_sd15_model(out / "sd15", "full")
    onnx_dir = export_onnx(model_dir, out / "onnx").out_dir
    report["onnx_export_s"] = round(time.perf_counter() - start, 1)
    plan = plan_engines(onnx_dir, "fp16", ["1x512:1x512:1x512"], components=("text_encoder", "unet", "vae_decoder"))
    t = time.perf_counter()
    export_engines(onnx_dir, out / "engines", plan, trt_parity_check)
    report["engine_build_s"] = round(time.perf_counter() - t, 1)
    report["engines"] = check_engines(out / "engines", runtime, plan.export_key)["parity"]
    report["timings"] = time_backends(model_dir, onnx_dir, out / "engines", args.steps, args.runs)
    report["steps"] = args.steps
    report["tolerance_rel_l2"] = TRT_TOLERANCE
    report["total_s"] = round(time.perf_counter() - start, 1)
    report["torch_cuda"] = torch.version.cuda
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
