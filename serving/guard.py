"""Kiln's door in front of tritonserver's HTTP port: what Triton 2.51 cannot be trusted to parse is
refused here, before it reaches Triton.

- a body larger than MAX_BODY_BYTES, counted while gzip/deflate inflation streams (a 1 MB gzip body
  that inflates to 1 GiB used to grow Triton's shared memory by a GiB for good): 413;
- a repeated Inference-Header-Content-Length, Content-Encoding or Content-Length (the door would
  check one value and Triton read another): 400;
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

MAX_BODY_BYTES = 16 << 20  # an 8 MiB init image (binary-data extension) fits twice; so does a UNet batch as JSON
COMPRESS_JSON_OVER = 512 << 10
PARSE_JSON_UP_TO = 1 << 20  # larger headers get the depth scan only: parsing them would pin the door's
# memory (millions of Python objects) and hold the GIL against every other request
READ_CHUNK = 64 << 10
MAX_JSON_DEPTH = 32  # Triton's own requests nest 3-4 deep, a tensor's data a level per dimension
BACKEND_HOST = "127.0.0.1"  # Triton's own HTTP port listens here alone, whatever address the door listens on
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


def check_body(body: bytes, headers, path: str = "") -> bool:
    """Raise Refused for a body Triton must not parse; True when it must reach Triton compressed.
    `headers` maps each name to all its values (a repeated header is refused: Triton reads the last)."""
    if len(body) > MAX_BODY_BYTES:
        raise Refused(413, f"the request body is {len(body)} bytes: at most {MAX_BODY_BYTES} are accepted")
    for name in (INFER_HEADER, "Content-Encoding", "Content-Length"):
        if len(headers.getall(name, [])) > 1:
            raise Refused(400, f"the header {name} is given {len(headers.getall(name))} times: give it once")
    if not body:
        return False
    header_length = headers.get(INFER_HEADER)
    if header_length is not None:
        try:
            header_length = int(header_length)
        except ValueError:
            raise Refused(400, f"{INFER_HEADER}={header_length!r} is invalid: expected the JSON header's length in bytes")
        if not 1 <= header_length <= len(body):
            raise Refused(400, f"{INFER_HEADER}={header_length} is invalid: expected 1 to {len(body)} (the body's length)")
    header = body if header_length is None else body[:header_length]
    depth = json_depth(header)
    if depth > MAX_JSON_DEPTH:
        raise Refused(400, f"the request's JSON nests {depth} levels deep: at most {MAX_JSON_DEPTH} are accepted")
    if len(header) <= PARSE_JSON_UP_TO:
        try:
            parsed = json.loads(header)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise Refused(400, f"the request body is not valid JSON: {exc}")
        if path.endswith("/infer") and not (isinstance(parsed, dict) and isinstance(parsed.get("inputs"), list)):
            raise Refused(400, 'an inference request is a JSON object with an "inputs" list')
    return len(header) > COMPRESS_JSON_OVER


async def read_body(request) -> bytes:
    """The body, inflated as its Content-Encoding says, refused once it passes MAX_BODY_BYTES: the
    inflation is streamed with a bound, so a small body that inflates to a GiB costs a chunk."""
    import zlib

    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    wbits = {"identity": None, "gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding, 0)
    if wbits == 0:
        raise Refused(415, f"Content-Encoding {encoding!r} is not accepted: use gzip, deflate or none")
    inflater = zlib.decompressobj(wbits) if wbits else None
    parts, size = [], 0
    while True:
        chunk = await request.content.read(READ_CHUNK)
        if not chunk:
            break
        if inflater is not None:
            if encoding == "deflate" and size == 0 and not parts and chunk[:1] != b"\x78":
                inflater = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate, as some clients send it
            try:
                out = inflater.decompress(chunk, MAX_BODY_BYTES - size + 1)
                while inflater.unconsumed_tail and len(out) <= MAX_BODY_BYTES - size:
                    out += inflater.decompress(inflater.unconsumed_tail, MAX_BODY_BYTES - size - len(out) + 1)
            except zlib.error as exc:
                raise Refused(400, f"the body is not valid {encoding}: {exc}")
            chunk = out
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise Refused(413, f"the request body is larger than {MAX_BODY_BYTES} bytes (after decompression)")
        parts.append(chunk)
    return b"".join(parts)


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

        loop = asyncio.get_running_loop()
        try:
            body = await read_body(request)
            compress = await loop.run_in_executor(None, check_body, body, request.headers, request.path)
        except Refused as exc:
            return self.error(exc.status, str(exc))
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}  # the body is inflated
        if compress:
            body = await loop.run_in_executor(None, gzip.compress, body, 1)
            headers["Content-Encoding"] = "gzip"
        url = f"http://{BACKEND_HOST}:{self.backend}{request.rel_url}"
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
        runner = web.AppRunner(app, access_log=None, handle_signals=False, auto_decompress=False)
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
