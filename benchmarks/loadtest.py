"""`kiln loadtest`: Locust headless against a running server, Triton's per-model queue and compute
times scraped around the run, and a verdict against service levels."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kiln.errors import KilnError
from kiln.artifacts import write_json_atomically

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


class LoadTestError(KilnError):
    """The load test could not run, or its results are missing."""


@dataclass
class LoadTestReport:
    requests: int
    failures: int
    rps: float
    median_ms: float
    p95_ms: float
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    min_ms: float = 0.0
    max_ms: float = 0.0
    per_model: dict[str, dict[str, float]] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    images_per_hour: float = 0.0  # successful requests (one image each) at the measured rate
    price_per_hour: float | None = None
    cost_per_1000_images: float | None = None


TRITON_COUNTERS = ("nv_inference_request_success", "nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us")


def scrape(metrics_url: str) -> dict[tuple[str, str], float]:
    """Triton's per-model counters, (name, model) -> value, read with prometheus_client's parser."""
    from kiln.serving.metrics import scrape as samples

    values: dict[tuple[str, str], float] = {}
    for s in samples(metrics_url):
        name = s.name.removesuffix("_total")
        if name in TRITON_COUNTERS and "model" in s.labels:
            values[(name, s.labels["model"])] = values.get((name, s.labels["model"]), 0.0) + s.value
    return values


def per_model(before: dict, after: dict) -> dict[str, dict[str, float]]:
    """Requests, and mean queue and compute milliseconds per request, for each model over the run."""
    models = {model for _, model in after}
    out = {}
    for model in sorted(models):
        delta = {name: after.get((name, model), 0.0) - before.get((name, model), 0.0) for name in TRITON_COUNTERS}
        count = delta["nv_inference_request_success"]
        if count:
            out[model] = {"requests": count, "queue_ms": delta["nv_inference_queue_duration_us"] / count / 1000,
                          "compute_ms": delta["nv_inference_compute_infer_duration_us"] / count / 1000}
    return out


def read_stats(prefix: Path) -> dict:
    path = Path(f"{prefix}_stats.csv")
    if not path.is_file():
        raise LoadTestError(f"Locust wrote no {path.name}", hint=f"see {prefix}_stdout.txt")
    with open(path) as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    total = rows.get("Aggregated") or next(iter(rows.values()))
    return total


def run(http_url: str, grpc_url: str, metrics_url: str, out_dir: Path, users: int, spawn_rate: float,
        duration_s: int, protocols: str = "http,grpc", steps: int = 4, slo_p95_ms: float | None = None,
        min_rps: float | None = None, gateway_url: str = "http://127.0.0.1:7860",
        gateway_key: str | None = None, price_per_hour: float | None = None) -> LoadTestReport:
    from kiln.benchmarks.cost import check_price, cost

    check_price(price_per_hour)  # before the run, not after it
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = out_dir / "locust"
    env = dict(os.environ, KILN_HTTP_URL=http_url, KILN_GRPC_URL=grpc_url, KILN_PROTOCOLS=protocols, KILN_STEPS=str(steps),
               KILN_GATEWAY_URL=gateway_url, KILN_GATEWAY_KEY=gateway_key or "")
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(users), "-r", str(spawn_rate),
               "-t", f"{duration_s}s", "--csv", str(prefix), "--html", str(out_dir / "report.html"), "--only-summary",
               "--stop-timeout", "30"]
    before = scrape(metrics_url)
    with open(f"{prefix}_stdout.txt", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            # gevent and gRPC can leave Locust hanging after it wrote its results: bound the wait.
            process.wait(timeout=duration_s + 90)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    after = scrape(metrics_url)
    stats = read_stats(prefix)
    report = LoadTestReport(
        requests=int(stats["Request Count"]),
        failures=int(stats["Failure Count"]),
        rps=float(stats["Requests/s"]),
        median_ms=float(stats["Median Response Time"]),
        p95_ms=float(stats["95%"]),
        p90_ms=float(stats["90%"]),
        p99_ms=float(stats["99%"]),
        min_ms=float(stats["Min Response Time"] or 0),
        max_ms=float(stats["Max Response Time"] or 0),
        per_model=per_model(before, after),
    )
    succeeded = report.rps * (report.requests - report.failures) / report.requests if report.requests else 0.0
    priced = cost(succeeded, price_per_hour)  # each Locust request draws one image
    report.images_per_hour, report.price_per_hour, report.cost_per_1000_images = (
        priced.images_per_hour, priced.price_per_hour, priced.per_1000_images)
    if report.requests == 0:
        report.violations.append("no request completed")
    if report.failures:
        report.violations.append(f"{report.failures} failed requests")
    if slo_p95_ms is not None and report.p95_ms > slo_p95_ms:
        report.violations.append(f"p95 {report.p95_ms:.0f} ms > {slo_p95_ms:.0f} ms")
    if min_rps is not None and report.rps < min_rps:
        report.violations.append(f"{report.rps:.2f} requests/s < {min_rps}")
    report.files = [str(p) for p in sorted(out_dir.iterdir())]
    write_json_atomically(out_dir / "loadtest.json", {"users": users, "spawn_rate": spawn_rate, "duration_s": duration_s,
                                                      "protocols": protocols, "steps": steps, **asdict(report)})
    (out_dir / "loadtest.md").write_text(to_markdown(report))
    return report


def to_markdown(report: LoadTestReport) -> str:
    spread = (report.max_ms - report.min_ms) / report.median_ms if report.median_ms else 0.0
    lines = [f"requests {report.requests}, failures {report.failures}, {report.rps:.2f} req/s; latency p50 "
             f"{report.median_ms:.0f} ms, p90 {report.p90_ms:.0f} ms, p95 {report.p95_ms:.0f} ms, p99 {report.p99_ms:.0f} ms, "
             f"min {report.min_ms:.0f} ms, max {report.max_ms:.0f} ms (spread {100 * spread:.0f} % of p50)", "",
             "| model | requests | queue ms/request | compute ms/request |", "|---|---|---|---|"]
    lines += [f"| {m} | {v['requests']:.0f} | {v['queue_ms']:.2f} | {v['compute_ms']:.2f} |" for m, v in report.per_model.items()]
    from kiln.benchmarks.cost import Cost

    lines += ["", "throughput: " + Cost(report.images_per_hour, report.price_per_hour, report.cost_per_1000_images).line()]
    lines += ["", "service levels: " + ("met" if not report.violations else "; ".join(report.violations))]
    return "\n".join(lines) + "\n"
