"""Locust users for Kiln's txt2img endpoint, over gRPC and HTTP (tritonclient), reporting through
Locust's request events. Run by `kiln loadtest`; settings come from the environment:
KILN_HTTP_URL, KILN_GRPC_URL (host:port), KILN_PROTOCOLS (http,grpc,gateway), KILN_STEPS, KILN_PROMPT;
the gateway user posts A1111's txt2img to KILN_GATEWAY_URL (http://host:port) with KILN_GATEWAY_KEY."""

import base64
import json
import os
import random
import time

# tritonclient's gRPC blocks a whole gevent worker unless grpc is told about gevent first.
import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

from locust import User, constant, events, task  # noqa: E402

from kiln.clients.client import KilnClient  # noqa: E402

PROTOCOLS = [p.strip() for p in os.environ.get("KILN_PROTOCOLS", "http,grpc").split(",") if p.strip()]
STEPS = int(os.environ.get("KILN_STEPS", "4"))
PROMPT = os.environ.get("KILN_PROMPT")  # fixed prompt; by default each request draws its own
COLOURS, BACKGROUNDS = ("red", "green", "blue", "yellow", "purple"), ("white", "black", "gray")


def prompt() -> str:
    if PROMPT:
        return PROMPT
    return f"a {random.choice(COLOURS)} digit {random.randrange(10)} on a {random.choice(BACKGROUNDS)} background"


class _Txt2ImgUser(User):
    abstract = True
    protocol = "http"
    wait_time = constant(0)

    def on_start(self):
        url = os.environ.get("KILN_HTTP_URL" if self.protocol == "http" else "KILN_GRPC_URL")
        self.client = KilnClient(url, self.protocol, timeout_s=300)

    def on_stop(self):
        self.client.close()

    @task
    def txt2img(self):
        start = time.perf_counter()
        exception, length = None, 0
        try:
            result = self.client.generate(prompt(), seed=random.randrange(2**31), steps=STEPS)
            length = int(result.images.nbytes)
        except Exception as e:  # noqa: BLE001 - every failure is reported to Locust
            exception = e
        events.request.fire(request_type=self.protocol, name="txt2img", response_time=(time.perf_counter() - start) * 1000,
                            response_length=length, exception=exception, context={})


class GrpcUser(_Txt2ImgUser):
    protocol = "grpc"
    weight = 1 if "grpc" in PROTOCOLS else 0


class HttpUser(_Txt2ImgUser):
    protocol = "http"
    weight = 1 if "http" in PROTOCOLS else 0


class GatewayUser(User):
    """A1111's txt2img through kiln gateway: a request fails unless it answers 200 with one PNG."""

    weight = 1 if "gateway" in PROTOCOLS else 0
    wait_time = constant(0)

    def on_start(self):
        from geventhttpclient import HTTPClient, URL

        self.url = URL(os.environ.get("KILN_GATEWAY_URL", "http://127.0.0.1:7860") + "/sdapi/v1/txt2img")
        self.http = HTTPClient.from_url(self.url, network_timeout=300, connection_timeout=30)
        key = os.environ.get("KILN_GATEWAY_KEY")
        self.headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}

    def on_stop(self):
        self.http.close()

    @task
    def txt2img(self):
        start = time.perf_counter()
        exception, length = None, 0
        try:
            body = json.dumps({"prompt": prompt(), "seed": random.randrange(2**31), "steps": STEPS})
            response = self.http.post(self.url.request_uri, body=body, headers=self.headers)
            data = response.read()
            length = len(data)
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {data[:300]!r}")
            images = json.loads(data)["images"]
            if len(images) != 1 or not base64.b64decode(images[0]).startswith(b"\x89PNG"):
                raise RuntimeError(f"expected one PNG, got {len(images)} images")
        except Exception as e:  # noqa: BLE001 - every failure is reported to Locust
            exception = e
        events.request.fire(request_type="gateway", name="sdapi/v1/txt2img",
                            response_time=(time.perf_counter() - start) * 1000, response_length=length,
                            exception=exception, context={})
