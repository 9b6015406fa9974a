"""What a running server exports on its metrics endpoint: every metric the Grafana dashboard queries
(those that need a GPU aside), and the denoising loop's counters adding up to exactly the work of the
requests sent."""

from pathlib import Path

import pytest

from kiln.clients.client import KilnClient
from kiln.serving import metrics
from kiln.serving.dashboard import GPU_METRICS, check_declared, queried_metrics


def test_the_dashboard_queries_only_metrics_kiln_declares():
    check_declared()
    assert set(metrics.LOOP_METRICS) <= queried_metrics()  # every loop metric has a panel


def test_parsing_reads_counters_summaries_and_labels():
    text = """# HELP kiln_unet_calls UNet calls
# TYPE kiln_unet_calls counter
kiln_unet_calls{model="txt2img"} 12
kiln_unet_calls{model="other"} 3
# HELP nv_inference_request_summary_us Summary of request latency
# TYPE nv_inference_request_summary_us summary
nv_inference_request_summary_us_count{model="unet",version="1"} 4
nv_inference_request_summary_us_sum{model="unet",version="1"} 1.5e+04
nv_inference_request_summary_us{model="unet",version="1",quantile="0.5"} 3000
"""
    samples = metrics.parse(text)
    assert metrics.total(samples, "kiln_unet_calls") == 15 and metrics.total(samples, "kiln_unet_calls", model="other") == 3
    assert metrics.total(samples, "nv_inference_request_summary_us", quantile="0.5") == 3000
    assert metrics.total(samples, "nv_inference_request_summary_us_sum") == 15000


@pytest.mark.triton
def test_a_running_server_exports_what_the_dashboard_queries_and_the_loop_counts_its_work(triton):
    info = triton()
    before = metrics.scrape(info.metrics_url)
    with KilnClient(info.grpc_url, "grpc") as client:
        client.generate("a red digit 7", seed=3, steps=3, scheduler="euler", num_images=2, guidance_scale=5.0)
        client.generate("a blue digit 1", seed=4, steps=4, scheduler="euler", guidance_scale=5.0, guidance_end=0.5)
    after = metrics.scrape(info.metrics_url)
    log = Path(info.log_file).read_text()
    for component in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):  # at load, not in the first request
        assert f"{component}: warmed up at load in" in log, component
    exported = {s.name for s in after} | {s.name.removesuffix("_total") for s in after}
    missing = sorted(queried_metrics() - set(GPU_METRICS) - exported)
    assert not missing, f"the dashboard queries metrics this server does not export: {missing}"

    def delta(name):
        return metrics.total(after, name, model="txt2img") - metrics.total(before, name, model="txt2img")

    assert delta("kiln_generations") == 2 and delta("kiln_generation_images") == 3
    assert delta("kiln_generation_steps") == 3 + 4 and delta("kiln_unet_calls") == 3 + 4
    # guided steps run prompt and negative: 2 rows an image; the second request is guided for steps 0 and 1 only
    assert delta("kiln_unet_rows") == 3 * 2 * 2 + (2 * 2 + 2 * 1)
    assert delta("kiln_unet_ms") > 0
    # Triton's own view agrees: the UNet model ran as many requests as the loop made calls
    unet = metrics.total(after, "nv_inference_request_success", model="unet") - metrics.total(before, "nv_inference_request_success", model="unet")
    assert unet == 7
