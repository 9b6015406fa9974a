"""Issue 17 groundwork, run once by hand (not part of the product yet): is "LoRA adapters as UNet
inputs" a sound mechanism at SD 1.5 size? Full-width SD 1.5 UNet (random weights), every attention
projection (to_q, to_k, to_v, to_out.0) exported as x W^T + b + (x A^T) B^T with A (r, in) and
B (out, r) as graph inputs (r dynamic), next to the plain export; ONNX Runtime CPU, batch 2 (one
guided step), 64x64 latents (512 px). Writes results.json beside this file.

    .venv/bin/python benchmarks/results/lora-adapters/sd15_adapter_inputs.py /tmp/lora-sd15
"""
import gc
import json
import os
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from kiln.models.benchmark import build_sd15_pipeline

work = Path(sys.argv[1]); work.mkdir(parents=True, exist_ok=True)
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
RANK, RUNS = 16, 5


def rss_mb() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


unet = build_sd15_pipeline("full").unet.eval()
layers = [(n, m) for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(TARGETS)]
current: dict = {}


class Plain(torch.nn.Module):
    def __init__(self, unet): super().__init__(); self.unet = unet
    def forward(self, s, t, h): return self.unet(s, t, h, return_dict=False)[0]


class WithAdapters(Plain):
    def forward(self, s, t, h, *ab):
        current.update({n: (ab[2 * i], ab[2 * i + 1]) for i, (n, _) in enumerate(layers)})
        return self.unet(s, t, h, return_dict=False)[0]


x, t, h = torch.randn(2, 4, 64, 64), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 768)
base_axes = {"sample": {0: "b"}, "timestep": {0: "b"}, "encoder_hidden_states": {0: "b"}}
warnings.simplefilter("ignore")
plain_path, lora_path = work / "plain" / "model.onnx", work / "lora" / "model.onnx"
names = [f"lora_{k}.{n}" for n, _ in layers for k in "AB"]
start = time.perf_counter()
if not plain_path.is_file():
    plain_path.parent.mkdir(exist_ok=True)
    with torch.inference_mode():
        torch.onnx.export(Plain(unet), (x, t, h), str(plain_path), input_names=list(base_axes), output_names=["out"],
                          dynamic_axes=base_axes, opset_version=17, dynamo=False)
for n, m in layers:
    m.forward = (lambda plain, n: lambda v: plain(v) + torch.nn.functional.linear(torch.nn.functional.linear(v, current[n][0]), current[n][1]))(m.forward, n)
if not lora_path.is_file():
    lora_path.parent.mkdir(exist_ok=True)
    dummy = [torch.zeros(2, m.in_features) if k == "A" else torch.zeros(m.out_features, 2) for _, m in layers for k in "AB"]
    axes = {**base_axes, **{nm: ({0: "rank"} if nm.startswith("lora_A") else {1: "rank"}) for nm in names}}
    with torch.inference_mode():
        torch.onnx.export(WithAdapters(unet), (x, t, h, *dummy), str(lora_path), input_names=[*base_axes, *names],
                          output_names=["out"], dynamic_axes=axes, opset_version=17, dynamo=False)
export_s = time.perf_counter() - start
shapes = {n: (m.in_features, m.out_features) for n, m in layers}
del unet
layers = []  # the modules (and their weights) can go
gc.collect()

feeds = {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": h.numpy()}
rng = np.random.default_rng(0)


def adapter(rank=RANK):
    return {n: (rng.normal(0, 0.02, (rank, i)).astype(np.float32), rng.normal(0, 0.02, (o, rank)).astype(np.float32))
            for n, (i, o) in shapes.items()}


def adapter_feeds(ad, scale=1.0):
    out = {}
    for n, (a, b) in ad.items():
        out[f"lora_A.{n}"], out[f"lora_B.{n}"] = a, b * scale
    return out


def timed(session, feed_list):
    session.run(None, feed_list[0])  # warm-up
    ts = []
    for i in range(RUNS):
        s = time.perf_counter(); session.run(None, feed_list[i % len(feed_list)]); ts.append(time.perf_counter() - s)
    return {"median_s": float(np.median(ts)), "min_s": min(ts), "max_s": max(ts)}


results = {"rank": RANK, "adapted_layers": len(shapes), "export_s": export_s, "runs": RUNS}
before = rss_mb()
plain = ort.InferenceSession(str(plain_path), providers=["CPUExecutionProvider"])
results["rss_mb_plain_session"] = rss_mb() - before
results["plain_step"] = timed(plain, [feeds])
plain_out = plain.run(None, feeds)[0]
del plain
gc.collect()
before = rss_mb()
session = ort.InferenceSession(str(lora_path), providers=["CPUExecutionProvider"])
results["rss_mb_adapter_session"] = rss_mb() - before
zeros = {**feeds, **{nm: np.zeros((1, shapes[nm[7:]][0]) if nm.startswith("lora_A") else (shapes[nm[7:]][1], 1), np.float32)
                      for nm in names}}
results["no_adapter_equals_plain_exactly"] = bool(np.array_equal(session.run(None, zeros)[0], plain_out))
memory = {}
held = []
for count in (1, 5, 20):
    s = time.perf_counter()
    while len(held) < count:
        held.append(adapter())
    memory[count] = {"adapter_mb_each": sum(a.nbytes + b.nbytes for a, b in held[0].values()) / 2**20,
                     "rss_mb_total_over_session": rss_mb() - before}
results["memory_by_adapters"] = memory
s = time.perf_counter(); feed_a = {**feeds, **adapter_feeds(held[0], 0.8)}; results["build_feeds_s"] = time.perf_counter() - s
feed_b = {**feeds, **adapter_feeds(held[1], 0.8)}
results["no_adapter_step"] = timed(session, [zeros])
results["same_adapter_step"] = timed(session, [feed_a])
results["switching_adapters_step"] = timed(session, [feed_a, feed_b])
a1 = session.run(None, feed_a)[0]; session.run(None, feed_b); a2 = session.run(None, feed_a)[0]
results["a_b_a_identical"] = bool(np.array_equal(a1, a2))
results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
(Path(__file__).parent / "results.json").write_text(json.dumps(results, indent=2))
print(json.dumps(results, indent=2))
