"""The Python-backend models' cores. Each takes plain arrays; the Triton specifics (reading inputs,
building responses, BLS calls) come from triton_adapter, imported only when Triton runs them."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np

from kiln.errors import Cancelled, GenerationError, RequestError
from kiln.serving.metrics import COMPONENT_METRICS, LOOP_METRICS
from kiln.export.specs import CONTROLNET_PREFIX, ComponentSpec, complete_feeds, served_family
from kiln.pipeline.denoise import ModelConstants, generate_request
from kiln.pipeline.engines import Engines
from kiln.pipeline.schedulers import make_scheduler
from kiln.pipeline.request import (PROMPT_SIDES, TXT2IMG_INPUTS, Defaults, Limits, parse_request, text_field,
                                   token_names, token_tensors)

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


class RowCache:
    """Outputs per input row, least recently used dropped beyond `max_bytes`. Only what a successful
    run returned is ever stored, so an error is never replayed (Triton's response cache did that)."""

    def __init__(self, max_bytes: int):
        from collections import OrderedDict

        self.rows: OrderedDict[bytes, dict[str, np.ndarray]] = OrderedDict()
        self.max_bytes, self.bytes, self.hits, self.misses = max_bytes, 0, 0, 0

    def run(self, inputs: dict[str, np.ndarray], compute, salt: bytes = b"") -> dict[str, np.ndarray]:
        """`compute(inputs restricted to the rows not cached)` -> their outputs; returns every row's.
        `salt` sets apart rows computed under different conditions (a request's LoRA adapters)."""
        count = len(next(iter(inputs.values())))
        keys = [b"".join([salt, b"\0", *(np.ascontiguousarray(v[i]).tobytes() for v in inputs.values())])
                for i in range(count)]
        missing = [i for i, key in enumerate(keys) if key not in self.rows]
        self.hits += count - len(missing)
        self.misses += len(missing)
        fresh = compute({k: v[missing] for k, v in inputs.items()}) if missing else {}
        found = {i: {k: v[j] for k, v in fresh.items()} for j, i in enumerate(missing)}
        for i, key in enumerate(keys):
            if i not in found:
                found[i] = self.rows[key]
                self.rows.move_to_end(key)
        for i in missing:
            self.put(keys[i], found[i])
        names = list(found[0])
        return {name: np.stack([found[i][name] for i in range(count)]) for name in names}

    def put(self, key: bytes, row: dict[str, np.ndarray]) -> None:
        if key in self.rows:
            return
        size = sum(v.nbytes for v in row.values())
        if size > self.max_bytes:
            return
        self.rows[key] = {k: v.copy() for k, v in row.items()}
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, dropped = self.rows.popitem(last=False)
            self.bytes -= sum(v.nbytes for v in dropped.values())


EMBEDDING_CACHE_BYTES = 256 << 20


ADAPTER_FEED_SETS = 4  # the last adapter sets' feeds kept built (a request's every step reuses its own)


def _triton():
    """triton_adapter when Triton runs this model; None in-process (tests), where
    triton_python_backend_utils cannot be imported."""
    try:
        from kiln.model_repository import triton_adapter
    except ImportError:
        return None
    return triton_adapter


def log_line(message: str) -> None:
    """A line in Triton's log when Triton runs this model, in this module's log otherwise."""
    triton = _triton()
    if triton is None:
        log.info("%s", message)
    else:
        triton.log_info(message)


class OnnxComponentModel:
    """One exported component on ONNX Runtime. Each request's inputs are checked against the spec
    (internal models are reachable by any client); the valid requests Triton batched run as one call
    per LoRA adapter set (kiln.pipeline.adapters), through the row cache when the spec asks for one."""

    def __init__(self, version_dir: Path, settings: dict):
        from kiln.export.specs import ModelDims

        self.spec = served_family(settings).spec(settings["component"])
        self.session = self.open_session(Path(version_dir), settings)
        self.dims = ModelDims(**settings["dims"]) if "dims" in settings else None
        self.limits = Limits(**settings["limits"]) if "limits" in settings else Limits()
        self.cache = RowCache(EMBEDDING_CACHE_BYTES) if self.spec.cache_outputs else None
        self.layers = self.session.layers  # None: exported without LoRA inputs
        self.repository = Path(version_dir).parent.parent
        self.store = None
        from collections import OrderedDict

        self.feed_sets: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
        self.warm_up()

    def warm_up(self) -> None:
        """One call at load on small inputs (batch 1, 8x8 latents), straight to the engine (the cache
        stays empty): session set-up, first allocations and any torch.compile happen here, not in the
        first request. Logged with its time."""
        if self.dims is None:
            return
        from kiln.export.specs import WARMUP_POINT, dummy_inputs

        began = time.perf_counter()
        self.session.run(dummy_inputs(self.spec, WARMUP_POINT, self.dims))
        log_line(f"{self.spec.name}: warmed up at load in {1000 * (time.perf_counter() - began):.0f} ms")

    def open_session(self, version_dir: Path, settings: dict):
        from kiln.pipeline.onnx_session import ComponentSession

        # No memory arena: one large request (1024x1024, four images) grew ONNX Runtime's arena to 9 GB
        # and kept it; without one, large blocks go back to the system when the request is done.
        return ComponentSession(self.spec, version_dir / "model.onnx", int(settings.get("onnx_threads", 0)), arena=False)

    def adapters(self, feed: dict[str, np.ndarray | None]) -> str:
        """The request's adapter set (ids and scales as the pipeline resolved them), '' for none."""
        from kiln.pipeline.adapters import LORA_FIELD, format_selection, parse_resolved

        value = feed.get(LORA_FIELD)
        if value is None:
            return ""
        items = {item for item in np.asarray(value, dtype=object).reshape(-1)}
        if len(items) != 1 or not isinstance(next(iter(items)), bytes):
            raise RequestError(LORA_FIELD, f"<{len(items)} values>", "one adapter set per request (BYTES)")
        text = next(iter(items)).decode("utf-8", errors="replace")
        if len(text) > 4096:
            raise RequestError(LORA_FIELD, f"<{len(text)} characters>", "an adapter set as the pipeline writes it")
        pairs = parse_resolved(text)
        if pairs and self.layers is None:
            raise RequestError(LORA_FIELD, text[:80], f"nothing: this {self.spec.name} was exported without LoRA inputs "
                               "(kiln export onnx --lora-inputs)")
        return format_selection(pairs)

    def _store(self):
        from kiln.pipeline.adapters import REGISTRY_FOLDER, AdapterStore

        if self.store is None:
            self.store = AdapterStore([])
        # every served model's registry: ids name file contents, so any registry holding one will do
        self.store.folders = sorted(self.repository.glob(f"*/{REGISTRY_FOLDER}"))
        return self.store

    def touching(self, wire: str) -> str:
        """The adapters of a set that change this component ('' when none has layers here: a UNet-only
        LoRA leaves the text encoder, and its embedding cache, as the base's)."""
        from kiln.pipeline.adapters import format_selection, parse_resolved

        if not wire:
            return ""
        prefix = f"A.{self.spec.name}."
        store = self._store()
        return format_selection([(i, scale) for i, scale in parse_resolved(wire)
                                 if any(key.startswith(prefix) for key in store.get(i))])

    def adapter_feeds(self, wire: str) -> dict[str, np.ndarray]:
        """The lora_A/lora_B feeds of an adapter set, built once while the set stays recent."""
        from kiln.pipeline.adapters import adapter_feeds, parse_resolved

        if wire in self.feed_sets:
            self.feed_sets.move_to_end(wire)
            return self.feed_sets[wire]
        store = self._store()
        feeds = adapter_feeds(self.layers, [(store.get(i), scale) for i, scale in parse_resolved(wire)])
        self.feed_sets[wire] = feeds
        while len(self.feed_sets) > ADAPTER_FEED_SETS:
            self.feed_sets.popitem(last=False)
        return feeds

    def check(self, feed: dict[str, np.ndarray | None]) -> None:
        from kiln.export.specs import axes_problem, input_problem

        for t in self.spec.inputs:
            value = feed.get(t.name)
            if value is None:
                if t.optional:  # zeros (a UNet's ControlNet residuals when no ControlNet acts)
                    continue
                raise RequestError(t.name, None, f"the input {t.name} of {self.spec.name}")
            problem = input_problem(t, value, self.dims, self.limits) if self.dims else None
            if problem:
                raise RequestError(t.name, f"<{value.dtype} {list(value.shape)}>", problem)
        problem = axes_problem(self.spec, feed, self.dims)
        if problem:
            raise RequestError(self.spec.name, "<inputs>", f"inputs of agreeing sizes: {problem}")

    def run(self, feeds: list[dict[str, np.ndarray]], adapters: str = "") -> list[dict[str, np.ndarray]]:
        """Requests that share one adapter set ('' for none) as one batch."""
        merged, sizes = batch_feeds(self.spec, [complete_feeds(self.spec, f) for f in feeds])
        extra = self.adapter_feeds(adapters) if adapters else {}

        def compute(inputs):
            return self.session.run({**inputs, **extra})

        outputs = self.cache.run(merged, compute, adapters.encode()) if self.cache else compute(merged)
        return split_outputs(outputs, sizes)

    def execute(self, requests):
        from kiln.model_repository import triton_adapter as triton
        from kiln.pipeline.adapters import LORA_FIELD

        responses: list = [None] * len(requests)
        groups: dict[str, list] = {}  # adapter set -> [(request index, feed)]
        names = self.spec.input_names + [LORA_FIELD]
        for i, request in enumerate(requests):
            feed = triton.read_inputs(request, names)
            try:
                self.check(feed)
                adapters = self.touching(self.adapters(feed))
            except Exception as exc:  # a bad request, or a damaged adapter file: this request fails alone
                if not isinstance(exc, RequestError):
                    log.warning("%s: %s", self.spec.name, exc)
                responses[i] = triton.fail(exc)
                continue
            groups.setdefault(adapters, []).append((i, feed))
        for adapters, members in groups.items():
            valid = [i for i, _ in members]
            hits = self.cache.hits if self.cache else 0
            try:
                for i, out in zip(valid, self.run([f for _, f in members], adapters)):
                    bad = [k for k, v in out.items() if v.dtype.kind == "f" and not np.isfinite(v).all()]
                    responses[i] = triton.fail(GenerationError(f"{self.spec.name}: {bad} came out non-finite (NaN or inf)",
                                                               hint="inputs (or adapter scales) this large overflow the model")) \
                        if bad else triton.respond(out)
            except Exception as exc:  # one bad batch must not take the instance down
                if not isinstance(exc, RequestError):
                    log.exception("%s failed", self.spec.name)
                for i in valid:
                    responses[i] = triton.fail(exc)
            if self.cache:
                self.count_cache(self.cache.hits - hits)
        return responses

    def count_cache(self, hits: int) -> None:
        """kiln_embedding_cache_hits on Triton's metrics endpoint (made at the first batch, at 0)."""
        from kiln.model_repository import triton_adapter as triton

        name = "kiln_embedding_cache_hits"
        triton.count(name, COMPONENT_METRICS[name], {"model": self.spec.name}, hits)

    def finalize(self):
        self.session = None


class TorchComponentModel(OnnxComponentModel):
    """One component as its PyTorch module (`kiln repo build --backend torch`): the same checks, batching
    and embedding cache as on ONNX Runtime; only the engine differs (model_repository.torch_backend)."""

    def open_session(self, version_dir: Path, settings: dict):
        from kiln.model_repository.torch_backend import load_component

        session = load_component(self.spec, version_dir, settings)
        log_line(session.description)
        return session


class OpenVinoComponentModel(OnnxComponentModel):
    """One component on OpenVINO's CPU plugin in f32, reading the same ONNX file (`kiln repo build
    --backend openvino`): the same checks, batching, adapters and embedding cache as on ONNX Runtime."""

    def open_session(self, version_dir: Path, settings: dict):
        from kiln.pipeline.openvino_runner import open_component

        session = open_component(self.spec, version_dir / "model.onnx", int(settings.get("onnx_threads", 0)))
        log_line(session.description)
        return session


class TokenizerModel:
    """Prompt text -> weighted 77-token chunks for each text encoder's tokenizer (SDXL has two), prompt
    and negative prompt padded to the same count. Every limit is checked before the work it bounds:
    bytes before decoding, characters before parsing, chunks before tokenizing, tokens before
    building arrays."""

    def __init__(self, version_dir: Path, settings: dict):
        from kiln.pipeline.prompts import load_tokenizer

        folders = settings.get("tokenizers") or [settings["tokenizer"]]
        self.tokenizers = [load_tokenizer(version_dir / folder) for folder in folders]
        self.limits = Limits(**settings["limits"]) if "limits" in settings else Limits()

    def run(self, prompt: np.ndarray | None, negative: np.ndarray | None) -> dict[str, np.ndarray]:
        from kiln.pipeline.prompt_weights import tokenize_prompts

        if prompt is None:
            raise RequestError("prompt", None, "non-empty text (the prompt is required)")
        raw = dict(zip(PROMPT_SIDES, (prompt, negative)))
        sides = tokenize_prompts(self.tokenizers, *(text_field(raw, side, "", self.limits) for side in PROMPT_SIDES),
                                 self.limits)
        out = {}
        for side, per_encoder in zip(PROMPT_SIDES, sides, strict=True):
            for encoder, chunks in enumerate(per_encoder):
                ids, weights = token_names(side, encoder)
                out[ids], out[weights] = chunks.ids, chunks.weights
        return out

    def execute(self, requests):
        from kiln.model_repository import triton_adapter as triton

        responses = []
        for request in requests:
            raw = triton.read_inputs(request, PROMPT_SIDES)
            try:
                responses.append(triton.respond(self.run(*(raw[side] for side in PROMPT_SIDES))))
            except Exception as exc:
                responses.append(triton.fail(exc))
        return responses

    def finalize(self):
        pass


def checked_chunks(side: str, ids: np.ndarray | None, weights: np.ndarray | None, limits: Limits, vocab_size: int,
                   encoder: int = 0):
    """The tokenizer's output as the pipeline accepts it: a client may call the pipeline directly."""
    from kiln.pipeline.prompt_weights import MAX_WEIGHT, TokenChunks

    ids_name, weights_name = token_names(side, encoder)
    expected = f"token ids and weights of shape (1 to {limits.max_prompt_chunks}, 77), as the tokenizer model writes"
    if ids is None or weights is None or ids.shape != weights.shape or ids.ndim != 2:
        raise RequestError(ids_name, None if ids is None else f"shape {list(ids.shape)}", expected)
    if not 1 <= ids.shape[0] <= limits.max_prompt_chunks or ids.shape[1] != 77:
        raise RequestError(ids_name, f"shape {list(ids.shape)}", expected)
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise RequestError(ids_name, "<out of range>", f"token ids in [0, {vocab_size})")
    if not np.isfinite(weights).all() or np.abs(weights).max() > MAX_WEIGHT:
        raise RequestError(weights_name, "<out of range>", f"finite weights in [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}]")
    return TokenChunks(ids.astype(np.int32), weights.astype(np.float32))


class PipelineModel:
    """The denoising loop (BLS): validates the request, then runs Kiln's pipeline core."""

    def __init__(self, version_dir: Path, settings: dict, engines: Engines | None = None):
        self.scheduler_config = json.loads((version_dir / "scheduler" / "scheduler_config.json").read_text())
        self.constants = ModelConstants(**settings["constants"])
        self.defaults = Defaults(**settings["defaults"])
        self.limits = Limits(**settings["limits"])
        self.size_multiple = int(settings["size_multiple"])
        self.vocab_size = int(settings.get("vocab_size", 49408))
        self.family = served_family(settings)
        self.controlnets = tuple(name[len(CONTROLNET_PREFIX):] for name in self.family.controlnets)
        self.token_tensors = token_tensors(len(self.family.text_encoders))
        self.engines = engines
        self.component_models = settings.get("models") or {}
        self.device = settings.get("device")
        self.adapted = tuple(settings.get("adapted") or ())  # components exported with LoRA inputs
        self.registry = None
        if self.adapted:
            from kiln.pipeline.adapters import REGISTRY_FOLDER, Registry

            self.registry = Registry(Path(version_dir).parent / REGISTRY_FOLDER)
        self.model_name = settings.get("model", "this model")
        # A client calling this model directly (its cancellation reaches the loop; through the ensemble it
        # does not) sends the prompt without the tokenizer's outputs: the same tokenizer core runs here.
        self.tokenizer = TokenizerModel(version_dir, settings) if settings.get("tokenizers") else None
        if settings.get("engines"):  # tensorrt_plan components: refuse engines of another TensorRT or GPU, clearly
            from kiln.export.engine_runtime import check_served_engines

            check_served_engines(settings["engines"], self.device, self.model_name)
        self._warm_up()
        triton = _triton()
        if triton is not None:  # counters exported from load, before the first generation
            triton.declare(LOOP_METRICS, {"model": self.model_name})

    def _warm_up(self) -> None:
        """Do at load what a first request would otherwise pay for: import every scheduler class and
        run torch's first random draw (each of several loop instances would pay it once)."""
        import torch

        from kiln.pipeline.schedulers import SCHEDULERS

        for name in ("default", *SCHEDULERS):
            make_scheduler(name, self.scheduler_config, self.family.name).set_timesteps(2)
        torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))

    def adapter_set(self, raw: dict[str, np.ndarray | None]) -> str:
        """The request's `loras`, resolved to the registry's adapter ids ('' for none)."""
        from kiln.pipeline.adapters import LORA_FIELD, parse_selection

        pairs = parse_selection(text_field(raw, LORA_FIELD, "", self.limits))
        if not pairs:
            return ""
        if self.registry is None:
            raise RequestError(LORA_FIELD, format_pairs(pairs), f"nothing: {self.model_name} was exported without LoRA "
                               "inputs (serve an export made with kiln export onnx --lora-inputs, or make deploy LORAS=1)")
        return self.registry.resolve(pairs, self.model_name)

    def run(self, raw: dict[str, np.ndarray | None], engines: Engines,
            cancelled: Callable[[], bool] | None = None, tally: LoopTally | None = None) -> dict[str, np.ndarray]:
        """`cancelled()`: whether the client went away or its deadline passed (Triton's is_cancelled),
        asked after each denoising step: the generation stops there and frees the UNet. `tally` counts
        the steps run (and, when `engines` runs through a LoopMeter sharing it, the UNet's work)."""
        conditioned = "time_ids" in self.family.spec("unet").input_names
        request = parse_request(raw, self.defaults, self.limits, self.size_multiple, conditioned, self.controlnets)
        adapters = self.adapter_set(raw)
        if adapters:
            engines = Engines(engines.run.with_adapters(adapters, self.adapted), engines.components, engines.family)
        if self.tokenizer is not None and all(raw.get(name) is None for name in self.token_tensors):
            raw = {**raw, **self.tokenizer.run(raw.get("prompt"), raw.get("negative_prompt"))}
        chunks = {}
        for side in PROMPT_SIDES:
            for encoder in range(len(self.family.text_encoders)):
                ids, weights = (raw.get(name) for name in token_names(side, encoder))
                if ids is not None and weights is not None and ids.ndim == 3 and ids.shape[0] == 1:
                    ids, weights = ids[0], weights[0]  # the batch dimension Triton adds
                chunks[side, encoder] = checked_chunks(side, ids, weights, self.limits, self.vocab_size, encoder)
        first = next(iter(chunks))
        for key, value in chunks.items():
            if value.ids.shape != chunks[first].ids.shape:
                raise RequestError(token_names(*key)[0], f"shape {list(value.ids.shape)}",
                                   f"as many chunks as {token_names(*first)[0]}, {list(chunks[first].ids.shape)}")
        prompt, negative = (tuple(chunks[side, e] for e in range(len(self.family.text_encoders))) for side in PROMPT_SIDES)
        images = generate_request(engines, request, self.scheduler_config, self.constants, prompt, negative,
                                  self.size_multiple, on_step=step_callback(cancelled, tally))
        return {"image": images, "seeds": np.array(request.seeds, dtype=np.int64)}

    def execute(self, requests):
        from kiln.model_repository import triton_adapter as triton

        engines = self.engines or Engines(triton.BlsRunner(self.component_models, self.device), family=self.family)
        names = list(self.token_tensors) + [f.name for f in TXT2IMG_INPUTS]  # `loras` is one of them
        responses = []
        labels = {"model": self.model_name}
        for request in requests:
            tally = LoopTally()
            metered = Engines(LoopMeter(engines.run, tally), engines.components, engines.family)
            try:
                outputs = self.run(triton.read_inputs(request, names), metered, cancelled=triton.cancellation(request),
                                   tally=tally)
                responses.append(triton.respond(outputs))
                for name, value in tally.published(len(outputs["image"])).items():
                    triton.count(name, LOOP_METRICS[name], labels, value)
            except Cancelled as exc:
                triton.log_info(f"pipeline: {exc}")
                triton.count("kiln_cancelled_requests", LOOP_METRICS["kiln_cancelled_requests"], labels)
                responses.append(triton.fail(exc))
            except Exception as exc:
                if not isinstance(exc, RequestError):
                    log.exception("pipeline failed")
                responses.append(triton.fail(exc))
        return responses

    def finalize(self):
        pass


class LoopTally:
    """One generation's work, for the loop metrics (serving.metrics.LOOP_METRICS)."""

    def __init__(self):
        self.steps = self.unet_calls = self.unet_rows = 0
        self.unet_seconds = 0.0

    def published(self, images: int) -> dict[str, float]:
        return {"kiln_generations": 1, "kiln_generation_steps": self.steps, "kiln_generation_images": images,
                "kiln_unet_calls": self.unet_calls, "kiln_unet_rows": self.unet_rows,
                "kiln_unet_ms": 1000 * self.unet_seconds}


class LoopMeter:
    """A runner around the loop's own: counts the UNet's calls, batch rows and time into a LoopTally,
    passing everything else (device, adapters) through."""

    def __init__(self, run, tally: LoopTally):
        self.inner, self.tally = run, tally

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def with_adapters(self, *args) -> "LoopMeter":
        return LoopMeter(self.inner.with_adapters(*args), self.tally)

    def __call__(self, spec, feeds: dict, outputs: list[str]) -> dict:
        if spec.name != "unet":
            return self.inner(spec, feeds, outputs)
        began = time.perf_counter()
        out = self.inner(spec, feeds, outputs)
        self.tally.unet_seconds += time.perf_counter() - began
        self.tally.unet_calls += 1
        self.tally.unet_rows += int(feeds["sample"].shape[0])
        return out


def step_callback(cancelled: Callable[[], bool] | None, tally: LoopTally | None) -> Callable[[int, int], None] | None:
    """After each step: count it, and stop if the request was cancelled."""
    if cancelled is None and tally is None:
        return None
    stop = stop_when(cancelled) if cancelled else None

    def on_step(step: int, steps: int) -> None:
        if tally is not None:
            tally.steps = step
        if stop is not None:
            stop(step, steps)

    return on_step


def stop_when(cancelled: Callable[[], bool]) -> Callable[[int, int], None]:
    """A step callback that raises Cancelled once `cancelled()` says so."""

    def on_step(step: int, steps: int) -> None:
        if cancelled():
            raise Cancelled(f"request cancelled by its client (or its deadline passed) after step {step} of {steps}: "
                            f"{steps - step} denoising steps not run")

    return on_step


def format_pairs(pairs) -> str:
    return ",".join(f"{name}:{scale:g}" for name, scale in pairs)


KINDS = {"onnx_component": OnnxComponentModel, "torch_component": TorchComponentModel,
         "openvino_component": OpenVinoComponentModel, "tokenizer": TokenizerModel,
         "pipeline": PipelineModel}


def create(args: dict):
    """Build the core named by the model config's `kiln_model` parameter (Triton's initialize args)."""
    config = json.loads(args["model_config"])
    parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
    version_dir = Path(args["model_repository"]) / args["model_version"]
    settings = json.loads(parameters.get("kiln_settings", "{}"))
    if settings.get("device") == "cuda" and args.get("model_instance_kind") == "GPU":
        settings["device"] = f"cuda:{args.get('model_instance_device_id', 0)}"  # this instance's GPU
    return KINDS[parameters["kiln_model"]](version_dir, settings)
