"""The embedded Triton server: the tritonserver binary shipped in the nvidia-pytriton wheel, run on
127.0.0.1 (or the address `kiln serve --host` names) against a Kiln model repository (no Docker)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from kiln.artifacts import write_folder_atomically
from kiln.errors import ServeError

HOST = "127.0.0.1"  # the default address, and the only one Triton's private HTTP port listens on
WILDCARDS = ("0.0.0.0",)  # addresses that bind every interface; clients on this machine reach them on HOST
STARTUP_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 30.0
ADMIN_HEADER = "admin-key"  # the admin surfaces need this header: Triton's restricted-API protection
RESTRICTED_APIS = "model-repository,shared-memory,trace,logging"  # load/unload/index, shm registration, trace and log settings


@dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    def flags(self) -> dict[str, int]:
        return {"--http-port": self.http, "--grpc-port": self.grpc, "--metrics-port": self.metrics}


@dataclass(frozen=True)
class ServerInfo:
    pid: int
    ports: Ports
    repository: str
    log_file: str
    host: str = HOST  # the address the HTTP, gRPC and metrics ports listen on

    @property
    def reach(self) -> str:
        """The address a client on this machine connects to."""
        return HOST if self.host in WILDCARDS else self.host

    @property
    def http_url(self) -> str:
        return f"{self.reach}:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"{self.reach}:{self.ports.grpc}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.reach}:{self.ports.metrics}/metrics"


def bind_address(host: str) -> str:
    """The IPv4 address `--host` names (an address, or a name this machine resolves), checked to be one of
    this machine's: refused with the value and the fix before any work is done."""
    fix = ("pass an IPv4 address of this machine: --host 127.0.0.1 (this machine only, the default) "
           "or --host 0.0.0.0 (every interface)")
    try:
        address = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except (socket.gaierror, UnicodeError, ValueError) as e:
        raise ServeError(f"--host {host!r} is not an IPv4 address or a host name this machine can resolve "
                         f"({getattr(e, 'strerror', None) or e})", hint=fix) from None
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((address, 0))
        except OSError as e:
            raise ServeError(f"--host {host!r} ({address}) is not an address of this machine ({e.strerror})",
                             hint=fix) from None
    return address


def kiln_home() -> Path:
    return Path(os.environ.get("KILN_HOME", Path.home() / ".cache" / "kiln"))


def _pytriton_dirs() -> tuple[Path, Path]:
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServeError("nvidia-pytriton is not installed", hint="make setup")
    package = Path(spec.submodule_search_locations[0])
    return package / "tritonserver", package.parent / "nvidia_pytriton.libs"


def server_home() -> Path:
    """A copy of the wheel's tritonserver with the Python-backend stub for this interpreter.

    The stub runs the system's libpython in isolated mode, so PYTHONPATH is ignored and the
    environment's packages are invisible to it. The copy's triton_python_backend_utils (the first
    module the stub imports, before numpy) therefore opens with two lines that put this
    environment's site-packages first. One copy per environment, keyed by its path.
    """
    source, _ = _pytriton_dirs()
    site_packages = sysconfig.get_paths()["purelib"]
    key = hashlib.sha256(f"{source}|{site_packages}".encode()).hexdigest()[:12]
    home = kiln_home() / f"tritonserver-{key}"
    if (home / "bin" / "tritonserver").is_file():
        return home
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = source / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServeError(f"no Python-backend stub for Python {version} in {source}")
    with write_folder_atomically(home) as tmp:
        for part in ("bin", "backends", "caches"):
            shutil.copytree(source / part, tmp / part)
        shutil.copy2(stub, tmp / "backends" / "python" / stub.name)
        utils = tmp / "backends" / "python" / "triton_python_backend_utils.py"
        header = (
            "# Added by Kiln: the stub's isolated interpreter must see this environment first.\n"
            f"import site as _kiln_site, sys as _kiln_sys\n"
            f"_kiln_sys.path.insert(0, {site_packages!r})\n"
            f"_kiln_site.addsitedir({site_packages!r})\n"
        )
        utils.write_text(header + utils.read_text())
    return home


def _port_free(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(exclude: tuple[int, ...] = ()) -> int:
    """A port nothing listens on now and not in `exclude` (ports chosen but not yet bound: the OS may
    hand a just-closed port out again)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port not in exclude:
            return port


def free_ports() -> Ports:
    """Three different ports nothing listens on now (HTTP, gRPC, metrics), for a server beside others:
    all three held open while chosen, so the OS cannot hand one out twice."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(3)]
        for s in sockets:
            s.bind((HOST, 0))
        return Ports(*(s.getsockname()[1] for s in sockets))


def state_file(ports: Ports) -> Path:
    return kiln_home() / "run" / f"triton-{ports.http}.json"


def command(repository: Path, ports: Ports, home: Path, admin_key: str, host: str = HOST) -> list[str]:
    """tritonserver's command line: gRPC and metrics on `host`; HTTP on HOST only, behind Kiln's door."""
    args = [
        str(home / "bin" / "tritonserver"),
        f"--model-repository={repository}",
        f"--backend-directory={home / 'backends'}",
        f"--cache-directory={home / 'caches'}",
        f"--http-address={HOST}",
        f"--grpc-address={host}",
        f"--metrics-address={host}",
        "--allow-gpu-metrics=false",
        "--metrics-config=summary_latencies=true",  # p50/p90/p99 per model, as the cluster target exports them
        "--exit-on-error=true",
        "--strict-readiness=true",
        "--model-control-mode=explicit",
        "--load-model=*",
        "--exit-timeout-secs=10",
        # every admin surface (RESTRICTED_APIS) only with the key, over both protocols
        f"--http-restricted-api={RESTRICTED_APIS}:{ADMIN_HEADER}={admin_key}",
        f"--grpc-restricted-protocol={RESTRICTED_APIS}:{ADMIN_HEADER}={admin_key}",
    ]
    args += [f"{flag}={port}" for flag, port in ports.flags().items()]
    return args


def _environment() -> dict[str, str]:
    _, libs = _pytriton_dirs()
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
    # glibc keeps freed heap in its arenas: a large request body (a gzip bomb inflates to a GiB) left
    # tritonserver that much larger for good. Blocks above 1 MiB are mapped on their own and given back
    # to the system when freed.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    env.setdefault("MALLOC_TRIM_THRESHOLD_", str(4 << 20))
    return env


def ready(ports: Ports) -> bool:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{ports.http}/v2/health/ready", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def triton_errors(log_text: str, limit: int = 12) -> str:
    """Triton's own error lines from its log (E-lines, failed model states, fatal messages)."""
    picked = []
    for line in log_text.splitlines():
        if re.match(r"^E\d{4}", line) or "UNAVAILABLE" in line or line.startswith("error:"):
            picked.append(line.strip())
    return "\n".join(picked[-limit:]) or "\n".join(log_text.splitlines()[-limit:])


def admin_key_file(ports: Ports) -> Path:
    return kiln_home() / "run" / f"triton-{ports.http}.admin-key"


def _admin_key(ports: Ports, key: str | None) -> str:
    """The given key, or a fresh random one; kept in a file only its owner can read."""
    import secrets

    key = key or os.environ.get("KILN_ADMIN_KEY") or secrets.token_urlsafe(24)
    path = admin_key_file(ports)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key)
    return key


def launch(repository: Path, ports: Ports, admin_key: str, log_file: Path, host: str = HOST) -> subprocess.Popen:
    """tritonserver in a session of its own (its stubs with it), its output appended to `log_file`."""
    with open(log_file, "ab") as log:
        return subprocess.Popen(
            command(repository, ports, server_home(), admin_key, host),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=_environment(),
            start_new_session=True,
        )


def _check_startable(repository: Path, ports: Ports, host: str) -> None:
    if not (repository / "manifest.json").is_file():
        raise ServeError(f"{repository} is not a Kiln model repository", hint="kiln repo build ONNX_DIR REPO_DIR")
    running = read_state(ports)
    if running is not None and _alive(running.pid):
        raise ServeError(f"a Kiln server (pid {running.pid}) already runs on HTTP port {ports.http}",
                         hint=f"kiln stop --http-port {ports.http}")
    for flag, port in ports.flags().items():
        if not _port_free(port, host):
            raise ServeError(
                f"port {port} ({flag}) is already in use on {host}",
                hint=f"choose another with {flag}, or stop the server holding it: kiln stop --http-port {ports.http}",
            )


def _prepare(repository: Path, ports: Ports, log_file: Path | None, admin_key: str | None,
             host: str) -> tuple[Path, Path, str, str]:
    host = bind_address(host)  # first: a wrong --host is refused before anything is checked or written
    repository = Path(repository).resolve()
    _check_startable(repository, ports, host)
    server_home()  # copied once, before any supervisor needs it
    log_file = Path(log_file or kiln_home() / "run" / f"triton-{ports.http}.log")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.write_bytes(b"")
    return repository, log_file, _admin_key(ports, admin_key), host


def start(
    repository: Path,
    ports: Ports = Ports(),
    log_file: Path | None = None,
    timeout_s: float = STARTUP_TIMEOUT_S,
    admin_key: str | None = None,
    host: str = HOST,
) -> tuple[subprocess.Popen, ServerInfo]:
    """Start a supervised tritonserver in the background and wait until every model is ready.

    The supervisor (kiln.serving.supervisor) runs detached in a session of its own and restarts the
    server when it dies; it records itself in the state file first thing, so `stop` finds it. An
    interrupted or failed start stops what it started, however early it was interrupted."""
    repository, log_file, _, host = _prepare(repository, ports, log_file, admin_key, host)
    state_file(ports).unlink(missing_ok=True)  # a dead server's record (_prepare refused a live one)
    process = None
    try:
        with open(log_file, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "kiln.serving.supervisor", str(repository), "--http-port", str(ports.http),
                 "--grpc-port", str(ports.grpc), "--metrics-port", str(ports.metrics), "--log-file", str(log_file),
                 "--startup-timeout", str(timeout_s), "--host", host],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )
        info = ServerInfo(process.pid, ports, str(repository), str(log_file), host)
        # The supervisor records itself (and then its tritonserver) in the state file; this process
        # writes nothing there, so a record with the server's pid is never overwritten by an older one.
        while read_status(ports).get("status") != "ready":
            if process.poll() is not None:
                why = read_status(ports).get("last_exit") or f"its supervisor exited with code {process.returncode}"
                raise ServeError(
                    f"tritonserver exited ({why}) while loading {repository}:\n"
                    f"{triton_errors(log_file.read_text(errors='replace'))}",
                    hint=f"full log: {log_file}",
                )
            time.sleep(0.3)
    except BaseException:
        _stop_uninterrupted(ports, process)
        raise
    return process, info


def _stop_uninterrupted(ports: Ports, process: subprocess.Popen | None) -> None:
    """Stop what an interrupted start began, however early it was interrupted (before the supervisor
    recorded itself, its own pid is all there is); a second Ctrl-C must not cut the clean-up short."""
    import threading

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        if read_state(ports) is not None:
            stop(ports)
        if process is not None:
            terminate(process.pid)  # its SIGTERM handler stops the tritonserver it started
            status = read_status(ports)
            if status.get("triton_pid"):
                terminate(status["triton_pid"])
            state_file(ports).unlink(missing_ok=True)
            admin_key_file(ports).unlink(missing_ok=True)
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


def write_state(info: ServerInfo, **status) -> None:
    from kiln.artifacts import write_json_atomically

    write_json_atomically(state_file(info.ports), {**asdict(info), "ports": asdict(info.ports), **status})


def read_status(ports: Ports) -> dict:
    """The state file's whole record: pid (the supervisor), triton_pid, status, restarts, last_exit."""
    try:
        return json.loads(state_file(ports).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def read_state(ports: Ports) -> ServerInfo | None:
    data = read_status(ports)
    if not data:
        return None
    return ServerInfo(data["pid"], Ports(**data["ports"]), data["repository"], data["log_file"], data.get("host", HOST))


def _alive(pid: int) -> bool:
    """Whether `pid` still runs: an exited process that its parent (or, orphaned, the machine's init)
    has not reaped yet is a zombie, which holds nothing but its pid and counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc (not Linux): signal 0 is all there is to tell by
    return state not in ("Z", "X")


def kill_group(pid: int) -> None:
    """SIGKILL whatever is left of a process group (a dead server's Python-backend stubs)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def terminate(pid: int, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM a process group (a server and its Python-backend stubs), SIGKILL after a grace."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                finished, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                finished = 0 if _alive(pid) else pid
            if finished == pid or not _alive(pid):
                return
            time.sleep(0.2)


@dataclass(frozen=True)
class StopResult:
    info: ServerInfo
    was_running: bool  # False: only a stale record was cleared

    @property
    def pid(self) -> int:
        return self.info.pid


def stop(ports: Ports = Ports()) -> StopResult:
    """Stop the server started on these ports: its supervisor, then whatever tritonserver it left."""
    status = read_status(ports)
    info = read_state(ports)
    if info is None:
        raise ServeError(f"no Kiln server is recorded on HTTP port {ports.http}", hint="kiln serve REPO --background")
    was_running = _alive(info.pid) or bool(status.get("triton_pid") and _alive(status["triton_pid"]))
    terminate(info.pid)
    if status.get("triton_pid"):
        terminate(status["triton_pid"])
    state_file(ports).unlink(missing_ok=True)
    admin_key_file(ports).unlink(missing_ok=True)
    return StopResult(info, was_running)


@contextlib.contextmanager
def running_server(repository: Path, ports: Ports | None = None, **start_options) -> Iterator[ServerInfo]:
    """A supervised server for the duration of a block: started on `ports` (default: free ones),
    ready when the block begins, stopped when it ends however it ends. `start_options` go to `start`."""
    ports = ports or free_ports()
    _, info = start(repository, ports, **start_options)
    try:
        yield info
    finally:
        stop(ports)


def serve_foreground(repository: Path, ports: Ports, on_ready, host: str = HOST) -> int:
    """Supervise the server in this process until Ctrl-C or SIGTERM; `on_ready(info, restarts)` after each
    (re)start. Returns 0 when stopped, 1 when the server could not start."""
    from kiln.serving.supervisor import Supervision, supervise

    repository, log_file, key, host = _prepare(repository, ports, None, None, host)
    try:
        return supervise(Supervision(repository, ports, log_file, key, on_ready=on_ready, host=host))
    finally:
        state_file(ports).unlink(missing_ok=True)
        admin_key_file(ports).unlink(missing_ok=True)
