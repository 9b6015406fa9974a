"""kiln gateway in front of the real Triton server: A1111's and OpenAI's doors return PNGs that decode
to exactly Triton's images, bad input gets a 4xx naming the field at every door, and a fuzz of
hostile requests leaves the gateway and Triton up."""

import base64
import io
import json
import random
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from kiln.clients.client import KilnClient
from kiln.serving import server

from gateway_server import running_gateway

pytest.importorskip("fastapi", reason="the gateway extra (pip install 'kiln[gateway]') is not installed")
pytestmark = pytest.mark.triton

KEY = "gateway-test-key-0123456789"


@pytest.fixture(scope="module")
def gateway(triton):
    info = triton("epsilon")
    with running_gateway(info, KEY) as url:
        yield url, info


def call(url: str, path: str, body=None, key: str | None = KEY, raw: bytes | None = None, headers=None,
         method: str | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url + path, data=data, method=method or ("POST" if data is not None else "GET"))
    request.add_header("content-type", "application/json")
    for name, value in {**({"authorization": f"Bearer {key}"} if key else {}), **(headers or {})}.items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        text = e.read()
        return e.code, json.loads(text) if text.startswith(b"{") or text.startswith(b"[") else {"text": text.decode()}


def multipart(fields: dict, files: dict) -> tuple[bytes, str]:
    boundary = "kiln-test-boundary"
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data) in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def pngs(images: list[str]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))) for b in images])


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a1111_txt2img_and_img2img_return_tritons_images(gateway):
    url, info = gateway
    status, answer = call(url, "/sdapi/v1/txt2img", {
        "prompt": "a red digit 7", "negative_prompt": "blurry", "seed": 1234, "steps": 3, "cfg_scale": 6.0,
        "sampler_name": "DPM++ 2M", "scheduler": "Karras", "width": 80, "height": 64, "batch_size": 2,
        "n_iter": 1, "unknown_a1111_field": 3})
    assert status == 200, answer
    with KilnClient(info.http_url) as client:
        expected = client.generate("a red digit 7", "blurry", 1234, 3, 6.0, 64, 80, "dpmpp_2m_karras", num_images=2)
    images = pngs(answer["images"])
    assert images.shape == (2, 64, 80, 3) and np.array_equal(images, expected.images)
    info_json = json.loads(answer["info"])
    assert info_json["all_seeds"] == [1234, 1235] and info_json["sampler_name"] == "DPM++ 2M Karras"
    assert answer["parameters"]["prompt"] == "a red digit 7"
    text = Image.open(io.BytesIO(base64.b64decode(answer["images"][1]))).text["parameters"]
    assert "Seed: 1235" in text and "Sampler: DPM++ 2M Karras" in text and "Size: 80x64" in text

    init = "data:image/png;base64," + base64.b64encode(png_bytes(expected.images[0])).decode()
    status, answer = call(url, "/sdapi/v1/img2img", {"prompt": "a blue digit 3", "init_images": [init], "seed": 9,
                                                       "steps": 4, "denoising_strength": 0.5, "sampler_name": "Euler a"})
    assert status == 200, answer
    with KilnClient(info.http_url) as client:
        redrawn = client.generate("a blue digit 3", seed=9, steps=4, scheduler="euler_a", image=png_bytes(expected.images[0]),
                                  strength=0.5)
    assert np.array_equal(pngs(answer["images"]), redrawn.images)
    assert np.abs(pngs(answer["images"]).astype(int) - expected.images[:1]).max() > 10  # it did redraw

    # a realistic init image (a 256x256 photo-like PNG is hundreds of KB of base64), line-wrapped as some clients send it
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    wrapped = base64.encodebytes(png_bytes(noise)).decode()
    assert len(wrapped) > 200_000 and "\n" in wrapped
    status, answer = call(url, "/sdapi/v1/img2img", {"prompt": "a", "init_images": [wrapped], "seed": 1, "steps": 2})
    assert status == 200 and pngs(answer["images"]).shape == (1, 256, 256, 3), answer


def test_openai_generations_and_edits_return_tritons_images(gateway):
    url, info = gateway
    status, answer = call(url, "/v1/images/generations", {"prompt": "a green digit 2", "size": "80x64", "n": 2,
                                                         "seed": 77, "steps": 3, "response_format": "b64_json",
                                                         "model": "txt2img", "scheduler": "euler_ancestral"})
    assert status == 200, answer
    with KilnClient(info.http_url) as client:
        expected = client.generate("a green digit 2", seed=77, steps=3, height=64, width=80, scheduler="euler_a",
                                   num_images=2)
    assert np.array_equal(pngs([d["b64_json"] for d in answer["data"]]), expected.images)
    assert [d["seed"] for d in answer["data"]] == [77, 78] and abs(answer["created"] - time.time()) < 600

    body, content_type = multipart({"prompt": "a yellow digit 5", "seed": "3", "steps": "4", "strength": "0.6"},
                                   {"image": ("in.png", png_bytes(expected.images[1]))})
    status, answer = call(url, "/v1/images/edits", raw=body, headers={"content-type": content_type})
    assert status == 200, answer
    with KilnClient(info.http_url) as client:
        redrawn = client.generate("a yellow digit 5", seed=3, steps=4, image=png_bytes(expected.images[1]), strength=0.6)
    assert np.array_equal(pngs([d["b64_json"] for d in answer["data"]]), redrawn.images)


def test_lists_health_key_and_options(gateway):
    url, _ = gateway
    status, samplers = call(url, "/sdapi/v1/samplers")
    names = {s["name"] for s in samplers}
    assert status == 200 and {"Euler a", "DPM++ 2M Karras", "DDIM", "UniPC"} <= names
    assert "euler_ancestral" in next(s for s in samplers if s["name"] == "Euler a")["aliases"]
    status, models = call(url, "/sdapi/v1/sd-models")
    assert status == 200 and [m["model_name"] for m in models] == ["txt2img"] and models[0]["family"] == "sd"
    assert call(url, "/sdapi/v1/options")[1] == {"sd_model_checkpoint": "txt2img"}
    assert call(url, "/sdapi/v1/options", {"sd_model_checkpoint": "txt2img"})[0] == 200
    assert call(url, "/sdapi/v1/options", {"sd_model_checkpoint": "sdxl_base"})[0] == 404
    assert call(url, "/v1/models")[1]["data"][0]["id"] == "txt2img"
    status, health = call(url, "/health", key=None)
    assert status == 200 and health["ready"] and health["models"] == ["txt2img"]
    with urllib.request.urlopen(url + "/docs", timeout=30) as page:
        assert b"swagger" in page.read().lower()
    # the key: missing or wrong is a 401 in each door's shape; /health and /docs need none
    status, answer = call(url, "/sdapi/v1/txt2img", {"prompt": "a"}, key=None)
    assert status == 401 and answer["detail"][0]["loc"] == ["header", "authorization"]
    status, answer = call(url, "/v1/images/generations", {"prompt": "a"}, key="wrong-key-wrong-key-wrong")
    assert status == 401 and answer["error"]["code"] == "invalid_api_key"


BAD = [
    # (path, body or raw bytes, status, field named)
    ("/sdapi/v1/txt2img", {"prompt": "a", "steps": "many"}, 422, "steps"),
    ("/sdapi/v1/txt2img", {"prompt": "a", "cfg_scale": 1e9}, 422, "cfg_scale"),
    ("/sdapi/v1/txt2img", {"prompt": "a", "width": 65}, 422, "width"),
    ("/sdapi/v1/txt2img", {"prompt": "a", "seed": 2**80}, 422, "seed"),
    ("/sdapi/v1/txt2img", {"prompt": "a", "batch_size": 3, "n_iter": 3}, 422, "batch_size x n_iter=9"),
    ("/sdapi/v1/txt2img", {"prompt": "a", "override_settings": {"CLIP_stop_at_last_layers": True}}, 422,
     "CLIP_stop_at_last_layers"),
    ("/sdapi/v1/txt2img", b'{"prompt": "\xff\xfe"}', 422, "not UTF-8"),
    ("/sdapi/v1/txt2img", {"prompt": "a", "sampler_name": "DPM fast"}, 422, "sampler_name"),
    ("/sdapi/v1/txt2img", {"prompt": "a", "sampler_name": "Euler a", "scheduler": "Karras"}, 422, "scheduler"),
    ("/sdapi/v1/txt2img", {"prompt": "a [cat:dog:0.5]"}, 422, "prompt"),
    ("/sdapi/v1/txt2img", {"prompt": ""}, 422, "prompt"),
    ("/sdapi/v1/txt2img", {"prompt": "a", "enable_hr": True}, 422, "enable_hr"),
    ("/sdapi/v1/txt2img", {"prompt": "a", "override_settings": {"sd_model_checkpoint": "nope"}}, 404, "sd_model_checkpoint"),
    ("/sdapi/v1/txt2img", {"prompt": "a", "override_settings": {"CLIP_stop_at_last_layers": 2}}, 422,
     "CLIP_stop_at_last_layers"),
    ("/sdapi/v1/txt2img", b'{"prompt": "a", "cfg_scale": NaN}', 422, "cfg_scale"),
    ("/sdapi/v1/txt2img", b'{"prompt": "a"', 422, "not valid JSON"),
    ("/sdapi/v1/txt2img", b'[1, 2]', 422, "body"),
    ("/sdapi/v1/txt2img", b'{"prompt": ' + b"[" * 100_000 + b'"a"' + b"]" * 100_000 + b"}", 422, "nests 100001 levels"),
    ("/sdapi/v1/img2img", {"prompt": "a", "init_images": ["not base64!"]}, 422, "init_images"),
    ("/sdapi/v1/img2img", {"prompt": "a", "init_images": [base64.b64encode(b"GIF89a nope").decode()]}, 422, "init_images"),
    ("/sdapi/v1/img2img", {"prompt": "a", "init_images": []}, 422, "init_images"),
    ("/sdapi/v1/img2img", {"prompt": "a", "init_images": ["x"], "mask": "y"}, 422, "mask"),
    ("/v1/images/generations", {"prompt": "a", "size": "huge"}, 422, "size"),
    ("/v1/images/generations", {"prompt": "a", "size": "4096x4096"}, 422, "size"),
    ("/v1/images/generations", {"prompt": "a", "n": 0}, 422, "n"),
    ("/v1/images/generations", {"prompt": "a", "n": 9}, 422, "n"),
    ("/v1/images/generations", {"prompt": "a", "response_format": "url"}, 422, "response_format"),
    ("/v1/images/generations", {"prompt": "a", "model": "dall-e-3"}, 404, "model"),
    ("/v1/images/generations", {"prompt": "a", "style": "vivid"}, 422, "style"),
    ("/v1/images/generations", {"prompt": 7}, 422, "prompt"),
    ("/v1/images/generations", {}, 422, "prompt"),
    ("/v1/images/generations", {"prompt": "a", "scheduler": "restart"}, 422, "scheduler"),
    ("/v1/images/edits", b"not a form", 422, "image"),
]


@pytest.mark.parametrize("path, body, status, field", BAD, ids=[f"{p.rsplit('/', 1)[1]}-{i}" for i, (p, *_) in enumerate(BAD)])
def test_bad_input_is_refused_with_the_field_named(gateway, path, body, status, field):
    url, _ = gateway
    got, answer = call(url, path, raw=body if isinstance(body, bytes) else None, body=None if isinstance(body, bytes) else body)
    assert got == status, answer
    if path.startswith("/v1/"):
        error = answer["error"]
        assert error["type"] == "invalid_request_error" and field in (error["param"] or "") + error["message"], error
    else:
        detail = answer["detail"][0]
        assert field in ".".join(map(str, detail["loc"])) + detail["msg"], detail


def test_a_body_over_the_bound_is_413_and_the_gateway_stays_up(gateway):
    from kiln.serving.gateway import MAX_BODY_BYTES

    import http.client

    url, _ = gateway
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.putrequest("POST", "/v1/images/generations")  # the header announces it: refused before any is read
    connection.putheader("content-type", "application/json")
    connection.putheader("authorization", f"Bearer {KEY}")
    connection.putheader("content-length", str(MAX_BODY_BYTES + 1))
    connection.endheaders()
    response = connection.getresponse()
    answer = json.loads(response.read())
    connection.close()
    assert response.status == 413 and str(MAX_BODY_BYTES) in answer["error"]["message"]
    for path, kind in (("/sdapi/v1/txt2img", "application/json"), ("/v1/images/edits", "multipart/form-data; boundary=b")):
        connection = http.client.HTTPConnection(host, int(port), timeout=60)  # chunked: counted while it streams
        head = b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n' if "form" in kind else b""
        chunks = (head if i < 0 else b"[" * (1 << 20) for i in range(-1, MAX_BODY_BYTES // (1 << 20) + 1))
        connection.request("POST", path, body=chunks, encode_chunked=True,
                           headers={"authorization": f"Bearer {KEY}", "content-type": kind})
        response = connection.getresponse()
        text = response.read().decode()
        connection.close()
        assert response.status == 413 and str(MAX_BODY_BYTES) in text and "body_too_large" in text, (path, text)
    assert call(url, "/health", key=None)[0] == 200


HOSTILE = [None, -1, 0, 1, 2**31, 2**63, -2**70, 1e308, -0.0, 0.5, "", "x", "NaN", "1e999", "\x00", "a" * 20_000,
           [], [1], {}, {"a": {"b": [1]}}, True, [[[[["deep"]]]]], "DPM++ 2M Karras", "64x64", "0x0", "9999999x1"]


def test_fuzz_never_answers_5xx_and_leaves_both_servers_up(gateway):
    """Seeded mutations of valid requests at both doors: each answer is a 200 or a 4xx with a JSON
    body, never a 5xx; afterwards both the gateway and Triton draw."""
    url, info = gateway
    rng = random.Random(16)
    bases = {
        "/sdapi/v1/txt2img": {"prompt": "a red digit 1", "steps": 1, "width": 64, "height": 64, "seed": 1,
                              "sampler_name": "Euler", "cfg_scale": 5, "batch_size": 1, "n_iter": 1},
        "/v1/images/generations": {"prompt": "a red digit 1", "steps": 1, "size": "64x64", "n": 1, "seed": 1},
    }
    statuses = []
    for _ in range(70):
        path = rng.choice(list(bases))
        body = dict(bases[path])
        for _ in range(rng.choice((1, 1, 2))):
            body[rng.choice([*body, "override_settings", "model", "init_images"])] = rng.choice(HOSTILE)
        if "steps" in body and body["steps"] not in (1, None) and not (isinstance(body["steps"], int) and body["steps"] < 1):
            body["steps"] = rng.choice([1, "x", -5, 2**40])  # keep drawn requests short
        status, answer = call(url, path, body)
        assert status < 500, (path, body, answer)
        assert isinstance(answer, dict) and ("images" in answer or "data" in answer or "detail" in answer
                                             or "error" in answer), answer
        statuses.append(status)
    assert 200 in statuses and len(set(statuses)) > 1, statuses
    assert call(url, "/health", key=None)[0] == 200
    with KilnClient(info.http_url) as client:
        assert client.generate("a red digit 1", seed=1, steps=1).images.shape[0] == 1


def test_triton_away_is_a_503_with_retry_after_not_a_blame_on_a_field():
    """A gateway whose Triton is not there answers 503 with Retry-After-worthy words, in each door's shape."""
    from fastapi.testclient import TestClient

    from kiln.serving.gateway import create_app

    away = f"127.0.0.1:{server.free_port()}"
    with TestClient(create_app(away)) as client:
        for path, body in (("/sdapi/v1/txt2img", {"prompt": "a"}), ("/v1/images/generations", {"prompt": "a"})):
            response = client.post(path, json=body)
            assert response.status_code == 503, response.text
            text = response.text
            assert "cannot reach the Triton server" in text and "sd_model_checkpoint" not in text, text
        assert client.get("/health").status_code == 503


def test_the_client_refuses_numbers_the_wire_would_wrap():
    """numpy would wrap 2**32 + 2 steps to 2 and draw: the client refuses it, naming the field."""
    from kiln.errors import ClientError

    client = KilnClient("127.0.0.1:1")  # nothing is sent
    for field, value in (("steps", 2**32 + 2), ("width", 2**32 + 64), ("num_images", -2**31 - 1), ("seed", 2**64),
                         ("steps", True), ("guidance_scale", "7")):
        with pytest.raises(ClientError, match=field):
            client.request_inputs(**{field: value})
    assert len(client.request_inputs(steps=2**31 - 1, seed=2**63 - 1)) == 2
