import json

import pytest

from kiln.errors import ModelError
from kiln.artifacts import tree_sha256, write_folder_atomically
from kiln.models.folder import inspect_model


@pytest.mark.parametrize("kind, scheduler", [("epsilon", "PNDMScheduler"), ("v_prediction", "DDIMScheduler")])
def test_inspect_tiny_models(tiny_model, kind, scheduler):
    info = inspect_model(tiny_model(kind))
    assert info.prediction_type == kind
    assert info.scheduler_class == scheduler
    assert info.vae_scale_factor == 8
    assert info.default_size == 64
    assert info.max_length == 77


def test_not_a_model_folder_names_the_fix(tmp_path):
    with pytest.raises(ModelError) as err:
        inspect_model(tmp_path)
    assert "model_index.json" in str(err.value)
    assert "kiln model tiny" in err.value.hint


def test_missing_component_is_named(tiny_model, tmp_path):
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(tiny_model("epsilon"), copy)
    shutil.rmtree(copy / "vae")
    with pytest.raises(ModelError, match="vae"):
        inspect_model(copy)


def test_unsupported_prediction_type(tiny_model, tmp_path):
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(tiny_model("epsilon"), copy)
    config_path = copy / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config["prediction_type"] = "sample"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelError, match="prediction_type='sample'"):
        inspect_model(copy)


def test_atomic_folder_keeps_the_old_one_on_failure(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with write_folder_atomically(target) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("interrupted")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (target / "old.txt").read_text() == "old"


def test_tree_sha256_changes_with_content(tmp_path):
    (tmp_path / "a").write_text("1")
    first = tree_sha256(tmp_path)
    (tmp_path / "a").write_text("2")
    assert tree_sha256(tmp_path) != first
