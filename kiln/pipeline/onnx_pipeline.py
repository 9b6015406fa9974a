"""Kiln's in-process pipeline over an exported ONNX folder: the same core as the Triton BLS model,
with the engines called through ONNX Runtime directly. It is the reference the served pipeline is
measured against, and the baseline for Triton's overhead."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kiln.errors import ModelError
from kiln.export.manifest import read_manifest
from kiln.export.specs import COMPONENTS
from kiln.pipeline.denoise import ModelConstants, generate_request
from kiln.pipeline.onnx_session import ComponentSession
from kiln.pipeline.prompt_weights import tokenize_pair
from kiln.pipeline.prompts import load_tokenizer
from kiln.pipeline.request import Defaults, GenerationRequest


def read_export(onnx_dir: Path) -> dict:
    """The export manifest, checked to describe a complete export."""
    manifest = read_manifest(onnx_dir)
    if not manifest:
        raise ModelError(
            f"{onnx_dir} has no manifest.json: it is not a Kiln ONNX export",
            hint=f"kiln export onnx MODEL_DIR {onnx_dir}",
        )
    missing = [c for c in ("text_encoder", "unet", "vae_decoder") if not (Path(onnx_dir) / c / "model.onnx").is_file()]
    if missing:
        raise ModelError(f"{onnx_dir} lacks {missing}", hint=f"kiln export onnx MODEL_DIR {onnx_dir}")
    return manifest


def model_constants(manifest: dict) -> ModelConstants:
    model = manifest["model"]
    return ModelConstants(model["latent_channels"], model["vae_scale_factor"], model["scaling_factor"])


def model_defaults(manifest: dict) -> Defaults:
    size = manifest["model"]["default_size"]
    return Defaults(height=size, width=size)


def size_multiple(manifest: dict) -> int:
    """Image sides must be multiples of this: the VAE factor times the UNet's down-sampling."""
    return manifest["dims"]["vae_scale_factor"] * manifest["dims"]["unet_factor"]


class OnnxEngines:
    def __init__(self, onnx_dir: Path, threads: int = 0):
        self.sessions = {
            name: ComponentSession(COMPONENTS[name], Path(onnx_dir) / name / "model.onnx", threads)
            for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder")
            if (Path(onnx_dir) / name / "model.onnx").is_file()
        }

    def encode_text(self, input_ids: np.ndarray) -> np.ndarray:
        return self.sessions["text_encoder"].run({"input_ids": input_ids})["last_hidden_state"]

    def predict_noise(self, sample, timestep, embeddings) -> np.ndarray:
        feeds = {"sample": sample, "timestep": timestep, "encoder_hidden_states": embeddings}
        return self.sessions["unet"].run(feeds)["out_sample"]

    def decode_latents(self, latents: np.ndarray) -> np.ndarray:
        return self.sessions["vae_decoder"].run({"latent_sample": latents})["sample"]

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        if "vae_encoder" not in self.sessions:
            raise ModelError("this export has no vae_encoder: img2img is unavailable")
        return self.sessions["vae_encoder"].run({"sample": pixels})["latent_parameters"]


class OnnxPipeline:
    def __init__(self, onnx_dir: Path, threads: int = 0):
        onnx_dir = Path(onnx_dir)
        self.manifest = read_export(onnx_dir)
        self.engines = OnnxEngines(onnx_dir, threads)
        self.tokenizer = load_tokenizer(onnx_dir / "tokenizer")
        self.scheduler_config = json.loads((onnx_dir / "scheduler" / "scheduler_config.json").read_text())
        self.constants = model_constants(self.manifest)
        self.defaults = model_defaults(self.manifest)

    def __call__(self, request: GenerationRequest) -> np.ndarray:
        prompt, negative = tokenize_pair(self.tokenizer, request.prompt, request.negative_prompt)
        return generate_request(self.engines, request, self.scheduler_config, self.constants, prompt, negative,
                                size_multiple(self.manifest))
