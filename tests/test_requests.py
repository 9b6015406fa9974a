"""The public txt2img endpoint as production users meet it: weighted and long prompts, several
images per request, img2img, the prompt-embedding cache, the protected model-control API, and
malformed requests that must neither break the server nor disturb anyone's image."""

import io
import random
import re
import threading
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from kiln.clients.client import KilnClient
from kiln.errors import ClientError
from kiln.serving import server

pytestmark = pytest.mark.triton
MAX_DIFF = 2


def client(info, protocol="http"):
    return KilnClient(info.http_url if protocol == "http" else info.grpc_url, protocol)


@pytest.fixture(scope="module")
def pipe(tiny_model):
    from kiln.pipeline.reference import load_diffusers_pipeline

    return load_diffusers_pipeline(tiny_model("epsilon"))


@pytest.mark.parametrize("prompt, negative", [
    ("a (red:1.6) digit [7] on a ((white)) background", "[blurry], (low quality:1.3)"),
    ("a red digit BREAK on a white background", "blurry"),
    (", ".join(["a red digit seven on a white background"] * 12), "blurry"),  # about 100 tokens: two chunks
])
def test_weighted_and_long_prompts_match_the_reference(triton, pipe, prompt, negative):
    from kiln.pipeline.reference import diffusers_image

    with client(triton("epsilon"), "grpc") as c:
        served = c.generate(prompt, negative, seed=5, steps=3, scheduler="euler_a").images
    expected = diffusers_image(pipe, "euler_a", prompt, negative, 5, 3, 7.5, 64, 64, weighted=True)
    assert np.abs(served.astype(int) - expected).max() <= MAX_DIFF
    plain = diffusers_image(pipe, "euler_a", re.sub(r"[()\[\]:\d.]|BREAK", "", prompt), negative, 5, 3, 7.5, 64, 64)
    assert np.abs(served.astype(int) - plain).max() > MAX_DIFF  # the weights did change the image


def test_several_images_each_reproducible_by_its_seed(triton, pipe):
    from kiln.pipeline.reference import diffusers_image

    with client(triton("epsilon")) as c:
        batch = c.generate("a red digit 7", seed=40, steps=3, num_images=3, scheduler="euler_a")
        alone = c.generate("a red digit 7", seed=41, steps=3, scheduler="euler_a")
    assert batch.images.shape == (3, 64, 64, 3) and batch.seeds == [40, 41, 42]
    assert np.abs(batch.images[1].astype(int) - alone.images[0]).max() <= MAX_DIFF
    expected = diffusers_image(pipe, "euler_a", "a red digit 7", "", 40, 3, 7.5, 64, 64, num_images=3)
    assert np.abs(batch.images.astype(int) - expected).max() <= MAX_DIFF


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_img2img_matches_diffusers(triton, pipe):
    from kiln.pipeline.reference import diffusers_image

    source = np.zeros((64, 64, 3), np.uint8)
    source[16:48, 16:48] = (220, 30, 30)
    with client(triton("epsilon"), "grpc") as c:
        served = c.generate("a red square", seed=8, steps=5, image=_png(source), strength=0.6, scheduler="ddim")
    expected = diffusers_image(pipe, "ddim", "a red square", "", 8, 5, 7.5, 64, 64, image=Image.fromarray(source),
                               strength=0.6)
    assert served.images.shape == (1, 64, 64, 3)
    assert np.abs(served.images.astype(int) - expected).max() <= MAX_DIFF
    with client(triton("epsilon")) as c:
        with pytest.raises(ClientError, match=r"init_image='<9 bytes>' is invalid: expected a PNG or JPEG file"):
            c.generate("a red square", steps=2, image=b"not a png")


def _cache_hits(info) -> float:
    text = urllib.request.urlopen(info.metrics_url, timeout=10).read().decode()
    match = re.search(r'kiln_embedding_cache_hits\{[^}]*model="text_encoder"[^}]*\} (\d+)', text)
    return float(match.group(1)) if match else 0.0


def test_identical_prompts_hit_the_embedding_cache(triton):
    info = triton("epsilon")
    prompt = f"a cached prompt {random.random()}"
    with client(info) as c:
        c.generate(prompt, steps=1)
        before = _cache_hits(info)
        first = c.generate(prompt, steps=1, seed=3)
        second = c.generate(prompt, steps=1, seed=3)
    assert _cache_hits(info) >= before + 2
    assert np.array_equal(first.images, second.images)


def test_model_control_needs_the_admin_key(triton):
    info = triton("epsilon")
    for protocol in ("http", "grpc"):
        with KilnClient(info.http_url if protocol == "http" else info.grpc_url, protocol, admin_key="wrong") as c:
            with pytest.raises(ClientError, match="(?i)unauthori|denied|restricted|permission"):
                c.unload_model("txt2img")
    key = server.admin_key_file(info.ports).read_text()
    for protocol in ("http", "grpc"):
        with KilnClient(info.http_url if protocol == "http" else info.grpc_url, protocol, admin_key=key) as c:
            c.load_model("vae_encoder")  # already loaded: a reload with the key succeeds
            assert {m["name"] for m in c.models() if m["state"] == "READY"} >= {"txt2img", "vae_encoder"}


MALFORMED = [
    # (input name, value, wire datatype) -- each makes the request invalid on its own
    ("prompt", "", "BYTES"), ("prompt", "   ", "BYTES"), ("prompt", "x" * 5000, "BYTES"),
    ("prompt", b"\xff\xfe\xfa", "BYTES"), ("prompt", 7, "INT32"), ("prompt", ["a", "b"], "BYTES"),
    ("prompt", "(cat) " * 400, "BYTES"),
    ("steps", 0, "INT32"), ("steps", -3, "INT32"), ("steps", 151, "INT32"), ("steps", 2**31 - 1, "INT32"),
    ("steps", 2.5, "FP32"), ("steps", [1, 2], "INT32"), ("steps", "ten", "BYTES"),
    ("guidance_scale", float("nan"), "FP32"), ("guidance_scale", float("inf"), "FP32"), ("guidance_scale", -1.0, "FP32"),
    ("guidance_scale", 31.0, "FP32"), ("guidance_scale", 7, "INT32"),
    ("height", 72, "INT32"), ("height", 0, "INT32"), ("height", -64, "INT32"), ("height", 2048, "INT32"),
    ("width", 63, "INT32"), ("width", 4096, "INT32"), ("width", 64.0, "FP32"),
    ("scheduler", "warp-drive", "BYTES"), ("scheduler", "", "BYTES"), ("scheduler", 3, "INT32"),
    ("seed", -2, "INT64"), ("seed", 2**63 - 1, "INT64"), ("seed", 1.5, "FP32"),
    ("num_images", 0, "INT32"), ("num_images", 5, "INT32"), ("num_images", -1, "INT32"),
    ("init_image", b"", "BYTES"), ("init_image", b"GIF89a garbage", "BYTES"),
    ("init_image", b"\x89PNG\r\n\x1a\n\x00", "BYTES"),
    ("strength", 0.0, "FP32"), ("strength", 1.5, "FP32"), ("strength", float("nan"), "FP32"),
    ("no_such_input", 1, "INT32"),
]


def _tensor(module, name, value, datatype):
    values = value if isinstance(value, list) else [value]
    if datatype == "BYTES":
        array = np.array([v if isinstance(v, bytes) else str(v).encode() for v in values], dtype=np.object_)
    else:
        array = np.array(values, dtype={"INT32": np.int32, "INT64": np.int64, "FP32": np.float32}[datatype])
    tensor = module.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def _request(module, case, with_image=False):
    name, value, datatype = case
    inputs = {"steps": ("steps", 1, "INT32")}
    if name != "prompt":
        inputs["prompt"] = ("prompt", "a red digit 7", "BYTES")
    if name == "strength":
        inputs["init_image"] = ("init_image", b"not checked before strength", "BYTES")
    inputs[name] = case
    return [_tensor(module, *spec) for spec in inputs.values()]


def test_fuzzed_malformed_requests_leave_the_server_healthy(triton):
    info = triton("epsilon")
    with client(info) as c:
        reference = c.generate("a red digit 7", seed=77, steps=2, scheduler="euler_a").images
    rng = random.Random(0)
    clients = {"http": httpclient.InferenceServerClient(info.http_url), "grpc": grpcclient.InferenceServerClient(info.grpc_url)}
    modules = {"http": httpclient, "grpc": grpcclient}
    answers = {}
    cases = MALFORMED + [("missing prompt", None, None)]
    for i in range(300):
        case = cases[i % len(cases)] if i < len(cases) * 2 else rng.choice(cases)
        protocol = ("http", "grpc")[i % 2]
        module = modules[protocol]
        if case[0] == "missing prompt":
            inputs = [_tensor(module, "steps", 1, "INT32")]
        else:
            inputs = _request(module, case)
        with pytest.raises(InferenceServerException) as err:
            clients[protocol].infer("txt2img", inputs)
        answers.setdefault((case[0], repr(case[1])[:30], case[2]), err.value.message()[:160])
    assert len(answers) == len(cases)
    for protocol in ("http", "grpc"):
        assert clients[protocol].is_server_live() and clients[protocol].is_server_ready()
    with client(info, "grpc") as c:
        assert np.array_equal(c.generate("a red digit 7", seed=77, steps=2, scheduler="euler_a").images, reference)
    field_errors = [m for (name, _, _), m in answers.items() if name in ("steps", "guidance_scale", "height", "scheduler")
                    and "is invalid: expected" in m]
    assert len(field_errors) >= 12  # range errors name the field, the value and the range
    print("\n".join(f"{k}: {v}" for k, v in sorted(answers.items())))


def test_concurrent_requests_each_get_their_own_image(triton):
    info = triton("epsilon")
    seeds = [101, 102, 103, 104]
    with client(info) as c:
        alone = {s: c.generate("a blue digit 3", seed=s, steps=3, scheduler="euler_a").images for s in seeds}
    results, errors = {}, []
    ready = threading.Barrier(len(seeds), timeout=60)  # all four connected, then all four send at once

    def work(seed, protocol):
        try:
            with client(info, protocol) as c:
                ready.wait()
                results[seed] = c.generate("a blue digit 3", seed=seed, steps=3, scheduler="euler_a").images
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s, ("http", "grpc")[i % 2])) for i, s in enumerate(seeds)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a request did not come back within 300 s"
    assert not errors and set(results) == set(seeds), errors
    for seed in seeds:
        assert np.abs(results[seed].astype(int) - alone[seed]).max() <= MAX_DIFF
    assert np.abs(results[101].astype(int) - results[102]).max() > 10 * MAX_DIFF


def test_a_component_that_raises_answers_with_an_error_and_stays_up(triton):
    """An input Triton's shape check lets through but ONNX Runtime rejects (a latent side the
    UNet cannot down-sample): the instance answers with an error and keeps serving."""
    info = triton("epsilon")
    http = httpclient.InferenceServerClient(info.http_url)
    bad = {"sample": np.zeros((1, 4, 5, 7), np.float32), "timestep": np.zeros((1, 1), np.float32),
           "encoder_hidden_states": np.zeros((1, 77, 32), np.float32)}
    inputs = []
    for name, array in bad.items():
        tensor = httpclient.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    with pytest.raises(InferenceServerException):
        http.infer("unet", inputs)
    with client(info) as c:
        assert c.generate("a red digit 7", steps=1).images.shape == (1, 64, 64, 3)


def _wait_until(condition, what: str, timeout_s: float = 120):
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        time.sleep(0.01)


def _inference_counts(info, model: str) -> tuple[int, int]:
    """(successes, failures) of `model` since the server started, from Triton's statistics API."""
    stats = httpclient.InferenceServerClient(info.http_url).get_inference_statistics(model)
    counts = stats["model_stats"][0]["inference_stats"]
    return counts["success"]["count"], counts["fail"]["count"]


def _pending(info, model: str) -> int:
    """Requests waiting in `model`'s queue for an instance (Triton's gauge, updated as they come and go)."""
    text = urllib.request.urlopen(info.metrics_url, timeout=10).read().decode()
    match = re.search(rf'nv_inference_pending_request_count\{{[^}}]*model="{model}"[^}}]*\}} (\d+)', text)
    assert match, f"no pending-request gauge for {model} at {info.metrics_url}"
    return int(match.group(1))


def test_a_client_that_disconnects_mid_generation_does_not_disturb_others(triton):
    """A client whose own timeout passes gets a ClientError saying so; the generation it abandoned
    runs on to its end, and a request served meanwhile draws what it draws alone."""
    info = triton("epsilon")
    with client(info) as c:
        expected = c.generate("a green digit 2", seed=9, steps=3).images
    before = _inference_counts(info, "pipeline")
    impatient = KilnClient(info.http_url, "http", timeout_s=0.2)
    try:
        with pytest.raises(ClientError, match=rf"at http://{re.escape(info.http_url)}: timed out") as err:
            impatient.generate("a long generation", steps=150, height=128, width=128)  # about 1 s here
        assert "cannot reach" not in str(err.value) and "timeout_s" in err.value.hint
    finally:
        impatient.close()
    with client(info, "grpc") as c:  # while the abandoned 150 steps still run
        patient = c.generate("a green digit 2", seed=9, steps=3).images
    assert np.abs(patient.astype(int) - expected).max() <= MAX_DIFF
    _wait_until(lambda: sum(_inference_counts(info, "pipeline")) >= sum(before) + 2, "the abandoned generation ending")
    assert _inference_counts(info, "pipeline") == (before[0] + 2, before[1])  # both ran to the end, neither failed
    with client(info) as c:
        assert c.health() == {"live": True, "ready": True}
        assert np.abs(c.generate("a green digit 2", seed=9, steps=3).images.astype(int) - expected).max() <= MAX_DIFF


@pytest.mark.slow  # starts a Triton server of its own
def test_a_full_queue_refuses_at_once_and_the_rest_still_draw_right(onnx_dir, tmp_path):
    """One pipeline instance and a queue of one: while one long generation runs and a second waits,
    a third and a fourth are refused at once with Triton's queue error instead of piling up; the
    running and the waiting generation both draw right. Each step waits for the server's own counts."""
    from kiln.model_repository.builder import build_repository
    from kiln.model_repository.configs import Tuning

    repo = build_repository(onnx_dir("epsilon"), tmp_path / "repo", tuning=Tuning(max_queue=1, pipeline_instances=1))
    with server.running_server(repo) as info:
        # long enough (about 4 s here) that the first is still running when the last is refused
        request = dict(prompt="a red digit 7", seed=1, steps=100, height=256, width=256)
        with client(info) as c:
            expected = c.generate(**request).images
        outcomes = {}

        def work(name, protocol):
            try:
                with client(info, protocol) as c:
                    outcomes[name] = c.generate(**request).images
            except ClientError as e:
                outcomes[name] = e

        unet_calls = sum(_inference_counts(info, "unet"))
        running = threading.Thread(target=work, args=("running", "http"))
        running.start()
        _wait_until(lambda: sum(_inference_counts(info, "unet")) > unet_calls, "the first generation's first step")
        waiting = threading.Thread(target=work, args=("waiting", "grpc"))
        waiting.start()
        _wait_until(lambda: _pending(info, "pipeline") == 1, "the second generation queueing")
        for protocol in ("http", "grpc"):  # the only instance busy, the queue full
            with client(info, protocol) as c:
                with pytest.raises(ClientError, match="Exceeds maximum queue size"):
                    c.generate(**request)
        for t in (running, waiting):
            t.join(timeout=300)
        assert not running.is_alive() and not waiting.is_alive(), "a generation did not come back within 300 s"
        assert set(outcomes) == {"running", "waiting"}
        for name, outcome in outcomes.items():
            assert isinstance(outcome, np.ndarray), f"{name}: {outcome}"
            assert np.array_equal(outcome, expected), name
        with client(info) as c:
            assert c.health() == {"live": True, "ready": True}
