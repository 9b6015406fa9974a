"""`kiln repo build --backend openvino`: each component's ONNX file on OpenVINO's CPU plugin under the
Python backend. The repository has the ONNX Runtime backend's models and tensors; each component
computes what ONNX Runtime computes within the component's tolerance, in f32 whatever the CPU's
default; and over the real Triton the served image equals diffusers' within 2/255."""

import json
from pathlib import Path

import numpy as np
import pytest

from kiln.model_repository.builder import build_repository
from kiln.model_repository.configs import parse_pbtxt
from kiln.serving import server

from test_triton import MAX_DIFF, NEGATIVE, PROMPT, client

pytest.importorskip("openvino", reason="OpenVINO comes with the bench extra (make setup installs it)")

COMPONENTS = ["text_encoder", "unet", "vae_decoder", "vae_encoder"]


@pytest.fixture(scope="module")
def openvino_repo(onnx_dir, tmp_path_factory):
    return build_repository(onnx_dir("epsilon"), tmp_path_factory.mktemp("openvino-repos") / "epsilon", backend="openvino")


def _configs(repo):
    manifest = json.loads((repo / "manifest.json").read_text())
    return {name: parse_pbtxt((repo / name / "config.pbtxt").read_text()) for name in manifest["models"]}


def _settings(repo, name) -> dict:
    return json.loads(parse_pbtxt((repo / name / "config.pbtxt").read_text()).parameters["kiln_settings"].string_value)


def test_components_keep_the_onnx_backends_files_names_tensors_and_batching(openvino_repo, repo_dir):
    served_configs, onnx_configs = _configs(openvino_repo), _configs(repo_dir("epsilon"))
    assert set(served_configs) == set(onnx_configs)
    engines = {n: c.parameters["kiln_model"].string_value for n, c in served_configs.items() if "kiln_model" in c.parameters}
    assert sorted(n for n, engine in engines.items() if engine == "openvino_component") == COMPONENTS
    for name, config in onnx_configs.items():
        served = served_configs[name]
        if name in COMPONENTS:
            assert config.parameters["kiln_model"].string_value == "onnx_component"
            assert (openvino_repo / name / "1" / "model.onnx").read_bytes() == (repo_dir("epsilon") / name / "1" / "model.onnx").read_bytes()
            for c in (served, config):
                del c.parameters["kiln_model"]
        assert served == config, name  # tensors, dims, dynamic batching, instances, settings: all the same
    assert json.loads((openvino_repo / "manifest.json").read_text())["backend"] == "openvino"


@pytest.mark.parametrize("component, batch", [("unet", 2), ("vae_decoder", 3), ("text_encoder", 4)])
def test_component_core_computes_what_onnx_runtime_computes_in_f32(openvino_repo, onnx_dir, component, batch):
    from kiln.export.specs import COMPONENTS as SPECS, ModelDims, ShapePoint, dummy_inputs
    from kiln.model_repository.python_models import OpenVinoComponentModel
    from kiln.pipeline.onnx_session import ComponentSession

    spec = SPECS[component]
    settings = _settings(openvino_repo, component)
    model = OpenVinoComponentModel(openvino_repo / component / "1", settings)
    assert model.session.description.endswith("on the CPU in f32")  # not the plugin's bf16 default on AMX CPUs
    feeds = dummy_inputs(spec, ShapePoint(batch=batch, latent_height=8, latent_width=8), ModelDims(**settings["dims"]))
    served = model.run([feeds])[0]
    expected = ComponentSession(spec, onnx_dir("epsilon") / component / "model.onnx").run(feeds)
    tolerance = spec.onnx_tolerance("fp32")
    for name, value in expected.items():
        assert served[name].shape == value.shape and served[name].dtype == value.dtype
        assert np.abs(served[name] - value).max() <= tolerance.atol + tolerance.rtol * np.abs(value).max(), name


def test_deploy_accepts_the_backend_and_a_wrong_one_is_refused_with_the_choices():
    from kiln.deploy import check_backend
    from kiln.errors import RepositoryError

    check_backend("openvino", "fp32", lora_inputs=False)
    with pytest.raises(RepositoryError, match="openvino"):
        check_backend("tensorrt", "fp32", lora_inputs=False)  # the message lists the embedded target's backends


@pytest.fixture(scope="module")
def openvino_triton(openvino_repo):
    with server.running_server(openvino_repo) as info:
        yield info


@pytest.mark.triton
@pytest.mark.slow  # starts a Triton server of its own
@pytest.mark.parametrize("scheduler, protocol, steps, guidance, height, width", [
    ("dpmpp_2m", "http", 4, 7.5, 64, 64),
    ("euler_a", "grpc", 3, 5.0, 64, 80),  # ancestral: noise drawn inside scheduler.step
])
def test_served_image_equals_diffusers(openvino_triton, tiny_model, reference_image, scheduler, protocol, steps,
                                       guidance, height, width):
    with client(openvino_triton, protocol) as c:
        result = c.generate(PROMPT, NEGATIVE, seed=17, steps=steps, guidance_scale=guidance, height=height,
                            width=width, scheduler=scheduler, num_images=2)
    expected = reference_image(tiny_model("epsilon"), scheduler, PROMPT, NEGATIVE, 17, steps, guidance, height, width,
                               num_images=2)
    assert result.images.shape == expected.shape == (2, height, width, 3)
    diff = np.abs(result.images.astype(int) - expected).max()
    assert diff <= MAX_DIFF, f"{scheduler}/{protocol}: max |Triton (openvino backend) - diffusers| = {diff}"
    assert "unet: OpenVINO" in Path(openvino_triton.log_file).read_text()  # what each component loaded, in Triton's log


def test_a_build_without_openvino_installed_is_refused_before_any_work(onnx_dir, tmp_path, monkeypatch):
    import importlib.util

    from kiln.errors import RepositoryError

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else find_spec(name, *a))
    with pytest.raises(RepositoryError, match="--backend openvino needs OpenVINO") as refused:
        build_repository(onnx_dir("epsilon"), tmp_path / "repo", backend="openvino")
    assert "kiln[openvino]" in refused.value.hint
    assert not (tmp_path / "repo").exists()
