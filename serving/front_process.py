"""Front doors (`kiln gateway`, `kiln ui`) run in the background: started detached, recorded beside
the Triton server they front (~/.cache/kiln/run/DOOR-PORT.json), stopped by `kiln stop` with that
server."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import ServeError
from kiln.serving.server import HOST, _alive, kiln_home, terminate

DOORS = ("gateway", "ui")
READY_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Door:
    kind: str  # gateway | ui
    pid: int
    port: int
    host: str
    triton: str  # the Triton HTTP url it fronts, host:port
    log_file: str

    @property
    def url(self) -> str:
        return f"http://{self.host if self.host not in ('0.0.0.0', '::') else HOST}:{self.port}"


def record_file(kind: str, port: int) -> Path:
    return kiln_home() / "run" / f"{kind}-{port}.json"


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True  # it answers, if only to say no (a key is needed, Triton is not ready yet)
    except OSError:
        return False


def start(kind: str, argv: list[str], host: str, port: int, triton: str) -> Door:
    """Start `kiln KIND ARGV...` detached, wait until its port answers, record it. A door already
    recorded on this port and still running is refused."""
    previous = read(kind, port)
    if previous is not None and _alive(previous.pid):
        raise ServeError(f"a Kiln {kind} already runs on port {port} (pid {previous.pid})",
                         hint="kiln stop stops it with its server, or pick another --port")
    log_file = kiln_home() / "run" / f"{kind}-{port}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "kiln.cli", kind, *argv], stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    door = Door(kind, process.pid, port, host, triton, str(log_file))
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not _answers(door.url + ("/health" if kind == "gateway" else "/")):
        if process.poll() is not None or time.monotonic() > deadline:
            terminate(process.pid, 5)
            tail = log_file.read_text(errors="replace").splitlines()[-8:]
            raise ServeError(f"the {kind} did not start on port {port}: " + " | ".join(tail),
                             hint=f"its log: {log_file}")
        time.sleep(0.5)
    path = record_file(kind, port)
    path.write_text(json.dumps(door.__dict__))
    return door


def read(kind: str, port: int) -> Door | None:
    return _read_record(record_file(kind, port))


def _read_record(path: Path) -> Door | None:
    try:
        return Door(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def stop_fronting(triton_port: int) -> list[Door]:
    """Stop every recorded door in front of the Triton server on this HTTP port; returns those that ran."""
    stopped = []
    folder = kiln_home() / "run"
    for kind in DOORS:
        for path in folder.glob(f"{kind}-*.json"):
            door = _read_record(path)
            if door is None or door.triton.rsplit(":", 1)[-1] != str(triton_port):
                continue
            if _alive(door.pid):
                terminate(door.pid, 10)
                stopped.append(door)
            path.unlink(missing_ok=True)
    return stopped

