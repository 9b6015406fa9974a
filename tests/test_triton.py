"""The real embedded Triton server on the tiny models' repositories, called over HTTP and gRPC.
The proof: what Triton serves equals what diffusers' StableDiffusionPipeline draws in-process."""

import shutil
import subprocess
import sys

import numpy as np
import pytest

from kiln.clients.client import KilnClient
from kiln.errors import ClientError, ServeError
from kiln.serving import server

pytestmark = pytest.mark.triton

MAX_DIFF = 2  # on the 0-255 scale
PROMPT, NEGATIVE = "a red digit 7 on a white background", "blurry, low quality"

PARITY_CASES = [
    # (kind, scheduler, protocol, steps, guidance, height, width)
    ("epsilon", "ddim", "http", 4, 7.5, 64, 64),
    ("epsilon", "euler_a", "grpc", 4, 7.5, 64, 80),  # ancestral: noise drawn inside scheduler.step
    ("epsilon", "dpmpp_2m", "http", 5, 5.0, 80, 64),
    ("epsilon", "pndm", "grpc", 4, 7.5, 64, 64),
    ("v_prediction", "ddim", "grpc", 4, 7.5, 64, 64),
    ("v_prediction", "euler_a", "http", 4, 7.5, 64, 64),
    ("v_prediction", "dpmpp_2m", "grpc", 4, 3.0, 64, 80),
]


def client(info, protocol):
    return KilnClient(info.http_url if protocol == "http" else info.grpc_url, protocol)


@pytest.mark.parametrize("kind, scheduler, protocol, steps, guidance, height, width", PARITY_CASES)
def test_served_image_equals_diffusers(triton, tiny_model, reference_image, kind, scheduler, protocol, steps,
                                       guidance, height, width):
    with client(triton(kind), protocol) as c:
        result = c.generate(PROMPT, NEGATIVE, seed=31, steps=steps, guidance_scale=guidance, height=height,
                            width=width, scheduler=scheduler)
    expected = reference_image(tiny_model(kind), scheduler, PROMPT, NEGATIVE, 31, steps, guidance, height, width)
    assert result.images.shape == expected.shape == (1, height, width, 3)
    assert result.images.dtype == np.uint8
    assert result.seeds == [31]
    diff = np.abs(result.images.astype(int) - expected).max()
    assert diff <= MAX_DIFF, f"{kind}/{scheduler}/{protocol}: max |Triton - diffusers| = {diff}"


def test_http_and_grpc_serve_the_same_image(triton):
    info = triton("epsilon")
    with client(info, "http") as h, client(info, "grpc") as g:
        a = h.generate(PROMPT, seed=9, steps=3, scheduler="EulerDiscreteScheduler")
        b = g.generate(PROMPT, seed=9, steps=3, scheduler="euler")
    assert np.array_equal(a.images, b.images)


def test_defaults_fill_absent_fields(triton):
    with client(triton("epsilon"), "http") as c:
        first = c.generate(PROMPT, steps=2)
        second = c.generate(PROMPT, steps=2, seed=first.seeds[0])
    assert first.images.shape == (1, 64, 64, 3)  # the model's native size
    assert np.array_equal(first.images, second.images)  # the reported seed reproduces the image


def test_invalid_request_gets_a_clear_error_and_server_stays_up(triton):
    info = triton("epsilon")
    for protocol in ("http", "grpc"):
        with client(info, protocol) as c:
            with pytest.raises(ClientError, match=r"steps=0 is invalid: expected an integer in \[1, 150\]"):
                c.generate(PROMPT, steps=0)
            with pytest.raises(ClientError, match="scheduler='warp' is invalid"):
                c.generate(PROMPT, scheduler="warp")
            with pytest.raises(ClientError, match="height=72 is invalid"):
                c.generate(PROMPT, height=72)
            assert c.health() == {"live": True, "ready": True}
            assert c.generate(PROMPT, steps=1).images.shape == (1, 64, 64, 3)


def test_models_lists_every_model_ready(triton):
    info = triton("epsilon")
    key = server.admin_key_file(info.ports).read_text()
    with KilnClient(info.grpc_url, "grpc", admin_key=key) as c:
        states = {m["name"]: m["state"] for m in c.models()}
    assert states == {name: "READY" for name in
                      ("pipeline", "text_encoder", "tokenizer", "txt2img", "unet", "vae_decoder", "vae_encoder")}


def test_taken_port_is_refused_with_the_flag_named(triton, repo_dir):
    info = triton("epsilon")
    with pytest.raises(ServeError, match=rf"port {info.ports.grpc} \(--grpc-port\) is already in use"):
        server.start(repo_dir("epsilon"), server.Ports(server.free_port(), info.ports.grpc, server.free_port()))


@pytest.mark.slow  # starts a Triton server of its own
def test_model_that_fails_to_load_reports_tritons_message(repo_dir, tmp_path):
    broken = tmp_path / "repo"
    shutil.copytree(repo_dir("epsilon"), broken)
    (broken / "unet" / "1" / "model.onnx").unlink()
    (broken / "unet" / "1" / "model.onnx").write_bytes(b"not an onnx model")
    ports = server.free_ports()
    with pytest.raises(ServeError) as err:
        server.start(broken, ports, timeout_s=120)
    message = str(err.value)
    assert "failed to load 'unet'" in message and "exited" in message
    assert server.read_state(ports) is None


@pytest.mark.slow  # starts a Triton server of its own
def test_cli_serve_background_generate_and_stop(repo_dir, tmp_path):
    """The commands a person types: serve --background, generate over both protocols, models, stop."""
    kiln = [sys.executable, "-m", "kiln.cli"]
    ports = [server.free_port() for _ in range(3)]
    flags = ["--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2])]
    started = subprocess.run(kiln + ["serve", str(repo_dir("epsilon")), "--background", *flags],
                             capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stderr
    assert f"127.0.0.1:{ports[0]}" in started.stderr and f"127.0.0.1:{ports[1]}" in started.stderr
    try:
        for protocol, port in (("http", ports[0]), ("grpc", ports[1])):
            out = tmp_path / f"{protocol}.png"
            run = subprocess.run(kiln + ["generate", PROMPT, "-o", str(out), "--url", f"127.0.0.1:{port}",
                                         "--protocol", protocol, "--seed", "4", "--steps", "2",
                                         "--scheduler", "euler_a", "--negative", "blurry", "--guidance", "6"],
                                 capture_output=True, text=True, timeout=120)
            assert run.returncode == 0, run.stderr
            from PIL import Image

            assert Image.open(out).size == (64, 64)
        listed = subprocess.run(kiln + ["models", "--url", f"127.0.0.1:{ports[0]}"], capture_output=True, text=True,
                                timeout=60)
        assert "txt2img" in listed.stdout and "READY" in listed.stdout
        bad = subprocess.run(kiln + ["generate", PROMPT, "--url", f"127.0.0.1:{ports[0]}", "--steps", "0"],
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 1 and "steps=0 is invalid" in bad.stderr
    finally:
        stopped = subprocess.run(kiln + ["stop", *flags], capture_output=True, text=True, timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    health = subprocess.run(kiln + ["health", "--url", f"127.0.0.1:{ports[0]}"], capture_output=True, text=True,
                            timeout=60)
    assert health.returncode == 1 and "cannot reach the server" in health.stderr
