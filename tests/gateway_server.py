"""A kiln gateway in front of a test's Triton server, on a free port, in a thread of the test process."""

from __future__ import annotations

import contextlib
import threading
import time

from kiln.serving import server


@contextlib.contextmanager
def running_gateway(info: server.ServerInfo, api_key: str | None = None):
    """Yields the gateway's base URL; it sees every served model (the server's admin key)."""
    import uvicorn

    from kiln.serving.gateway import create_app

    key_file = server.admin_key_file(info.ports)
    app = create_app(info.http_url, api_key=api_key, admin_key=key_file.read_text() if key_file.is_file() else None)
    port = server.free_port()
    runner = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not runner.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert runner.started, "the gateway did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        runner.should_exit = True
        thread.join(timeout=10)
