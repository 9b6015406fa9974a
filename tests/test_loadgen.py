"""`kiln loadgen`: MLPerf Inference's LoadGen drives a real server in each scenario and Kiln reports
what LoadGen's own summary says; bad settings are refused before any query."""

import json

import pytest

from kiln.benchmarks.loadgen import LoadGenError, LoadGenSpec, read_summary

pytest.importorskip("mlperf_loadgen", reason="mlcommons-loadgen comes with the bench extra (make setup installs it)")


@pytest.mark.triton
@pytest.mark.slow  # three LoadGen runs against a server
def test_each_scenario_runs_and_reports_loadgens_own_figures(triton, tmp_path):
    from kiln.benchmarks.loadgen import run

    info = triton()
    for scenario, spec in {
        "SingleStream": LoadGenSpec(scenario="SingleStream", samples=8, steps=2, min_duration_s=2, min_queries=64),
        "Server": LoadGenSpec(scenario="Server", samples=8, steps=2, min_duration_s=2, min_queries=8, target_qps=4,
                              target_latency_ms=60_000),
        "Offline": LoadGenSpec(scenario="Offline", samples=8, steps=2, min_duration_s=1, min_queries=8, target_qps=50),
    }.items():
        report = run(info.grpc_url, tmp_path / scenario, spec)
        summary = (tmp_path / scenario / "mlperf_log_summary.txt").read_text()
        assert f"Scenario : {scenario}" in summary and report["scenario"] == scenario
        assert report["failed_queries"] == 0
        assert report["result"] in ("VALID", "INVALID") and report["valid"] == ("Result is : VALID" in summary)
        assert 0 < report["p50_ms"] <= report["p90_ms"] <= report["p99_ms"]
        assert report["samples_per_second"] > 0
        assert json.loads((tmp_path / scenario / "loadgen.json").read_text())["p99_ms"] == report["p99_ms"]
        assert f"LoadGen {scenario}" in (tmp_path / scenario / "loadgen.md").read_text()
    # 64 queries, well inside their expected latency: SingleStream's early stopping is met
    assert json.loads((tmp_path / "SingleStream" / "loadgen.json").read_text())["valid"]


def test_the_summary_is_read_as_loadgen_writes_it():
    text = """Scenario : Server
Mode     : PerformanceOnly
Completed samples per second    : 4.18
Result is : INVALID
  Performance constraints satisfied : Yes
  Min duration satisfied : Yes
  Early stopping satisfied: NO
Early Stopping Result:
 * Would need to run at least 445 more queries,
================================================
Additional Stats
================================================
50.00 percentile latency (ns)   : 104151648
90.00 percentile latency (ns)   : 237625160
99.00 percentile latency (ns)   : 310564433
"""
    summary = read_summary(text)
    assert summary["scenario"] == "Server" and not summary["valid"] and summary["samples_per_second"] == 4.18
    assert summary["p99_ms"] == pytest.approx(310.564433)
    assert summary["why_invalid"] == ["Early stopping satisfied: NO", "Would need to run at least 445 more queries,"]


@pytest.mark.parametrize("field, value, message", [
    ("scenario", "Batch", "SingleStream, Server, Offline"),
    ("target_qps", 0.0, "target_qps=0.0"),
    ("target_latency_ms", float("nan"), "target_latency_ms=nan"),
    ("min_queries", 0, "--min-queries 0"),
])
def test_bad_settings_are_refused_before_any_query(field, value, message, tmp_path):
    from kiln.benchmarks.loadgen import run

    with pytest.raises(LoadGenError, match=message):
        run("127.0.0.1:1", tmp_path / "out", LoadGenSpec(**{field: value}))
    assert not (tmp_path / "out").exists()
