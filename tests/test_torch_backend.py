"""`kiln repo build --backend torch`: the components as PyTorch modules under the Python backend. The
repository has the ONNX backend's models and tensors, holds its weights, refuses a moved or changed
model folder and what only ONNX serves, and over the real Triton serves what diffusers draws."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from kiln.errors import ModelError, RepositoryError
from kiln.model_repository.builder import build_repository
from kiln.model_repository.configs import parse_pbtxt
from kiln.model_repository.python_models import TorchComponentModel
from kiln.model_repository.torch_backend import STAMPS_NAME, WEIGHTS_FOLDER, TorchOptions
from kiln.serving import server

from test_controlnet import controlled_onnx, controlnets, diffusers_draw  # noqa: F401 (fixtures)
from test_triton import MAX_DIFF, NEGATIVE, PROMPT, client


@pytest.fixture(scope="module")
def torch_repo(onnx_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("torch-repos")
    return build_repository(onnx_dir("epsilon"), root / "epsilon", backend="torch")


def _configs(repo):
    manifest = json.loads((repo / "manifest.json").read_text())
    return {name: parse_pbtxt((repo / name / "config.pbtxt").read_text()) for name in manifest["models"]}


def test_components_keep_the_onnx_backends_names_tensors_and_batching(torch_repo, repo_dir):
    torch_configs, onnx_configs = _configs(torch_repo), _configs(repo_dir("epsilon"))
    assert set(torch_configs) == set(onnx_configs)
    engines = {name: c.parameters["kiln_model"].string_value for name, c in torch_configs.items() if "kiln_model" in c.parameters}
    components = sorted(name for name, engine in engines.items() if engine == "torch_component")
    assert components == ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    for name, config in onnx_configs.items():
        served = torch_configs[name]
        if name in components:
            assert config.parameters["kiln_model"].string_value == "onnx_component"
            for c in (served, config):
                del c.parameters["kiln_model"], c.parameters["kiln_settings"]
            assert (torch_repo / name / "1" / WEIGHTS_FOLDER / "config.json").is_file()
            assert not (torch_repo / name / "1" / "model.onnx").exists()
        assert served == config, name  # tensors, dims, dynamic batching, instances: all the same
    manifest = json.loads((torch_repo / "manifest.json").read_text())
    assert manifest["backend"] == "torch" and manifest["torch"] == {"device": "auto", "dtype": "auto", "compile": False}


def test_component_core_runs_the_module_on_the_cpu_in_fp32(torch_repo, onnx_dir):
    from kiln.export.specs import COMPONENTS, dummy_inputs, ShapePoint
    from kiln.pipeline.onnx_session import ComponentSession

    spec = COMPONENTS["unet"]
    settings = json.loads(parse_pbtxt((torch_repo / "unet" / "config.pbtxt").read_text())
                          .parameters["kiln_settings"].string_value)
    model = TorchComponentModel(torch_repo / "unet" / "1", settings)
    component = model.session.component
    assert str(component.device) == "cpu" and str(component.dtype) == "torch.float32"  # no GPU here
    assert "cpu" in model.session.description and "float32" in model.session.description
    from kiln.export.specs import ModelDims

    dims = ModelDims(**settings["dims"])
    feeds = dummy_inputs(spec, ShapePoint(batch=2, latent_height=8, latent_width=8), dims)
    served = model.run([feeds])[0]["out_sample"]
    onnx = ComponentSession(spec, onnx_dir("epsilon") / "unet" / "model.onnx").run(feeds)["out_sample"]
    assert np.abs(served - onnx).max() <= 1e-4 + 1e-4 * np.abs(onnx).max()


def test_models_sharing_weights_share_their_component_models(onnx_dir, tmp_path):
    from kiln.model_repository.builder import build_models_repository

    repo = build_models_repository({"base": onnx_dir("epsilon"), "again": onnx_dir("epsilon"), "v": onnx_dir("v_prediction")},
                                   tmp_path / "repo", backend="torch")
    ensembles = json.loads((repo / "manifest.json").read_text())["ensembles"]
    assert ensembles["base"]["components"] == ensembles["again"]["components"]
    for name, model in ensembles["v"]["components"].items():  # shared exactly where the weights are the same
        same = ensembles["v"]["source"]["weights"][name] == ensembles["base"]["source"]["weights"][name]
        assert (model == ensembles["base"]["components"][name]) == same, name
    assert ensembles["v"]["components"]["unet"] != ensembles["base"]["components"]["unet"]
    assert ensembles["base"]["source"]["weights"]["vae_decoder"] == ensembles["base"]["source"]["weights"]["vae_encoder"]


def test_a_weight_file_changed_after_the_build_is_refused_at_load(torch_repo, tmp_path):
    repo = shutil.copytree(torch_repo, tmp_path / "copy", copy_function=shutil.copy)  # new times: hashed, accepted
    version = repo / "vae_decoder" / "1"
    settings = json.loads(parse_pbtxt((repo / "vae_decoder" / "config.pbtxt").read_text())
                          .parameters["kiln_settings"].string_value)
    TorchComponentModel(version, settings)
    weights = version / WEIGHTS_FOLDER / "config.json"
    weights.write_text(weights.read_text().replace('"scaling_factor"', '"scaling_factor" ', 1))
    with pytest.raises(ModelError, match=rf"{WEIGHTS_FOLDER}/config.json changed since the repository was built"):
        TorchComponentModel(version, settings)
    (version / STAMPS_NAME).unlink()
    with pytest.raises(ModelError, match="missing or damaged"):
        TorchComponentModel(version, settings)


def _moved_export(onnx_dir, tiny_model, tmp_path):
    """A copy of the export whose manifest points at a copy of its model folder."""
    model = shutil.copytree(tiny_model("epsilon"), tmp_path / "model")
    export = shutil.copytree(onnx_dir("epsilon"), tmp_path / "onnx")
    manifest = json.loads((export / "manifest.json").read_text())
    manifest["source"]["path"] = str(model)
    (export / "manifest.json").write_text(json.dumps(manifest))
    return model, export, manifest


def test_a_moved_or_changed_model_folder_is_refused(onnx_dir, tiny_model, tmp_path):
    model, export, _ = _moved_export(onnx_dir, tiny_model, tmp_path)
    build_repository(export, tmp_path / "ok", backend="torch")  # unchanged: accepted
    config = model / "unet" / "config.json"
    config.write_text(config.read_text() + " ")
    with pytest.raises(RepositoryError, match=r"unet/?, which changed since .* was exported") as changed:
        build_repository(export, tmp_path / "r1", backend="torch")
    assert "kiln export onnx" in changed.value.hint
    shutil.rmtree(model)
    with pytest.raises(RepositoryError, match="it is gone"):
        build_repository(export, tmp_path / "r2", backend="torch")
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


@pytest.mark.parametrize("precision, flag", [("fp16", "--fp16"), ("int8", "--int8")])
def test_exports_only_onnx_serves_are_refused_before_any_work(onnx_dir, tiny_model, tmp_path, precision, flag):
    _, export, manifest = _moved_export(onnx_dir, tiny_model, tmp_path)
    manifest["precision"] = precision
    (export / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RepositoryError, match=f"exported with {flag}") as refused:
        build_repository(export, tmp_path / "repo", backend="torch")
    assert "--torch-dtype" in refused.value.hint and not (tmp_path / "repo").exists()


def test_lora_inputs_and_misplaced_torch_options_are_refused(onnx_dir, tiny_model, tmp_path):
    from kiln.pipeline.adapters import ADAPTED_LAYERS_NAME

    _, export, _ = _moved_export(onnx_dir, tiny_model, tmp_path)
    (export / "unet" / ADAPTED_LAYERS_NAME).write_text("[]")  # what --lora-inputs leaves beside the UNet
    with pytest.raises(RepositoryError, match="exported with --lora-inputs"):
        build_repository(export, tmp_path / "repo", backend="torch")
    with pytest.raises(RepositoryError, match="apply to --backend torch"):
        build_repository(onnx_dir("epsilon"), tmp_path / "repo", torch_options=TorchOptions(device="cuda"))
    with pytest.raises(RepositoryError, match="--torch-dtype float16 with --torch-device cpu"):
        build_repository(onnx_dir("epsilon"), tmp_path / "repo", backend="torch",
                         torch_options=TorchOptions(device="cpu", dtype="float16"))
    with pytest.raises(RepositoryError, match="--backend 'torch' is not available for --target ngc"):
        build_repository(onnx_dir("epsilon"), tmp_path / "repo", target="ngc", backend="torch")


def test_deploy_refuses_what_only_onnx_serves_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from kiln.cli import app

    for args, flag in ((["--lora-inputs"], "--lora-inputs"), (["--precision", "int8"], "--precision int8"),
                       (["--backend", "tensorrt"], "--backend tensorrt")):
        result = CliRunner().invoke(app, ["deploy", "--tiny", "--artifacts", str(tmp_path), "--backend", "torch", *args])
        assert isinstance(result.exception, RepositoryError) and flag in str(result.exception), result.output
    assert not any(tmp_path.iterdir())  # refused before building or exporting anything


@pytest.fixture(scope="module")
def torch_triton(torch_repo):
    with server.running_server(torch_repo) as info:
        yield info


@pytest.mark.triton
@pytest.mark.slow  # starts a Triton server of its own
@pytest.mark.parametrize("scheduler, protocol, steps, guidance, height, width", [
    ("ddim", "http", 4, 7.5, 64, 64),
    ("euler_a", "grpc", 4, 7.5, 64, 80),  # ancestral: noise drawn inside scheduler.step
])
def test_served_image_equals_diffusers(torch_triton, tiny_model, reference_image, scheduler, protocol, steps,
                                       guidance, height, width):
    with client(torch_triton, protocol) as c:
        result = c.generate(PROMPT, NEGATIVE, seed=31, steps=steps, guidance_scale=guidance, height=height,
                            width=width, scheduler=scheduler)
    expected = reference_image(tiny_model("epsilon"), scheduler, PROMPT, NEGATIVE, 31, steps, guidance, height, width)
    assert result.images.shape == expected.shape == (1, height, width, 3)
    diff = np.abs(result.images.astype(int) - expected).max()
    assert diff <= MAX_DIFF, f"{scheduler}/{protocol}: max |Triton (torch backend) - diffusers| = {diff}"
    log = Path(torch_triton.log_file).read_text()
    assert "unet: PyTorch on cpu in float32" in log  # what the component chose at load, in Triton's log


def _settings(repo, name) -> dict:
    return json.loads(parse_pbtxt((repo / name / "config.pbtxt").read_text()).parameters["kiln_settings"].string_value)


class ServedCores:
    """What the BLS loop calls, without Triton: each component model's served core."""

    def __init__(self, repo, names):
        import torch

        self.device = torch.device("cpu")
        self.models = {n: TorchComponentModel(repo / n / "1", _settings(repo, n)) for n in names}
        self.components = tuple(names)

    def __call__(self, spec, feeds, outputs):
        import torch

        out = self.models[spec.name].run([{k: v.numpy() for k, v in feeds.items()}])[0]
        return {k: torch.from_numpy(out[k]) for k in outputs}


def test_controlnets_load_from_their_recorded_folders_and_draw_what_diffusers_draws(controlled_onnx, diffusers_draw,
                                                                                      tmp_path):
    from kiln.model_repository.python_models import PipelineModel, TokenizerModel
    from kiln.pipeline.engines import Engines

    from test_controlnet import CONTROLS, MAX_DIFF as CONTROL_MAX_DIFF, PROMPT as CONTROL_PROMPT, raw_request, worst

    repo = build_repository(controlled_onnx, tmp_path / "repo", backend="torch")
    models = json.loads((repo / "manifest.json").read_text())["ensembles"]["txt2img"]["components"]
    assert {"controlnet_edge", "controlnet_pose", "unet"} <= set(models)
    core = PipelineModel(repo / "pipeline" / "1", _settings(repo, "pipeline"))
    engines = Engines(ServedCores(repo, list(models)), family=core.family)
    tokens = TokenizerModel(repo / "tokenizer" / "1", {"tokenizer": "tokenizer"}).run(
        np.array([CONTROL_PROMPT.encode()], dtype=object), None)
    out = core.run({**tokens, **raw_request(controlnet="edge", control_image=CONTROLS[0], scheduler="euler")}, engines)
    expected = diffusers_draw("euler", [("edge", CONTROLS[0], 1.0, 0.0, 1.0)])
    assert worst(out["image"], expected) <= CONTROL_MAX_DIFF
    plain = core.run({**tokens, **raw_request(scheduler="euler")}, engines)
    assert worst(plain["image"], expected) > CONTROL_MAX_DIFF  # the ControlNet did move the image
