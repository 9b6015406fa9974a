"""`make gpu-check`: the GPU target measured in one script (one H100 or A100, about 8 minutes).

1. full SD 1.5 architecture with random weights -> ONNX (fp32, parity-checked against PyTorch);
2. fp16 TensorRT engines at 512x512 (1 image; guidance doubles the UNet and text-encoder batch),
   each checked against ONNX Runtime running the same ONNX file (relative L2, tolerance in the report);
3. one UNet step (batch 2) and a 30-step generation (text encoder, 30 guided UNet calls, VAE decoder)
   timed through the same loop for TensorRT, ONNX Runtime (CUDA provider, fp32 export) and PyTorch
   (fp16 on a GPU), plus diffusers' own pipeline for the same steps; medians after warm-up;
4. a JSON report naming the GPU and the versions.

What is missing is reported rather than fatal: with --install (the default) a CUDA host with PyPI
access gets TensorRT and ONNX Runtime's GPU build; where that fails (no network) or there is no GPU,
each skipped backend says why, and the rest still runs. Without a GPU the same code runs on the CPU
(ONNX Runtime's CPU provider, PyTorch fp32), which is how the test suite exercises this script.

Published reference for the same shape: TensorRT about 0.82-0.86 s for 50 steps at 512x512 fp16 on
an A100 (NVIDIA's TensorRT demo).

    python -m kiln.benchmarks.gpu_check OUT_DIR [--model DIR] [--size 512] [--steps 30] [--no-install]
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

GUIDANCE = 7.5
REFERENCE = "TensorRT 0.82-0.86 s for 50 steps, 512x512, fp16, A100 (NVIDIA TensorRT demo)"
VERSIONS = ("tensorrt", "onnxruntime", "onnxruntime-gpu", "torch", "diffusers", "nvidia-modelopt")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _pip(*args: str) -> tuple[bool, str]:
    done = subprocess.run([sys.executable, "-m", "pip", *args, "--quiet"], capture_output=True, text=True)
    return done.returncode == 0, (done.stderr.strip().splitlines() or [""])[-1]


def _ort_providers() -> list[str]:
    """Asked in a fresh interpreter: an onnxruntime swapped for onnxruntime-gpu after this process
    imported it would still answer with the old build's providers."""
    code = "import onnxruntime as o; print(','.join(o.get_available_providers()))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return done.stdout.strip().split(",") if done.returncode == 0 else []


def ensure_installed(allowed: bool) -> dict:
    """On a CUDA host: TensorRT and ONNX Runtime's CUDA build, installed when missing (needs PyPI).
    A failed install is reported and its backend skipped; nothing working is removed first."""
    if not allowed:
        return {"installed": [], "skipped": "--no-install"}
    if not _cuda():
        return {"installed": [], "skipped": "no CUDA GPU: nothing to install"}
    installed, failed = [], {}

    def outcome(package: str, ok: bool, message: str) -> None:
        if ok:
            installed.append(package)
        else:
            failed[package] = message

    if importlib.util.find_spec("tensorrt") is None:
        outcome("tensorrt", *_pip("install", "tensorrt"))
    if "CUDAExecutionProvider" not in _ort_providers():
        # onnxruntime and onnxruntime-gpu are one module: fetch the GPU build (same minor version)
        # before the CPU build is uninstalled, so a host without network keeps a working one
        try:
            version = importlib.metadata.version("onnxruntime")
            spec = f"onnxruntime-gpu=={'.'.join(version.split('.')[:2])}.*"
        except importlib.metadata.PackageNotFoundError:
            version, spec = None, "onnxruntime-gpu"
        with tempfile.TemporaryDirectory() as wheels:
            ok, message = _pip("download", "--no-deps", "--dest", wheels, spec)
            if ok:
                _pip("uninstall", "-y", "onnxruntime")
                ok, message = _pip("install", "--no-deps", "--no-index", "--find-links", wheels, spec)
                if not ok and version:  # put the CPU build back
                    _pip("install", "--no-deps", f"onnxruntime=={version}")
        outcome("onnxruntime-gpu", ok, message)
    return {"installed": installed, "failed": failed}


# ------------------------------------------------------------------ one timing loop, three backends


class Backend:
    """A text encoder, a UNet over the prompt and negative prompt, and a VAE decoder, over one array
    type; guidance and `generation` are the same for every backend (a fixed update stands in for the
    scheduler: it costs nothing). `x` holds the starting latents (1 image)."""

    name = ""
    x = None

    def text(self):
        raise NotImplementedError

    def unet(self, latents, embeddings):
        """The UNet at batch 2: `latents` for both halves of `embeddings`."""
        raise NotImplementedError

    def decode(self, latents):
        raise NotImplementedError

    def noise(self, latents, embeddings):
        out = self.unet(latents, embeddings)
        uncond, cond = out[:1], out[1:]
        return uncond + GUIDANCE * (cond - uncond)

    def sync(self) -> None:
        pass

    def generation(self, steps: int):
        embeddings, x = self.text(), self.x
        for _ in range(steps):
            x = x - 0.01 * self.noise(x, embeddings)
        return self.decode(x)

    def close(self) -> None:
        pass


class TorchTensors:
    """Inputs as torch tensors on `device`: batch-2 token ids, timesteps, 1-image latents."""

    def __init__(self, dims, latent: int, device: str, dtype):
        import torch

        self.torch, self.device, self.dtype = torch, device, dtype
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, dims.vocab_size, (2, dims.sequence), generator=generator).to(device, torch.int32)
        self.t = torch.full((2,), 500.0, device=device, dtype=dtype)
        self.x = torch.randn((1, dims.latent_channels, latent, latent), generator=generator).to(device, dtype)


class TensorRTBackend(Backend, TorchTensors):
    name = "tensorrt"

    def __init__(self, engine_dir: Path, dims, latent: int):
        import torch

        from kiln.export.tensorrt import ENGINE_NAME, TrtRunner

        TorchTensors.__init__(self, dims, latent, "cuda", torch.float32)
        self.runners = {c: TrtRunner(engine_dir / c / ENGINE_NAME) for c in ("text_encoder", "unet", "vae_decoder")}

    def text(self):
        return self.runners["text_encoder"]({"input_ids": self.ids})["last_hidden_state"].float()

    def unet(self, x, emb):
        return self.runners["unet"]({"sample": self.torch.cat([x, x]), "timestep": self.t,
                                     "encoder_hidden_states": emb})["out_sample"].float()

    def decode(self, x):
        return self.runners["vae_decoder"]({"latent_sample": x})["sample"]

    def sync(self):
        self.torch.cuda.synchronize()


class OnnxRuntimeBackend(Backend):
    def __init__(self, onnx_dir: Path, dims, latent: int, provider: str):
        import onnxruntime as ort

        from kiln.errors import KilnError

        self.name = "onnxruntime_" + provider.replace("ExecutionProvider", "").lower()
        if provider == "CUDAExecutionProvider" and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA and cuDNN from the nvidia-* wheels torch brought
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.sessions = {c: ort.InferenceSession(str(onnx_dir / c / "model.onnx"), options, providers=[provider])
                         for c in ("text_encoder", "unet", "vae_decoder")}
        used = {s.get_providers()[0] for s in self.sessions.values()}
        if used != {provider}:  # ONNX Runtime falls back to the CPU when CUDA's libraries do not load
            raise KilnError(f"ONNX Runtime asked for {provider} ran on {sorted(used)}")
        rng = np.random.default_rng(0)
        self.ids = rng.integers(0, dims.vocab_size, (2, dims.sequence)).astype(np.int32)
        self.t = np.full((2,), 500.0, np.float32)
        self.x = rng.standard_normal((1, dims.latent_channels, latent, latent)).astype(np.float32)

    def text(self):
        return self.sessions["text_encoder"].run(["last_hidden_state"], {"input_ids": self.ids})[0]

    def unet(self, x, emb):
        return self.sessions["unet"].run(None, {"sample": np.concatenate([x, x]), "timestep": self.t,
                                                "encoder_hidden_states": emb})[0]

    def decode(self, x):
        return self.sessions["vae_decoder"].run(None, {"latent_sample": x})[0]

    def close(self):
        self.sessions.clear()


class TorchBackend(Backend, TorchTensors):
    """diffusers' modules, fp16 on a GPU (as served in PyTorch), fp32 on the CPU."""

    def __init__(self, model_dir: Path, dims, latent: int, device: str):
        import torch
        from diffusers import StableDiffusionPipeline

        dtype = torch.float16 if device == "cuda" else torch.float32
        TorchTensors.__init__(self, dims, latent, device, dtype)
        self.name = f"pytorch_{'fp16' if device == 'cuda' else 'fp32'}"
        self.pipe = StableDiffusionPipeline.from_pretrained(model_dir, dtype=dtype, safety_checker=None).to(device)
        self.pipe.set_progress_bar_config(disable=True)

    def text(self):
        with self.torch.no_grad():
            return self.pipe.text_encoder(self.ids.long())[0]

    def unet(self, x, emb):
        with self.torch.no_grad():
            return self.pipe.unet(self.torch.cat([x, x]), self.t, encoder_hidden_states=emb).sample

    def decode(self, x):
        with self.torch.no_grad():
            return self.pipe.vae.decode(x / self.pipe.vae.config.scaling_factor).sample

    def sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def diffusers_pipeline(self, steps: int, size: int):
        return self.pipe("a red digit 7", num_inference_steps=steps, guidance_scale=GUIDANCE, height=size, width=size,
                         output_type="np")


def median_seconds(fn, sync, runs: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_backend(backend: Backend, steps: int, runs: int) -> dict:
    emb, x = backend.text(), backend.x
    result = {"unet_step_s": median_seconds(lambda: backend.noise(x, emb), backend.sync, runs * 5),
              "generation_s": median_seconds(lambda: backend.generation(steps), backend.sync, runs)}
    out = backend.generation(steps)
    image = out.float().cpu().numpy() if hasattr(out, "cpu") else np.asarray(out)
    result["finite"] = bool(np.isfinite(image).all())  # an fp16 overflow shows up here as inf/NaN
    return result


# ------------------------------------------------------------------ the check


def _failure(exc: Exception) -> str:
    """One line for the report: the error, its hint, and where it was raised."""
    hint = getattr(exc, "hint", None)
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    return (f"{type(exc).__name__}: {exc}" + (f" ({hint})" if hint else "")
            + (f" [{Path(where.filename).name}:{where.lineno}]" if where else ""))


def _versions() -> dict:
    found = {}
    for name in VERSIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def run(out: Path, model_dir: Path | None = None, size: int = 512, steps: int = 30, runs: int = 3,
        install: bool = True) -> dict:
    import torch

    from kiln.export.onnx_export import export_onnx
    from kiln.export.specs import ModelDims
    from kiln.models.benchmark import write_sd15_model
    from kiln.pipeline.onnx_pipeline import read_export

    start = time.perf_counter()
    out = Path(out)
    report: dict = {"setup": ensure_installed(install)}
    cuda = _cuda()
    report["device"] = torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or platform.machine()})"
    report["versions"] = _versions() | {"torch_cuda": torch.version.cuda}
    report.update(size=size, steps=steps, runs=runs, guidance=GUIDANCE, reference=REFERENCE)
    if model_dir is None:
        sd15 = out / "sd15"
        model_dir = sd15 if (sd15 / "model_index.json").is_file() else write_sd15_model(sd15, "full")
        report["model"] = "SD 1.5 architecture (full width), random weights"
    else:
        report["model"] = str(model_dir)
    t = time.perf_counter()
    onnx_dir = export_onnx(model_dir, out / "onnx").out_dir
    report["onnx_export_s"] = round(time.perf_counter() - t, 1)
    dims = ModelDims(**read_export(onnx_dir)["dims"])
    latent = size // dims.vae_scale_factor
    backends: list = []  # (label, factory)
    skipped: dict = {}

    # TensorRT: fp16 engines for one image at `size`, each checked against ONNX Runtime
    try:
        from kiln.export.tensorrt import TRT_TOLERANCE, Runtime, check_engines, export_engines, plan_engines, trt_parity_check

        plan = plan_engines(onnx_dir, "fp16", [f"1x{size}:1x{size}:1x{size}"], components=("text_encoder", "unet", "vae_decoder"))
        t = time.perf_counter()
        export_engines(onnx_dir, out / "engines", plan, trt_parity_check)
        report["engine_build_s"] = round(time.perf_counter() - t, 1)
        report["engines"] = check_engines(out / "engines", Runtime.detect(), plan.export_key)["parity"]
        report["tolerance_rel_l2"] = TRT_TOLERANCE
        backends.append(("tensorrt", lambda: TensorRTBackend(out / "engines", dims, latent)))
    except Exception as exc:  # no TensorRT, no GPU, a failed build or parity: said in the report, the rest runs
        skipped["tensorrt"] = _failure(exc)
    import onnxruntime as ort

    provider = "CUDAExecutionProvider" if cuda else "CPUExecutionProvider"
    if provider in ort.get_available_providers():
        backends.append(("onnxruntime", lambda: OnnxRuntimeBackend(onnx_dir, dims, latent, provider)))
    else:
        skipped["onnxruntime_cuda"] = "this onnxruntime build has no CUDA provider (pip install onnxruntime-gpu)"
    backends.append(("pytorch", lambda: TorchBackend(model_dir, dims, latent, "cuda" if cuda else "cpu")))

    timings = {}
    for label, make in backends:  # one backend in memory at a time
        backend = None
        try:
            backend = make()
            timings[backend.name] = time_backend(backend, steps, runs)
            if isinstance(backend, TorchBackend):
                timings[backend.name]["diffusers_pipeline_s"] = median_seconds(
                    lambda: backend.diffusers_pipeline(steps, size), backend.sync, runs)
            print(f"{backend.name}: {json.dumps(timings[backend.name])}", flush=True)
        except Exception as exc:  # one backend failing must not cost the others' numbers
            skipped[label] = _failure(exc)
        if backend is not None:
            backend.close()
        backend = None
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    report["timings"], report["skipped"] = timings, skipped
    if "tensorrt" in timings:
        report["generation_time_vs_tensorrt"] = {name: round(t["generation_s"] / timings["tensorrt"]["generation_s"], 2)
                                         for name, t in timings.items()}
    report["total_s"] = round(time.perf_counter() - start, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--model", type=Path, default=None, help="a diffusers folder (default: SD 1.5, random weights)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-install", dest="install", action="store_false",
                        help="use what is installed; skip (and report) the backends that are missing")
    args = parser.parse_args(argv)
    report = run(args.out_dir, args.model, args.size, args.steps, args.runs, args.install)
    print(json.dumps(report, indent=2))
    print(f"report written to {args.out_dir / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
