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


@pytest.mark.triton
@pytest.mark.slow  # 150-step generations
def test_a_generation_whose_deadline_passes_stops_at_the_next_step_and_frees_the_unet(triton):
    """The denoising loop asks Triton after each step whether its request was cancelled. Through the
    txt2img ensemble Triton 2.51 does not pass a cancellation on to a composing model already running
    (README, Known limits), so a client that may cancel sends txt2img's request to `pipeline`, which
    tokenizes the prompt itself and draws the same image."""
    import numpy as np

    from kiln.errors import ClientError

    info = triton()
    metrics_url = f"http://{info.reach}:{info.ports.metrics}/metrics"
    request = dict(steps=STEPS, height=SIZE, width=SIZE, seed=1, scheduler="euler")
    before = settled(metrics_url)
    began = time.perf_counter()
    with KilnClient(info.grpc_url, "grpc", model="pipeline") as direct:
        image = direct.generate("a (red:1.2) digit 7", negative_prompt="blurry", **request).images
    full_s = time.perf_counter() - began
    full = settled(metrics_url) - before
    assert full == STEPS  # one UNet execution a step (prompt and negative in one batch of 2)
    with KilnClient(info.http_url, "http") as public:  # the ensemble's tokenizer and the loop's own: one image
        assert np.array_equal(public.generate("a (red:1.2) digit 7", negative_prompt="blurry", **request).images, image)
    full_with_ensemble = settled(metrics_url) - before
    cancelled_before = metric(metrics_url, "kiln_cancelled_requests")

    with KilnClient(info.grpc_url, "grpc", model="pipeline", timeout_s=full_s / 5) as impatient:
        with pytest.raises(ClientError, match="Deadline"):
            impatient.generate("a red digit 7", **request)
    ran = settled(metrics_url) - before - full_with_ensemble
    print(f"UNet executions: {full:.0f} run to the end ({full_s:.1f} s), {ran:.0f} cancelled after {full_s / 5:.1f} s")
    assert ran < STEPS / 2, f"a generation cancelled at a fifth of its time still ran {ran} of {STEPS} UNet steps"
    assert metric(metrics_url, "kiln_cancelled_requests") == cancelled_before + 1
    assert "request cancelled by its client" in Path(info.log_file).read_text()
    with KilnClient(info.grpc_url, "grpc") as served:  # the server goes on serving
        assert served.generate("a red digit 7", seed=1, steps=2).images.shape[0] == 1
    with KilnClient(info.http_url, "http", model="pipeline") as direct:  # over HTTP too, several images a request
        assert direct.generate("a red digit 7", seed=1, steps=2, num_images=2).seeds == [1, 2]


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
