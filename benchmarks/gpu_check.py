"""`make gpu-check`: the GPU target measured in one script, for SD 1.5 at 512x512 and SDXL at
1024x1024 (one H100 or A100; about 8 minutes for SD 1.5, longer for SDXL's engines).

1. the full architecture (SD 1.5, or SDXL base with `--family sdxl`) with random weights -> ONNX
   (fp32, parity-checked against PyTorch; SDXL's UNet keeps its weights as external data);
2. fp16 TensorRT engines at the size (1 image; guidance doubles the UNet and text-encoder batch),
   each checked against ONNX Runtime running the same ONNX file (relative L2, the spec's tolerance);
3. one UNet step (batch 2) and a whole generation timed through Kiln's own denoising loop
   (kiln.pipeline.denoise with a real diffusers scheduler) over each backend's runner: TensorRT
   engines, ONNX Runtime (CUDA provider, fp32 export) and the components' PyTorch modules (fp16 on a
   GPU); diffusers' own pipeline for the same steps beside them; medians after warm-up;
4. runtime LoRA adapters (lora_check): the adapted UNet against the plain one in PyTorch and, where
   TensorRT is installed, as engines (rank as a profile dimension): no more than 5% slower, A -> B -> A
   identical;
5. a JSON report naming the GPU and the versions.

It installs nothing: `make gpu-setup` (the `gpu` extra) brings TensorRT and ONNX Runtime's CUDA
build. What is missing is reported rather than fatal: each skipped backend says why, and the rest
still runs. Without a GPU the same code runs on the CPU (ONNX Runtime's CPU provider, PyTorch fp32),
which is how the test suite exercises this script; run from the command line on a host without a
CUDA GPU and without --model, it writes a report saying so and builds nothing.

Published reference for the same shape: TensorRT about 0.82-0.86 s for 50 steps at 512x512 fp16 on
an A100 (NVIDIA's TensorRT demo).

    python -m kiln.benchmarks.gpu_check OUT_DIR [--family sd15|sdxl] [--model DIR] [--size 512] [--steps 30]
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import platform
import sys
import time
import traceback
from pathlib import Path

GUIDANCE = 7.5
PROMPT = "a red digit 7 on a white background"
REFERENCE = "TensorRT 0.82-0.86 s for 50 steps, 512x512, fp16, A100 (NVIDIA TensorRT demo)"
VERSIONS = ("tensorrt", "onnxruntime", "onnxruntime-gpu", "torch", "diffusers", "nvidia-modelopt")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ------------------------------------------------------------------ Kiln's loop over each backend


class Generation:
    """One prompt, tokenized once, drawn through kiln.pipeline.denoise.generate on any engines."""

    def __init__(self, model_dir: Path, size: int, steps: int, scheduler: str):
        from kiln.export.specs import family
        from kiln.models.folder import inspect_model
        from kiln.pipeline.denoise import ModelConstants
        from kiln.pipeline.prompt_weights import tokenize_prompts
        from kiln.pipeline.prompts import load_tokenizer

        info = inspect_model(model_dir)
        self.constants = ModelConstants(info.latent_channels, info.vae_scale_factor, info.scaling_factor,
                                        info.zero_empty_negative)
        tokenizers = [load_tokenizer(Path(model_dir) / name) for name in family(info.family).tokenizers]
        self.prompt, self.negative = tokenize_prompts(tokenizers, PROMPT, "")
        self.scheduler_config = json.loads((Path(model_dir) / "scheduler" / "scheduler_config.json").read_text())
        self.size, self.steps, self.scheduler = size, steps, scheduler

    def __call__(self, engines):
        from kiln.pipeline.denoise import generate
        from kiln.pipeline.schedulers import make_scheduler

        return generate(engines, make_scheduler(self.scheduler, self.scheduler_config, engines.family.name),
                        self.constants, self.prompt, self.negative, [0], self.steps, GUIDANCE, self.size, self.size,
                        zero_negative=self.constants.zero_empty_negative)


def _sync(engines):
    import torch

    return torch.cuda.synchronize if engines.device.type == "cuda" else None


def time_engines(engines, generation: Generation, dims, runs: int) -> dict:
    """A UNet step at batch 2 (the guided pair) and a whole generation, both through the pipeline's engines."""
    import torch

    from kiln.benchmarks.timing import timed
    from kiln.export.specs import ShapePoint, dummy_inputs

    unet = engines.family.spec("unet")
    latent = generation.size // dims.vae_scale_factor
    feeds = dummy_inputs(unet, ShapePoint(unet.batch(1), latent, latent), dims)
    args = [torch.from_numpy(feeds[name]).to(engines.device) for name in unet.input_names]
    step = timed(lambda: engines.call(unet, *args), runs * 5, warmup=2, sync=_sync(engines))
    whole = timed(lambda: generation(engines), runs, warmup=1, sync=_sync(engines))
    # every generation above checked its latents and image: an fp16 overflow (inf/NaN) raised GenerationError
    return {"unet_step_s": step.median_ms / 1000, "generation_s": whole.median_ms / 1000,
            "generation_spread": round(whole.spread, 3)}


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


def diffusers_seconds(model_dir: Path, generation: Generation, device: str, runs: int) -> float:
    import torch

    from kiln.benchmarks.timing import timed
    from kiln.pipeline.reference import diffusers_image, load_diffusers_pipeline

    pipe = load_diffusers_pipeline(model_dir)
    if device == "cuda":
        pipe = pipe.to("cuda", torch.float16)
    sync = torch.cuda.synchronize if device == "cuda" else None
    return timed(lambda: diffusers_image(pipe, generation.scheduler, PROMPT, "", 0, generation.steps, GUIDANCE,
                                         generation.size, generation.size), runs, warmup=1, sync=sync).median_ms / 1000


# ------------------------------------------------------------------ runtime LoRA adapters

LORA_RANK = 16
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def _random_adapters(layers, work: Path, count: int) -> list[dict]:
    """`count` rank-16 attention adapters as the registry stores them (written as kohya files, read back
    through kiln lora add's normalisation)."""
    from kiln.models.tiny import write_random_lora
    from kiln.pipeline.adapters import normalise

    return [normalise(write_random_lora(layers, work / f"adapter{i}.safetensors", rank=LORA_RANK, seed=i, std=0.02,
                                        only=ATTENTION), layers)[0] for i in range(count)]


def lora_check(model_dir: Path, out: Path, size: int, runs: int, cuda: bool, plain_engine: Path | None = None) -> dict:
    """Runtime LoRA adapters on the GPU target (kiln.pipeline.adapters), one guided UNet step at `size`:
    - PyTorch (fp16 on a GPU): the plain UNet against the adapted graph's module (what `--lora-inputs`
      exports) with no adapter, the same adapter every step, and a different one every step; A -> B -> A
      must give identical outputs (deterministic kernels);
    - TensorRT, where it is installed: the adapted UNet's engine (each layer's rank a profile dimension,
      ENGINE_RANKS) against the plain engine; the target is at most 5% slower, A -> B -> A identical."""
    import json as _json

    import numpy as np
    import torch

    from kiln.benchmarks.timing import timed
    from kiln.export.specs import ShapePoint, dummy_inputs, family
    from kiln.export.wrappers import WithLoraInputs, adaptable_layers
    from kiln.models.folder import inspect_model, model_dims
    from kiln.pipeline.adapters import adapter_feeds

    info = inspect_model(model_dir)
    spec, dims = family(info.family).spec("unet"), model_dims(model_dir, info)
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    module = spec.load_torch(model_dir)
    layers = adaptable_layers(module, "unet", info.family, _json.loads((Path(model_dir) / "unet" / "config.json").read_text()))
    adapted = WithLoraInputs(module, layers).to(device, dtype).eval()
    latent = size // dims.vae_scale_factor
    base = dummy_inputs(spec, ShapePoint(spec.batch(1), latent, latent), dims)
    work = Path(out) / "lora"
    work.mkdir(parents=True, exist_ok=True)
    adapters = _random_adapters(layers, work, 2)
    sets = [adapter_feeds(layers, []), adapter_feeds(layers, [(adapters[0], 0.8)]), adapter_feeds(layers, [(adapters[1], 0.8)])]

    def tensors(feeds):
        return [torch.from_numpy(v).to(device, dtype if v.dtype == np.float32 else None) for v in feeds.values()]

    args = [torch.from_numpy(base[n]).to(device, dtype) for n in spec.input_names]
    none, a, b = ([*args, *tensors(f)] for f in sets)
    sync = torch.cuda.synchronize if cuda else None
    report: dict = {"size": size, "adapted_layers": len(layers), "adapter": f"rank {LORA_RANK}, attention projections"}
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    with torch.inference_mode():
        plain = timed(lambda: module(*args), runs * 5, warmup=2, sync=sync)
        results = {"plain": plain,
                   "no_adapter": timed(lambda: adapted(*none), runs * 5, warmup=2, sync=sync),
                   "same_adapter": timed(lambda: adapted(*a), runs * 5, warmup=2, sync=sync)}
        turn = iter(range(10**6))
        results["switching_every_step"] = timed(lambda: adapted(*(a if next(turn) % 2 else b)), runs * 5, warmup=2, sync=sync)
        first = adapted(*a).float().cpu()
        adapted(*b)
        again = adapted(*a).float().cpu()
    report["pytorch"] = {name: {"median_ms": round(t.median_ms, 3), "spread": round(t.spread, 3)} for name, t in results.items()}
    report["pytorch"]["a_b_a_identical"] = bool(torch.equal(first, again))
    report["pytorch"]["same_adapter_vs_plain"] = round(results["same_adapter"].median_ms / plain.median_ms - 1, 4)
    try:
        report["tensorrt"] = _lora_engines(model_dir, out, size, runs, adapters, layers, plain_engine)
    except Exception as exc:  # no TensorRT, no GPU, a failed build: said in the report
        report["tensorrt"] = {"skipped": _failure(exc)}
    return report


def _lora_engines(model_dir: Path, out: Path, size: int, runs: int, adapters, layers, plain_engine: Path | None) -> dict:
    import numpy as np

    from kiln.benchmarks.timing import timed
    from kiln.errors import KilnError
    from kiln.export.onnx_export import export_onnx
    from kiln.export.specs import ShapePoint, dummy_inputs
    from kiln.export.tensorrt import ENGINE_NAME, Runtime, TrtRunner, export_engines, plan_engines, trt_parity_check
    from kiln.pipeline.adapters import adapter_feeds

    Runtime.detect()  # ExportError where TensorRT or its GPU is missing
    if plain_engine is None or not plain_engine.is_file():
        raise KilnError("the plain UNet engine was not built, so there is nothing to compare the adapted one with")
    onnx_dir = export_onnx(model_dir, Path(out) / "onnx-lora", components=("unet",), lora_inputs=True).out_dir
    plan = plan_engines(onnx_dir, "fp16", [f"1x{size}:1x{size}:1x{size}"], components=("unet",))
    export_engines(onnx_dir, Path(out) / "engines-lora", plan, trt_parity_check)
    from kiln.artifacts import read_export

    manifest = read_export(onnx_dir)
    spec, dims = manifest.family.spec("unet"), manifest.dims
    latent = size // dims.vae_scale_factor
    base = dummy_inputs(spec, ShapePoint(spec.batch(1), latent, latent), dims)
    plain, lora = TrtRunner(plain_engine), TrtRunner(Path(out) / "engines-lora" / "unet" / ENGINE_NAME)
    a, b = ({**base, **adapter_feeds(layers, [(x, 0.8)])} for x in adapters)
    import torch

    times = {"plain": timed(lambda: plain(base), runs * 5, warmup=2, sync=torch.cuda.synchronize),
             "same_adapter": timed(lambda: lora(a), runs * 5, warmup=2, sync=torch.cuda.synchronize)}
    first = lora(a)["out_sample"].float().cpu().numpy()
    lora(b)
    again = lora(a)["out_sample"].float().cpu().numpy()
    slower = times["same_adapter"].median_ms / times["plain"].median_ms - 1
    return {"median_ms": {k: round(t.median_ms, 3) for k, t in times.items()}, "slower_than_plain": round(slower, 4),
            "within_5_percent": slower <= 0.05, "a_b_a_identical": bool(np.array_equal(first, again))}


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


# The built-in architectures: image sides must be multiples of the VAE's 8 x the UNet's down-sampling
BUILT_IN = {"sd15": {"name": "SD 1.5", "multiple": 64, "size": 512},
            "sdxl": {"name": "SDXL base", "multiple": 32, "size": 1024}}


def check_settings(size: int, steps: int, runs: int, scheduler: str, model_dir: Path | None = None,
                   family: str = "sd15") -> str:
    """Refuse what would make every backend fail (or measure a size the product refuses) before any
    work; returns the scheduler's canonical name."""
    from kiln.errors import RequestError
    from kiln.models.folder import model_dims
    from kiln.pipeline.request import Limits, size_limit
    from kiln.pipeline.schedulers import canonical_name

    if runs < 1:
        raise RequestError("runs", runs, "at least 1")
    if not 1 <= steps <= Limits().max_steps:
        raise RequestError("steps", steps, f"1 to {Limits().max_steps}")
    dims = model_dims(model_dir) if model_dir is not None else None
    if family not in BUILT_IN:
        raise RequestError("family", family, f"one of {list(BUILT_IN)}")
    multiple = dims.vae_scale_factor * dims.unet_factor if dims else BUILT_IN[family]["multiple"]
    largest = size_limit(dims.default_latent * dims.vae_scale_factor if dims else BUILT_IN[family]["size"])
    if size % multiple or not multiple <= size <= largest:
        raise RequestError("size", size, f"a multiple of {multiple} up to {largest} (this model's image sides)")
    return canonical_name(scheduler)


def run(out: Path, model_dir: Path | None = None, size: int = 512, steps: int = 30, runs: int = 3,
        scheduler: str = "euler", family: str = "sd15") -> dict:
    import onnxruntime as ort
    import torch

    from kiln.artifacts import read_export
    from kiln.export.onnx_export import export_onnx
    from kiln.models.benchmark import write_sd15_model, write_sdxl_model
    from kiln.pipeline.engines import Engines, TorchRunner

    start = time.perf_counter()
    out = Path(out)
    scheduler = check_settings(size, steps, runs, scheduler, model_dir, family)
    cuda = _cuda()
    report: dict = {"device": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or platform.machine()})",
                    "versions": _versions() | {"torch_cuda": torch.version.cuda},
                    "size": size, "steps": steps, "runs": runs, "scheduler": scheduler, "guidance": GUIDANCE,
                    "reference": REFERENCE if family == "sd15" else None}
    if model_dir is None:
        built = out / family
        write = write_sdxl_model if family == "sdxl" else write_sd15_model
        model_dir = built if (built / "model_index.json").is_file() else write(built, "full")
        report["model"] = f"{BUILT_IN[family]['name']} architecture (full width), random weights"
    else:
        report["model"] = str(model_dir)
    t = time.perf_counter()
    onnx_dir = export_onnx(model_dir, out / "onnx").out_dir
    report["onnx_export_s"] = round(time.perf_counter() - t, 1)
    manifest = read_export(onnx_dir)
    dims = manifest.dims
    generation = Generation(model_dir, size, steps, scheduler)
    backends: list = []  # (name, factory of engines)
    skipped: dict = {}

    # TensorRT: fp16 engines for one image at `size`, each checked against ONNX Runtime
    try:
        from kiln.export.tensorrt import EngineRunner, Runtime, check_engines, export_engines, plan_engines, trt_parity_check

        required = tuple(n for n, spec in manifest.family.components.items() if spec.required)
        plan = plan_engines(onnx_dir, "fp16", [f"1x{size}:1x{size}:1x{size}"], components=required)
        t = time.perf_counter()
        export_engines(onnx_dir, out / "engines", plan, trt_parity_check)
        report["engine_build_s"] = round(time.perf_counter() - t, 1)
        report["engines"] = check_engines(out / "engines", Runtime.detect(), plan.export_key)["parity"]
        backends.append(("tensorrt", lambda: Engines(EngineRunner(out / "engines", required, manifest.family))))
    except Exception as exc:  # no TensorRT, no GPU, a failed build or parity: said in the report, the rest runs
        skipped["tensorrt"] = _failure(exc)
    provider = "CUDAExecutionProvider" if cuda else "CPUExecutionProvider"
    ort_name = "onnxruntime_" + provider.replace("ExecutionProvider", "").lower()
    if provider in ort.get_available_providers():
        backends.append((ort_name, lambda: onnx_runtime_engines(onnx_dir, provider)))
    else:
        skipped[ort_name] = "this onnxruntime build has no CUDA provider (make gpu-setup installs onnxruntime-gpu)"
    torch_name = f"pytorch_{'fp16' if cuda else 'fp32'}"
    backends.append((torch_name, lambda: Engines(TorchRunner(model_dir, "cuda" if cuda else "cpu",
                                                             torch.float16 if cuda else torch.float32))))

    timings = {}
    for name, make in backends:  # one backend in memory at a time
        engines = None
        try:
            engines = make()
            timings[name] = time_engines(engines, generation, dims, runs)
            print(f"{name}: {json.dumps(timings[name])}", flush=True)
        except Exception as exc:  # one backend failing must not cost the others' numbers
            skipped[name] = _failure(exc)
        engines = None
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    try:
        timings.setdefault(torch_name, {})["diffusers_pipeline_s"] = diffusers_seconds(
            model_dir, generation, "cuda" if cuda else "cpu", runs)
    except Exception as exc:
        skipped["diffusers_pipeline"] = _failure(exc)
    report["timings"], report["skipped"] = timings, skipped
    try:
        from kiln.export.tensorrt import ENGINE_NAME

        report["lora_adapters"] = lora_check(model_dir, out, size, runs, cuda, out / "engines" / "unet" / ENGINE_NAME)
        print(f"lora_adapters: {json.dumps(report['lora_adapters'])}", flush=True)
    except Exception as exc:
        skipped["lora_adapters"] = _failure(exc)
    if "generation_s" in timings.get("tensorrt", {}):
        report["generation_time_vs_tensorrt"] = {name: round(t["generation_s"] / timings["tensorrt"]["generation_s"], 2)
                                                 for name, t in timings.items() if "generation_s" in t}
    report["total_s"] = round(time.perf_counter() - start, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv=None) -> int:
    from kiln.errors import KilnError

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--family", default="sd15", choices=list(BUILT_IN),
                        help="the built-in architecture measured without --model (random weights)")
    parser.add_argument("--model", type=Path, default=None, help="a diffusers folder (default: --family's architecture)")
    parser.add_argument("--size", type=int, default=None, help="pixels (default: 512 for sd15, 1024 for sdxl)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--scheduler", default="euler", help="any name `kiln generate --scheduler` takes")
    args = parser.parse_args(argv)
    size = args.size or BUILT_IN[args.family]["size"]
    try:
        check_settings(size, args.steps, args.runs, args.scheduler, args.model, args.family)
    except KilnError as exc:
        parser.error(str(exc))  # exit 2, before anything is built
    if args.model is None and not _cuda():
        report = {"family": args.family, "size": size, "steps": args.steps,
                  "skipped": {"all": "no CUDA GPU (torch.cuda.is_available() is False): the full-size "
                                     f"{BUILT_IN[args.family]['name']} check runs on a GPU host; pass --model DIR "
                                     "to time a small model on this CPU"}}
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
        print(report["skipped"]["all"])
        return 0
    report = run(args.out_dir, args.model, size, args.steps, args.runs, args.scheduler, args.family)
    print(json.dumps(report, indent=2))
    print(f"report written to {args.out_dir / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
