"""The one module that imports triton_python_backend_utils: requests in, responses out, BLS calls.
Everything else in the Python-backend models is plain numpy/torch and unit-tested without Triton."""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from kiln.errors import Cancelled, KilnError, RequestError


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
    """An error response: INVALID_ARG for a bad request, CANCELLED for a cancelled one, INTERNAL for anything else."""
    invalid = isinstance(exc, RequestError)
    message = str(exc) if isinstance(exc, KilnError) else f"{type(exc).__name__}: {exc}"
    if getattr(exc, "hint", None):
        message = f"{message} ({exc.hint})"
    code = getattr(pb_utils.TritonError, "CANCELLED", None) if isinstance(exc, Cancelled) else None
    if code is not None:
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
    return pb_utils.InferenceResponse(error=_error(message, invalid))


def cancellation(request):
    """The request's is_cancelled (the client went away or its deadline passed), None where this
    Python backend has none."""
    return getattr(request, "is_cancelled", None)


def log_info(message: str) -> None:
    """A line in Triton's own log (the server's log file)."""
    pb_utils.Logger.log_info(message)


_COUNTERS: dict = {}


def count(name: str, description: str, labels: dict[str, str], value: float = 1) -> None:
    """Add `value` to a counter on Triton's metrics endpoint, its family made once per stub."""
    key = (name, tuple(sorted(labels.items())))
    if key not in _COUNTERS:
        _COUNTERS[key] = Counter(name, description, labels)
    if value:
        _COUNTERS[key].increment(value)


def declare(counters: dict[str, str], labels: dict[str, str]) -> None:
    """Make each counter (name -> description) now, at 0, so it is exported before its first event."""
    for name, description in counters.items():
        count(name, description, labels, 0)


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


class BlsRunner:
    """Runs a component as one BLS call to the Triton model serving it (kiln.pipeline.engines.Runner).
    `models` maps a component to that model (shared between pipelines when the weights are the same).
    Without `device`, tensors cross as host arrays; with it (the GPU target) they are shared through
    DLPack and stay on that device. Per-item scalars (a spec tensor of rank 1) travel as [batch, 1],
    as their Triton configs declare."""

    def __init__(self, models: dict[str, str] | None = None, device: str | None = None):
        import torch

        self.models = models or {}
        if self.models:
            self.components = tuple(self.models)  # what this pipeline's repository serves
        self.on_host = device is None
        self.device = torch.device(device or "cpu")
        self.adapters, self.adapted = "", ()

    def with_adapters(self, adapters: str, adapted) -> "BlsRunner":
        """This runner for one request whose `adapted` components also get its LoRA adapter set."""
        import copy

        runner = copy.copy(self)
        runner.adapters, runner.adapted = adapters, tuple(adapted)
        return runner

    def __call__(self, spec, feeds: dict, outputs: list[str]) -> dict:
        import torch

        from kiln.export.specs import complete_feeds

        if not self.on_host:  # a native backend needs every graph input: zeros for optional ones left out
            feeds = complete_feeds(spec, feeds)
        inputs = {}
        for t in spec.inputs:
            value = feeds.get(t.name)
            if value is None:  # optional, left out: the component fills it (kiln.export.specs.complete_feeds)
                continue
            value = value.reshape(-1, 1) if len(t.shape) == 1 else value
            inputs[t.name] = value.numpy() if self.on_host else value
        if self.adapters and spec.name in self.adapted:
            from kiln.pipeline.adapters import LORA_FIELD

            batch = len(feeds[spec.inputs[0].name])
            inputs[LORA_FIELD] = np.array([[self.adapters.encode()]] * batch, dtype=np.object_)
        result = infer(self.models.get(spec.name, spec.name), inputs, outputs, None if self.on_host else self.device)
        return {k: torch.from_numpy(v) if self.on_host else v for k, v in result.items()}
