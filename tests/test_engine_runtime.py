"""TensorRT engines against the runtime that serves them, on the CPU: the TensorRT version read from
libnvinfer through ctypes (a library compiled here that answers getInferLibVersion as TensorRT's
does), the comparison and its message, the check the BLS pipeline runs at load on a repository's
recorded runtime, and the engine store the cluster's build step keeps (reuse, rebuild, swap). Building
real engines needs a GPU: tests/test_targets.py's gpu-marked test does that."""

import importlib.util
import json
import shutil
import subprocess

import pytest

from kiln.artifacts import write_json_atomically
from kiln.errors import ExportError
from kiln.export.engine_runtime import (Runtime, check_runtime, check_served_engines, mismatches, parse_version,
                                        tensorrt_version, version_from_int)
from kiln.export.engine_store import ensure_engines, runtime_folder, stale_reason
from kiln.export.tensorrt import engine_manifest, plan_engines
from kiln.model_repository import configs
from kiln.model_repository.builder import build_repository

H100 = Runtime("10.3.0.26", "NVIDIA H100 80GB HBM3", "9.0")
A100 = Runtime("10.3.0", "NVIDIA A100-SXM4-80GB", "8.0")


@pytest.mark.parametrize("number, version", [(100300, "10.3.0"), (100501, "10.5.1"), (101300, "10.13.0"),
                                             (8601, "8.6.1"), (9200, "9.2.0")])
def test_getinferlibversion_integers_decode_per_tensorrt_generation(number, version):
    assert version_from_int(number) == version


def test_the_tensorrt_version_comes_from_libnvinfer_through_ctypes(tmp_path):
    """A shared library exporting getInferLibVersion as NvInferVersion.h defines it for TensorRT 10.5.1;
    loaded by path, as the container's libnvinfer.so.10 is by name."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler to build the stand-in library")
    source = tmp_path / "nvinfer.c"
    source.write_text("int getInferLibVersion(void) { return 10 * 10000 + 5 * 100 + 1; }\n")
    library = tmp_path / "libnvinfer.so.10"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    assert tensorrt_version((str(tmp_path / "libmissing.so.10"), str(library))) == "10.5.1"


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT's module is the fallback here")
def test_no_tensorrt_anywhere_is_a_clear_error():
    with pytest.raises(ExportError, match=r"no TensorRT here: none of \['libmissing.so.10'\] loads"):
        tensorrt_version(("libmissing.so.10",))


def test_versions_compare_on_major_minor_patch_and_gpus_exactly():
    assert parse_version("10.3.0.26") == (10, 3, 0, 26)
    with pytest.raises(ExportError, match="'ten' is not a version"):
        parse_version("ten")
    assert mismatches(H100, Runtime("10.3.0", H100.gpu, "9.0")) == []  # the build number is not compared
    assert mismatches(H100, Runtime("10.5.0", H100.gpu, "9.0")) == [("tensorrt", "10.3.0.26", "10.5.0")]
    assert [name for name, _, _ in mismatches(H100, A100)] == ["gpu", "compute_capability"]


def test_another_tensorrt_or_gpu_is_refused_naming_both_and_the_fix():
    with pytest.raises(ExportError) as refused:
        check_runtime(H100, Runtime("10.5.0", "NVIDIA A100-SXM4-80GB", "8.0"), "for model txt2img", here="this container")
    message = str(refused.value)
    assert "built with tensorrt '10.3.0.26', this container has '10.5.0'" in message
    assert "built with gpu 'NVIDIA H100 80GB HBM3', this container has 'NVIDIA A100-SXM4-80GB'" in message
    assert "kiln export trt" in refused.value.hint and "--engines build" in refused.value.hint
    check_runtime(H100, Runtime("10.3.0", H100.gpu, "9.0"), "here")  # the same runtime passes


def write_engine_folder(onnx, folder, runtime=H100, precision="fp16"):
    """A folder as export_engines leaves it (placeholder engine bytes): what runs here is everything
    around the GPU build."""
    plan = plan_engines(onnx, precision)
    for component in plan.components:
        (folder / component.component).mkdir(parents=True)
        (folder / component.component / "model.plan").write_bytes(component.component.encode())
    write_json_atomically(folder / "manifest.json",
                          engine_manifest(plan, runtime, {c.component: {} for c in plan.components}))
    return plan


def test_the_pipeline_refuses_at_load_engines_of_another_tensorrt(onnx_dir, tmp_path):
    """The repository records the engines' runtime in the pipeline's settings; the check the pipeline
    runs at load, fed the runtime this container detects, refuses another TensorRT or GPU by name."""
    write_engine_folder(onnx_dir("epsilon"), tmp_path / "engines")
    repo = build_repository(onnx_dir("epsilon"), tmp_path / "repo", target="ngc", backend="tensorrt",
                            engine_dir=tmp_path / "engines")
    config = configs.parse_pbtxt((repo / "pipeline" / "config.pbtxt").read_text())
    settings = json.loads(config.parameters["kiln_settings"].string_value)
    seen = []

    def container(device):
        seen.append(device)
        return Runtime("10.5.0", "NVIDIA L4", "8.9")

    with pytest.raises(ExportError, match=r"stale engines for model txt2img: built with tensorrt '10.3.0.26', "
                                          r"this container has '10.5.0'.*Fix: rebuild the engines") as refused:
        check_served_engines(settings["engines"], "cuda:1", "txt2img", detect=container)
    assert "built with compute_capability '9.0', this container has '8.9'" in str(refused.value)
    assert seen == [1]  # the instance's own GPU
    assert check_served_engines(settings["engines"], "cuda", "txt2img", detect=lambda d: H100) == H100


def test_store_folders_are_named_by_runtime():
    assert runtime_folder(H100) == "10.3.0.26-sm90-nvidia-h100-80gb-hbm3"
    assert runtime_folder(A100) != runtime_folder(H100)


def test_the_store_decides_what_to_rebuild(onnx_dir, tmp_path):
    plan = write_engine_folder(onnx_dir("epsilon"), tmp_path / "e")
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    names = [c.component for c in plan.components]
    assert stale_reason(manifest, Runtime("10.3.0", H100.gpu, "9.0"), plan, names) is None
    assert stale_reason({}, H100, plan, names) == "no engines yet"
    assert "built with tensorrt '10.3.0.26', this machine has '10.5.0'" in stale_reason(
        manifest, Runtime("10.5.0", H100.gpu, "9.0"), plan, names)
    assert "another plan" in stale_reason(manifest, H100, plan_engines(onnx_dir("epsilon"), "fp32"), names)
    assert "no engine for ['controlnet_canny']" in stale_reason(manifest, H100, plan, [*names, "controlnet_canny"])
    other = plan_engines(onnx_dir("epsilon"), "fp16")
    other.export_key = "0" * 64
    assert stale_reason(manifest, H100, other, names) == "built from another ONNX export"


def test_the_store_builds_once_per_runtime_and_swaps_stale_engines(onnx_dir, tmp_path):
    """ensure_engines with a builder that writes what export_engines writes: the first start builds, a
    restart builds nothing, another GPU gets its own folder, and a stale folder is replaced whole."""
    onnx = onnx_dir("epsilon")
    plan = plan_engines(onnx, "fp16")
    builds = []

    def build(runtime):
        def run(onnx_dir, out_dir, plan):
            builds.append(runtime.gpu)
            write_engine_folder(onnx_dir, out_dir, runtime, plan.precision)
        return run

    store = tmp_path / "store"
    folder, built = ensure_engines(onnx, store, plan, build(H100), H100)
    assert built and folder == store / runtime_folder(H100) and (folder / "unet" / "model.plan").is_file()
    assert ensure_engines(onnx, store, plan, build(H100), H100) == (folder, False)  # a restart: nothing built
    other, _ = ensure_engines(onnx, store, plan, build(A100), A100)
    assert other != folder and folder.is_dir()  # another GPU's pods keep their own engines
    (folder / "unet" / "model.plan").unlink()  # damaged: rebuilt and swapped in whole
    assert ensure_engines(onnx, store, plan, build(H100), H100) == (folder, True)
    assert builds == [H100.gpu, A100.gpu, H100.gpu]
    assert sorted(p.name for p in store.iterdir()) == sorted([folder.name, other.name])  # no scratch left behind

    def wrong(onnx_dir, out_dir, plan):
        write_engine_folder(onnx_dir, out_dir, A100, plan.precision)

    shutil.rmtree(folder)
    with pytest.raises(ExportError, match="do not pass their own check"):
        ensure_engines(onnx, store, plan, wrong, H100)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_the_build_step_without_tensorrt_stops_before_writing(onnx_dir, tmp_path):
    """What the cluster's init container runs, on a host without TensorRT: one error line, nothing written."""
    import sys

    run = subprocess.run([sys.executable, "-m", "kiln.cli", "export", "trt", str(onnx_dir("epsilon")), str(tmp_path / "store"),
                          "--fp16", "--reuse", "--repository", str(tmp_path / "repo")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "TensorRT is not installed" in run.stderr, run.stderr[-2000:]
    assert not (tmp_path / "store").exists() and not (tmp_path / "repo").exists()
