import json
import shutil

import numpy as np
import onnx
import pytest

from kiln.errors import ExportError, ParityError
from kiln.artifacts import read_manifest
from kiln.export.onnx_export import check_parity, export_onnx
from kiln.export.parity import compare
from kiln.export.specs import COMPONENTS, ShapePoint, concrete_shape, dummy_inputs, parity_points
from kiln.models.folder import inspect_model, model_dims
from kiln.models.tiny import write_tiny_model
from kiln.pipeline.onnx_session import make_session

ORT_TYPES = {"float32": "tensor(float)", "int32": "tensor(int32)"}


def test_optimum_layout_and_names(onnx_dir):
    out = onnx_dir("epsilon")
    for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        assert (out / name / "model.onnx").is_file()
    assert (out / "tokenizer" / "vocab.json").is_file() and (out / "scheduler" / "scheduler_config.json").is_file()
    assert COMPONENTS["unet"].input_names == ["sample", "timestep", "encoder_hidden_states"]
    assert COMPONENTS["unet"].output_names == ["out_sample"]


@pytest.mark.parametrize("name", list(COMPONENTS))
def test_exported_graph_matches_its_spec(onnx_dir, name):
    """Names, dtypes and which axes are dynamic come from the spec, nowhere else."""
    spec = COMPONENTS[name]
    session = make_session(onnx_dir("epsilon") / name / "model.onnx")
    assert [i.name for i in session.get_inputs()] == spec.input_names  # none missing, none extra, in order
    for declared, actual in zip(spec.inputs, session.get_inputs(), strict=True):
        assert actual.name == declared.name
        assert actual.type == ORT_TYPES[declared.dtype]
        dynamic = {i for i, d in enumerate(actual.shape) if isinstance(d, str)}
        assert dynamic == set(declared.dynamic_axes())
    assert [o.name for o in session.get_outputs()] == spec.output_names


def test_parity_numbers_are_recorded_within_tolerance(onnx_dir):
    manifest = read_manifest(onnx_dir("epsilon"))
    for name, entry in manifest["components"].items():
        assert len(entry["parity"]) == 2, name  # two shapes
        shapes = {json.dumps(r["shape"]) for r in entry["parity"]}
        assert len(shapes) == 2
        for report in entry["parity"]:
            for t in report["tensors"]:
                bound = report["tolerance"]["atol"] + report["tolerance"]["rtol"] * t["ref_max_abs"]
                assert t["max_abs"] <= bound, (name, t)
    assert manifest["opset"] == 17 and manifest["precision"] == "fp32"
    assert set(manifest["libraries"]) >= {"torch", "onnx", "onnxruntime", "diffusers"}
    assert manifest["model"]["prediction_type"] == "epsilon"


def test_parity_shapes_cover_batch_and_non_square(tiny_model):
    model = tiny_model("epsilon")
    dims = model_dims(model, inspect_model(model))
    first, second = parity_points(dims)
    assert first.batch == 1 and second.batch == 2
    assert second.latent_height != second.latent_width
    for point in (first, second):
        assert point.latent_height % dims.unet_factor == 0 and point.latent_width % dims.unet_factor == 0
    shape = concrete_shape(COMPONENTS["vae_decoder"].outputs[0], second, dims)
    assert shape == (2, 3, second.latent_height * 8, second.latent_width * 8)


def test_unchanged_inputs_reuse_changed_inputs_rebuild(tiny_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model("epsilon"), model)
    out = tmp_path / "onnx"
    first = export_onnx(model, out, components=("text_encoder", "unet"))
    assert [c.reused for c in first.components] == [False, False]
    unet_mtime = (out / "unet" / "model.onnx").stat().st_mtime_ns
    again = export_onnx(model, out, components=("text_encoder", "unet"))
    assert [c.reused for c in again.components] == [True, True]
    assert (out / "unet" / "model.onnx").stat().st_mtime_ns == unet_mtime
    # New UNet weights (another seed): the UNet is rebuilt, the text encoder is not.
    other = write_tiny_model(tmp_path / "other", "epsilon", seed=1)
    shutil.rmtree(model / "unet")
    shutil.copytree(other / "unet", model / "unet")
    changed = export_onnx(model, out, components=("text_encoder", "unet"))
    assert {c.name: c.reused for c in changed.components} == {"text_encoder": True, "unet": False}


def test_parity_error_prints_the_numbers(tiny_model, onnx_dir, tmp_path):
    """An ONNX model that does not come from these weights fails the check with its numbers."""
    other = write_tiny_model(tmp_path / "other", "epsilon", seed=7)
    dims = model_dims(other, inspect_model(other))
    module = COMPONENTS["unet"].load_torch(other)
    with pytest.raises(ParityError) as err:
        check_parity(module, COMPONENTS["unet"], onnx_dir("epsilon") / "unet" / "model.onnx", dims, "fp32")
    message = str(err.value)
    assert "unet" in message and "out_sample" in message and "max|diff|=" in message and "rel-L2=" in message


def test_compare_locates_the_largest_difference():
    ref = np.zeros((2, 3), np.float32)
    got = ref.copy()
    got[1, 2] = 0.5
    diff = compare("x", got, ref)
    assert diff.max_abs == 0.5 and diff.where == (1, 2)
    nan = compare("x", np.full((1,), np.nan), np.zeros(1))
    assert not np.isfinite(nan.max_abs)


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_reduced_precision_exports_pass_their_bounds(tiny_model, tmp_path, precision):
    result = export_onnx(tiny_model("epsilon"), tmp_path / precision, precision=precision,
                         components=("text_encoder", "unet", "vae_decoder"))
    by_name = {c.name: c for c in result.components}
    assert by_name["unet"].precision == precision and by_name["vae_decoder"].precision == "fp32"
    for report in by_name["unet"].parity:
        assert all(t["rel_l2"] <= report["tolerance"]["max_rel_l2"] for t in report["tensors"])
    graph = onnx.load(str(tmp_path / precision / "unet" / "model.onnx"))
    ops = {n.op_type for n in graph.graph.node}
    if precision == "int8":
        assert "MatMulInteger" in ops or "DynamicQuantizeLinear" in ops
    else:
        assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.graph.initializer)
    assert read_manifest(tmp_path / precision)["precision"] == precision


def test_bad_precision_is_rejected_before_work(tiny_model, tmp_path):
    with pytest.raises(ExportError, match="precision='bf8'"):
        export_onnx(tiny_model("epsilon"), tmp_path, precision="bf8")


def test_dummy_inputs_follow_the_spec(tiny_model):
    model = tiny_model("epsilon")
    dims = model_dims(model, inspect_model(model))
    feeds = dummy_inputs(COMPONENTS["text_encoder"], ShapePoint(3, 8, 8), dims)
    assert feeds["input_ids"].shape == (3, 77) and feeds["input_ids"].dtype == np.int32
    assert feeds["input_ids"].max() < dims.vocab_size


@pytest.mark.parametrize("damage, expected", [
    (lambda m: m["components"].pop("unet"), "does not record"),
    (lambda m: m.update(precision="fp8"), "precision 'fp8' is not one of"),
    (lambda m: m["dims"].update(vae_scale_factor=0), "must be positive"),
])
def test_a_manifest_that_disagrees_with_its_files_is_refused(onnx_dir, tmp_path, damage, expected):
    """A manifest is read as a typed model and checked against the files: what it says is what the
    repository builder, TensorRT and the pipeline will trust."""
    from kiln.artifacts import read_export
    from kiln.errors import ModelError

    copy = tmp_path / "onnx"
    shutil.copytree(onnx_dir("epsilon"), copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    damage(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match=expected) as err:
        read_export(copy)
    assert "kiln export onnx" in err.value.hint


@pytest.mark.parametrize("content", [b"\xff\xfe not utf-8", b"[]", b"{not json"])
def test_a_damaged_manifest_is_called_damaged_and_rebuilt(tiny_model, onnx_dir, tmp_path, content):
    from kiln.artifacts import read_export
    from kiln.errors import ModelError

    copy = tmp_path / "onnx"
    shutil.copytree(onnx_dir("epsilon"), copy)
    (copy / "manifest.json").write_bytes(content)
    with pytest.raises(ModelError, match="damaged manifest.json"):
        read_export(copy)
    result = export_onnx(tiny_model("epsilon"), copy)  # proves nothing: every component is rebuilt
    assert not any(c.reused for c in result.components) and read_export(copy).precision == "fp32"


def test_external_data_is_readable_like_the_model_file(tmp_path):
    """Files above 2 GB (SDXL's UNet) keep their weights beside model.onnx; onnx writes that file
    owner-only, which a Triton running as another user could not read."""
    import os

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from kiln.export.precision import EXTERNAL_DATA_NAME, save_model

    weight = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [weight])
    save_model(helper.make_model(graph), tmp_path / "model.onnx", large=True)
    umask = os.umask(0)
    os.umask(umask)
    mode = (tmp_path / EXTERNAL_DATA_NAME).stat().st_mode & 0o777
    assert mode == 0o666 & ~umask == (tmp_path / "model.onnx").stat().st_mode & 0o777
    stored = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    assert stored.graph.initializer[0].data_location == onnx.TensorProto.EXTERNAL
