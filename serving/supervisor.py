"""Keeps one embedded tritonserver running: restarts it with backoff when it dies or stops answering
its liveness endpoint, reloads a model whose Python-backend stub died (Triton keeps reporting it ready
while every request to it fails), logs why, and counts restarts in the server's state file.

tritonserver 2.51 can be killed by a single request (see the README's known limits) and nothing in it
restarts itself, so every server Kiln starts runs under this loop: in-process for `kiln serve` in the
foreground, as a detached process (`python -m kiln.serving.supervisor`) for `--background`, the tests,
the demo and the benchmarks. `kiln stop` ends the supervisor, which ends tritonserver and its stubs. The supervisor also holds the
HTTP door (kiln.serving.guard): clients' HTTP port is the guard's, Triton's own is private.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kiln.serving import server
from kiln.serving.guard import Guard

LIVENESS_PERIOD_S = 10.0  # how often a ready server's /v2/health/live is asked
LIVENESS_FAILURES = 3  # consecutive unanswered checks before a hung server is killed and restarted
BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)  # waits before consecutive restarts
STABLE_S = 60.0  # a server up this long resets the backoff
MAX_FAILED_STARTS = 5  # restarts in a row that never became ready: give up


@dataclass
class Supervision:
    repository: Path
    ports: server.Ports
    log_file: Path
    admin_key: str
    startup_timeout_s: float = server.STARTUP_TIMEOUT_S
    on_ready: Callable[[server.ServerInfo, int], None] | None = None  # (info, restarts)
    host: str = server.HOST  # where clients' HTTP (the guard), gRPC and metrics ports listen, every restart
    restarts: int = 0
    last_exit: str | None = None
    log_start: int = 0
    stopping: bool = False
    triton: subprocess.Popen | None = field(default=None, repr=False)
    guard: Guard | None = field(default=None, repr=False)

    def __post_init__(self):
        # Triton's own HTTP port is private; clients reach it through the guard on ports.http.
        taken = (self.ports.http, self.ports.grpc, self.ports.metrics)  # chosen, not yet bound by tritonserver
        self.backend = server.Ports(server.free_port(exclude=taken), self.ports.grpc, self.ports.metrics)

    def note(self, message: str) -> None:
        """One line in the server's log, beside Triton's own."""
        with open(self.log_file, "a") as log:
            log.write(f"[kiln supervisor {time.strftime('%Y-%m-%d %H:%M:%S')}] {message}\n")

    def info(self) -> server.ServerInfo:
        return server.ServerInfo(os.getpid(), self.ports, str(self.repository), str(self.log_file), self.host)

    def record(self, status: str) -> None:
        server.write_state(self.info(), triton_pid=self.triton.pid if self.triton else None, status=status,
                           restarts=self.restarts, last_exit=self.last_exit, triton_http_port=self.backend.http)

    def launch(self) -> None:
        self.log_start = self.log_file.stat().st_size if self.log_file.exists() else 0  # this server's lines begin here
        self.triton = server.launch(self.repository, self.backend, self.admin_key, self.log_file, self.host)
        self.record("starting")

    def wait_ready(self) -> bool:
        """True once every model is ready; False if the server exited or timed out first."""
        deadline = time.monotonic() + self.startup_timeout_s
        while not self.stopping:
            if self.triton.poll() is not None:
                return False
            if server.ready(self.backend):
                return True
            if time.monotonic() > deadline:
                self.note(f"tritonserver was not ready after {self.startup_timeout_s:.0f} s: stopping it")
                server.terminate(self.triton.pid)
                return False
            time.sleep(0.5)
        return False

    def watch(self) -> None:
        """Until the server exits, is stopped, or stops answering its liveness endpoint; a model whose
        stub died is reloaded (and the server restarted if that fails)."""
        unanswered, next_check = 0, time.monotonic() + LIVENESS_PERIOD_S
        stubs = stub_instances(self.triton.pid)
        while not self.stopping and self.triton.poll() is None:
            time.sleep(0.5)
            if time.monotonic() < next_check:
                continue
            next_check = time.monotonic() + LIVENESS_PERIOD_S
            stubs, failed = self.revive(stubs)
            if failed:
                self.note(f"reloading {failed} did not bring its stub back: restarting tritonserver")
                server.terminate(self.triton.pid, timeout_s=5.0)
                self.last_exit = f"a Python-backend stub of {failed} died and its reload failed"
                return
            unanswered = 0 if live(self.backend) else unanswered + 1
            if unanswered >= LIVENESS_FAILURES:
                self.note(f"tritonserver (pid {self.triton.pid}) did not answer /v2/health/live "
                          f"{unanswered} times in a row: killing it")
                server.terminate(self.triton.pid, timeout_s=5.0)
                self.last_exit = "hung (liveness checks unanswered)"
                return
        if self.triton.poll() is not None and not self.stopping:
            self.last_exit = describe_exit(self.triton.returncode)

    def revive(self, known: dict[int, tuple[str, str]]) -> tuple[dict[int, tuple[str, str]], str | None]:
        """Reload each still-ready model one of whose stubs (`known`: pid -> (model, instance)) has gone:
        Triton 2.51 neither restarts a dead stub nor marks its model unready. Returns the stubs now
        running and the model whose reload failed, if one did."""
        current = stub_instances(self.triton.pid)
        running = {instance for _, instance in current.values()}
        dead = {model: instance for pid, (model, instance) in known.items() if pid not in current and instance not in running}
        for model, instance in dead.items():
            if not model_ready(self.backend, model):
                continue  # unloaded on purpose (kiln models unload): nothing to revive
            self.note(f"the Python-backend stub of {model} (instance {instance}) died: reloading {model}")
            self.restarts += 1
            self.last_exit = f"stub {instance} died; {model} reloaded"
            if not reload_model(self.backend, model, self.admin_key) or \
                    not any(m == model for m, _ in stub_instances(self.triton.pid).values()):
                return current, model
            self.record("ready")
        return (stub_instances(self.triton.pid) if dead else current), None

    def run(self) -> int:
        """Start, wait for ready, watch, restart; returns 0 when stopped, 1 when the server cannot start."""
        in_a_row = 0  # restarts since the server last stayed up STABLE_S
        self.record("starting")  # first thing: `kiln stop` finds this process from here on
        self.guard = Guard(self.host, self.ports.http, self.backend.http)
        self.guard.start()
        while not self.stopping:
            self.launch()
            if self.wait_ready():
                self.record("ready")
                if self.on_ready is not None:
                    self.on_ready(self.info(), self.restarts)
                up_since = time.monotonic()
                self.watch()
                if self.stopping:
                    break
                if time.monotonic() - up_since > STABLE_S:
                    in_a_row = 0
            elif self.stopping:
                break
            else:
                self.last_exit = f"{describe_exit(self.triton.poll())} before it was ready"
                if self.restarts == 0 or in_a_row >= MAX_FAILED_STARTS:
                    server.kill_group(self.triton.pid)
                    self.note(f"tritonserver could not start ({self.last_exit}); giving up")
                    self.record("failed")
                    return 1
            server.kill_group(self.triton.pid)  # the dead server's Python-backend stubs
            wait = BACKOFF_S[min(in_a_row, len(BACKOFF_S) - 1)]
            in_a_row += 1
            self.restarts += 1
            self.note(f"tritonserver exited ({self.last_exit}); restart {self.restarts} in {wait:.0f} s. "
                      f"Triton's last errors:\n{server.triton_errors(self.log_tail())}")
            self.record("restarting")
            deadline = time.monotonic() + wait
            while not self.stopping and time.monotonic() < deadline:
                time.sleep(0.1)
        return 0

    def log_tail(self, size: int = 64 << 10) -> str:
        """The end of what the last server wrote (not its predecessors' lines)."""
        with open(self.log_file, "rb") as f:
            f.seek(max(self.log_start, f.seek(0, os.SEEK_END) - size))
            return f.read().decode(errors="replace")

    def stop(self, *_) -> None:
        self.stopping = True


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def live(ports: server.Ports) -> bool:
    try:
        with urllib.request.urlopen(f"http://{server.HOST}:{ports.http}/v2/health/live", timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def stub_instances(triton_pid: int) -> dict[int, tuple[str, str]]:
    """The Python-backend stubs tritonserver `triton_pid` started: pid -> (Triton model name, instance
    name), read from each stub's command line (model.py's path, then the instance name)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rpartition(")")[2].split()[1])
            if parent != triton_pid:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
        if len(args) > 8 and args[0].endswith(b"triton_python_backend_stub"):
            found[int(entry)] = (Path(args[1].decode()).parent.parent.name, args[8].decode())
    return found


def model_ready(ports: server.Ports, model: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{server.HOST}:{ports.http}/v2/models/{model}/ready", timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _control(ports: server.Ports, path: str, admin_key: str, timeout_s: float = 300.0) -> bytes | None:
    """A POST to Triton's protected model-control API; None when it fails."""
    request = urllib.request.Request(f"http://{server.HOST}:{ports.http}{path}", data=b"{}",
                                     headers={server.ADMIN_HEADER: admin_key, "content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as r:
            return r.read() if r.status == 200 else None
    except (urllib.error.URLError, OSError):
        return None


def reload_model(ports: server.Ports, model: str, admin_key: str) -> bool:
    """Unload and load `model` (a load alone is a no-op for an unchanged model in Triton 2.51, dead stub
    or not), then load again whatever was ready before and is not now (an ensemble that composed it)."""
    import json

    index = _control(ports, "/v2/repository/index", admin_key)
    ready = [m["name"] for m in json.loads(index or b"[]") if m.get("state") == "READY"]
    if _control(ports, f"/v2/repository/models/{model}/unload", admin_key) is None:
        return False
    if _control(ports, f"/v2/repository/models/{model}/load", admin_key) is None:
        return False
    return all(model_ready(ports, name) or _control(ports, f"/v2/repository/models/{name}/load", admin_key) is not None
               for name in ready)


def supervise(supervision: Supervision) -> int:
    """Run the loop in this process until SIGTERM or SIGINT; the server stops with it."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, supervision.stop)
    try:
        return supervision.run()
    finally:
        if supervision.triton is not None:
            server.terminate(supervision.triton.pid)
        if supervision.guard is not None:
            supervision.guard.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repository", type=Path)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--log-file", type=Path, required=True)
    parser.add_argument("--startup-timeout", type=float, default=server.STARTUP_TIMEOUT_S)
    parser.add_argument("--host", default=server.HOST)
    args = parser.parse_args(argv)
    ports = server.Ports(args.http_port, args.grpc_port, args.metrics_port)
    key = server.admin_key_file(ports).read_text()
    return supervise(Supervision(args.repository, ports, args.log_file, key, args.startup_timeout, host=args.host))


if __name__ == "__main__":
    sys.exit(main())
