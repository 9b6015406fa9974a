"""The one module that imports triton_python_backend_utils: requests in, responses out, BLS calls.
Everything else in the Python-backend models is plain numpy/torch and unit-tested without Triton."""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from kiln.errors import KilnError, RequestError


class BlsError(KilnError):
    """A model called from the BLS loop answered with an error."""


def read_inputs(request, names) -> dict[str, np.ndarray | None]:
    out = {}
    for name in names:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        out[name] = None if tensor is None else tensor.as_numpy()
    return out


def respond(outputs: dict[str, np.ndarray]):
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, np.ascontiguousarray(v)) for k, v in outputs.items()])


def _error(message: str, invalid_argument: bool):
    code_enum = getattr(pb_utils.TritonError, "INVALID_ARG" if invalid_argument else "INTERNAL", None)
    return pb_utils.TritonError(message) if code_enum is None else pb_utils.TritonError(message, code_enum)


def fail(exc: BaseException):
    """An error response: INVALID_ARG for a bad request, INTERNAL for anything else."""
    invalid = isinstance(exc, RequestError)
    message = str(exc) if isinstance(exc, KilnError) else f"{type(exc).__name__}: {exc}"
    if getattr(exc, "hint", None):
        message = f"{message} ({exc.hint})"
    return pb_utils.InferenceResponse(error=_error(message, invalid))


class Counter:
    """A counter on Triton's metrics endpoint (the Python backend's custom metrics). Holds its family:
    Triton refuses to count on a metric whose family was deleted."""

    def __init__(self, name: str, description: str, labels: dict[str, str]):
        self.family = pb_utils.MetricFamily(name=name, description=description, kind=pb_utils.MetricFamily.COUNTER)
        self.metric = self.family.Metric(labels=labels)

    def increment(self, value: float) -> None:
        self.metric.increment(value)


def _to_triton(name: str, value):
    """numpy -> a host tensor; torch -> shared through DLPack (stays on its device)."""
    if isinstance(value, np.ndarray):
        return pb_utils.Tensor(name, np.ascontiguousarray(value))
    from torch.utils.dlpack import to_dlpack

    return pb_utils.Tensor.from_dlpack(name, to_dlpack(value.contiguous()))


def _from_triton(tensor, device):
    if device is None:
        return tensor.as_numpy()
    import torch
    from torch.utils.dlpack import from_dlpack

    return from_dlpack(tensor.to_dlpack()).to(torch.device(device))


def infer(model_name: str, inputs: dict, output_names: list[str], device: str | None = None) -> dict:
    """A synchronous BLS call; raises BlsError carrying the callee's own message. With `device`, the
    outputs come back as torch tensors there (DLPack, no host copy when Triton left them on the GPU)."""
    request = pb_utils.InferenceRequest(
        model_name=model_name,
        requested_output_names=output_names,
        inputs=[_to_triton(k, v) for k, v in inputs.items()],
    )
    response = request.exec()
    if response.has_error():
        raise BlsError(f"{model_name}: {response.error().message()}")
    return {name: _from_triton(pb_utils.get_output_tensor_by_name(response, name), device) for name in output_names}


class BlsEngines:
    """The pipeline core's engines, each one call to a model in the same Triton server. `models` maps
    a component to the Triton model serving it (shared between pipelines when the weights are the same);
    with `device` the core hands torch tensors on that device (see kiln.pipeline.denoise.Engines)."""

    def __init__(self, models: dict[str, str] | None = None, device: str | None = None):
        self.models = {c: c for c in ("text_encoder", "unet", "vae_decoder", "vae_encoder")} | (models or {})
        self.device = device

    def encode_text(self, input_ids: np.ndarray) -> np.ndarray:
        return infer(self.models["text_encoder"], {"input_ids": input_ids}, ["last_hidden_state"])["last_hidden_state"]

    def predict_noise(self, sample, timestep, embeddings):
        feeds = {"sample": sample, "timestep": timestep.reshape(-1, 1), "encoder_hidden_states": embeddings}
        return infer(self.models["unet"], feeds, ["out_sample"], self.device)["out_sample"]

    def decode_latents(self, latents):
        return infer(self.models["vae_decoder"], {"latent_sample": latents}, ["sample"], self.device)["sample"]

    def encode_image(self, pixels):
        return infer(self.models["vae_encoder"], {"sample": pixels}, ["latent_parameters"], self.device)["latent_parameters"]
