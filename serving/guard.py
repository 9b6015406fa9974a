"""Kiln's door in front of tritonserver's HTTP port: what Triton 2.51 cannot be trusted to parse is
refused here, before it reaches Triton.

- a body larger than MAX_BODY_BYTES, counted after gzip/deflate inflation (a 1 MB gzip body that
  inflates to 1 GiB used to grow Triton's shared memory by a GiB for good): 413;
- a JSON header that is not JSON, or nests deeper than MAX_JSON_DEPTH (about 60,000 nested arrays
  crash tritonserver itself, taking every model with it): 400 naming the problem;
- a JSON header over COMPRESS_JSON_OVER bytes is passed on gzip-compressed: tritonserver 2.51 dies
  (SIGSEGV) parsing a raw JSON body of a few MB (1 MB was parsed, 5 MB killed it), but parses the same
  body inflated from gzip, and a binary-data body of 6 MB, without trouble;
- everything else passes through unchanged, to Triton's HTTP port on 127.0.0.1, which Kiln picks
  and no client is told about. While Triton restarts, requests get 503.

gRPC goes to Triton directly: its messages are protobuf, which has no nesting to exploit.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import re
import threading
from dataclasses import dataclass

log = logging.getLogger("kiln.serving")

MAX_BODY_BYTES = 64 << 20  # an 8 MiB init image as JSON numbers, or a UNet batch's latents, fit well inside
COMPRESS_JSON_OVER = 512 << 10
MAX_JSON_DEPTH = 32  # Triton's own requests nest 3-4 deep, a tensor's data a level per dimension
INFER_HEADER = "Inference-Header-Content-Length"  # Triton's binary-data extension: JSON, then raw tensors
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "content-length", "content-encoding", "host"}
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 opening, -1 closing (int8)


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def json_depth(text: bytes) -> int:
    """How deep arrays and objects nest, strings skipped: linear and in C (regex, translate, cumsum)."""
    import numpy as np

    brackets = _STRING.sub(b"", text).translate(_STEPS, _NOT_BRACKET)
    if not brackets:
        return 0
    return int(np.cumsum(np.frombuffer(brackets, dtype=np.int8), dtype=np.int32).max())


def check_body(body: bytes, headers) -> bool:
    """Raise Refused for a body Triton must not parse; True when it must reach Triton compressed."""
    if len(body) > MAX_BODY_BYTES:
        raise Refused(413, f"the request body is {len(body)} bytes: at most {MAX_BODY_BYTES} are accepted")
    if not body:
        return False
    header_length = headers.get(INFER_HEADER)
    if header_length is not None:
        try:
            header_length = int(header_length)
        except ValueError:
            raise Refused(400, f"{INFER_HEADER}={header_length!r} is invalid: expected the JSON header's length in bytes")
        if not 0 <= header_length <= len(body):
            raise Refused(400, f"{INFER_HEADER}={header_length} is invalid: expected 0 to {len(body)} (the body's length)")
    header = body if header_length is None else body[:header_length]
    if not header:
        return False
    depth = json_depth(header)
    if depth > MAX_JSON_DEPTH:
        raise Refused(400, f"the request's JSON nests {depth} levels deep: at most {MAX_JSON_DEPTH} are accepted")
    try:
        json.loads(header)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise Refused(400, f"the request body is not valid JSON: {exc}")
    return len(header) > COMPRESS_JSON_OVER


@dataclass
class Guard:
    """An aiohttp server on `host:port` forwarding to Triton's HTTP port `backend`, in a thread of its own."""

    host: str
    port: int
    backend: int
    thread: threading.Thread | None = None
    loop: asyncio.AbstractEventLoop | None = None

    async def handle(self, request):
        from aiohttp import ClientConnectionError, web

        try:
            body = await request.read()  # inflated by aiohttp; raises past client_max_size
            loop = asyncio.get_running_loop()
            compress = await loop.run_in_executor(None, check_body, body, request.headers)
        except web.HTTPRequestEntityTooLarge:
            return self.error(413, f"the request body is larger than {MAX_BODY_BYTES} bytes (after decompression)")
        except Refused as exc:
            return self.error(exc.status, str(exc))
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}  # the body is inflated
        if compress:
            body = await loop.run_in_executor(None, gzip.compress, body, 1)
            headers["Content-Encoding"] = "gzip"
        url = f"http://{self.host}:{self.backend}{request.rel_url}"
        try:
            async with self.session.request(request.method, url, data=body, headers=headers) as answer:
                payload = await answer.read()
                out = {k: v for k, v in answer.headers.items()  # passed on as Triton wrote it, compressed or not
                       if k.lower() not in HOP_BY_HOP or k.lower() == "content-encoding"}
                return web.Response(status=answer.status, body=payload, headers=out)
        except ClientConnectionError:
            return self.error(503, "the server is restarting: try again in a few seconds")

    @staticmethod
    def error(status: int, message: str):
        from aiohttp import web

        return web.json_response({"error": message}, status=status)

    async def serve(self, started: threading.Event):
        import aiohttp
        from aiohttp import web

        # No response timeout: a generation may take minutes; the client's own timeout bounds it.
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None), auto_decompress=False)
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, self.host, self.port, reuse_address=True).start()
        self.stopped = asyncio.Event()
        started.set()
        await self.stopped.wait()
        await runner.cleanup()
        await self.session.close()

    def start(self) -> None:
        started = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self.serve(started),),
                                       name="kiln-http-guard", daemon=True)
        self.thread.start()
        if not started.wait(30):
            raise RuntimeError(f"the HTTP door on {self.host}:{self.port} did not start")

    def stop(self) -> None:
        if self.loop is not None and self.thread is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.stopped.set)
            self.thread.join(10)
