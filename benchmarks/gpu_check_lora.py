"""Runtime LoRA adapters in the GPU check (benchmarks/gpu_check.py), on Kiln's UNet at the family's
size: in PyTorch over the check's own in-memory UNet, and, where TensorRT is installed and the plain
engine was built, as engines (each layer's rank a profile dimension)."""

from __future__ import annotations

from pathlib import Path

LORA_RANK = 16
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def _random_adapters(layers, work: Path, count: int) -> list[dict]:
    """`count` rank-16 attention adapters as the registry stores them (written as kohya files, read back
    through kiln lora add's normalisation)."""
    from kiln.models.tiny import write_random_lora
    from kiln.pipeline.adapters import normalise

    return [normalise(write_random_lora(layers, work / f"adapter{i}.safetensors", rank=LORA_RANK, seed=i, std=0.02,
                                        only=ATTENTION), layers)[0] for i in range(count)]


def lora_check(model, work: Path, runs: int) -> tuple[dict, list]:
    """One guided UNet step in PyTorch on `model`'s (a gpu_check_models.LoadedFamily): the plain UNet
    against the adapted graph's module (what `--lora-inputs` exports) with no adapter, the same adapter
    every step, and a different one every step; A -> B -> A must give identical outputs (deterministic
    kernels). Returns the report and the adapters (for lora_engines). It hooks the shared UNet's layers
    for good, so it runs last in a family."""
    import numpy as np
    import torch

    from kiln.benchmarks.timing import timed
    from kiln.export.specs import ShapePoint, dummy_inputs
    from kiln.export.wrappers import WithLoraInputs, adaptable_layers
    from kiln.models.folder import inspect_model, model_dims
    from kiln.pipeline.adapters import adapter_feeds

    spec, module = model.engines.family.spec("unet"), model.engines.run.modules["unet"].module
    dims, cuda = model_dims(model.folder), model.device.type == "cuda"
    layers = adaptable_layers(module, "unet", inspect_model(model.folder).family, dict(model.pipe.unet.config))
    adapted = WithLoraInputs(module, layers)
    latent = model.check.size // dims.vae_scale_factor
    base = dummy_inputs(spec, ShapePoint(spec.batch(1), latent, latent), dims)
    adapters = _random_adapters(layers, work / model.check.name / "lora", 2)
    sets = [adapter_feeds(layers, []), *(adapter_feeds(layers, [(a, 0.8)]) for a in adapters)]

    def tensors(feeds):
        return [torch.from_numpy(v).to(model.device, model.dtype if v.dtype == np.float32 else None)
                for v in feeds.values()]

    args = [torch.from_numpy(base[n]).to(model.device, model.dtype) for n in spec.input_names]
    none, a, b = ([*args, *tensors(f)] for f in sets)
    sync = torch.cuda.synchronize if cuda else None
    report: dict = {"adapted_layers": len(layers), "adapter": f"rank {LORA_RANK}, attention projections"}
    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        with torch.inference_mode():
            turn = iter(range(10**6))
            calls = {"plain": lambda: module(*args), "no_adapter": lambda: adapted(*none),
                     "same_adapter": lambda: adapted(*a),
                     "switching_every_step": lambda: adapted(*(a if next(turn) % 2 else b))}
            results = {name: timed(call, runs * 5, warmup=2, sync=sync) for name, call in calls.items()}
            first = adapted(*a).float().cpu()
            adapted(*b)
            again = adapted(*a).float().cpu()
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved
    pytorch = report["pytorch"] = {name: {"median_ms": round(t.median_ms, 3), "spread": round(t.spread, 3)}
                                   for name, t in results.items()}
    pytorch["a_b_a_identical"] = bool(torch.equal(first, again))
    pytorch["same_adapter_vs_plain"] = round(results["same_adapter"].median_ms / results["plain"].median_ms - 1, 4)
    return report, adapters


def lora_engines(model, work: Path, runs: int, adapters) -> dict:
    """The adapted UNet's engine against the plain one (onnx_backends built it): the target is at most
    5% slower, A -> B -> A identical. Raises where TensorRT, its GPU or the plain engine is missing."""
    import numpy as np
    import torch

    from kiln.artifacts import read_export
    from kiln.benchmarks.timing import timed
    from kiln.errors import KilnError
    from kiln.export.onnx_export import export_onnx
    from kiln.export.specs import ShapePoint, dummy_inputs
    from kiln.export.tensorrt import ENGINE_NAME, Runtime, TrtRunner, export_engines, plan_engines, trt_parity_check
    from kiln.export.wrappers import adaptable_layers
    from kiln.models.folder import inspect_model
    from kiln.pipeline.adapters import adapter_feeds

    Runtime.detect()  # ExportError where TensorRT or its GPU is missing
    if model.weights is None or model.plain_engine is None or not model.plain_engine.is_file():
        raise KilnError("the plain UNet engine was not built, so there is nothing to compare the adapted one with")
    root, size = work / model.check.name, model.check.size
    layers = adaptable_layers(model.engines.run.modules["unet"].module, "unet", inspect_model(model.folder).family,
                              dict(model.pipe.unet.config))
    onnx_dir = export_onnx(model.weights, root / "onnx-lora", components=("unet",), lora_inputs=True).out_dir
    plan = plan_engines(onnx_dir, "fp16", [f"1x{size}:1x{size}:1x{size}"], components=("unet",))
    export_engines(onnx_dir, root / "engines-lora", plan, trt_parity_check)
    manifest = read_export(onnx_dir)
    spec, dims = manifest.family.spec("unet"), manifest.dims
    latent = size // dims.vae_scale_factor
    base = dummy_inputs(spec, ShapePoint(spec.batch(1), latent, latent), dims)
    plain, lora = TrtRunner(model.plain_engine), TrtRunner(root / "engines-lora" / "unet" / ENGINE_NAME)
    a, b = ({**base, **adapter_feeds(layers, [(x, 0.8)])} for x in adapters)
    times = {"plain": timed(lambda: plain(base), runs * 5, warmup=2, sync=torch.cuda.synchronize),
             "same_adapter": timed(lambda: lora(a), runs * 5, warmup=2, sync=torch.cuda.synchronize)}
    first = lora(a)["out_sample"].float().cpu().numpy()
    lora(b)
    again = lora(a)["out_sample"].float().cpu().numpy()
    slower = times["same_adapter"].median_ms / times["plain"].median_ms - 1
    return {"median_ms": {k: round(t.median_ms, 3) for k, t in times.items()}, "slower_than_plain": round(slower, 4),
            "within_5_percent": slower <= 0.05, "a_b_a_identical": bool(np.array_equal(first, again))}
