"""The repository builder's configs, parsed with Triton's own schema and checked against the specs,
and the Python-backend cores run without Triton."""

import json

import numpy as np
import pytest

from kiln.errors import RepositoryError, RequestError
from kiln.export.specs import COMPONENTS, ModelDims
from kiln.model_repository.builder import build_repository
from kiln.model_repository.configs import NUMPY_TO_TRITON, WIRE_TO_TRITON, parse_pbtxt
from kiln.model_repository.python_models import PipelineModel, TokenizerModel, batch_feeds, split_outputs
from kiln.pipeline.engines import onnx_engines
from kiln.pipeline.onnx_pipeline import OnnxPipeline
from kiln.pipeline.request import TXT2IMG_INPUTS, TXT2IMG_OUTPUTS, GenerationRequest


def _config(repo, name):
    return parse_pbtxt((repo / name / "config.pbtxt").read_text())


def test_every_config_parses_with_tritons_schema(repo_dir):
    repo = repo_dir("epsilon")
    manifest = json.loads((repo / "manifest.json").read_text())
    for name in manifest["models"]:
        config = _config(repo, name)
        assert config.name == name
        assert (repo / name / "1").is_dir()


@pytest.mark.parametrize("name", ["text_encoder", "unet", "vae_decoder", "vae_encoder"])
def test_component_configs_derive_from_the_spec(repo_dir, onnx_dir, name):
    spec = COMPONENTS[name]
    dims = ModelDims(**json.loads((onnx_dir("epsilon") / "manifest.json").read_text())["dims"])
    config = _config(repo_dir("epsilon"), name)
    assert config.backend == "python" and config.max_batch_size > 0
    assert [t.name for t in config.input] == spec.input_names  # none missing, none extra, in order
    assert [t.name for t in config.output] == spec.output_names
    for declared, actual in zip(spec.inputs + spec.outputs, list(config.input) + list(config.output), strict=True):
        assert actual.name == declared.name
        assert actual.data_type == NUMPY_TO_TRITON[declared.dtype]
        symbolic = declared.shape[1:]
        if not symbolic:
            assert list(actual.dims) == [1] and actual.HasField("reshape")
            continue
        for sym, dim in zip(symbolic, actual.dims, strict=True):
            expected = {"latent_channels": dims.latent_channels, "hidden_size": dims.hidden_size,
                        "image_channels": 3, "latent_parameters": 2 * dims.latent_channels}.get(sym, -1)
            assert dim == expected, (name, declared.name, sym)
    assert (repo_dir("epsilon") / name / "1" / "model.onnx").is_file()


def test_ensemble_is_wired_from_the_request_spec(repo_dir):
    repo = repo_dir("epsilon")
    config = _config(repo, "txt2img")
    assert config.platform == "ensemble"
    assert [(i.name, i.data_type, i.optional) for i in config.input] == [
        (f.name, WIRE_TO_TRITON[f.datatype], True) for f in TXT2IMG_INPUTS
    ]
    assert [o.name for o in config.output] == [name for name, _, _ in TXT2IMG_OUTPUTS]
    available = {i.name for i in config.input}
    for step in config.ensemble_scheduling.step:
        callee = _config(repo, step.model_name)
        callee_inputs = {i.name: i for i in callee.input}
        assert set(step.input_map) == set(callee_inputs), step.model_name
        assert set(step.input_map.values()) <= available, step.model_name
        for key in step.input_map:
            # an optional ensemble input may only feed an optional model input
            if key in {i.name for i in config.input if i.optional}:
                assert callee_inputs[key].optional, (step.model_name, key)
        assert set(step.output_map) <= {o.name for o in callee.output}
        available |= set(step.output_map.values())
    assert {o.name for o in config.output} <= available


def test_unknown_target_is_refused(onnx_dir, tmp_path):
    with pytest.raises(RepositoryError, match="--target 'cloud'"):
        build_repository(onnx_dir("epsilon"), tmp_path / "r", target="cloud")


def test_batch_feeds_round_trip():
    spec = COMPONENTS["unet"]
    feeds = [
        {"sample": np.full((n, 4, 2, 2), n, np.float32), "timestep": np.full((n, 1), n, np.float32),
         "encoder_hidden_states": np.zeros((n, 77, 32), np.float32)}
        for n in (2, 1, 3)
    ]
    merged, sizes = batch_feeds(spec, feeds)
    assert sizes == [2, 1, 3] and merged["sample"].shape == (6, 4, 2, 2) and merged["timestep"].shape == (6,)
    parts = split_outputs({"out_sample": merged["sample"]}, sizes)
    assert [p["out_sample"].shape[0] for p in parts] == [2, 1, 3]
    assert all((p["out_sample"] == n).all() for p, n in zip(parts, (2, 1, 3), strict=True))


def test_pipeline_core_without_triton_equals_the_in_process_pipeline(repo_dir, onnx_dir):
    """The BLS model's core, with ONNX Runtime engines in place of BLS calls."""
    repo = repo_dir("epsilon")
    settings = json.loads(_config(repo, "pipeline").parameters["kiln_settings"].string_value)
    core = PipelineModel(repo / "pipeline" / "1", settings)
    tokens = TokenizerModel(repo / "tokenizer" / "1", {"tokenizer": "tokenizer"}).run(
        np.array([b"a red digit 7"], dtype=object), None
    )
    raw = {**tokens, "prompt": np.array([b"a red digit 7"], dtype=object), "seed": np.array([5]),
           "steps": np.array([3], np.int32), "scheduler": np.array([b"euler_a"], dtype=object)}
    out = core.run(raw, onnx_engines(onnx_dir("epsilon")))
    expected = OnnxPipeline(onnx_dir("epsilon"))(GenerationRequest("a red digit 7", "", 5, 3, 7.5, 64, 64, "euler_a"))
    assert out["seeds"].tolist() == [5]
    assert np.array_equal(out["image"], expected)
    untokenized = {k: v for k, v in raw.items() if k not in tokens}  # a direct caller: the loop tokenizes itself
    assert np.array_equal(core.run(untokenized, onnx_engines(onnx_dir("epsilon")))["image"], expected)
    with pytest.raises(RequestError, match="prompt=None is invalid"):
        core.run({k: v for k, v in untokenized.items() if k != "prompt"}, onnx_engines(onnx_dir("epsilon")))
    with pytest.raises(RequestError, match="negative_prompt_ids"):  # half the tokenizer's outputs: named, not guessed
        core.run({**untokenized, **{k: v for k, v in tokens.items() if k.startswith("prompt_")}}, onnx_engines(onnx_dir("epsilon")))
    with pytest.raises(RequestError, match="steps=999"):
        core.run({**raw, "steps": np.array([999], np.int32)}, onnx_engines(onnx_dir("epsilon")))


def test_deployment_chooses_the_defaults_of_requests_that_leave_them_out(onnx_dir, tmp_path):
    """`kiln repo build --default-guidance 4 --default-steps 3 --default-scheduler EulerDiscreteScheduler`:
    a request naming none of them draws what one naming them draws."""
    repo = build_repository(onnx_dir("epsilon"), tmp_path / "repo",
                            defaults={"guidance_scale": 4.0, "steps": 3, "scheduler": "EulerDiscreteScheduler"})
    settings = json.loads(_config(repo, "pipeline").parameters["kiln_settings"].string_value)
    assert settings["defaults"]["scheduler"] == "euler" and settings["defaults"]["height"] == 64  # size: the model's
    core = PipelineModel(repo / "pipeline" / "1", settings)
    tokens = TokenizerModel(repo / "tokenizer" / "1", {"tokenizer": "tokenizer"}).run(
        np.array([b"a red digit 7"], dtype=object), None
    )
    out = core.run({**tokens, "prompt": np.array([b"a red digit 7"], dtype=object), "seed": np.array([5])},
                   onnx_engines(onnx_dir("epsilon")))
    pipe = OnnxPipeline(onnx_dir("epsilon"))
    assert np.array_equal(out["image"], pipe(GenerationRequest("a red digit 7", "", 5, 3, 4.0, 64, 64, "euler")))
    assert not np.array_equal(out["image"], pipe(GenerationRequest("a red digit 7", "", 5, 3, 7.5, 64, 64, "euler")))


@pytest.mark.parametrize("defaults, message", [
    ({"guidance_scale": 99.0}, "--default-guidance 99.0 is out of range"),
    ({"steps": 0}, "--default-steps 0 is out of range"),
    ({"scheduler": "fastest"}, "--default-scheduler: scheduler='fastest' is invalid"),
    ({"height": 128}, r"request defaults \['height'\] cannot be set"),
])
def test_bad_request_defaults_are_refused_before_writing(onnx_dir, tmp_path, defaults, message):
    with pytest.raises(RepositoryError, match=message):
        build_repository(onnx_dir("epsilon"), tmp_path / "repo", defaults=defaults)
    assert not (tmp_path / "repo").exists()


def test_row_cache_answers_repeats_drops_the_oldest_and_never_keeps_a_failure():
    from kiln.model_repository.python_models import RowCache

    calls = []

    def encode(inputs):
        calls.append(inputs["ids"].copy())
        if (inputs["ids"] < 0).any():
            raise ValueError("bad ids")
        return {"out": inputs["ids"].astype(np.float32) * 2}

    cache = RowCache(max_bytes=3 * 4 * 4)  # three rows of four float32
    rows = np.arange(16, dtype=np.int32).reshape(4, 4)
    first = cache.run({"ids": rows[:2]}, encode)
    second = cache.run({"ids": rows[[1, 2]]}, encode)  # row 1 from the cache, row 2 computed
    assert np.array_equal(first["out"], rows[:2] * 2) and np.array_equal(second["out"], rows[[1, 2]] * 2)
    assert [c.tolist() for c in calls[1:]] == [rows[[2]].tolist()] and (cache.hits, cache.misses) == (1, 3)
    cache.run({"ids": rows[[3]]}, encode)  # a fourth row: the least recently used (row 0) goes
    assert len(cache.rows) == 3 and cache.bytes == 3 * 16
    cache.run({"ids": rows[[0]]}, encode)
    assert calls[-1].tolist() == rows[[0]].tolist()  # computed again
    bad = np.full((1, 4), -1, np.int32)
    for _ in range(2):
        with pytest.raises(ValueError):
            cache.run({"ids": bad}, encode)
    assert bad.tobytes() not in cache.rows
