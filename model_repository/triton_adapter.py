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
    return pb_utils.InferenceResponse(error=_error(message, invalid))


def infer(model_name: str, inputs: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
    """A synchronous BLS call; raises BlsError carrying the callee's own message."""
    request = pb_utils.InferenceRequest(
        model_name=model_name,
        requested_output_names=output_names,
        inputs=[pb_utils.Tensor(k, np.ascontiguousarray(v)) for k, v in inputs.items()],
    )
    response = request.exec()
    if response.has_error():
        raise BlsError(f"{model_name}: {response.error().message()}")
    return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in output_names}


class BlsEngines:
    """The pipeline core's engines, each one call to a model in the same Triton server."""

    def encode_text(self, input_ids: np.ndarray) -> np.ndarray:
        return infer("text_encoder", {"input_ids": input_ids}, ["last_hidden_state"])["last_hidden_state"]

    def predict_noise(self, sample, timestep, embeddings) -> np.ndarray:
        feeds = {"sample": sample, "timestep": timestep.reshape(-1, 1), "encoder_hidden_states": embeddings}
        return infer("unet", feeds, ["out_sample"])["out_sample"]

    def decode_latents(self, latents: np.ndarray) -> np.ndarray:
        return infer("vae_decoder", {"latent_sample": latents}, ["sample"])["sample"]

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        return infer("vae_encoder", {"sample": pixels}, ["latent_parameters"])["latent_parameters"]
