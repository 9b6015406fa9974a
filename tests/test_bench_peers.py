"""The runtimes `kiln bench` puts beside Kiln's: fused-attention ONNX Runtime graphs, OpenVINO and
torch.compile, each through its own path on the tiny model, with its parity against diffusers' eager
PyTorch; and what the report says about them (no Triton here: tests/test_benchmarks.py runs it)."""

import sys

import numpy as np
import pytest

CUDA_ONLY_OPS = {"GroupNorm", "SkipGroupNorm", "NhwcConv", "BiasSplitGelu", "BiasAdd"}


def _setup(tiny_model, onnx_dir):
    from kiln.artifacts import read_export
    from kiln.benchmarks.latency import stage_inputs

    model, onnx = tiny_model("epsilon"), onnx_dir("epsilon")
    manifest = read_export(onnx)
    size = manifest.model.default_size
    return model, onnx, manifest, size, stage_inputs(manifest.family, manifest.dims, size)


def test_fused_graphs_keep_the_spec_names_load_on_the_cpu_and_match_pytorch(tiny_model, onnx_dir, tmp_path):
    import onnx

    from kiln.export.optimize import fuse_export

    model, export, manifest, _, _ = _setup(tiny_model, onnx_dir)
    fused = fuse_export(model, export, tmp_path)
    assert set(fused) == {"text_encoder", "unet"}  # the VAE declares no fusion
    assert fused["unet"].fused_ops["Attention"] > 0 and fused["unet"].fused_ops["MultiHeadAttention"] > 0
    for name, component in fused.items():
        spec = manifest.family.spec(name)
        graph = onnx.load(str(component.path)).graph
        assert not CUDA_ONLY_OPS & {n.op_type for n in graph.node}, name
        assert [i.name for i in graph.input] == spec.input_names and [o.name for o in graph.output] == spec.output_names
        for shape in component.parity:  # checked by ONNX Runtime's CPU provider against the PyTorch module
            assert all(t["max_abs"] < 1e-4 for t in shape["tensors"]), shape


def test_peers_run_kiln_core_within_the_unet_tolerance_and_missing_ones_are_skipped(tiny_model, onnx_dir, tmp_path):
    pytest.importorskip("openvino")
    from kiln.benchmarks.latency import BenchSpec, measure_in_process
    from kiln.pipeline.openvino_runner import default_precision

    model, export, manifest, size, x = _setup(tiny_model, onnx_dir)
    spec = BenchSpec(steps=2, runs=1, warmup=0, peers=("onnxruntime_fused", "openvino", "onnxruntime_openvino"))
    measured, skipped = measure_in_process(model, export, tmp_path, manifest.family, spec, size, x)
    tolerance = manifest.family.spec("unet").onnx_tolerance("fp32")
    for name in ("onnxruntime", "onnxruntime_fused", "openvino"):
        row = measured[name].row(measured["pytorch"], tolerance)
        p = row["parity"]
        assert p["unet_step_within_tolerance"] and p["unet_step_max_abs"] < 1e-4, (name, p)
        assert p["image_max_abs_255"] <= 2, (name, p)
        assert row["end_to_end"]["p90_ms"] >= row["end_to_end"]["median_ms"] > 0
    assert measured["openvino"].extra["precision"] == "f32"
    if default_precision() != "f32":  # this CPU's default (bf16) is reported beside, with its own parity
        assert measured["openvino_default"].extra["precision"] == default_precision()
    else:
        assert "openvino_default" in skipped
    assert ("onnxruntime_openvino" in measured) != ("OpenVINOExecutionProvider" in skipped.get("onnxruntime_openvino", ""))


def test_a_peer_whose_package_is_missing_is_skipped_with_the_reason(tiny_model, onnx_dir, tmp_path, monkeypatch):
    from kiln.benchmarks.latency import BenchSpec, measure_in_process

    model, export, manifest, size, x = _setup(tiny_model, onnx_dir)
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    measured, skipped = measure_in_process(model, export, tmp_path, manifest.family,
                                           BenchSpec(steps=1, runs=1, warmup=0, peers=("openvino",)), size, x)
    assert set(measured) == {"pytorch", "onnxruntime"}
    assert set(skipped) == {"openvino", "openvino_default"} and "openvino" in skipped["openvino"]


def test_parity_flags_a_unet_step_outside_the_tolerance():
    from kiln.benchmarks.latency import Measured, parity
    from kiln.export.specs import Tolerance

    rng = np.random.default_rng(0)
    reference = Measured({}, {}, rng.normal(size=(2, 4, 8, 8)).astype(np.float32), np.full((1, 8, 8, 3), 100, np.uint8))
    close = Measured({}, {}, reference.unet_out + 1e-6, reference.image.copy())
    far = Measured({}, {}, reference.unet_out + 1e-2, reference.image + 3)
    tolerance = Tolerance(atol=1e-4, rtol=1e-4)
    assert parity(close, reference, tolerance)["unet_step_within_tolerance"]
    flagged = parity(far, reference, tolerance)
    assert not flagged["unet_step_within_tolerance"] and flagged["unet_step_max_abs"] == pytest.approx(1e-2, rel=1e-3)
    assert flagged["image_max_abs_255"] == 3 and flagged["image_mean_abs_255"] == 3.0


def test_markdown_reports_p90_parity_extras_and_skipped_peers():
    from kiln.benchmarks.latency import ratios, to_markdown

    def row(ms: float, within: bool = True, **extra) -> dict:
        timing = {"median_ms": ms, "p90_ms": 1.5 * ms, "min_ms": ms, "max_ms": 2 * ms, "runs": 3, "spread": 1.0}
        return {"stages": {"text_encoder": timing, "unet_step": timing, "vae_decode": timing}, "end_to_end": timing,
                "parity": {"unet_step_max_abs": 0.0 if within else 0.04, "unet_step_rel_l2": 0.0,
                           "unet_step_within_tolerance": within, "image_max_abs_255": 0 if within else 12,
                           "image_mean_abs_255": 0.0}, **extra}

    results = {"pytorch": row(40.0, unet_gflop=1.0), "torch_compile": row(20.0, compile_s=90.0, backend="inductor"),
               "onnxruntime": row(10.0), "openvino_default": row(5.0, False, precision="bf16", load_s=1.0),
               "triton_http": row(11.0), "triton_grpc": row(12.0)}
    report = {"spec": {"steps": 2, "scheduler": "euler", "runs": 3}, "size": 64, "family": "sd1", "results": results,
              "unet_tolerance": {"atol": 1e-4, "rtol": 1e-4, "max_rel_l2": None},
              "skipped": {"openvino": "ImportError: No module named 'openvino'"}, "ratios": ratios(results),
              "unet_step": {"gflop": 1.0, "onnxruntime_gflops": 100.0, "matmul_gflops": 200.0}, "cost": {}}
    text = to_markdown(report)
    assert "| onnxruntime | 10.0 / 15.0 | 10.0 / 15.0 | 10.0 / 15.0 | 10.0 / 15.0 | 100 % |" in text
    assert "| openvino_default | 4.00e-02 | 0.00e+00 | NO | 12 |" in text and "| 2.00x | 2.00x |" in text
    assert "torch.compile (inductor): 90.0 s compiling" in text and "openvino_default: precision bf16" in text
    assert "skipped openvino: ImportError: No module named 'openvino'" in text


@pytest.mark.slow  # dynamo traces the tiny UNet, text encoder and VAE: half a minute (inductor: minutes)
def test_torch_compile_matches_eager_and_reports_compile_time_apart(tiny_model, onnx_dir):
    from kiln.benchmarks.latency import BenchSpec, bench_pytorch
    from kiln.benchmarks.peers import bench_torch_compile

    model, _, manifest, size, x = _setup(tiny_model, onnx_dir)
    spec = BenchSpec(steps=2, runs=1, warmup=0, compile_backend="eager")
    eager = bench_pytorch(model, manifest.family, spec, size, x)
    compiled = bench_torch_compile(model, manifest.family, spec, size, x)
    p = compiled.row(eager, manifest.family.spec("unet").onnx_tolerance("fp32"))["parity"]
    assert p["unet_step_within_tolerance"] and p["image_max_abs_255"] <= 1, p
    assert compiled.extra["compile_s"] > compiled.end_to_end["median_ms"] / 1000


def test_a_ratio_of_runs_that_overlap_is_marked_inconclusive():
    from kiln.benchmarks.latency import _ratio, overlap

    fast = {"median_ms": 10.0, "min_ms": 9.0, "max_ms": 11.0}
    slow = {"median_ms": 20.0, "min_ms": 19.0, "max_ms": 30.0}
    noisy = {"median_ms": 12.0, "min_ms": 10.5, "max_ms": 40.0}
    assert not overlap(fast, slow) and _ratio(2.0, fast, slow) == "2.00x"
    assert overlap(fast, noisy) and _ratio(1.2, fast, noisy) == "1.20x (inconclusive: the runs overlap)"


@pytest.mark.parametrize("field, value, named", [("guidance_scale", float("nan"), "--guidance nan"),
                                                 ("guidance_scale", -1.0, "--guidance -1.0"), ("steps", 0, "--steps 0"),
                                                 ("runs", 0, "--runs 0")])
def test_bench_settings_out_of_range_are_refused_before_any_work(field, value, named):
    from kiln.benchmarks.latency import BenchSpec
    from kiln.errors import KilnError

    with pytest.raises(KilnError, match=named):
        BenchSpec(**{field: value})
