"""Triton model configs built as `model_config.proto` messages (the schema tritonclient ships) from
the component specs and the txt2img request spec, then written as config.pbtxt."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from kiln.export.specs import QDQ_PRECISION, ComponentSpec, ModelDims, config_dims
from kiln.pipeline.request import TXT2IMG_INPUTS, TXT2IMG_OUTPUTS, token_tensors

NUMPY_TO_TRITON = {"float32": mc.TYPE_FP32, "float16": mc.TYPE_FP16, "int32": mc.TYPE_INT32, "int64": mc.TYPE_INT64}
WIRE_TO_TRITON = {
    "BYTES": mc.TYPE_STRING,
    "INT32": mc.TYPE_INT32,
    "INT64": mc.TYPE_INT64,
    "FP32": mc.TYPE_FP32,
    "UINT8": mc.TYPE_UINT8,
}


ORT_ACCELERATORS = ("cuda", "tensorrt")  # ngc target, onnxruntime backend: CUDA alone, or ORT's TensorRT provider


@dataclass(frozen=True)
class Tuning:
    """Knobs the repository builder exposes; the defaults are what this machine runs best."""

    max_batch_size: int = 16
    max_queue_delay_us: int = 0  # paid at every denoising step of the BLS loop: keep near zero
    component_instances: int = 1
    tokenizer_instances: int = 2  # a slow prompt (at most ~10 ms within the limits) never queues the others behind it
    pipeline_instances: int = 4  # BLS loops: measured best on 2 cores (4 concurrent: 1.6x their sequential rate)
    max_queue: int = 16  # generations waiting beyond this are refused at once ("Exceeds maximum queue size")
    onnx_threads: int = 0  # 0: ONNX Runtime's own choice
    ort_accelerator: str = "cuda"  # ngc target, onnxruntime backend: cuda | tensorrt (ORT's TensorRT provider)


def _parameters(config: mc.ModelConfig, values: dict[str, str]) -> None:
    for key, value in values.items():
        config.parameters[key].string_value = value


def _tensor(message, name: str, data_type: int, dims: list[int], optional: bool = False):
    message.name = name
    message.data_type = data_type
    if dims:
        message.dims.extend(dims)
    else:  # a per-item scalar: Triton wants [1] on the wire, the model sees [batch]
        message.dims.append(1)
        message.reshape.SetInParent()
    if optional:
        message.optional = True
    return message


def _component(config: mc.ModelConfig, spec: ComponentSpec, dims: ModelDims, tuning: Tuning, kind: int,
               optional_inputs: bool = False) -> mc.ModelConfig:
    """What every target's component model shares: tensors from the spec, dynamic batching and the
    instance group. No response cache: Triton's replays a failed request as an empty success.
    `optional_inputs`: the spec's optional inputs may be left out (Kiln's own core fills them with
    zeros; a native backend needs every graph input, so the pipeline sends them there)."""
    for t in spec.inputs:
        _tensor(config.input.add(), t.name, NUMPY_TO_TRITON[t.dtype], config_dims(t, dims),
                optional=optional_inputs and t.optional)
    for t in spec.outputs:
        _tensor(config.output.add(), t.name, NUMPY_TO_TRITON[t.dtype], config_dims(t, dims))
    config.dynamic_batching.max_queue_delay_microseconds = tuning.max_queue_delay_us
    config.instance_group.add(kind=kind, count=tuning.component_instances)
    return config


def component_config(spec: ComponentSpec, dims: ModelDims, tuning: Tuning, settings: dict,
                     adapted: bool = False, engine: str = "onnx_component") -> mc.ModelConfig:
    """A Python-backend model running one exported component: on ONNX Runtime, with `engine`
    "torch_component" its PyTorch module, with "openvino_component" on OpenVINO (same tensors and
    batching); `adapted`: exported with LoRA
    inputs, it also takes a request's adapter set (optional)."""
    config = _component(mc.ModelConfig(name=spec.name, backend="python", max_batch_size=tuning.max_batch_size),
                        spec, dims, tuning, mc.ModelInstanceGroup.KIND_CPU, optional_inputs=True)
    if adapted:
        from kiln.pipeline.adapters import LORA_FIELD

        _tensor(config.input.add(), LORA_FIELD, mc.TYPE_STRING, [1], optional=True)
    _parameters(config, {"kiln_model": engine, "kiln_settings": json.dumps(settings)})
    return config


NGC_PLATFORMS = {"onnxruntime": ("onnxruntime_onnx", "model.onnx"), "tensorrt": ("tensorrt_plan", "model.plan")}


def trt_precision_mode(spec: ComponentSpec, exported_precision: str) -> str:
    """ONNX Runtime's TensorRT accelerator takes one precision per model: INT8 for a calibrated Q/DQ
    export (TensorRT keeps its scales; the layers between run fp32), else FP16 except for the VAE."""
    if exported_precision == QDQ_PRECISION:
        return "INT8"
    return "FP16" if spec.reduced_precision else "FP32"


def ngc_component_config(spec: ComponentSpec, dims: ModelDims, tuning: Tuning, backend: str,
                         exported_precision: str = "fp32", name: str | None = None) -> mc.ModelConfig:
    """One component on the NGC container's native backend, on the GPU, batched across requests.

    onnxruntime: the CUDA execution provider, with TensorRT as its accelerator when `tuning.ort_accelerator`
    is "tensorrt" (see trt_precision_mode, engine cache on disk); tensorrt: a `kiln export trt` engine."""
    platform, filename = NGC_PLATFORMS[backend]
    name = name or spec.name  # the Triton model's name: several models' UNets each get their own
    config = _component(mc.ModelConfig(name=name, platform=platform, max_batch_size=tuning.max_batch_size,
                                       default_model_filename=filename), spec, dims, tuning, mc.ModelInstanceGroup.KIND_GPU)
    if backend == "onnxruntime" and tuning.ort_accelerator == "tensorrt":
        accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        accelerator.parameters["precision_mode"] = trt_precision_mode(spec, exported_precision)
        accelerator.parameters["max_workspace_size_bytes"] = str(4 << 30)
        accelerator.parameters["trt_engine_cache_enable"] = "1"
        # one cache per Triton model: ONNX Runtime keys cached engines by graph, so two fine-tunes of one
        # architecture sharing a folder could load each other's engines (weights and all)
        accelerator.parameters["trt_engine_cache_path"] = f"/tmp/kiln-trt-cache/{name}"
    _warmup(config, spec, dims)
    return config


def _warmup(config: mc.ModelConfig, spec: ComponentSpec, dims: ModelDims) -> None:
    """Triton's model_warmup: one request of random data at WARMUP_POINT when the model loads, so the
    first client request pays no engine build or CUDA initialisation. Dims as the config declares them
    (the batch dimension is Triton's; a per-image scalar is [1], reshaped), -1 made concrete."""
    from kiln.export.specs import WARMUP_POINT, concrete_shape

    warmup = config.model_warmup.add(name=f"{spec.name}_warmup", batch_size=WARMUP_POINT.batch)
    declared = {t.name: list(t.dims) for t in config.input}
    for t in spec.inputs:
        shape = concrete_shape(t, WARMUP_POINT, dims)
        concrete = list(shape[1:] if t.shape and t.shape[0] == "batch" else shape)
        wanted = declared[t.name]
        data = warmup.inputs[t.name]
        data.data_type = NUMPY_TO_TRITON[t.dtype]
        data.dims.extend(concrete if len(concrete) == len(wanted) else wanted)  # [] per image is declared [1]
        if np.dtype(t.dtype).kind in "iu":
            data.zero_data = True  # token ids and sizes: zeros are always valid, random integers may not be
        else:
            data.random_data = True


def field_dims(field) -> list[int]:
    """A request field's wire shape: one value, or any number (one per ControlNet)."""
    return [-1] if field.many else [1]


def tokenizer_config(settings: dict, tuning: Tuning = Tuning(), encoders: int = 1) -> mc.ModelConfig:
    """Prompt text -> weighted 77-token chunks (see kiln.pipeline.prompt_weights), for each of
    `encoders` text encoders' tokenizers. Several instances, so one long prompt never holds up the others."""
    config = mc.ModelConfig(name="tokenizer", backend="python", max_batch_size=0)
    _tensor(config.input.add(), "prompt", mc.TYPE_STRING, [1], optional=True)  # required: checked by Kiln
    _tensor(config.input.add(), "negative_prompt", mc.TYPE_STRING, [1], optional=True)
    for name, wire in token_tensors(encoders).items():
        _tensor(config.output.add(), name, WIRE_TO_TRITON[wire], [-1, -1])
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=tuning.tokenizer_instances)
    _parameters(config, {"kiln_model": "tokenizer", "kiln_settings": json.dumps(settings)})
    return config


def pipeline_config(tuning: Tuning, settings: dict, gpu: bool = False, encoders: int = 1) -> mc.ModelConfig:
    """The BLS model: the denoising loop around text_encoder, unet and vae_decoder. It takes txt2img's
    inputs with the tokenizer's outputs (the ensemble's second step) or without them (a client calling
    it directly, whose cancellation Triton passes to the loop, unlike the ensemble's).

    Batch size 1 only so that it may have a queue policy: requests beyond `max_queue` waiting for an
    instance are rejected rather than left to pile up. Triton adds a leading 1 to its inputs.
    On the GPU its instances sit on the GPU and BLS outputs stay there (FORCE_CPU_ONLY_INPUT_TENSORS
    off): the loop hands latents to the UNet through DLPack without copies to the host."""
    config = mc.ModelConfig(name="pipeline", backend="python", max_batch_size=1)
    config.dynamic_batching.max_queue_delay_microseconds = 0
    policy = config.dynamic_batching.default_queue_policy
    policy.max_queue_size = tuning.max_queue
    policy.timeout_action = mc.ModelQueuePolicy.REJECT
    policy.allow_timeout_override = True  # a client may bound its own wait (request timeout)
    for name, wire in token_tensors(encoders).items():  # the ensemble's tokenizer sends them; without them the
        _tensor(config.input.add(), name, WIRE_TO_TRITON[wire], [-1, -1], optional=True)  # loop tokenizes itself
    for field in TXT2IMG_INPUTS:  # the prompts too: the pipeline validates the whole request
        _tensor(config.input.add(), field.name, WIRE_TO_TRITON[field.datatype], field_dims(field), optional=True)
    for name, wire, shape in TXT2IMG_OUTPUTS:
        _tensor(config.output.add(), name, WIRE_TO_TRITON[wire], shape)
    kind = mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU
    config.instance_group.add(kind=kind, count=tuning.pipeline_instances)
    parameters = {"kiln_model": "pipeline", "kiln_settings": json.dumps(settings)}
    if settings.get("device"):
        parameters["FORCE_CPU_ONLY_INPUT_TENSORS"] = "no"
    _parameters(config, parameters)
    return config


def txt2img_config(name: str = "txt2img", tokenizer: str = "tokenizer", pipeline: str = "pipeline",
                   encoders: int = 1) -> mc.ModelConfig:
    """The public entry point: an ensemble of tokenizer -> pipeline (`encoders`: the family's text encoders)."""
    config = mc.ModelConfig(name=name, platform="ensemble", max_batch_size=0)
    for field in TXT2IMG_INPUTS:
        _tensor(config.input.add(), field.name, WIRE_TO_TRITON[field.datatype], field_dims(field), optional=True)
    for name, wire, shape in TXT2IMG_OUTPUTS:
        _tensor(config.output.add(), name, WIRE_TO_TRITON[wire], shape)
    tokenize = config.ensemble_scheduling.step.add(model_name=tokenizer, model_version=-1)
    tokenize.input_map["prompt"] = "prompt"
    tokenize.input_map["negative_prompt"] = "negative_prompt"
    for name in token_tensors(encoders):
        tokenize.output_map[name] = name
    denoise = config.ensemble_scheduling.step.add(model_name=pipeline, model_version=-1)
    for name in token_tensors(encoders):
        denoise.input_map[name] = name
    for field in TXT2IMG_INPUTS:
        denoise.input_map[field.name] = field.name
    for name, _, _ in TXT2IMG_OUTPUTS:
        denoise.output_map[name] = name
    return config


def to_pbtxt(config: mc.ModelConfig) -> str:
    return text_format.MessageToString(config)


def parse_pbtxt(text: str) -> mc.ModelConfig:
    """Parse with Triton's own schema: unknown fields or wrong types raise ParseError."""
    return text_format.Parse(text, mc.ModelConfig())
