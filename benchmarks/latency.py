"""`kiln bench`: per-stage and end-to-end latency for the same model, steps, size and seed through
diffusers' PyTorch pipeline (eager, and torch.compile), Kiln's core in-process on ONNX Runtime (the
exported graphs, and their fused-attention variants), on OpenVINO, and Kiln through Triton over HTTP
and gRPC, measured in one run. Each path reports p50, p90 and spread after warm-up, and its parity
with diffusers' eager PyTorch: the UNet step's output for the same inputs, and the end-to-end image.
The stages are the model family's: each text encoder, a UNet step, the VAE decode. A peer runtime
that cannot run here (package missing, a graph that fails its parity check) is reported as skipped.
JSON, markdown and a PNG plot."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from kiln.benchmarks.timing import timed as _timed
from kiln.errors import KilnError
from kiln.export.specs import Family, Tolerance

if TYPE_CHECKING:
    from kiln.evaluation.settings import Setting

log = logging.getLogger(__name__)

PROMPT = "a red digit 7 on a white background"
# The runtimes a user would pick instead of Kiln's, timed beside it when asked for (all by default).
PEERS = ("torch_compile", "onnxruntime_fused", "openvino", "onnxruntime_openvino")
# What makes a peer skipped rather than the bench fail: a package not installed, a graph outside its
# tolerance, a runtime that refuses the model.
PEER_FAILURES = (ImportError, KilnError, RuntimeError)


@dataclass(frozen=True)
class BenchSpec:
    steps: int = 10
    size: int | None = None  # pixels; default the model's native size
    runs: int = 5
    warmup: int = 1
    scheduler: str = "euler"
    seed: int = 0
    guidance_scale: float = 7.5
    peers: tuple[str, ...] = PEERS
    compile_backend: str = "inductor"  # torch.compile's backend ("eager" checks the wiring in seconds)
    # sampler settings Kiln is also timed at through Triton (kiln eval --sweep chooses them by accuracy),
    # each beside diffusers eager at the same setting
    settings: tuple[Setting, ...] = ()

    def __post_init__(self):
        import math

        unknown = [p for p in self.peers if p not in PEERS]
        if unknown:
            raise ValueError(f"peers {unknown}: expected some of {PEERS}")
        if not (math.isfinite(self.guidance_scale) and self.guidance_scale >= 0):
            raise KilnError(f"--guidance {self.guidance_scale}: expected a finite number >= 0 (1 or less: no guidance)")
        for name in ("steps", "runs"):
            if getattr(self, name) < 1:
                raise KilnError(f"--{name} {getattr(self, name)}: expected at least 1")


def timed(fn: Callable[[], object], runs: int, warmup: int) -> dict[str, float]:
    return _timed(fn, runs, warmup).to_json()


def timed_keeping(fn: Callable[[], object], runs: int, warmup: int) -> tuple[dict[str, float], object]:
    """timed(fn), and what its last call returned (for parity, without one more call)."""
    last = []

    def call():
        last[:] = [fn()]

    return timed(call, runs, warmup), last[0]


@dataclass
class Measured:
    """One path's timings, its UNet-step output for the bench's inputs and its end-to-end image."""

    stages: dict[str, dict]
    end_to_end: dict
    unet_out: np.ndarray
    image: np.ndarray | None  # (1, H, W, 3) uint8
    extra: dict = field(default_factory=dict)  # what else the path reports (compile seconds, fused operators)

    def row(self, reference: "Measured", tolerance: Tolerance) -> dict:
        return {"stages": self.stages, "end_to_end": self.end_to_end,
                "parity": parity(self, reference, tolerance), **self.extra}


def parity(measured: Measured, reference: Measured, tolerance: Tolerance) -> dict:
    """The UNet step's output against the reference's for the same inputs (and whether that is within the
    UNet's declared tolerance), and the end-to-end image's difference in 1/255 units."""
    from kiln.export.parity import compare

    diff = compare("out_sample", measured.unet_out, reference.unet_out)
    result = {"unet_step_max_abs": diff.max_abs, "unet_step_rel_l2": diff.rel_l2,
              "unet_step_within_tolerance": diff.within(tolerance)}
    if measured.image is not None and reference.image is not None:
        result.update(image_difference(measured.image, reference.image))
    return result


def image_difference(image: np.ndarray, reference: np.ndarray) -> dict:
    """Two uint8 images' largest and mean absolute difference, in 1/255 units."""
    pixels = np.abs(image.astype(int) - reference.astype(int))
    return {"image_max_abs_255": int(pixels.max()), "image_mean_abs_255": float(pixels.mean())}


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


def diffusers_stages(pipe, family: Family, spec: BenchSpec, x: dict, warmup: Callable) -> tuple[dict, np.ndarray]:
    """Each stage through diffusers' own modules (each in the spec's wrapper: the same call export
    traced), warmed up by `warmup(fn)`; the UNet step's output."""
    from kiln.export import wrappers

    outputs = {}
    measured = {}
    with torch.inference_mode():
        for stage, c in stages(family).items():
            module = getattr(wrappers, c.wrapper)(getattr(pipe, c.source))
            t = [torch.from_numpy(x[stage][name]) for name in c.input_names]
            warmup(lambda: module(*t))
            measured[stage], outputs[stage] = timed_keeping(lambda: module(*t), spec.runs, 0)
    return measured, outputs["unet_step"].numpy()


def end_to_end_diffusers(pipe, spec: BenchSpec, size: int, warmup: Callable) -> tuple[dict, np.ndarray]:
    from kiln.pipeline.reference import diffusers_image

    generate = lambda: diffusers_image(pipe, spec.scheduler, PROMPT, "", spec.seed, spec.steps, spec.guidance_scale, size,
                                             size)  # noqa: E731
    warmup(generate)
    return timed_keeping(generate, spec.runs, 0)


def bench_pytorch(model_dir: Path, family: Family, spec: BenchSpec, size: int, x: dict) -> Measured:
    """diffusers' pipeline and modules, eager: the reference every path's parity is measured against."""
    from kiln.export import wrappers
    from kiln.pipeline.reference import load_diffusers_pipeline

    pipe = load_diffusers_pipeline(model_dir)
    warmup = lambda fn: [fn() for _ in range(spec.warmup)]  # noqa: E731
    measured, unet_out = diffusers_stages(pipe, family, spec, x, warmup)
    unet = family.spec("unet")
    flops = unet_flops(getattr(wrappers, unet.wrapper)(pipe.unet), *(torch.from_numpy(x["unet_step"][n]) for n in unet.input_names))
    end, image = end_to_end_diffusers(pipe, spec, size, warmup)
    return Measured(measured, end, unet_out, image, {"unet_gflop": flops / 1e9})


def bench_kiln(pipe, family: Family, spec: BenchSpec, size: int, x: dict, extra: dict | None = None) -> Measured:
    """Kiln's core in this process (kiln.pipeline.onnx_pipeline.OnnxPipeline) on whichever runner `pipe`
    was built with: its own engine calls per stage, its own pipeline end to end."""
    from kiln.pipeline.request import GenerationRequest

    measured, outputs = {}, {}
    for stage, component in stages(family).items():
        feeds = [torch.from_numpy(x[stage][name]) for name in component.input_names]
        measured[stage], outputs[stage] = timed_keeping(lambda: pipe.engines.outputs(component, *feeds), spec.runs, spec.warmup)
    request = GenerationRequest(PROMPT, "", spec.seed, spec.steps, spec.guidance_scale, size, size, spec.scheduler)
    end, image = timed_keeping(lambda: pipe(request), spec.runs, spec.warmup)
    unet_out = outputs["unet_step"][family.spec("unet").output_names[0]].numpy()
    return Measured(measured, end, unet_out, image, extra or {})


def bench_onnx(onnx_dir: Path, family: Family, spec: BenchSpec, size: int, x: dict) -> Measured:
    from kiln.pipeline.onnx_pipeline import OnnxPipeline

    return bench_kiln(OnnxPipeline(onnx_dir), family, spec, size, x)


def bench_triton(url: str, protocol: str, family: Family, spec: BenchSpec, size: int, x: dict, loops: int = 1) -> Measured:
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

    measured, outputs = {}, {}
    for stage, component in stages(family).items():
        measured[stage], outputs[stage] = timed_keeping(
            lambda: call(component, fresh(x[stage]) if component.cache_outputs else x[stage]), spec.runs, spec.warmup)
    with KilnClient(url, protocol) as client:
        end, result = timed_keeping(lambda: client.generate(PROMPT, seed=spec.seed, steps=spec.steps, height=size, width=size,
                                                            scheduler=spec.scheduler, guidance_scale=spec.guidance_scale), spec.runs, max(spec.warmup, loops))
    unet_out = outputs["unet_step"].as_numpy(family.spec("unet").output_names[0])
    return Measured(measured, end, unet_out, result.images)  # warm-up reaches every BLS loop instance once


def bench_settings(url: str, model_dir: Path, spec: BenchSpec, size: int, reference_ms: float) -> dict:
    """Kiln through Triton over HTTP at each of `spec.settings` (scheduler, steps, guidance, its cutoff and
    interval), and diffusers' eager pipeline at the same setting with its guidance callbacks: p50/p90 end
    to end, the UNet rows one image runs, the served image's difference from diffusers' (0-255), and the
    speed-up over diffusers eager at the bench's own setting (`reference_ms`, its median)."""
    from kiln.clients.client import KilnClient
    from kiln.pipeline.reference import diffusers_image, load_diffusers_pipeline

    pipe = load_diffusers_pipeline(model_dir)
    rows = {}
    with KilnClient(url, "http") as client:
        for setting in spec.settings:
            served, images = timed_keeping(lambda s=setting: client.generate(
                PROMPT, seed=spec.seed, height=size, width=size, **s.request()).images, spec.runs, spec.warmup)
            eager, expected = timed_keeping(lambda s=setting: diffusers_image(
                pipe, s.scheduler, PROMPT, "", spec.seed, s.steps, s.guidance_scale, size, size,
                **s.diffusers_callbacks()), spec.runs, spec.warmup)
            rows[setting.name] = {
                "setting": asdict(setting), "unet_rows": setting.unet_rows(), "triton_http": served, "diffusers": eager,
                **image_difference(images, expected),
                "speedup_vs_pytorch": reference_ms / served["median_ms"],
                "speedup_vs_diffusers_same_setting": eager["median_ms"] / served["median_ms"]}
    return rows


def paths(model_dir: Path, onnx_dir: Path, out_dir: Path, family: Family, spec: BenchSpec, size: int,
          x: dict) -> dict[str, tuple[str | None, Callable[[], Measured]]]:
    """Every in-process path in the order of the report: name -> (the peer it belongs to, None for
    Kiln's own and the reference; how to measure it)."""
    from kiln.benchmarks.peers import bench_onnx_fused, bench_onnx_openvino, bench_openvino, bench_torch_compile

    def openvino_default() -> Measured:
        from kiln.pipeline.openvino_runner import default_precision

        if default_precision() == "f32":
            raise RuntimeError("OpenVINO's CPU plugin computes in f32 here by default: the openvino row is its default")
        return bench_openvino(onnx_dir, family, spec, size, x, "default")

    return {
        "pytorch": (None, lambda: bench_pytorch(model_dir, family, spec, size, x)),
        "torch_compile": ("torch_compile", lambda: bench_torch_compile(model_dir, family, spec, size, x)),
        "onnxruntime": (None, lambda: bench_onnx(onnx_dir, family, spec, size, x)),
        "onnxruntime_fused": ("onnxruntime_fused",
                              lambda: bench_onnx_fused(model_dir, onnx_dir, out_dir / "fused", family, spec, size, x)),
        "openvino": ("openvino", lambda: bench_openvino(onnx_dir, family, spec, size, x, "f32")),
        "openvino_default": ("openvino", openvino_default),
        "onnxruntime_openvino": ("onnxruntime_openvino", lambda: bench_onnx_openvino(onnx_dir, family, spec, size, x)),
    }


def measure_in_process(model_dir: Path, onnx_dir: Path, out_dir: Path, family: Family, spec: BenchSpec, size: int,
                       x: dict) -> tuple[dict[str, Measured], dict[str, str]]:
    """Each path one after the other (one model in memory at a time); a peer that fails with one of
    PEER_FAILURES is skipped with its reason."""
    measured, skipped = {}, {}
    for name, (peer, measure) in paths(model_dir, onnx_dir, out_dir, family, spec, size, x).items():
        if peer is None:
            measured[name] = measure()
        elif peer in spec.peers:
            try:
                measured[name] = measure()
            except PEER_FAILURES as exc:
                skipped[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                log.warning("bench: %s skipped: %s", name, skipped[name])
    return measured, skipped


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
    measured, skipped = measure_in_process(model_dir, onnx_dir, out_dir, family, spec, size, x)
    repo = build_repository(onnx_dir, out_dir / "repository", tuning=tuning)
    with running_server(repo) as served:
        for protocol, url in (("http", served.http_url), ("grpc", served.grpc_url)):
            measured[f"triton_{protocol}"] = bench_triton(url, protocol, family, spec, size, x, tuning.pipeline_instances)
        settings = bench_settings(served.http_url, model_dir, spec, size, measured["pytorch"].end_to_end["median_ms"])
    tolerance = family.spec("unet").onnx_tolerance(manifest.precision)
    results = {name: m.row(measured["pytorch"], tolerance) for name, m in measured.items()}
    report = {
        "spec": asdict(spec), "size": size, "family": manifest.model.family, "tuning": asdict(tuning),
        "unet_tolerance": asdict(tolerance), "results": results, "skipped": skipped,
        "ratios": ratios(results), "unet_step": unet_rates(results),
        # one image at a time, back to back: the floor of what a machine serves (concurrency: kiln loadtest)
        "cost": {k: asdict(cost(1000 / v["end_to_end"]["median_ms"], price_per_hour)) for k, v in results.items()},
        "settings": settings,
        "settings_cost": {k: asdict(cost(1000 / v["triton_http"]["median_ms"], price_per_hour)) for k, v in settings.items()},
    }
    write_json_atomically(out_dir / "bench.json", report)
    (out_dir / "bench.md").write_text(to_markdown(report))
    plot(report, out_dir / "bench.png")
    return report


def ratios(results: dict) -> dict:
    end = {k: v["end_to_end"]["median_ms"] for k, v in results.items()}
    unet = {k: v["stages"]["unet_step"]["median_ms"] for k, v in results.items()}
    return {
        "onnxruntime_speedup_vs_pytorch": end["pytorch"] / end["onnxruntime"],
        "triton_http_overhead": end["triton_http"] / end["onnxruntime"] - 1,
        "triton_grpc_overhead": end["triton_grpc"] / end["onnxruntime"] - 1,
        # > 1: faster than Kiln's ONNX Runtime path
        "speedup_vs_onnxruntime": {k: {"unet_step": unet["onnxruntime"] / unet[k], "end_to_end": end["onnxruntime"] / end[k]}
                                   for k in results},
    }


def unet_rates(results: dict) -> dict:
    gflop = results["pytorch"]["unet_gflop"]
    return {"gflop": gflop, "matmul_gflops": matmul_gflops(),
            "onnxruntime_gflops": gflop / (results["onnxruntime"]["stages"]["unet_step"]["median_ms"] / 1000),
            "gflops": {k: gflop / (v["stages"]["unet_step"]["median_ms"] / 1000) for k, v in results.items()}}


def overlap(a: dict, b: dict) -> bool:
    """Whether two timings' runs overlap (min to max): a ratio of their medians is then inconclusive, as
    the runs spread wider than the difference it reports."""
    return a["min_ms"] <= b["max_ms"] and b["min_ms"] <= a["max_ms"]


def _ratio(value: float, a: dict, b: dict, fmt: str = "{:.2f}x") -> str:
    return fmt.format(value) + (" (inconclusive: the runs overlap)" if overlap(a, b) else "")


def _ms(timing: dict) -> str:
    return f"{timing['median_ms']:.1f} / {timing.get('p90_ms', timing['median_ms']):.1f}"


def latency_table(report: dict) -> list[str]:
    names = list(next(iter(report["results"].values()))["stages"])
    heads = [n.replace("_", " ").replace("unet step", "UNet step (batch 2)").replace("vae", "VAE") for n in names]
    priced = report.get("cost", {})
    with_price = any(c.get("per_1000_images") is not None for c in priced.values())
    lines = [f"| path | {' | '.join(heads)} | end to end | spread | images/hour |" + (" per 1,000 images |" if with_price else ""),
             "|---|" + "---|" * (len(names) + 3) + ("---|" if with_price else "")]
    for name, r in report["results"].items():
        cells = " | ".join(_ms(r["stages"][n]) for n in names)
        c = priced.get(name, {})
        money = f" {c['per_1000_images']:.2f} |" if with_price and c.get("per_1000_images") is not None else (" - |" if with_price else "")
        lines.append(f"| {name} | {cells} | {_ms(r['end_to_end'])} | {100 * r['end_to_end'].get('spread', 0):.0f} % | "
                     f"{c.get('images_per_hour', 0):,.0f} |{money}")
    return lines


def parity_table(report: dict) -> list[str]:
    speedup = report["ratios"].get("speedup_vs_onnxruntime", {})
    lines = ["| path | UNet step max abs diff | rel-L2 | within tolerance | image max abs diff (/255) | image mean abs diff (/255) "
             "| UNet step vs Kiln ORT | end to end vs Kiln ORT |", "|---|---|---|---|---|---|---|---|"]
    for name, r in report["results"].items():
        p, s = r.get("parity", {}), speedup.get(name, {})
        image = (f"{p['image_max_abs_255']} | {p['image_mean_abs_255']:.3f}" if "image_max_abs_255" in p else "- | -")
        lines.append(f"| {name} | {p.get('unet_step_max_abs', 0):.2e} | {p.get('unet_step_rel_l2', 0):.2e} | "
                     f"{'yes' if p.get('unet_step_within_tolerance', True) else 'NO'} | {image} | "
                     f"{s.get('unet_step', 0):.2f}x | {s.get('end_to_end', 0):.2f}x |")
    return lines


def settings_table(report: dict) -> list[str]:
    spec = report["spec"]
    priced = report.get("settings_cost", {})
    with_price = any(c.get("per_1000_images") is not None for c in priced.values())
    lines = [f"Kiln through Triton (HTTP) at other sampler settings, beside diffusers eager at the same setting; "
             f"speed-up against diffusers eager at the bench's own setting ({spec['scheduler']} {spec['steps']} steps, "
             f"guidance {spec['guidance_scale']:g}, full guidance)", "",
             "| setting | UNet rows/image | Triton HTTP p50 / p90 | spread | diffusers eager p50 / p90 | image max / mean abs "
             "diff vs diffusers (/255) | vs diffusers, same setting | vs diffusers eager at the bench's setting | images/hour |"
             + (" per 1,000 images |" if with_price else ""), "|---|---|---|---|---|---|---|---|---|" + ("---|" if with_price else "")]
    for name, r in report["settings"].items():
        c = priced.get(name, {})
        money = f" {c['per_1000_images']:.2f} |" if with_price and c.get("per_1000_images") is not None else (" - |" if with_price else "")
        lines.append(f"| {name} | {r['unet_rows']} | {_ms(r['triton_http'])} | {100 * r['triton_http'].get('spread', 0):.0f} % | "
                     f"{_ms(r['diffusers'])} | {r['image_max_abs_255']} / {r['image_mean_abs_255']:.3f} | "
                     f"{_ratio(r['speedup_vs_diffusers_same_setting'], r['triton_http'], r['diffusers'])} | "
                     f"{_ratio(r['speedup_vs_pytorch'], r['triton_http'], report['results']['pytorch']['end_to_end'])} | "
                     f"{c.get('images_per_hour', 0):,.0f} |{money}")
    return lines


def notes(report: dict) -> list[str]:
    results = report["results"]
    lines = []
    if "torch_compile" in results:
        r = results["torch_compile"]
        lines.append(f"- torch.compile ({r['backend']}): {r['compile_s']:.1f} s compiling and warming up, not in the timings")
    if "onnxruntime_fused" in results:
        r = results["onnxruntime_fused"]
        ops = "; ".join(f"{name}: {', '.join(f'{op} {n}' for op, n in fused.items()) or 'nothing'}"
                        for name, fused in r["fused_ops"].items())
        lines.append(f"- ONNX Runtime fused graphs ({r['fuse_s']:.1f} s to fuse and check): {ops}")
    for name in ("openvino", "openvino_default"):
        if name in results:
            lines.append(f"- {name}: precision {results[name]['precision']}, {results[name]['load_s']:.1f} s to compile the model")
    lines += [f"- skipped {name}: {reason}" for name, reason in report.get("skipped", {}).items()]
    return lines


def to_markdown(report: dict) -> str:
    tol = report.get("unet_tolerance")
    lines = [f"{report.get('family', 'sd1')} model, size {report['size']}px, {report['spec']['steps']} steps, "
             f"{report['spec']['scheduler']}, {report['spec']['runs']} runs after warm-up: p50 / p90 in ms, "
             "spread = (max - min) / p50 end to end", "", *latency_table(report)]
    if "parity" in next(iter(report["results"].values())):
        bound = f"within atol {tol['atol']:g} + rtol {tol['rtol']:g} x max|ref|" if tol else "the UNet's tolerance"
        lines += ["", f"Parity with diffusers' eager PyTorch: the UNet step on the same inputs ({bound}), the image "
                  "from the same seed (0-255); speed relative to Kiln's ONNX Runtime path (> 1: faster)", "",
                  *parity_table(report)]
    r, u, priced = report["ratios"], report["unet_step"], report.get("cost", {})
    end = {k: v["end_to_end"] for k, v in report["results"].items()}
    lines += ["", "- ONNX Runtime vs PyTorch end to end: "
              + _ratio(r["onnxruntime_speedup_vs_pytorch"], end["onnxruntime"], end["pytorch"]),
              "- Triton overhead vs in-process: HTTP "
              + _ratio(100 * r["triton_http_overhead"], end["triton_http"], end["onnxruntime"], "{:+.1f} %")
              + ", gRPC " + _ratio(100 * r["triton_grpc_overhead"], end["triton_grpc"], end["onnxruntime"], "{:+.1f} %"),
              f"- UNet step: {u['gflop']:.1f} GFLOP, {u['onnxruntime_gflops']:.1f} GFLOP/s on ONNX Runtime "
              f"vs {u['matmul_gflops']:.1f} GFLOP/s float32 matmul on this machine", *notes(report)]
    if report.get("settings"):
        lines += ["", *settings_table(report), ""]
    if any(c.get("per_1000_images") is not None for c in priced.values()):
        lines.append(f"- cost at {next(iter(priced.values()))['price_per_hour']:g} per hour, one image at a time "
                     "(concurrent serving: kiln loadtest --price-per-hour)")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["results"])
    stages = list(report["results"][names[0]]["stages"])
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [report["results"][name]["stages"][s]["median_ms"] for s in stages]
        axes[0].bar(np.arange(len(stages)) + i * width, values, width, label=name)
    axes[0].set_xticks(np.arange(len(stages)) + 0.4 - width / 2, stages)
    axes[0].set_ylabel("ms (median)")
    axes[0].set_title("per stage")
    axes[0].legend(fontsize="small")
    axes[1].bar(names, [report["results"][n]["end_to_end"]["median_ms"] for n in names], color="tab:gray")
    axes[1].tick_params(axis="x", labelrotation=45)
    axes[1].set_ylabel("ms (median)")
    axes[1].set_title(f"end to end, {report['spec']['steps']} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
