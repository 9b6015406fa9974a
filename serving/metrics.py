"""What a Kiln server exports on Triton's metrics endpoint beside Triton's own, declared once: the BLS
loop publishes these (model_repository.python_models), the Grafana dashboard queries them
(serving.dashboard), and tests/test_metrics.py checks a running server exports every one. Read with
prometheus_client's parser, never regular expressions."""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass

# Counters, each labelled with the served model's name (`model`): per-request averages are ratios of
# their rates (UNet milliseconds per step = rate(kiln_unet_ms) / rate(kiln_unet_calls)).
LOOP_METRICS = {
    "kiln_generations": "generations the denoising loop completed",
    "kiln_generation_steps": "denoising steps the loop ran",
    "kiln_generation_images": "images the loop generated",
    "kiln_unet_calls": "UNet calls the loop made (one a step, a ControlNet's not counted)",
    "kiln_unet_rows": "UNet batch rows the loop ran: 2 an image on a guided step, 1 on an unguided one",
    "kiln_unet_ms": "milliseconds the loop waited on the UNet",
    "kiln_cancelled_requests": "generations stopped early: the client cancelled or its deadline passed",
}
# published by the component models that keep Kiln's embedding cache (text encoders)
COMPONENT_METRICS = {"kiln_embedding_cache_hits": "rows answered from Kiln's embedding cache"}


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict
    value: float


def parse(text: str) -> list[Sample]:
    """Every sample of a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    return [Sample(s.name, dict(s.labels), s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def scrape(metrics_url: str, timeout_s: float = 10.0) -> list[Sample]:
    return parse(urllib.request.urlopen(metrics_url, timeout=timeout_s).read().decode())


def total(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (a counter's `_total` name too)."""
    return sum(s.value for s in samples if s.name in (name, f"{name}_total")
               and all(s.labels.get(k) == v for k, v in labels.items()))
