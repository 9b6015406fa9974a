"""The Python-backend models' cores. Each takes plain arrays; the Triton specifics (reading inputs,
building responses, BLS calls) come from triton_adapter, imported only when Triton runs them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from kiln.errors import RequestError
from kiln.export.specs import COMPONENTS, ComponentSpec
from kiln.pipeline.denoise import Engines, ModelConstants, generate_request
from kiln.pipeline.schedulers import make_scheduler
from kiln.pipeline.request import TXT2IMG_INPUTS, Defaults, Limits, parse_request

log = logging.getLogger("kiln.model_repository")


def batch_feeds(spec: ComponentSpec, feeds: list[dict[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], list[int]]:
    """Concatenate several requests' inputs along the batch axis, each reshaped to the spec's rank
    (Triton sends per-item scalars as [batch, 1]). Returns the batch and each request's size."""
    sizes = [len(f[spec.inputs[0].name]) for f in feeds]
    merged = {}
    for t in spec.inputs:
        parts = [np.asarray(f[t.name]) for f in feeds]
        if len(t.shape) == 1:
            parts = [p.reshape(p.shape[0]) for p in parts]
        merged[t.name] = np.concatenate(parts) if len(parts) > 1 else parts[0]
    return merged, sizes


def split_outputs(outputs: dict[str, np.ndarray], sizes: list[int]) -> list[dict[str, np.ndarray]]:
    bounds = np.cumsum([0, *sizes])
    return [{k: v[bounds[i] : bounds[i + 1]] for k, v in outputs.items()} for i in range(len(sizes))]


class OnnxComponentModel:
    """One exported component on ONNX Runtime; the requests Triton batches run as one call."""

    def __init__(self, version_dir: Path, settings: dict):
        from kiln.pipeline.onnx_session import ComponentSession

        self.spec = COMPONENTS[settings["component"]]
        self.session = ComponentSession(self.spec, version_dir / "model.onnx", int(settings.get("onnx_threads", 0)))

    def run(self, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        merged, sizes = batch_feeds(self.spec, feeds)
        return split_outputs(self.session.run(merged), sizes)

    def execute(self, requests):
        from kiln.model_repository import triton_adapter as triton

        feeds = [triton.read_inputs(r, self.spec.input_names) for r in requests]
        try:
            return [triton.respond(out) for out in self.run(feeds)]
        except Exception as exc:  # one bad batch must not take the instance down
            log.exception("%s failed", self.spec.name)
            return [triton.fail(exc) for _ in requests]

    def finalize(self):
        self.session = None


class TokenizerModel:
    """Prompt text -> weighted 77-token chunks, prompt and negative prompt padded to the same count."""

    def __init__(self, version_dir: Path, settings: dict):
        from kiln.pipeline.prompts import load_tokenizer

        self.tokenizer = load_tokenizer(version_dir / settings["tokenizer"])
        self.max_tokens = int(settings.get("max_prompt_tokens", Limits().max_prompt_tokens))

    def run(self, prompt: np.ndarray | None, negative: np.ndarray | None) -> dict[str, np.ndarray]:
        from kiln.pipeline.prompt_weights import tokenize_pair

        if prompt is None:
            raise RequestError("prompt", None, "non-empty text (the prompt is required)")
        texts = {}
        for field, value in (("prompt", prompt), ("negative_prompt", negative)):
            try:
                texts[field] = "" if value is None else value.reshape(-1)[0].decode("utf-8")
            except (UnicodeDecodeError, AttributeError, IndexError):
                raise RequestError(field, "<undecodable>", "one UTF-8 string") from None
        first, second = tokenize_pair(self.tokenizer, texts["prompt"], texts["negative_prompt"])
        for field, chunks in (("prompt", first), ("negative_prompt", second)):
            if chunks.tokens > self.max_tokens:
                raise RequestError(field, f"<{chunks.tokens} tokens>", f"at most {self.max_tokens} tokens")
        return {"prompt_ids": first.ids, "prompt_weights": first.weights,
                "negative_prompt_ids": second.ids, "negative_prompt_weights": second.weights}

    def execute(self, requests):
        from kiln.model_repository import triton_adapter as triton

        responses = []
        for request in requests:
            raw = triton.read_inputs(request, ["prompt", "negative_prompt"])
            try:
                responses.append(triton.respond(self.run(raw["prompt"], raw["negative_prompt"])))
            except Exception as exc:
                responses.append(triton.fail(exc))
        return responses

    def finalize(self):
        pass


class PipelineModel:
    """The denoising loop (BLS): validates the request, then runs Kiln's pipeline core."""

    def __init__(self, version_dir: Path, settings: dict, engines: Engines | None = None):
        self.scheduler_config = json.loads((version_dir / "scheduler" / "scheduler_config.json").read_text())
        self.constants = ModelConstants(**settings["constants"])
        self.defaults = Defaults(**settings["defaults"])
        self.limits = Limits(**settings["limits"])
        self.size_multiple = int(settings["size_multiple"])
        self.engines = engines
        self.component_models = settings.get("models") or {}
        self.device = settings.get("device")
        self._warm_up()

    def _warm_up(self) -> None:
        """Do at load what a first request would otherwise pay for: import every scheduler class and
        run torch's first random draw (each of several loop instances would pay it once)."""
        import torch

        from kiln.pipeline.schedulers import SCHEDULERS

        for name in ("default", *SCHEDULERS):
            make_scheduler(name, self.scheduler_config).set_timesteps(2)
        torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))

    def run(self, raw: dict[str, np.ndarray | None], engines: Engines) -> dict[str, np.ndarray]:
        from kiln.pipeline.prompt_weights import TokenChunks

        request = parse_request(raw, self.defaults, self.limits, self.size_multiple)
        chunks = {}
        for side in ("prompt", "negative_prompt"):
            ids, weights = raw.get(f"{side}_ids"), raw.get(f"{side}_weights")
            if ids is not None and weights is not None and ids.ndim == 3 and ids.shape[0] == 1:
                ids, weights = ids[0], weights[0]  # the batch dimension Triton adds
            if ids is None or weights is None or ids.shape != weights.shape or ids.ndim != 2:
                raise RequestError(f"{side}_ids", None, "token ids and weights from the tokenizer model")
            chunks[side] = TokenChunks(ids.astype(np.int32), weights.astype(np.float32))
        images = generate_request(engines, request, self.scheduler_config, self.constants, chunks["prompt"],
                                  chunks["negative_prompt"], self.size_multiple)
        return {"image": images, "seeds": np.array(request.seeds, dtype=np.int64)}

    def execute(self, requests):
        from kiln.model_repository import triton_adapter as triton
        from kiln.model_repository.configs import TOKEN_TENSORS

        engines = self.engines or triton.BlsEngines(self.component_models, self.device)
        names = list(TOKEN_TENSORS) + [f.name for f in TXT2IMG_INPUTS]
        responses = []
        for request in requests:
            try:
                responses.append(triton.respond(self.run(triton.read_inputs(request, names), engines)))
            except Exception as exc:
                if not isinstance(exc, RequestError):
                    log.exception("pipeline failed")
                responses.append(triton.fail(exc))
        return responses

    def finalize(self):
        pass


KINDS = {"onnx_component": OnnxComponentModel, "tokenizer": TokenizerModel, "pipeline": PipelineModel}


def create(args: dict):
    """Build the core named by the model config's `kiln_model` parameter (Triton's initialize args)."""
    config = json.loads(args["model_config"])
    parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
    version_dir = Path(args["model_repository"]) / args["model_version"]
    settings = json.loads(parameters.get("kiln_settings", "{}"))
    if settings.get("device") == "cuda" and args.get("model_instance_kind") == "GPU":
        settings["device"] = f"cuda:{args.get('model_instance_device_id', 0)}"  # this instance's GPU
    return KINDS[parameters["kiln_model"]](version_dir, settings)
