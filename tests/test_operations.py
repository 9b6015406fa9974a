"""Operating Kiln: the address `kiln serve --host` binds (checked before any work, kept across restarts,
found again by `kiln stop`), the example systemd unit and the operator's commands in the docs, each
checked against `kiln` itself so they cannot rot."""

from __future__ import annotations

import configparser
import inspect
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from kiln.cli import app
from kiln.errors import ServeError
from kiln.serving import server, supervisor

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "deploy" / "systemd" / "kiln.service"
KILN = [sys.executable, "-m", "kiln.cli"]
PROMPT = "a red digit 7 on a white background"


def _loopback_has(address: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((address, 0))
        except OSError:
            return False
    return True


@pytest.mark.parametrize("host, reason, background", [
    ("not a host", "is not an IPv4 address or a host name this machine can resolve", True),
    ("203.0.113.7", "is not an address of this machine", False),  # TEST-NET-3: never this machine's
    ("::1", "is not an IPv4 address", True),
])
def test_bad_host_is_refused_before_anything_starts(host, reason, background, tmp_path):
    """Refused with the flag, the value and the fix, before the repository is read or a file is written:
    the repository here is not even one, which would be the error if --host were checked later."""
    home = tmp_path / "kiln-home"
    refused = subprocess.run(KILN + ["serve", str(tmp_path / "no-repository"), "--host", host,
                                     *(["--background"] if background else [])],
                             capture_output=True, text=True, timeout=120, env={**os.environ, "KILN_HOME": str(home)})
    assert refused.returncode == 1, refused.stderr
    assert f"error: --host {host!r}" in refused.stderr and reason in refused.stderr, refused.stderr
    assert "next: pass an IPv4 address of this machine: --host 127.0.0.1" in refused.stderr
    assert not home.exists()  # no state, key or log file: nothing was started


def test_host_names_resolve_to_the_address_bound():
    assert server.bind_address("localhost") == "127.0.0.1"
    assert server.bind_address("0.0.0.0") == "0.0.0.0"
    with pytest.raises(ServeError, match="--host ''"):
        server.bind_address("")
    info = server.ServerInfo(1, server.Ports(10, 11, 12), "repo", "log", host="0.0.0.0")
    assert (info.http_url, info.grpc_url, info.metrics_url) == ("127.0.0.1:10", "127.0.0.1:11",
                                                                "http://127.0.0.1:12/metrics")


def test_triton_binds_grpc_and_metrics_to_the_host_and_keeps_its_own_http_private():
    args = server.command(Path("repo"), server.Ports(1, 2, 3), Path("home"), "key", "192.0.2.1")
    assert {"--grpc-address=192.0.2.1", "--metrics-address=192.0.2.1", f"--http-address={server.HOST}"} <= set(args)


def test_supervisor_restarts_tritonserver_on_the_same_address(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    launched = []

    class Exited:
        pid = 0

    def launch(repository, ports, admin_key, log_file, host):
        launched.append((ports, host))
        return Exited()

    monkeypatch.setattr(server, "launch", launch)
    watched = supervisor.Supervision(tmp_path, server.Ports(1, 2, 3), tmp_path / "log", "key", host="127.0.0.2")
    watched.launch()
    watched.launch()  # what run() does after each exit
    assert [host for _, host in launched] == ["127.0.0.2", "127.0.0.2"]
    assert all(ports.grpc == 2 and ports.metrics == 3 for ports, _ in launched)
    assert server.read_state(server.Ports(1, 2, 3)).host == "127.0.0.2"  # what kiln stop and kiln health read


@pytest.mark.slow  # starts a Triton server of its own
@pytest.mark.triton
@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2"])
def test_serve_on_a_host_draws_and_kiln_stop_finds_it(host, repo_dir, tmp_path):
    """`kiln serve --host` explicitly, on free ports: an image over HTTP and gRPC at that address, metrics
    there too, and `kiln stop` given only the HTTP port stops it. 127.0.0.2 (Linux's loopback holds all of
    127/8) shows the address reaches every port: nothing answers on 127.0.0.1."""
    if not _loopback_has(host):
        pytest.skip(f"{host} is not an address of this machine")
    ports = server.free_ports()
    flags = ["--http-port", str(ports.http), "--grpc-port", str(ports.grpc), "--metrics-port", str(ports.metrics)]
    started = subprocess.run(KILN + ["serve", str(repo_dir("epsilon")), "--background", "--host", host, *flags],
                             capture_output=True, text=True, timeout=400)
    assert started.returncode == 0, started.stderr
    try:
        assert f"{host}:{ports.http}" in started.stderr and f"{host}:{ports.grpc}" in started.stderr
        assert json.loads(server.state_file(ports).read_text())["host"] == host
        for protocol, port in (("http", ports.http), ("grpc", ports.grpc)):
            out = tmp_path / f"{protocol}.png"
            drawn = subprocess.run(KILN + ["generate", PROMPT, "-o", str(out), "--url", f"{host}:{port}",
                                           "--protocol", protocol, "--seed", "4", "--steps", "2"],
                                   capture_output=True, text=True, timeout=120)
            assert drawn.returncode == 0, drawn.stderr
            from PIL import Image

            assert Image.open(out).size == (64, 64)
        with urllib.request.urlopen(f"http://{host}:{ports.metrics}/metrics", timeout=10) as r:
            assert b"nv_inference_request_success" in r.read()
        if host != server.HOST:
            for port in (ports.http, ports.grpc, ports.metrics):
                with pytest.raises(OSError):
                    socket.create_connection((server.HOST, port), timeout=5).close()
    finally:
        stopped = subprocess.run(KILN + ["stop", "--http-port", str(ports.http)], capture_output=True, text=True,
                                 timeout=120)
    assert stopped.returncode == 0 and "stopped the server (pid" in stopped.stderr, stopped.stderr
    assert not server.state_file(ports).exists()


def _unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)  # systemd repeats keys; % is literal
    unit.optionxform = str  # systemd's keys are case-sensitive
    assert unit.read(UNIT), UNIT
    return unit


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)\s*(s|sec|min)?", value.strip())
    assert match, f"TimeoutStopSec={value!r}: write seconds (60, 60s) or minutes (1min)"
    return int(match[1]) * (60 if match[2] == "min" else 1)


def _command(*path: str):
    node = typer.main.get_command(app)
    for name in path:
        node = node.commands[name]
    return node


def _options_in_help(*path: str) -> set[str]:
    shown = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "250", "NO_COLOR": "1"})
    assert shown.exit_code == 0, shown.output
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", shown.output))


def test_systemd_unit_serves_in_the_foreground_with_options_kiln_serve_has():
    service = _unit()["Service"]
    argv = shlex.split(service["ExecStart"])
    assert Path(argv[0]).parts[-3:] == (".venv", "bin", "kiln") and argv[1] == "serve"
    options = {a.split("=", 1)[0] for a in argv[2:] if a.startswith("--")}
    assert options and options <= _options_in_help("serve"), options - _options_in_help("serve")
    assert "--background" not in options  # systemd watches the process: it must stay in the foreground
    params = _command("serve").make_context("serve", argv[2:]).params  # every value parses as kiln serve reads it
    assert Path(params["repo_dir"]).is_relative_to(service["WorkingDirectory"])
    assert server.bind_address(params["host"])


def test_systemd_unit_stops_and_restarts_as_kiln_expects():
    unit = _unit()
    service = unit["Service"]
    assert service["User"] and service["Restart"] == "on-failure" and _seconds(service["RestartSec"]) > 0
    # SIGTERM to Kiln alone, which stops tritonserver and SIGKILLs what is left after STOP_TIMEOUT_S
    assert service["KillMode"] == "mixed" and service["KillSignal"] == "SIGTERM"
    assert _seconds(service["TimeoutStopSec"]) > server.STOP_TIMEOUT_S
    assert "SIGTERM" in inspect.getsource(supervisor.supervise)
    # the settings it passes are the ones Kiln reads
    assert service["Environment"].startswith("KILN_HOME=") and '"KILN_HOME"' in inspect.getsource(server.kiln_home)
    assert "KILN_ADMIN_KEY" in UNIT.read_text() and '"KILN_ADMIN_KEY"' in inspect.getsource(server._admin_key)
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def _kiln_commands(text: str) -> list[list[str]]:
    """Every `kiln ...` command written in inline code or a code block, split into words."""
    spans = re.findall(r"```(?:bash)?\n(.*?)```", text, flags=re.S) + re.findall(r"`([^`\n]+)`", text)
    found = []
    for span in spans:
        for line in span.splitlines():
            for match in re.finditer(r"(?:^|[\s/(])kiln ((?:[a-z][\w-]* ?)+[^#|;&)]*)", line):
                found.append(match[1].replace("[", " ").replace("]", " ").split())
    return found


def _operator_docs() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Operating Kiln", 1)[1].split("\n## ", 1)[0]
    return section + (ROOT / "deploy" / "systemd" / "README.md").read_text()


def test_every_kiln_command_in_the_operator_docs_exists_with_its_options():
    commands = _kiln_commands(_operator_docs())
    assert len(commands) >= 8
    group = typer.main.get_command(app)
    for words in commands:
        path, node = [], group
        while words and hasattr(node, "commands") and words[0] in node.commands:
            node = node.commands[words[0]]
            path.append(words.pop(0))
        assert path and not hasattr(node, "commands"), f"kiln {' '.join(path + words)}: not a kiln command"
        options = {w.split("=", 1)[0] for w in words if w.startswith("--")}
        assert options <= _options_in_help(*path), f"kiln {' '.join(path)}: {options - _options_in_help(*path)}"
