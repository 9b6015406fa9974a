"""Kiln's in-process pipeline over an exported ONNX folder: the same core as the Triton BLS model,
with the engines called through ONNX Runtime directly. It is the reference the served pipeline is
measured against, and the baseline for Triton's overhead."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kiln.artifacts import ExportManifest, read_export
from kiln.pipeline.denoise import ModelConstants, generate_request
from kiln.pipeline.engines import Engines, Runner, onnx_engines
from kiln.pipeline.prompt_weights import tokenize_prompts
from kiln.pipeline.prompts import load_tokenizer
from kiln.pipeline.request import Defaults, GenerationRequest


def model_constants(manifest: ExportManifest) -> ModelConstants:
    model = manifest.model
    return ModelConstants(model.latent_channels, model.vae_scale_factor, model.scaling_factor, model.zero_empty_negative)


def model_defaults(manifest: ExportManifest) -> Defaults:
    return Defaults(height=manifest.model.default_size, width=manifest.model.default_size)


class OnnxPipeline:
    def __init__(self, onnx_dir: Path, threads: int = 0, runner: Runner | None = None):
        """`runner`: what runs the export's components (default: ONNX Runtime on its files)."""
        onnx_dir = Path(onnx_dir)
        self.manifest = read_export(onnx_dir)
        self.engines = Engines(runner) if runner else onnx_engines(onnx_dir, threads)
        self.tokenizers = [load_tokenizer(onnx_dir / name) for name in self.manifest.family.tokenizers]
        self.scheduler_config = json.loads((onnx_dir / "scheduler" / "scheduler_config.json").read_text())
        self.constants = model_constants(self.manifest)
        self.defaults = model_defaults(self.manifest)

    def __call__(self, request: GenerationRequest) -> np.ndarray:
        prompt, negative = tokenize_prompts(self.tokenizers, request.prompt, request.negative_prompt)
        return generate_request(self.engines, request, self.scheduler_config, self.constants, prompt, negative,
                                self.manifest.size_multiple)
