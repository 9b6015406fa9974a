"""The benchmark scripts run end to end on the tiny model and save what they promise. (Timings are
reported by the scripts, never asserted here.)"""

import json

import pytest

pytestmark = pytest.mark.triton


@pytest.mark.slow  # starts a Triton server of its own
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_bench_writes_json_markdown_and_plot(tiny_model, onnx_dir, sdxl_model, sdxl_onnx, tmp_path, family):
    from kiln.benchmarks.latency import BenchSpec, run
    from kiln.evaluation.settings import Setting

    model, onnx = (sdxl_model(), sdxl_onnx()) if family == "sdxl" else (tiny_model("epsilon"), onnx_dir("epsilon"))
    fewer = Setting("dpmpp_2m 3, guidance in [0, 0.5)", "dpmpp_2m", 3, guidance_scale=6.0, guidance_end=0.5)
    # torch.compile's peer is left out: inductor compiles for minutes (tests/test_bench_peers.py checks its wiring)
    report = run(model, onnx, tmp_path, BenchSpec(steps=2, runs=2, peers=("onnxruntime_fused", "openvino"), settings=(fewer,)),
                 price_per_hour=24.0)
    kiln = {"pytorch", "onnxruntime", "triton_http", "triton_grpc"}
    assert kiln <= set(report["results"])  # a peer runs or says why not
    assert set(report["results"]) | set(report["skipped"]) == kiln | {"onnxruntime_fused", "openvino", "openvino_default"}
    encoders = {"text_encoder", "text_encoder_2"} if family == "sdxl" else {"text_encoder"}
    for name, result in report["results"].items():
        assert set(result["stages"]) == {*encoders, "unet_step", "vae_decode"}
        assert result["end_to_end"]["p90_ms"] >= result["end_to_end"]["median_ms"] > 0
        if name in kiln:  # the same graphs as export checked, and the served image within 2/255 of diffusers'
            assert result["parity"]["unet_step_within_tolerance"] and result["parity"]["image_max_abs_255"] <= 2, name
    assert report["unet_step"]["gflop"] > 0 and report["unet_step"]["matmul_gflops"] > 0
    assert json.loads((tmp_path / "bench.json").read_text())["ratios"]
    for name, result in report["results"].items():  # one image at a time, back to back
        priced = report["cost"][name]
        assert priced["images_per_hour"] == pytest.approx(3600 * 1000 / result["end_to_end"]["median_ms"])
        assert priced["per_1000_images"] == pytest.approx(24.0 / priced["images_per_hour"] * 1000)
    assert "per 1,000 images" in (tmp_path / "bench.md").read_text()
    # another sampler setting through Triton: drawn as diffusers draws it with its guidance callback
    row = report["settings"][fewer.name]
    assert row["unet_rows"] == 5  # steps 0 and 1 guided (batch 2), step 2 not
    assert row["image_max_abs_255"] <= 2 and row["setting"]["scheduler"] == "dpmpp_2m"
    pytorch_ms = report["results"]["pytorch"]["end_to_end"]["median_ms"]
    assert row["speedup_vs_pytorch"] == pytest.approx(pytorch_ms / row["triton_http"]["median_ms"])
    assert row["speedup_vs_diffusers_same_setting"] == pytest.approx(row["diffusers"]["median_ms"] / row["triton_http"]["median_ms"])
    assert report["settings_cost"][fewer.name]["per_1000_images"] > 0
    assert f"| {fewer.name} | 5 |" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "bench.png").stat().st_size > 1000 and "ONNX Runtime vs PyTorch" in (tmp_path / "bench.md").read_text()


def test_cost_in_money_from_a_measured_rate():
    from kiln.benchmarks.cost import cost
    from kiln.errors import KilnError

    priced = cost(2.0, 24.0)  # 2 images a second on a machine at 24 an hour
    assert (priced.images_per_hour, priced.per_1000_images) == (7200.0, pytest.approx(24 / 7.2))
    assert priced.line() == "7,200 images/hour, 3.33 per 1,000 images at 24/hour"
    assert cost(0.0, 24.0).per_1000_images is None and cost(2.0).per_1000_images is None
    for price in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(KilnError, match="--price-per-hour"):
            cost(1.0, price)


@pytest.mark.slow  # starts a Triton server of its own
def test_concurrent_generations_through_several_loops_match_lone_ones(onnx_dir, tmp_path):
    """Four BLS loops feeding one dynamically batched UNet: each image equals its one-at-a-time twin."""
    from kiln.benchmarks.throughput import measure
    from kiln.model_repository.builder import build_repository
    from kiln.model_repository.configs import Tuning
    from kiln.serving.server import running_server

    repo = build_repository(onnx_dir("epsilon"), tmp_path / "repo", tuning=Tuning(pipeline_instances=4))
    with running_server(repo) as info:
        result = measure(info.grpc_url, requests=8, steps=3, rounds=1, levels=(4,))
    assert result["concurrent"][4]["max_abs_diff_vs_alone"] == 0
