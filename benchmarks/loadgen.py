"""`kiln loadgen`: MLPerf Inference's LoadGen (the `mlcommons-loadgen` package) drives a running Kiln
server in one of its scenarios, the way text-to-image latency results are stated in MLPerf: SingleStream
(one query at a time, its 90th percentile latency), Server (Poisson arrivals at a target rate, VALID
only if the 99th percentile stays within the latency bound) or Offline (every query at once, samples
per second). The query samples are glyph-demo prompts, each drawn with its own seed through Kiln's
client; LoadGen writes its own logs (mlperf_log_summary.txt, mlperf_log_detail.txt) and Kiln writes
loadgen.json and loadgen.md beside them."""

from __future__ import annotations

import logging
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from kiln.errors import KilnError

log = logging.getLogger(__name__)

SCENARIOS = ("SingleStream", "Server", "Offline")


class LoadGenError(KilnError):
    """LoadGen could not run, or wrote no result."""


@dataclass(frozen=True)
class LoadGenSpec:
    scenario: str = "SingleStream"
    protocol: str = "grpc"
    samples: int = 32  # prompts in the query sample library
    steps: int | None = None  # the server's default when None
    min_duration_s: float = 10.0
    min_queries: int = 32
    target_qps: float = 1.0  # Server: the arrival rate; Offline: the expected rate (sizes its one query)
    target_latency_ms: float = 10_000.0  # Server: the 99th-percentile bound of a VALID run
    workers: int = 4  # requests in flight at most (Server and Offline)
    seed: int = 0

    def check(self) -> None:
        if self.scenario not in SCENARIOS:
            raise LoadGenError(f"--scenario {self.scenario!r}: expected one of {', '.join(SCENARIOS)}")
        for name in ("samples", "min_queries", "workers"):
            if getattr(self, name) < 1:
                raise LoadGenError(f"--{name.replace('_', '-')} {getattr(self, name)}: expected at least 1")
        for name in ("min_duration_s", "target_qps", "target_latency_ms"):
            value = getattr(self, name)
            if not value > 0 or value == float("inf"):
                raise LoadGenError(f"{name}={value}: expected a positive, finite number")


def prompts(count: int) -> list[str]:
    """Glyph-demo captions: every digit, colour and background in turn."""
    from kiln.dataset.glyphs import BACKGROUNDS, COLOURS, DIGITS

    colours, backgrounds = list(COLOURS), list(BACKGROUNDS)
    return [f"a {colours[i % len(colours)]} digit {DIGITS[i % len(DIGITS)]} on a "
            f"{backgrounds[(i // len(colours)) % len(backgrounds)]} background" for i in range(count)]


def settings(spec: LoadGenSpec):
    import mlperf_loadgen as lg

    ts = lg.TestSettings()
    ts.scenario = getattr(lg.TestScenario, spec.scenario)
    ts.mode = lg.TestMode.PerformanceOnly
    ts.min_duration_ms = int(spec.min_duration_s * 1000)
    ts.min_query_count = spec.min_queries
    ts.server_target_qps = spec.target_qps
    ts.server_target_latency_ns = int(spec.target_latency_ms * 1e6)
    ts.offline_expected_qps = spec.target_qps
    # SingleStream pre-generates min_duration / expected latency queries: a low guess never runs out
    ts.single_stream_expected_latency_ns = 1_000_000
    return ts


def run(url: str, out_dir: Path, spec: LoadGenSpec = LoadGenSpec()) -> dict:
    """Drive the server at `url` with LoadGen; returns Kiln's report (also written as loadgen.json/.md)."""
    import mlperf_loadgen as lg

    from kiln.artifacts import write_json_atomically
    from kiln.clients.client import KilnClient

    spec.check()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = prompts(spec.samples)
    local = threading.local()
    failures: list[str] = []
    clients: list = []
    lock = threading.Lock()

    def client() -> KilnClient:
        if not hasattr(local, "client"):
            local.client = KilnClient(url, spec.protocol)
            with lock:
                clients.append(local.client)
        return local.client

    def answer(sample) -> None:
        try:
            client().generate(texts[sample.index], seed=spec.seed + sample.index, steps=spec.steps)
        except Exception as exc:  # a failed query still completes, or LoadGen would wait for ever
            with lock:
                failures.append(f"{type(exc).__name__}: {exc}")
        lg.QuerySamplesComplete([lg.QuerySampleResponse(sample.id, 0, 0)])

    pool = ThreadPoolExecutor(max_workers=1 if spec.scenario == "SingleStream" else spec.workers)

    def issue(samples) -> None:
        for sample in samples:
            pool.submit(answer, sample)

    client().health()  # an unreachable server fails here, not as a run of failed queries
    sut = lg.ConstructSUT(issue, lambda: None)
    qsl = lg.ConstructQSL(len(texts), len(texts), lambda indices: None, lambda indices: None)
    output = lg.LogOutputSettings()
    output.outdir = str(out_dir)
    output.copy_summary_to_stdout = False
    logging_settings = lg.LogSettings()
    logging_settings.log_output = output
    logging_settings.enable_trace = False
    log.info("LoadGen %s against %s (%s), logs in %s", spec.scenario, url, spec.protocol, out_dir)
    try:
        lg.StartTestWithLogSettings(sut, qsl, settings(spec), logging_settings)
    finally:
        pool.shutdown(wait=True)
        lg.DestroyQSL(qsl)
        lg.DestroySUT(sut)
        for c in clients:
            c.close()
    summary_file = out_dir / "mlperf_log_summary.txt"
    if not summary_file.is_file():
        raise LoadGenError(f"LoadGen wrote no {summary_file}", hint=f"see {out_dir / 'mlperf_log_detail.txt'}")
    report = {"spec": asdict(spec), "url": url, **read_summary(summary_file.read_text()), "failed_queries": len(failures),
              "failures": failures[:5], "files": sorted(p.name for p in out_dir.glob("mlperf_log_*"))}
    write_json_atomically(out_dir / "loadgen.json", report)
    (out_dir / "loadgen.md").write_text(to_markdown(report))
    return report


_FIELDS = {
    "scenario": (r"Scenario\s*:\s*(\S+)", str),
    "result": (r"Result is\s*:\s*(\S+)", str),
    "samples_per_second": (r"(?:Completed samples per second|Samples per second|QPS w/o loadgen overhead)\s*:\s*([\d.e+-]+)", float),
    "p50_ms": (r"50\.00 percentile latency \(ns\)\s*:\s*(\d+)", lambda v: int(v) / 1e6),
    "p90_ms": (r"90\.00 percentile latency \(ns\)\s*:\s*(\d+)", lambda v: int(v) / 1e6),
    "p99_ms": (r"99\.00 percentile latency \(ns\)\s*:\s*(\d+)", lambda v: int(v) / 1e6),
    "mean_ms": (r"Mean latency \(ns\)\s*:\s*(\d+)", lambda v: int(v) / 1e6),
}


def read_summary(text: str) -> dict:
    """The figures of LoadGen's mlperf_log_summary.txt (its own text format, not Prometheus')."""
    out = {}
    for key, (pattern, convert) in _FIELDS.items():
        match = re.search(pattern, text)
        if match:
            out[key] = convert(match.group(1))
    out["valid"] = out.get("result") == "VALID"
    results = text.split("Additional Stats")[0]
    out["why_invalid"] = [line.strip(" *") for line in results.splitlines()
                          if line.rstrip().endswith(": NO") or line.startswith(" * ")] if not out["valid"] else []
    return out


def to_markdown(report: dict) -> str:
    spec = report["spec"]

    def ms(key: str) -> str:
        return f"{report[key]:.1f}" if key in report else "-"

    lines = [f"MLPerf LoadGen {report.get('scenario', spec['scenario'])} against {report['url']} ({spec['protocol']}): "
             f"**{report.get('result', '?')}**", "",
             "| p50 ms | p90 ms | p99 ms | mean ms | samples/s | failed queries |", "|---|---|---|---|---|---|",
             f"| {ms('p50_ms')} | {ms('p90_ms')} | {ms('p99_ms')} | {ms('mean_ms')} | "
             f"{report.get('samples_per_second', 0):.2f} | {report['failed_queries']} |"]
    if spec["scenario"] == "Server":
        lines.append(f"\nServer: Poisson arrivals at {spec['target_qps']:g}/s, VALID needs p99 <= {spec['target_latency_ms']:g} ms")
    lines += [f"- {why}" for why in report.get("why_invalid", [])]
    lines.append(f"\nLoadGen's own logs: {', '.join(report['files'])}")
    return "\n".join(lines) + "\n"
