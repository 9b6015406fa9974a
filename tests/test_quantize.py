"""Calibrated int8 with explicit Q/DQ nodes (`kiln export qdq`, NVIDIA ModelOpt), run for real on
the tiny model: the quantised UNet, its check against fp32, the untouched source export, reuse, and
the TensorRT int8 plan built from it."""

import collections
import json

import numpy as np
import onnx
import pytest

from kiln.errors import ExportError
from kiln.artifacts import file_sha256, read_manifest
from kiln.export.quantize import QDQ_TOLERANCE, Calibration, export_qdq, read_prompts
from kiln.export.specs import COMPONENTS, QDQ_PRECISION
from kiln.export.tensorrt import plan_engines
from kiln.pipeline.onnx_pipeline import OnnxPipeline
from kiln.pipeline.request import GenerationRequest

PROMPTS = ("a red digit 1", "a blue digit 2 on a black background", "a green digit 3", "a yellow digit 4",
           "a red digit 5 on a gray background")


@pytest.fixture(scope="module")
def qdq(onnx_dir, tmp_path_factory):
    fp32 = onnx_dir("epsilon")
    before = {p.relative_to(fp32): file_sha256(p) for p in fp32.rglob("*") if p.is_file()}
    out = export_qdq(fp32, tmp_path_factory.mktemp("qdq") / "int8", Calibration(PROMPTS, holdout=2, steps=4, guidance=6.0))
    return fp32, out, before


@pytest.mark.slow  # ModelOpt's calibration
def test_unet_is_quantised_with_qdq_nodes(qdq):
    fp32, out, _ = qdq
    ops = collections.Counter(n.op_type for n in onnx.load(str(out / "unet" / "model.onnx")).graph.node)
    assert ops["QuantizeLinear"] > 10 and ops["DequantizeLinear"] >= ops["QuantizeLinear"]
    quantised_inputs = {n.input[0] for n in onnx.load(str(out / "unet" / "model.onnx")).graph.node
                        if n.op_type == "DequantizeLinear"}
    assert quantised_inputs  # activations and weights pass through Q/DQ pairs
    manifest = read_manifest(out)
    assert manifest["precision"] == QDQ_PRECISION
    unet = manifest["components"]["unet"]
    assert unet["precision"] == QDQ_PRECISION and unet["sha256"] == file_sha256(out / "unet" / "model.onnx")
    quant = manifest["quantization"]
    assert quant["toolkit"].startswith("nvidia-modelopt ")
    assert quant["calibration"]["calibration_steps"] == 3 * 4 and quant["calibration"]["held_out_steps"] == 2 * 4
    # the check against fp32 ran on the held-out prompts and is within the stated tolerance
    parity = unet["parity"]
    assert parity["steps"] == 8 and 0 < parity["median_rel_l2"] <= QDQ_TOLERANCE["median_rel_l2"]
    assert parity["max_rel_l2"] <= QDQ_TOLERANCE["max_rel_l2"]
    # the other components are the fp32 export's, unchanged
    for name in ("text_encoder", "vae_decoder", "vae_encoder"):
        assert file_sha256(out / name / "model.onnx") == manifest["components"][name]["sha256"]
        assert manifest["components"][name] == read_manifest(fp32)["components"][name]


@pytest.mark.slow  # ModelOpt's calibration
def test_source_export_is_left_untouched(qdq):
    """ModelOpt rewrites its input file in place; Kiln hands it a private copy."""
    fp32, _, before = qdq
    after = {p.relative_to(fp32): file_sha256(p) for p in fp32.rglob("*") if p.is_file()}
    assert after == before
    assert file_sha256(fp32 / "unet" / "model.onnx") == read_manifest(fp32)["components"]["unet"]["sha256"]


@pytest.mark.slow  # ModelOpt's calibration
def test_qdq_export_draws_like_fp32(qdq):
    fp32, out, _ = qdq
    request = GenerationRequest("a blue digit 9", "", 11, 4, 6.0, 64, 64, "euler")
    reference, quantised = OnnxPipeline(fp32)(request), OnnxPipeline(out)(request)
    assert quantised.shape == reference.shape and quantised.dtype == np.uint8
    diff = np.abs(quantised.astype(int) - reference.astype(int))
    assert 0 < diff.mean() < 8  # int8 changes the image, slightly (0-255 scale)


@pytest.mark.slow  # ModelOpt's calibration
def test_current_qdq_export_is_reused_and_a_changed_calibration_rebuilt(qdq):
    fp32, out, _ = qdq
    stamp = (out / "unet" / "model.onnx").stat().st_mtime_ns
    export_qdq(fp32, out, Calibration(PROMPTS, holdout=2, steps=4, guidance=6.0))
    assert (out / "unet" / "model.onnx").stat().st_mtime_ns == stamp
    export_qdq(fp32, out, Calibration(PROMPTS, holdout=2, steps=4, guidance=6.0, method="max"))
    assert read_manifest(out)["quantization"]["calibration"]["method"] == "max"
    assert (out / "unet" / "model.onnx").stat().st_mtime_ns != stamp
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no scratch left behind


@pytest.mark.slow  # ModelOpt's calibration
def test_int8_engines_plan_from_the_qdq_export_only(qdq):
    fp32, out, _ = qdq
    plan = {c.component: c for c in plan_engines(out, "int8").components}
    assert plan["unet"].precision == "int8" and plan["unet"].fp32_layers
    assert plan["text_encoder"].precision == "fp16"  # no Q/DQ nodes: TensorRT builds it fp16
    assert plan["vae_decoder"].precision == "fp32"
    with pytest.raises(ExportError, match="int8 engines are built from a calibrated Q/DQ export") as err:
        plan_engines(fp32, "int8")
    assert "kiln export qdq" in err.value.hint
    with pytest.raises(ExportError, match="int8-qdq ONNX export") as err:
        plan_engines(out, "fp16")
    assert err.value.hint == "--int8 for a Q/DQ export"
    unet = COMPONENTS["unet"]
    assert unet.trt_tolerance(QDQ_PRECISION) == unet.tolerances.tensorrt[QDQ_PRECISION] > unet.trt_tolerance("fp32")
    assert COMPONENTS["text_encoder"].trt_tolerance(QDQ_PRECISION) == COMPONENTS["text_encoder"].trt_tolerance("fp32")


@pytest.mark.slow  # ModelOpt's calibration
def test_ngc_configs_run_the_qdq_unet_in_int8(qdq, tmp_path):
    """ONNX Runtime's TensorRT accelerator keeps the calibrated scales only in INT8 mode."""
    from kiln.model_repository import configs
    from kiln.model_repository.builder import build_repository

    _, out, _ = qdq
    repo = build_repository(out, tmp_path / "repo", target="ngc", tuning=configs.Tuning(ort_accelerator="tensorrt"))
    modes = {name: configs.parse_pbtxt((repo / name / "config.pbtxt").read_text())
             .optimization.execution_accelerators.gpu_execution_accelerator[0].parameters["precision_mode"]
             for name in ("text_encoder", "unet", "vae_decoder")}
    assert modes == {"text_encoder": "FP16", "unet": "INT8", "vae_decoder": "FP32"}


def test_qdq_refuses_a_reduced_precision_source(onnx_dir, tmp_path):
    fp32 = onnx_dir("epsilon")
    fake = tmp_path / "fp16"
    import shutil

    shutil.copytree(fp32, fake)
    manifest = json.loads((fake / "manifest.json").read_text())
    (fake / "manifest.json").write_text(json.dumps({**manifest, "precision": "fp16"}))
    with pytest.raises(ExportError, match="is a fp16 export; int8 is calibrated from the fp32 export"):
        export_qdq(fake, tmp_path / "out", Calibration(PROMPTS))


@pytest.mark.parametrize("fields, message", [
    (dict(method="minmax"), "--method 'minmax' is not one of"),
    (dict(prompts=("one", "two"), holdout=2), "2 calibration prompts with holdout 2"),
    (dict(holdout=0), "--holdout 0 must be at least 1"),
    (dict(guidance=1.0), "--guidance 1.0 must be above 1"),
    (dict(steps=0), "--steps 0 is out of range"),
])
def test_bad_calibration_names_the_field(fields, message):
    with pytest.raises(ExportError, match=message):
        Calibration(**fields).validate()


def test_prompt_file(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert read_prompts(tmp_path / "p.txt") == ("a cat", "a dog")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ExportError, match="holds no prompt"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(ExportError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")
