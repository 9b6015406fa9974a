"""`kiln gateway`: a REST service in front of a running Kiln Triton server that speaks A1111's and
OpenAI's image APIs (FastAPI + uvicorn, the `gateway` extra).

Each request is validated by its door (serving/front_doors.py), becomes one Triton request through
Kiln's client, and is answered in its door's shape: images as base64 PNGs that decode to exactly the
images Triton returned. Errors are answered in the door's shape too, with the field named: 422 for
an invalid request (Triton's own refusals included), 404 for a model that is not served, 401 for a
missing or wrong key, 413 for a body over MAX_BODY_BYTES, 502/503 when Triton fails or is away.
"""

import hmac
import logging
import threading
import time
from pathlib import Path

from kiln.clients.client import PUBLIC_MODEL, KilnClient
from kiln.errors import ClientError, KilnError
from kiln.serving import front_doors as doors
from kiln.export.specs import CONTROLNET_PREFIX

log = logging.getLogger("kiln.gateway")

MAX_BODY_BYTES = 24 << 20  # an 8 MiB init image as base64 (11 MiB), twice over
OPEN_PATHS = ("/health", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc")
CATALOG_TTL_S = 10.0


class GatewayError(KilnError):
    """The gateway cannot start (a missing key file, no FastAPI installed)."""


class BodyTooLarge(Exception):
    """A body (chunked, so its length was not announced) grew past MAX_BODY_BYTES while being read."""


class BodyLimit:
    """ASGI middleware: a body announced or streamed beyond `limit` bytes is refused with a 413
    before it is held in memory (an announced one before any of it is read)."""

    def __init__(self, app, limit: int, refuse):
        self.app, self.limit, self.refuse = app, limit, refuse

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"").decode("latin-1")
        if length and (not length.isdigit() or int(length) > self.limit):
            return await self.refuse(scope, send, f"the body ({length} bytes) is over {self.limit} bytes")
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLarge(f"the body is over {self.limit} bytes")
            return message

        await self.app(scope, counted, send)


class Catalog:
    """The txt2img endpoints a Triton server serves, with each one's defaults and limits, read from
    its model configs (public); the repository index (an admin API) lists them when the admin key is
    known, otherwise the single-model endpoint `txt2img` is looked for. Refreshed every CATALOG_TTL_S."""

    def __init__(self, url: str, admin_key: str | None = None, extra: tuple[str, ...] = ()):
        self.url, self.admin_key, self.extra = url, admin_key, extra
        self._lock = threading.Lock()
        self._served: dict[str, doors.Served] = {}
        self._read_at = -CATALOG_TTL_S
        self.error = ""  # why the last read failed

    def served(self) -> dict[str, doors.Served]:
        with self._lock:
            if time.monotonic() - self._read_at >= CATALOG_TTL_S:
                try:
                    self._served = self._read()
                    self._read_at = time.monotonic()
                    self.error = ""
                except Exception as exc:  # noqa: BLE001 - Triton away: answer with what was known, try again next time
                    self.error = f"cannot reach the Triton server at {self.url} ({type(exc).__name__}: {exc})"
                    log.warning("%s", self.error)
            return dict(self._served)

    def _read(self) -> dict[str, doors.Served]:
        import json

        import tritonclient.http as http
        from tritonclient.utils import InferenceServerException

        client = http.InferenceServerClient(self.url, connection_timeout=10, network_timeout=10)
        try:
            names = list(self.extra)
            if self.admin_key:
                from kiln.serving.server import ADMIN_HEADER

                index = client.get_model_repository_index(headers={ADMIN_HEADER: self.admin_key})
                names += [m["name"] for m in index if m.get("state") == "READY"]
            else:
                names.append(PUBLIC_MODEL)
            served = {}
            for name in dict.fromkeys(names):
                try:
                    config = client.get_model_config(name)
                except InferenceServerException:
                    continue
                inputs = {t["name"] for t in config.get("input", [])}
                outputs = {t["name"] for t in config.get("output", [])}
                if "prompt" not in inputs or not {"image", "seeds"} <= outputs or config.get("platform") != "ensemble":
                    continue
                settings = {}
                for step in config.get("ensemble_scheduling", {}).get("step", []):
                    try:
                        parameters = client.get_model_config(step["model_name"]).get("parameters", {})
                    except InferenceServerException:
                        continue
                    if parameters.get("kiln_model", {}).get("string_value") == "pipeline":
                        settings = json.loads(parameters["kiln_settings"]["string_value"])
                controlnets = tuple(n.removeprefix(CONTROLNET_PREFIX) for n in settings.get("controlnets", ()))
                served[name] = doors.Served(name, settings.get("family", ""), settings.get("defaults", {}),
                                            settings.get("limits", {}), controlnets)
            return served
        finally:
            client.close()


def create_app(url: str, api_key: str | None = None, admin_key: str | None = None, timeout_s: float = 600.0,
               models: tuple[str, ...] = ()):
    """The FastAPI application in front of the Triton server at `url` (host:port, HTTP)."""
    try:
        from fastapi import Depends, FastAPI, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import JSONResponse
        from fastapi.security import HTTPBearer
        from starlette.exceptions import HTTPException
    except ImportError:
        raise GatewayError("kiln gateway needs FastAPI and uvicorn", hint="pip install 'kiln[gateway]'") from None

    catalog = Catalog(url, admin_key, models)
    state = {"default": PUBLIC_MODEL}
    # the key is checked by the middleware below; declaring the scheme gives /docs its Authorize button
    security = [Depends(HTTPBearer(auto_error=False, description="the key in kiln gateway's --api-key-file"))] if api_key else []
    app = FastAPI(title="Kiln gateway", version="1", dependencies=security,
                  summary=f"A1111's and OpenAI's image APIs in front of Kiln's Triton server at {url}")

    def is_openai(request) -> bool:
        return request.url.path.startswith("/v1/")

    def refuse(request, status: int, field: str, message: str, code: str | None = None, headers=None, where: str = "body"):
        if is_openai(request):
            kind = "server_error" if status >= 500 else "invalid_request_error"
            return JSONResponse(doors.openai_error(message, field, code, kind), status_code=status, headers=headers)
        return JSONResponse({"detail": [{"loc": [where, *field.split(".")] if field else [where], "msg": message,
                                         "type": code or "value_error"}]}, status_code=status, headers=headers)

    def catalog_served() -> dict:
        served = catalog.served()
        if not served:
            raise doors.DoorError("", f"no txt2img model is served at {url}: {catalog.error or 'the server lists none'}", 503)
        return served

    async def too_large(scope, send, message: str):
        from starlette.requests import Request as Plain

        await refuse(Plain(scope), 413, "", message, "body_too_large")(scope, None, send)

    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES, refuse=too_large)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if api_key and request.url.path not in OPEN_PATHS:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
                return refuse(request, 401, "authorization", "a valid API key is needed: send the header "
                              "'Authorization: Bearer KEY'", "invalid_api_key", {"WWW-Authenticate": "Bearer"}, "header")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        def described(error: dict) -> tuple[str, str]:
            if error.get("type") == "json_invalid":  # its loc is the character where parsing stopped
                at = [p for p in error.get("loc", ()) if isinstance(p, int)]
                return "", f"the body is not valid JSON ({error.get('msg')}{f' at character {at[0]}' if at else ''})"
            place = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
            if error.get("type") == "model_attributes_type" and not place:
                return place, ("the body must be a JSON object, sent with 'Content-Type: application/json' "
                               f"(this one came as {request.headers.get('content-type', 'no content type')!r})")
            got = f" (got {error['input']!r:.80})" if "input" in error and place and error.get("type") != "missing" else ""
            return place, f"{place or 'body'}: {error.get('msg')}{got}"

        errors = exc.errors() or [{"loc": (), "msg": "invalid request", "type": "value_error"}]
        if is_openai(request):
            place, message = described(errors[0])
            return JSONResponse(doors.openai_error(message, place, "invalid_value"), status_code=422)
        return JSONResponse({"detail": [{"loc": list(e.get("loc", ())), "msg": described(e)[1], "type": e.get("type")}
                                        for e in errors]}, status_code=422)

    @app.exception_handler(doors.DoorError)
    async def door_error(request, exc: doors.DoorError):
        code = {404: "model_not_found", 413: "body_too_large", 503: "service_unavailable"}.get(exc.status, "invalid_value")
        retry = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else None
        return refuse(request, exc.status, exc.field, exc.message, code, retry)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        if isinstance(exc.__cause__, BodyTooLarge):
            return refuse(request, 413, "", str(exc.__cause__), "body_too_large")
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":  # FastAPI's words for
            from kiln.serving.guard import json_depth  # a body Python's json cannot read (RecursionError)

            body = await request.body()
            depth = json_depth(body)
            why = (f"it nests {depth} levels deep" if depth > 100 else
                   "it is not UTF-8 JSON text (compressed bodies are not accepted)")
            return refuse(request, 422, "", f"the body could not be read as JSON: {why}", "json_invalid")
        return refuse(request, exc.status_code, "", str(exc.detail), None)

    @app.exception_handler(Exception)
    async def failure(request, exc: Exception):  # no traceback leaves the gateway; the log keeps it
        log.exception("%s %s failed", request.method, request.url.path)
        return refuse(request, 500, "", f"the gateway failed: {type(exc).__name__}", "internal_error")

    def generate(call: doors.Call, names: dict[str, str]):
        try:
            with KilnClient(url, "http", model=call.model, timeout_s=timeout_s) as client:
                return client.generate(**call.kwargs)
        except ClientError as exc:
            if exc.rejected:
                raise doors.from_kiln(exc.detail, names) from None
            if exc.unreachable or exc.status in ("503", "429", "StatusCode.UNAVAILABLE", "StatusCode.RESOURCE_EXHAUSTED"):
                busy = "queue" in exc.detail.lower()  # the pipeline's queue is full; otherwise away or restarting
                error = doors.DoorError("", f"the Triton server at {url} is {'busy' if busy else 'unavailable'}: "
                                        f"{exc.detail}; try again shortly", 503)
                error.retry_after_s = 1 if busy else 5
                raise error from None
            raise doors.DoorError("", f"the Triton server at {url} could not draw this: {exc.detail}", 502) from None

    # --- service --------------------------------------------------------------------------------

    @app.get("/health", tags=["service"])
    def health():
        try:
            with KilnClient(url, "http", timeout_s=10) as client:
                triton = client.health()
        except ClientError as exc:
            return JSONResponse({"status": "unavailable", "triton": url, "error": str(exc)}, status_code=503)
        served = sorted(catalog.served())
        ok = triton["ready"] and bool(served)
        return JSONResponse({"status": "ok" if ok else "unavailable", "triton": url, **triton, "models": served},
                            status_code=200 if ok else 503)

    # --- A1111 ----------------------------------------------------------------------------------

    @app.get("/sdapi/v1/samplers", tags=["A1111"])
    def samplers():
        return doors.a1111_samplers()

    @app.get("/sdapi/v1/schedulers", tags=["A1111"])
    def schedulers():
        return [{"name": "automatic", "label": "Automatic"}, {"name": "karras", "label": "Karras"}]

    @app.get("/controlnet/model_list", tags=["A1111"])
    def controlnet_models():
        """The sd-webui-controlnet extension's model list: every ControlNet a served model holds."""
        return {"model_list": sorted({n for s in catalog.served().values() for n in s.controlnets})}

    @app.get("/controlnet/module_list", tags=["A1111"])
    def controlnet_modules():
        return {"module_list": ["none"]}  # control images come ready-made (kiln data prepare --control)

    @app.get("/sdapi/v1/sd-models", tags=["A1111"])
    def sd_models():
        return doors.a1111_models(catalog.served())

    @app.get("/sdapi/v1/options", tags=["A1111"])
    def get_options():
        served = catalog.served()
        default = state["default"] if state["default"] in served else (sorted(served)[0] if served else None)
        return {"sd_model_checkpoint": default}

    @app.post("/sdapi/v1/options", tags=["A1111"])
    def set_options(options: dict[str, object]):
        unknown = sorted(set(options) - {"sd_model_checkpoint"})
        if unknown:
            raise doors.DoorError(unknown[0], f"options {unknown} cannot be set here: expected only sd_model_checkpoint")
        if "sd_model_checkpoint" in options:
            value = options["sd_model_checkpoint"]
            chosen = doors.choose_model(value if isinstance(value, str) else repr(value), catalog_served(), state["default"],
                                  "sd_model_checkpoint")
            state["default"] = chosen.name
        return None

    def a1111(req: doors.A1111Txt2Img):
        served = catalog_served()
        call = doors.a1111_call(req, served, state["default"])
        result = generate(call, doors.A1111_FIELDS)
        return doors.a1111_answer(req, call, served[call.model], result.images, result.seeds)

    @app.post("/sdapi/v1/txt2img", tags=["A1111"])
    def txt2img(req: doors.A1111Txt2Img):
        return a1111(req)

    @app.post("/sdapi/v1/img2img", tags=["A1111"])
    def img2img(req: doors.A1111Img2Img):
        return a1111(req)

    # --- OpenAI ---------------------------------------------------------------------------------

    @app.get("/v1/models", tags=["OpenAI"])
    def openai_models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "kiln"}
                                           for name in sorted(catalog.served())]}

    @app.post("/v1/images/generations", tags=["OpenAI"])
    def generations(req: doors.OpenAIGeneration):
        call = doors.openai_call(req, catalog_served(), state["default"])
        result = generate(call, doors.OPENAI_FIELDS)
        return doors.openai_answer(result.images, result.seeds, int(time.time()))

    edit_form = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["image", "prompt"],
        "properties": {"image": {"type": "string", "format": "binary"},
                       **{k: v for k, v in doors.OpenAIEdit.model_json_schema()["properties"].items()}}}}}}}

    @app.post("/v1/images/edits", tags=["OpenAI"], openapi_extra=edit_form)
    async def edits(request: Request):
        """multipart/form-data: image (a file), prompt, and the fields of /v1/images/generations, plus strength."""
        from pydantic import ValidationError
        from starlette.concurrency import run_in_threadpool

        try:
            form = await request.form(max_files=2, max_fields=32)
        except BodyTooLarge as exc:
            raise doors.DoorError("", str(exc), 413) from None
        except Exception as exc:  # noqa: BLE001 - not a form, or a malformed one
            raise doors.DoorError("", f"the body is not a multipart form ({exc}): send image and prompt as "
                                  "multipart/form-data") from None
        images = [v for k, v in form.multi_items() if k in ("image", "image[]")]
        if "mask" in form:
            raise doors.DoorError("mask", "mask: this server does not inpaint; send the image without a mask")
        if len(images) != 1 or isinstance(images[0], str):
            raise doors.DoorError("image", f"image: expected one image file, got {len(images)} "
                                  f"{'text field' if images and isinstance(images[0], str) else 'file(s)'}")
        data = await images[0].read(MAX_BODY_BYTES + 1)
        fields = {k: v for k, v in form.multi_items() if k not in ("image", "image[]")}
        if any(not isinstance(v, str) for v in fields.values()):
            raise doors.DoorError(next(k for k, v in fields.items() if not isinstance(v, str)), "expected a text field, got a file")
        try:
            req = doors.OpenAIEdit.model_validate(fields)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from None
        call = doors.openai_call(req, catalog_served(), state["default"], image=data)
        result = await run_in_threadpool(generate, call, doors.OPENAI_FIELDS)
        return doors.openai_answer(result.images, result.seeds, int(time.time()))

    return app


def read_key(path: Path | None) -> str | None:
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise GatewayError(f"--api-key-file {path} does not exist", hint="write the key into it, one line")
    key = path.read_text().strip()
    if len(key) < 16:
        raise GatewayError(f"the key in {path} is {len(key)} characters: expected at least 16",
                           hint="python -c 'import secrets; print(secrets.token_urlsafe(32))' > KEYFILE")
    return key


def serve(url: str, host: str, port: int, api_key: str | None = None, admin_key: str | None = None,
          models: tuple[str, ...] = ()) -> None:
    """Run the gateway in the foreground until Ctrl-C."""
    try:
        import uvicorn
    except ImportError:
        raise GatewayError("kiln gateway needs FastAPI and uvicorn", hint="pip install 'kiln[gateway]'") from None
    app = create_app(url, api_key, admin_key, models=models)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
