"""A generation whose client goes away stops at the next denoising step: over the real Triton, a gRPC
client whose deadline passes mid-generation frees the UNet (its executions counted on the metrics
endpoint, against the same request run to the end), and the server goes on serving."""

import time
import urllib.request
from pathlib import Path

import pytest

from kiln.clients.client import KilnClient

STEPS = 150
SIZE = 128  # the tiny model at 128 px: 150 steps take seconds, long enough to cancel in the middle


def unet_executions(metrics_url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "nv_inference_request_success":
            return sum(s.value for s in family.samples if s.labels.get("model") == "unet")
    return 0.0


def metric(metrics_url: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name in (name, f"{name}_total"))


def settled(metrics_url: str, wait_s: float = 1.0, limit_s: float = 60.0) -> float:
    """The UNet's execution count once it stops moving."""
    last, deadline = unet_executions(metrics_url), time.monotonic() + limit_s
    while time.monotonic() < deadline:
        time.sleep(wait_s)
        now = unet_executions(metrics_url)
        if now == last:
            return now
        last = now
    raise AssertionError("the UNet kept running")


def pipeline_inputs(grpc_url: str, prompt: str, **fields) -> list:
    """The `pipeline` model's inputs as the txt2img ensemble builds them: the tokenizer's outputs, the prompt
    and the request's fields, each with the batch dimension of one request."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    from kiln.pipeline.request import NUMPY_DTYPES, TXT2IMG_INPUTS

    client = grpcclient.InferenceServerClient(grpc_url)
    text = grpcclient.InferInput("prompt", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
    tokens = client.infer("tokenizer", [text])
    inputs = []
    for output in tokens.get_response(as_json=True)["outputs"]:
        array = tokens.as_numpy(output["name"])[None]
        tensor = grpcclient.InferInput(output["name"], list(array.shape), output["datatype"])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    types = {f.name: f.datatype for f in TXT2IMG_INPUTS}
    for name, value in {"prompt": prompt.encode(), **fields}.items():
        array = np.array([[value]], dtype=NUMPY_DTYPES[types[name]])
        tensor = grpcclient.InferInput(name, [1, 1], types[name])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


@pytest.mark.triton
@pytest.mark.slow  # 150-step generations
def test_a_generation_whose_deadline_passes_stops_at_the_next_step_and_frees_the_unet(triton):
    """The denoising loop asks Triton after each step whether its request was cancelled. Through the
    txt2img ensemble Triton 2.51 does not pass a cancellation on to a composing model already running
    (README, Known limits), so this drives the loop's own model, as a BLS caller or Triton would."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    info = triton()
    metrics_url = f"http://{info.reach}:{info.ports.metrics}/metrics"
    client = grpcclient.InferenceServerClient(info.grpc_url)
    request = dict(steps=STEPS, height=SIZE, width=SIZE, seed=1, scheduler=b"euler")
    before = settled(metrics_url)
    began = time.perf_counter()
    client.infer("pipeline", pipeline_inputs(info.grpc_url, "a red digit 7", **request))
    full_s = time.perf_counter() - began
    full = settled(metrics_url) - before
    assert full == STEPS  # one UNet execution a step (prompt and negative in one batch of 2)
    cancelled_before = metric(metrics_url, "kiln_cancelled_requests")

    with pytest.raises(InferenceServerException, match="Deadline"):
        client.infer("pipeline", pipeline_inputs(info.grpc_url, "a red digit 7", **request), client_timeout=full_s / 5)
    ran = settled(metrics_url) - before - full
    print(f"UNet executions: {full:.0f} run to the end ({full_s:.1f} s), {ran:.0f} cancelled after {full_s / 5:.1f} s")
    assert ran < STEPS / 2, f"a generation cancelled at a fifth of its time still ran {ran} of {STEPS} UNet steps"
    assert metric(metrics_url, "kiln_cancelled_requests") == cancelled_before + 1
    assert "request cancelled by its client" in Path(info.log_file).read_text()
    with KilnClient(info.grpc_url, "grpc") as served:  # the server goes on serving
        assert served.generate("a red digit 7", seed=1, steps=2).images.shape[0] == 1


def test_the_step_callback_stops_a_generation_once_cancelled():
    from kiln.errors import Cancelled
    from kiln.model_repository.python_models import stop_when

    asked = []
    on_step = stop_when(lambda: len(asked) >= 3 or asked.append(1))
    on_step(1, 10)
    on_step(2, 10)
    on_step(3, 10)
    with pytest.raises(Cancelled, match="after step 4 of 10: 6 denoising steps not run"):
        on_step(4, 10)
