"""`kiln bench`: per-stage and end-to-end latency for the same model, steps, size and seed through
diffusers' PyTorch pipeline, Kiln's ONNX Runtime pipeline (in-process), and Kiln through Triton
over HTTP and gRPC, measured in one run. Medians after warm-up; JSON, markdown and a PNG plot.
The stages are the model family's: each text encoder, a UNet step, the VAE decode."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from kiln.benchmarks.timing import timed as _timed
from kiln.export.specs import Family

PROMPT = "a red digit 7 on a white background"


@dataclass(frozen=True)
class BenchSpec:
    steps: int = 10
    size: int | None = None  # pixels; default the model's native size
    runs: int = 5
    warmup: int = 1
    scheduler: str = "euler"
    seed: int = 0


def timed(fn: Callable[[], object], runs: int, warmup: int) -> dict[str, float]:
    return _timed(fn, runs, warmup).to_json()


def matmul_gflops(n: int = 2048, runs: int = 5) -> float:
    """This machine's float32 matrix-multiply rate through torch (the ceiling a UNet step can reach)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    result = timed(lambda: a @ b, runs, 1)
    return 2 * n**3 / (result["median_ms"] / 1000) / 1e9


def unet_flops(unet, *inputs: torch.Tensor) -> float:
    """Floating-point operations of one call of `unet` (a module taking the UNet spec's inputs)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        unet(*inputs)
    return float(counter.get_total_flops())


def stages(family: Family) -> dict:
    """What one image runs: each text encoder, a UNet step, the VAE decode (stage name -> spec)."""
    return {**{name: family.spec(name) for name in family.text_encoders},
            "unet_step": family.spec("unet"), "vae_decode": family.spec("vae_decoder")}


def stage_inputs(family: Family, dims, size: int) -> dict[str, dict[str, np.ndarray]]:
    """Each stage's inputs for one guided image at `size` pixels, drawn as the spec declares them."""
    from kiln.export.specs import ShapePoint, dummy_inputs

    latent = size // dims.vae_scale_factor
    return {stage: dummy_inputs(spec, ShapePoint(spec.batch(1), latent, latent), dims)
            for stage, spec in stages(family).items()}


def bench_pytorch(model_dir: Path, family: Family, spec: BenchSpec, size: int, x: dict) -> dict:
    """diffusers' own modules (each in the spec's wrapper: the same call export traced) and pipeline."""
    from kiln.export import wrappers
    from kiln.pipeline.reference import diffusers_image, load_diffusers_pipeline

    pipe = load_diffusers_pipeline(model_dir)
    modules = {stage: getattr(wrappers, c.wrapper)(getattr(pipe, c.source)) for stage, c in stages(family).items()}
    t = {stage: [torch.from_numpy(x[stage][name]) for name in c.input_names] for stage, c in stages(family).items()}
    with torch.inference_mode():
        measured = {stage: timed(lambda: modules[stage](*t[stage]), spec.runs, spec.warmup) for stage in modules}
    flops = unet_flops(modules["unet_step"], *t["unet_step"])
    end = timed(lambda: diffusers_image(pipe, spec.scheduler, PROMPT, "", spec.seed, spec.steps, 7.5, size, size),
                spec.runs, spec.warmup)
    return {"stages": measured, "end_to_end": end, "unet_gflop": flops / 1e9}


def bench_onnx(onnx_dir: Path, family: Family, spec: BenchSpec, size: int, x: dict) -> dict:
    from kiln.pipeline.onnx_pipeline import OnnxPipeline
    from kiln.pipeline.request import GenerationRequest

    pipe = OnnxPipeline(onnx_dir)
    measured = {}
    for stage, component in stages(family).items():  # the pipeline's own engine calls
        feeds = [torch.from_numpy(x[stage][name]) for name in component.input_names]
        measured[stage] = timed(lambda: pipe.engines.outputs(component, *feeds), spec.runs, spec.warmup)
    request = GenerationRequest(PROMPT, "", spec.seed, spec.steps, 7.5, size, size, spec.scheduler)
    return {"stages": measured, "end_to_end": timed(lambda: pipe(request), spec.runs, spec.warmup)}


def bench_triton(url: str, protocol: str, family: Family, spec: BenchSpec, size: int, x: dict, loops: int = 1) -> dict:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    from kiln.clients.client import KilnClient

    module = httpclient if protocol == "http" else grpcclient
    raw = module.InferenceServerClient(url)

    def call(component, feeds: dict[str, np.ndarray]):
        inputs = []
        for name, array in feeds.items():
            array = array.reshape(-1, 1) if array.ndim == 1 else array
            tensor = module.InferInput(name, list(array.shape), {"float32": "FP32", "int32": "INT32"}[str(array.dtype)])
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        return raw.infer(component.name, inputs)

    def fresh(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Distinct token ids each call: the embedding cache must not answer for the encoder."""
        return {k: np.random.randint(0, 49000, v.shape).astype(v.dtype) for k, v in feeds.items()}

    measured = {stage: timed(lambda: call(component, fresh(x[stage]) if component.cache_outputs else x[stage]),
                             spec.runs, spec.warmup) for stage, component in stages(family).items()}
    with KilnClient(url, protocol) as client:
        end = timed(lambda: client.generate(PROMPT, seed=spec.seed, steps=spec.steps, height=size, width=size,
                                            scheduler=spec.scheduler), spec.runs, max(spec.warmup, loops))
    return {"stages": measured, "end_to_end": end}  # warm-up reaches every BLS loop instance once


def run(model_dir: Path, onnx_dir: Path, out_dir: Path, spec: BenchSpec = BenchSpec(), tuning=None,
        price_per_hour: float | None = None) -> dict:
    """`price_per_hour`: the cost of each path's sequential rate (one image at a time) in money."""
    from kiln.artifacts import read_export, write_json_atomically
    from kiln.benchmarks.cost import check_price, cost

    check_price(price_per_hour)
    from kiln.model_repository.builder import build_repository
    from kiln.model_repository.configs import Tuning
    from kiln.serving.server import running_server

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_export(onnx_dir)
    family = manifest.family
    size = spec.size or manifest.model.default_size
    x = stage_inputs(family, manifest.dims, size)
    tuning = tuning or Tuning()
    results = {"pytorch": bench_pytorch(model_dir, family, spec, size, x),
               "onnxruntime": bench_onnx(onnx_dir, family, spec, size, x)}
    repo = build_repository(onnx_dir, out_dir / "repository", tuning=tuning)
    with running_server(repo) as served:
        for protocol, url in (("http", served.http_url), ("grpc", served.grpc_url)):
            results[f"triton_{protocol}"] = bench_triton(url, protocol, family, spec, size, x, tuning.pipeline_instances)
    end = {k: v["end_to_end"]["median_ms"] for k, v in results.items()}
    unet_ms = results["onnxruntime"]["stages"]["unet_step"]["median_ms"]
    gflop = results["pytorch"]["unet_gflop"]
    report = {
        "spec": asdict(spec), "size": size, "family": manifest.model.family, "tuning": asdict(tuning), "results": results,
        "ratios": {
            "onnxruntime_speedup_vs_pytorch": end["pytorch"] / end["onnxruntime"],
            "triton_http_overhead": end["triton_http"] / end["onnxruntime"] - 1,
            "triton_grpc_overhead": end["triton_grpc"] / end["onnxruntime"] - 1,
        },
        "unet_step": {"gflop": gflop, "onnxruntime_gflops": gflop / (unet_ms / 1000), "matmul_gflops": matmul_gflops()},
        # one image at a time, back to back: the floor of what a machine serves (concurrency: kiln loadtest)
        "cost": {k: asdict(cost(1000 / ms, price_per_hour)) for k, ms in end.items()},
    }
    write_json_atomically(out_dir / "bench.json", report)
    (out_dir / "bench.md").write_text(to_markdown(report))
    plot(report, out_dir / "bench.png")
    return report


def to_markdown(report: dict) -> str:
    names = list(next(iter(report["results"].values()))["stages"])
    heads = [n.replace("_", " ").replace("unet step", "UNet step (batch 2)").replace("vae", "VAE") for n in names]
    lines = [f"{report.get('family', 'sd1')} model, size {report['size']}px, {report['spec']['steps']} steps, "
             f"{report['spec']['scheduler']}, medians of {report['spec']['runs']} runs (ms)", "",
             f"| path | {' | '.join(heads)} | end to end |", "|---|" + "---|" * (len(names) + 1)]
    priced = report.get("cost", {})
    with_price = any(c.get("per_1000_images") is not None for c in priced.values())
    lines[-2] += " images/hour |" + (" per 1,000 images |" if with_price else "")
    lines[-1] += "---|" + ("---|" if with_price else "")
    for name, r in report["results"].items():
        cells = " | ".join(f"{r['stages'][n]['median_ms']:.1f}" for n in names)
        c = priced.get(name, {})
        money = f" {c['per_1000_images']:.2f} |" if with_price and c.get("per_1000_images") is not None else (" - |" if with_price else "")
        lines.append(f"| {name} | {cells} | {r['end_to_end']['median_ms']:.1f} | {c.get('images_per_hour', 0):,.0f} |{money}")
    r, u = report["ratios"], report["unet_step"]
    lines += ["", f"- ONNX Runtime vs PyTorch end to end: {r['onnxruntime_speedup_vs_pytorch']:.2f}x",
              f"- Triton overhead vs in-process: HTTP {100 * r['triton_http_overhead']:+.1f} %, gRPC {100 * r['triton_grpc_overhead']:+.1f} %",
              f"- UNet step: {u['gflop']:.1f} GFLOP, {u['onnxruntime_gflops']:.1f} GFLOP/s on ONNX Runtime "
              f"vs {u['matmul_gflops']:.1f} GFLOP/s float32 matmul on this machine"]
    if with_price:
        lines.append(f"- cost at {next(iter(priced.values()))['price_per_hour']:g} per hour, one image at a time "
                     "(concurrent serving: kiln loadtest --price-per-hour)")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["results"])
    stages = list(report["results"][names[0]]["stages"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.2
    for i, name in enumerate(names):
        values = [report["results"][name]["stages"][s]["median_ms"] for s in stages]
        axes[0].bar(np.arange(len(stages)) + i * width, values, width, label=name)
    axes[0].set_xticks(np.arange(len(stages)) + 1.5 * width, stages)
    axes[0].set_ylabel("ms (median)")
    axes[0].set_title("per stage")
    axes[0].legend()
    axes[1].bar(names, [report["results"][n]["end_to_end"]["median_ms"] for n in names], color="tab:gray")
    axes[1].set_title(f"end to end, {report['spec']['steps']} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
