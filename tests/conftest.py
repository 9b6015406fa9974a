"""Shared fixtures: tiny SD models (epsilon and v-prediction), their ONNX exports and repositories,
and real embedded Triton servers on free ports."""

from __future__ import annotations

import contextlib
import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars are for people; failures print captured output

from pathlib import Path

import numpy as np
import pytest

from kiln.export.onnx_export import export_onnx
from kiln.model_repository.builder import build_repository
from kiln.models.tiny import write_tiny_model
from kiln.pipeline.reference import diffusers_image, load_diffusers_pipeline
from kiln.serving import server
from kiln.dataset.prepare import PrepareOptions, prepare
from kiln.training.run import run_training

from images import write_folder
from training_runs import METHOD_SETTINGS, train_settings

KINDS = ("epsilon", "v_prediction")


def _per_kind(build):
    """A getter that builds the artifact for a model kind once per session."""
    cache = {}

    def get(kind: str = "epsilon") -> Path:
        if kind not in cache:
            cache[kind] = build(kind)
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return _per_kind(lambda kind: write_tiny_model(root / kind, kind))


@pytest.fixture(scope="session")
def onnx_dir(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    return _per_kind(lambda kind: export_onnx(tiny_model(kind), root / kind).out_dir)


@pytest.fixture(scope="session")
def repo_dir(onnx_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("repos")
    return _per_kind(lambda kind: build_repository(onnx_dir(kind), root / kind))


@pytest.fixture(scope="session")
def triton(repo_dir):
    """A running embedded Triton per model kind, started on first use, stopped at the end."""
    with contextlib.ExitStack() as servers:
        running = {}

        def get(kind: str = "epsilon") -> server.ServerInfo:
            if kind not in running:
                running[kind] = servers.enter_context(server.running_server(repo_dir(kind)))
            return running[kind]

        yield get


@pytest.fixture(scope="session")
def sdxl_model(tmp_path_factory):
    """Tiny SDXL folders (epsilon and v_prediction), their exports, repositories and servers."""
    root = tmp_path_factory.mktemp("sdxl-models")
    return _per_kind(lambda kind: write_tiny_model(root / kind, kind, family="sdxl"))


@pytest.fixture(scope="session")
def sdxl_onnx(sdxl_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-onnx")
    return _per_kind(lambda kind: export_onnx(sdxl_model(kind), root / kind).out_dir)


@pytest.fixture(scope="session")
def sdxl_triton(sdxl_onnx, tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-repos")
    with contextlib.ExitStack() as servers:
        running = {}

        def get(kind: str = "epsilon") -> server.ServerInfo:
            if kind not in running:
                repo = build_repository(sdxl_onnx(kind), root / kind)
                running[kind] = servers.enter_context(server.running_server(repo))
            return running[kind]

        yield get


@pytest.fixture(scope="session")
def reference_image():
    """diffusers' in-process image for (model_dir, scheduler, prompt, negative, seed, steps, guidance, h, w)."""
    pipes = {}

    def draw(model_dir: Path, *args, **kwargs) -> np.ndarray:
        if model_dir not in pipes:
            pipes[model_dir] = load_diffusers_pipeline(model_dir)
        return diffusers_image(pipes[model_dir], *args, **kwargs)

    return draw


# Training runs shared by the training and merge tests: 15 steps of each method on the tiny model.
@pytest.fixture(scope="session")
def training_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    prepare(write_folder(root / "src", 8), root / "prepared", PrepareOptions(resolution=64))
    return root / "prepared"


@pytest.fixture(scope="session")
def trained(tiny_model, training_data, tmp_path_factory):
    runs = {}

    def get(method):
        if method not in runs:
            out = tmp_path_factory.mktemp(method)
            extra = list(METHOD_SETTINGS[method])
            if method == "dreambooth":
                extra.append(f"dreambooth.class_data_dir={out / 'class'}")
            summary = run_training(method, None, train_settings(tiny_model("epsilon"), training_data, out,
                                                                "max_train_steps=15", "checkpointing_steps=100",
                                                                "data.augment.enabled=false", *extra))
            runs[method] = (out, summary)
        return runs[method]

    return get


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need a CUDA GPU: skipped, with the reason, where torch sees none."""
    marked = [item for item in items if item.get_closest_marker("gpu")]
    if not marked:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False here")
    for item in marked:
        item.add_marker(skip)
