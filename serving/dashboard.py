"""The Grafana dashboard `kiln cluster render` writes beside the manifests: Triton's queue and compute
time per model, latency quantiles from its summaries, failures by reason, Kiln's embedding cache and
denoising-loop metrics (serving.metrics), and GPU use (Triton's own GPU metrics, DCGM's where an
exporter runs). Each panel names the metrics it queries, so a test can check that a running server
exports every one (GPU_METRICS only on a GPU host)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from kiln.serving.metrics import COMPONENT_METRICS, LOOP_METRICS

# Exported only where there is a GPU: Triton's with --allow-gpu-metrics, DCGM's by its exporter.
GPU_METRICS = ("nv_gpu_utilization", "nv_gpu_memory_used_bytes", "DCGM_FI_DEV_GPU_UTIL")
_NAME = re.compile(r"\b(nv_[a-z_]+|kiln_[a-z_]+|DCGM_[A-Z_]+)\b")


def _per(numerator: str, denominator: str, by: str = "model", scale: str = "") -> str:
    """rate(numerator) / rate(denominator), by `by`, guarded against an idle denominator."""
    return (f"sum by ({by}) (rate({numerator}[1m])){scale} / "
            f"clamp_min(sum by ({by}) (rate({denominator}[1m])), 1e-9)")


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str  # Grafana's unit id
    targets: tuple[tuple[str, str], ...]  # (PromQL, legend)

    def metrics(self) -> set[str]:
        return {name for expr, _ in self.targets for name in _NAME.findall(expr)}


PANELS: tuple[Panel, ...] = (
    Panel("Requests per second", "reqps", (("sum by (model) (rate(nv_inference_request_success[1m]))", "{{model}}"),)),
    Panel("Queue time per request", "ms", ((_per("nv_inference_queue_duration_us", "nv_inference_request_success",
                                                  scale=" / 1000"), "{{model}}"),)),
    Panel("Compute time per request", "ms", ((_per("nv_inference_compute_infer_duration_us", "nv_inference_request_success",
                                                    scale=" / 1000"), "{{model}}"),)),
    Panel("Request latency p50 / p99 (Triton's summaries)", "ms", (
        ('max by (model) (nv_inference_request_summary_us{quantile="0.5"}) / 1000', "{{model}} p50"),
        ('max by (model) (nv_inference_request_summary_us{quantile="0.99"}) / 1000', "{{model}} p99"))),
    Panel("Failures per second, by reason", "reqps", (
        ("sum by (model, reason) (rate(nv_inference_request_failure[5m]))", "{{model}} {{reason}}"),)),
    Panel("Refused by a full queue", "reqps", (
        ('sum by (model) (rate(nv_inference_request_failure{reason="REJECTED"}[5m]))', "{{model}}"),)),
    Panel("Embedding cache hits per second", "ops", (("sum by (model) (rate(kiln_embedding_cache_hits[5m]))", "{{model}}"),)),
    Panel("Generations per second", "reqps", (("sum by (model) (rate(kiln_generations[1m]))", "{{model}}"),
                                             ("sum by (model) (rate(kiln_cancelled_requests[1m]))", "{{model}} cancelled"))),
    Panel("Steps and images per generation", "short", (
        (_per("kiln_generation_steps", "kiln_generations"), "{{model}} steps"),
        (_per("kiln_generation_images", "kiln_generations"), "{{model}} images"))),
    Panel("UNet milliseconds per step", "ms", ((_per("kiln_unet_ms", "kiln_unet_calls"), "{{model}}"),)),
    Panel("Guidance batch: UNet rows per call", "short", ((_per("kiln_unet_rows", "kiln_unet_calls"), "{{model}}"),)),
    Panel("GPU use", "percent", (("avg by (gpu_uuid) (nv_gpu_utilization) * 100", "Triton {{gpu_uuid}}"),
                                 ("avg by (gpu) (DCGM_FI_DEV_GPU_UTIL)", "DCGM {{gpu}}"))),
    Panel("GPU memory", "bytes", (("sum by (gpu_uuid) (nv_gpu_memory_used_bytes)", "{{gpu_uuid}}"),)),
)


def queried_metrics() -> set[str]:
    return set().union(*(panel.metrics() for panel in PANELS))


def dashboard(title: str = "Kiln on Triton") -> dict:
    """Grafana's dashboard JSON (schema 39), on a `datasource` variable choosing the Prometheus source."""
    panels = []
    for i, panel in enumerate(PANELS):
        panels.append({
            "id": i + 1, "type": "timeseries", "title": panel.title,
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
            "targets": [{"refId": chr(ord("A") + j), "expr": expr, "legendFormat": legend,
                         "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                        for j, (expr, legend) in enumerate(panel.targets)],
        })
    return {
        "title": title, "uid": "kiln-triton", "schemaVersion": 39, "version": 1, "editable": True,
        "time": {"from": "now-1h", "to": "now"}, "refresh": "30s", "tags": ["kiln", "triton"],
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"}]},
        "panels": panels,
    }


def check_declared() -> None:
    """Every Kiln metric the dashboard queries is one Kiln declares (a misspelt name would chart nothing)."""
    kiln = {m for m in queried_metrics() if m.startswith("kiln_")}
    unknown = kiln - set(LOOP_METRICS) - set(COMPONENT_METRICS)
    if unknown:
        raise ValueError(f"the dashboard queries {sorted(unknown)}, which Kiln does not export")
