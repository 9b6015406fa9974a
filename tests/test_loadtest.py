"""Locust against the real server: both user kinds run, Triton's per-model times are scraped, and
a missed service level turns into a non-zero exit."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.triton


def test_loadtest_reports_and_judges(triton, tmp_path):
    info = triton("epsilon")
    command = [sys.executable, "-m", "kiln.cli", "loadtest", "--users", "2", "--spawn-rate", "2", "--duration", "6",
               "--http-url", info.http_url, "--grpc-url", info.grpc_url, "--metrics-url", info.metrics_url,
               "--steps", "2", "--price-per-hour", "24", "--out", str(tmp_path / "ok")]
    run = subprocess.run(command, capture_output=True, text=True, timeout=200)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads((tmp_path / "ok" / "loadtest.json").read_text())
    assert report["requests"] > 0 and report["failures"] == 0 and not report["violations"]
    assert 0 < report["min_ms"] <= report["max_ms"]
    # Locust keeps percentiles of response times rounded to two significant digits (above 100 ms)
    assert report["median_ms"] <= report["p90_ms"] <= report["p99_ms"] <= 1.05 * report["max_ms"]
    assert "p99" in (tmp_path / "ok" / "loadtest.md").read_text()
    assert report["images_per_hour"] == pytest.approx(report["rps"] * 3600)  # one image per request, none failed
    assert report["cost_per_1000_images"] == pytest.approx(24 / report["images_per_hour"] * 1000)
    assert "per 1,000 images at 24/hour" in (tmp_path / "ok" / "loadtest.md").read_text()
    assert {"txt2img", "pipeline", "unet", "text_encoder"} <= set(report["per_model"])
    assert report["per_model"]["unet"]["requests"] >= 2 * report["per_model"]["pipeline"]["requests"] - 4
    assert (tmp_path / "ok" / "report.html").is_file() and (tmp_path / "ok" / "locust_stats.csv").is_file()
    strict = subprocess.run(command[:-1] + [str(tmp_path / "strict"), "--slo-p95-ms", "0.001"],
                            capture_output=True, text=True, timeout=200)
    assert strict.returncode == 1 and "p95" in strict.stdout
