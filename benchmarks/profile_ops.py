"""Operator profiles of one component on ONNX Runtime and in PyTorch, same shapes and weights: where
the time goes, by operator type, and each side's achieved GFLOP/s against this machine's float32
matmul rate. Explains the end-to-end ratio `kiln bench` reports.

    python -m kiln.benchmarks.profile_ops MODEL_DIR ONNX_DIR OUT [--component unet] [--size 256] [--runs 3]
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

from kiln.benchmarks.timing import timed
from kiln.export import specs


def _shape_point(spec, size: int, dims):
    """One image with guidance: the batch the component sees."""
    from kiln.export.specs import ShapePoint

    latent = size // dims.vae_scale_factor
    return ShapePoint(spec.batch(1), latent, latent)


def profile_onnxruntime(onnx_path: Path, feeds: dict, runs: int, threads: int = 0) -> dict:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    timing = timed(lambda: session.run(None, feeds), runs, warmup=1)
    with tempfile.TemporaryDirectory() as tmp:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        profiled = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            profiled.run(None, feeds)
        events = json.loads(Path(profiled.end_profiling()).read_text())
    by_op: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"] / 1e3 / runs  # ms per run
    return {"median_ms": timing.median_ms, "by_op_ms": dict(sorted(by_op.items(), key=lambda kv: -kv[1]))}


def profile_torch(module, feeds: dict, runs: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    inputs = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        timing = timed(lambda: module(**inputs), runs, warmup=1)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(runs):
                module(**inputs)
    by_op = {e.key: e.self_cpu_time_total / 1e3 / runs for e in prof.key_averages() if e.self_cpu_time_total > 0}
    return {"median_ms": timing.median_ms, "by_op_ms": dict(sorted(by_op.items(), key=lambda kv: -kv[1]))}


# Operator families, so both sides' tables read alike.
FAMILIES = {
    "convolution": ("Conv", "FusedConv", "NhwcFusedConv", "aten::mkldnn_convolution", "aten::convolution",
                    "aten::_convolution", "aten::conv2d", "aten::_nnpack_spatial_convolution"),
    "matmul / attention": ("MatMul", "Gemm", "FusedMatMul", "MatMulNBits", "Attention", "MultiHeadAttention",
                           "aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
                           "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::scaled_dot_product_attention"),
    "normalisation": ("GroupNormalization", "GroupNorm", "LayerNormalization", "InstanceNormalization", "SkipLayerNormalization",
                      "aten::native_group_norm", "aten::native_layer_norm", "aten::group_norm", "aten::layer_norm"),
    "softmax": ("Softmax", "aten::_softmax", "aten::softmax"),
}


def family_totals(by_op: dict[str, float]) -> dict[str, float]:
    totals = collections.defaultdict(float)
    for op, ms in by_op.items():
        family = next((f for f, names in FAMILIES.items() if op in names), "elementwise / other")
        totals[family] += ms
    return dict(totals)


def run(model_dir: Path, onnx_dir: Path, out: Path, component: str = "unet", size: int = 256, runs: int = 3) -> dict:
    import torch

    from kiln.artifacts import onnx_file
    from kiln.benchmarks.latency import matmul_gflops, unet_flops
    from kiln.export.specs import dummy_inputs
    from kiln.models.folder import inspect_model, model_dims

    spec = specs.family(inspect_model(Path(model_dir)).family).spec(component)
    dims = model_dims(Path(model_dir))
    feeds = dummy_inputs(spec, _shape_point(spec, size, dims), dims)
    ort_side = profile_onnxruntime(onnx_file(onnx_dir, component), feeds, runs)
    module = spec.load_torch(model_dir)
    torch_side = profile_torch(module, feeds, runs)
    report = {"component": component, "size": size, "runs": runs, "onnxruntime": ort_side, "pytorch": torch_side,
              "families_ms": {"onnxruntime": family_totals(ort_side["by_op_ms"]), "pytorch": family_totals(torch_side["by_op_ms"])},
              "matmul_gflops": matmul_gflops()}
    if spec.name == "unet":
        flop = unet_flops(module, *(torch.from_numpy(feeds[k]) for k in spec.input_names)) / 1e9
        report["gflop"] = flop
        report["gflops"] = {k: flop / (report[k]["median_ms"] / 1e3) for k in ("onnxruntime", "pytorch")}
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "profile.md").write_text(to_markdown(report))
    print(to_markdown(report))
    return report


def to_markdown(r: dict) -> str:
    o, p = r["onnxruntime"], r["pytorch"]
    lines = [f"{r['component']} at {r['size']}px, medians of {r['runs']} runs after warm-up (ms per call)", "",
             f"- ONNX Runtime {o['median_ms']:.1f} ms, PyTorch {p['median_ms']:.1f} ms: {p['median_ms'] / o['median_ms']:.2f}x"]
    if "gflops" in r:
        lines.append(f"- {r['gflop']:.1f} GFLOP per call: ONNX Runtime {r['gflops']['onnxruntime']:.0f} GFLOP/s, PyTorch "
                     f"{r['gflops']['pytorch']:.0f} GFLOP/s, float32 matmul on this machine {r['matmul_gflops']:.0f} GFLOP/s")
    lines += ["", "| operator family | ONNX Runtime ms | PyTorch ms |", "|---|---|---|"]
    families = sorted(set(r["families_ms"]["onnxruntime"]) | set(r["families_ms"]["pytorch"]),
                      key=lambda f: -r["families_ms"]["pytorch"].get(f, 0))
    for f in families:
        lines.append(f"| {f} | {r['families_ms']['onnxruntime'].get(f, 0):.1f} | {r['families_ms']['pytorch'].get(f, 0):.1f} |")
    lines += ["", "Top operators, ONNX Runtime: " + ", ".join(f"{k} {v:.1f}" for k, v in list(o["by_op_ms"].items())[:6]),
              "", "Top operators, PyTorch: " + ", ".join(f"{k} {v:.1f}" for k, v in list(p["by_op_ms"].items())[:6])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("onnx_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--component", default="unet",
                        choices=list(dict.fromkeys(name for layout in specs.FAMILIES.values() for name in layout.components)))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    run(args.model_dir, args.onnx_dir, args.out, args.component, args.size, args.runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
