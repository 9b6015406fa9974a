"""Shared fixtures: tiny SD models (epsilon and v-prediction), their ONNX exports and repositories,
and real embedded Triton servers on free ports."""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from pathlib import Path

import numpy as np
import pytest
import torch

from kiln.export.onnx_export import export_onnx
from kiln.model_repository.builder import build_repository
from kiln.models.tiny import write_tiny_model
from kiln.pipeline.schedulers import make_scheduler
from kiln.serving import server

KINDS = ("epsilon", "v_prediction")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    cache = {}

    def get(kind: str = "epsilon") -> Path:
        if kind not in cache:
            cache[kind] = write_tiny_model(root / kind, kind)
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def onnx_dir(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    cache = {}

    def get(kind: str = "epsilon") -> Path:
        if kind not in cache:
            export_onnx(tiny_model(kind), root / kind)
            cache[kind] = root / kind
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def repo_dir(onnx_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("repos")
    cache = {}

    def get(kind: str = "epsilon") -> Path:
        if kind not in cache:
            cache[kind] = build_repository(onnx_dir(kind), root / kind)
        return cache[kind]

    return get


def free_ports() -> server.Ports:
    return server.Ports(server.free_port(), server.free_port(), server.free_port())


@pytest.fixture(scope="session")
def triton(repo_dir):
    """A running embedded Triton per model kind, started on first use, stopped at the end."""
    running = {}

    def get(kind: str = "epsilon") -> server.ServerInfo:
        if kind not in running:
            ports = free_ports()
            _, info = server.start(repo_dir(kind), ports)
            running[kind] = info
        return running[kind]

    yield get
    for info in running.values():
        server.stop(info.ports)


def diffusers_image(model_dir: Path, scheduler: str, prompt: str, negative: str, seed: int, steps: int,
                    guidance: float, height: int, width: int) -> np.ndarray:
    """What diffusers' StableDiffusionPipeline draws in-process, as (1, H, W, 3) uint8."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler(scheduler, dict(pipe.scheduler.config))
    images = pipe(
        prompt,
        negative_prompt=negative,
        generator=torch.Generator().manual_seed(seed),
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=height,
        width=width,
        output_type="np",
    ).images
    return (images * 255).round().astype(np.uint8)


@pytest.fixture(scope="session")
def reference_image():
    return diffusers_image
