"""Runtime LoRA adapters at SD 1.5 size, through Kiln's own serving path: a full-width SD 1.5 (random
weights) exported with `--lora-inputs`, its UNet run by the served component's core
(model_repository.python_models.OnnxComponentModel, as Triton runs it, without Triton), adapters
added with the registry `kiln lora add` uses. Rank-16 LoRAs of the attention projections (to_q, to_k,
to_v, to_out.0), kohya layout, random weights.

    python -m kiln.benchmarks.lora_adapters WORK_DIR [--out benchmarks/results/lora-adapters] [--runs 3]

Measures:
- resident memory (RSS, each in a fresh process, so no allocator reuse hides a cost) of the plain
  UNet export, of the adapted one with no adapter, and with 1, 5 and 20 adapters loaded and each
  one's feeds built once;
- the time `kiln lora add` takes for one adapter (normalise + write + index), median of `runs`;
- one guided 512x512 UNet step (batch 2, 64x64 latents): the plain export, the adapted one with no
  adapter, the same adapter as the step before, and the first step of a request whose adapter
  differs from the previous request's; what a switch costs (reading the adapter's file, building its
  feeds) timed on its own, and from it what a switch adds to a 20-step request.
Writes results.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
RANK = 16
COUNTS = (-1, 0, 1, 5, 20)  # -1: the plain export


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def prepare(work: Path) -> Path:
    """WORK/repo: unet/1 (the adapted export's UNet folder) and pipeline/loras (a registry of 20+ adapters)."""
    from kiln.export.onnx_export import export_onnx
    from kiln.models.benchmark import write_sd15_model
    from kiln.models.tiny import write_random_lora
    from kiln.pipeline.adapters import Registry, read_layers

    model = work / "sd15-full"
    if not (model / "model_index.json").is_file():
        write_sd15_model(model, "full")
    onnx_dir = work / "onnx"
    export_onnx(model, onnx_dir, components=("unet",), lora_inputs=True)
    export_onnx(model, work / "onnx-plain", components=("unet",))
    repo = work / "repo"
    for name, source in (("unet", onnx_dir), ("plain_unet", work / "onnx-plain")):
        (repo / name).mkdir(parents=True, exist_ok=True)
        if not (repo / name / "1").exists():
            (repo / name / "1").symlink_to((source / "unet").resolve())
    layers = read_layers(onnx_dir / "unet")
    registry = Registry(repo / "pipeline" / "loras")
    for i in range(max(COUNTS) + 8):
        name = f"style{i}"
        if name not in registry.entries():
            source = write_random_lora(layers, work / "files" / f"{name}.safetensors", rank=RANK, alpha=RANK / 2,
                                       seed=i, std=0.02, only=ATTENTION)
            registry.add(name, source, layers)
    return repo


def component(repo: Path, plain: bool = False):
    """The served UNet model's core, as Triton builds it (no memory arena); `plain`: the export without
    LoRA inputs."""
    from kiln.model_repository.python_models import OnnxComponentModel

    return OnnxComponentModel(repo / ("plain_unet" if plain else "unet") / "1", {"component": "unet", "family": "sd"})


def memory_child(repo: Path, count: int) -> dict:
    """In a fresh process: RSS before, with the UNet loaded, and with `count` adapters loaded (feeds
    built); count -1: the plain export, no adapter inputs."""
    from kiln.pipeline.adapters import Registry

    start = rss_mb()
    model = component(repo, plain=count < 0)
    base = rss_mb()
    entries = Registry(repo / "pipeline" / "loras").entries()
    model.feed_sets.clear()
    for i in range(max(count, 0)):
        model.adapter_feeds(f"{entries[f'style{i}']['id']}:1.0")
    return {"adapters": count, "rss_start_mb": start, "rss_base_mb": base, "rss_mb": rss_mb(),
            "adapter_store_mb": model.store.bytes / 2**20 if model.store else 0.0}


def step_feeds(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"sample": rng.standard_normal((2, 4, 64, 64)).astype(np.float32),
            "timestep": np.array([500.0, 500.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, 768)).astype(np.float32)}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def latency(repo: Path, runs: int) -> dict:
    """Each round times the four cases back to back (plain export, no adapter, the same adapter as the
    step before, the first step with a new adapter) in a rotating order, so the drift of a shared
    machine falls on all four alike; ratios are taken within each round."""
    from kiln.pipeline.adapters import AdapterStore, Registry

    feeds = [step_feeds()]
    plain, model = component(repo, plain=True), component(repo)
    registry = Registry(repo / "pipeline" / "loras")
    entries = registry.entries()
    wire = [f"{entries[f'style{i}']['id']}:0.8" for i in range(runs + 2)]
    plain.run(feeds)  # warm-ups
    model.run(feeds, wire[0])
    out: dict = {"plain_export_s": [], "no_adapter_s": [], "same_adapter_s": [], "switched_first_step_s": []}

    def same():
        model.run(feeds, wire[0])  # untimed: the step before used this adapter too
        return timed(lambda: model.run(feeds, wire[0]))

    for i in range(runs):
        cases = [("plain_export_s", lambda: timed(lambda: plain.run(feeds))),
                 ("no_adapter_s", lambda: timed(lambda: model.run(feeds))),
                 ("same_adapter_s", same),
                 ("switched_first_step_s", lambda: timed(lambda: model.run(feeds, wire[i + 1])))]  # a new adapter
        for name, case in cases[i % 4:] + cases[:i % 4]:
            out[name].append(case())
    for name in ("no_adapter_s", "same_adapter_s", "switched_first_step_s"):
        base = "plain_export_s" if name == "no_adapter_s" else "same_adapter_s" if name.startswith("switched") else "no_adapter_s"
        out[f"{name[:-2]}_over_{base[:-2]}"] = [a / b - 1 for a, b in zip(out[name], out[base])]
    out["no_adapter_equals_plain_export"] = bool(np.array_equal(model.run(feeds)[0]["out_sample"],
                                                                plain.run(feeds)[0]["out_sample"]))
    # what a switch adds, part by part: reading a new adapter's file, and building its feeds
    out["read_adapter_file_s"] = [timed(lambda: AdapterStore([registry.folder]).get(entries[f"style{i}"]["id"]))
                                  for i in range(runs)]
    feed_build = []
    for i in range(runs):
        model.feed_sets.clear()
        feed_build.append(timed(lambda: model.adapter_feeds(wire[i])))
    out["feeds_from_loaded_adapter_s"] = feed_build
    first = np.asarray(model.run(feeds, wire[0])[0]["out_sample"])
    model.run(feeds, wire[1])
    out["a_b_a_identical"] = bool(np.array_equal(first, model.run(feeds, wire[0])[0]["out_sample"]))
    return out


def add_time(repo: Path, work: Path, runs: int) -> list[float]:
    from kiln.pipeline.adapters import Registry, read_layers

    registry = Registry(repo / "pipeline" / "loras")
    layers = read_layers(repo / "unet" / "1")
    times = []
    for i in range(runs):
        name = f"timed{i}"
        if name in registry.entries():
            registry.remove(name)
        source = work / "files" / f"style{i}.safetensors"
        times.append(timed(lambda: registry.add(name, source, layers)))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lora-adapters"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child is not None:
        print(json.dumps(memory_child(args.work / "repo", args.memory_child)))
        return
    from tqdm import tqdm

    start = time.perf_counter()
    repo = prepare(args.work)
    prepared_s = time.perf_counter() - start
    memory = []
    for count in tqdm(COUNTS, desc="memory (one process each)"):
        child = subprocess.run([sys.executable, "-m", "kiln.benchmarks.lora_adapters", str(args.work), "--memory-child",
                                str(count)], check=True, capture_output=True, text=True)
        memory.append(json.loads(child.stdout.strip().splitlines()[-1]))
    times = latency(repo, args.runs)
    adds = add_time(repo, args.work, args.runs)
    from kiln.pipeline.adapters import read_layers

    layers = read_layers(repo / "unet" / "1")
    unet_bytes = sum(f.stat().st_size for f in (repo / "unet" / "1").iterdir() if f.name.startswith("model.onnx"))
    median = {k: statistics.median(v) for k, v in times.items() if isinstance(v, list)}
    switch_cost = median["read_adapter_file_s"] + median["feeds_from_loaded_adapter_s"]
    base_rss = next(m["rss_mb"] for m in memory if m["adapters"] == 0)
    results = {
        "model": "SD 1.5 architecture, full width, random weights; UNet exported with --lora-inputs",
        "adapted_layers": len(layers), "adapter": f"rank {RANK}, attention projections {list(ATTENTION)}, kohya layout",
        "unet_file_mb": unet_bytes / 2**20, "runs": args.runs, "prepare_s": prepared_s,
        "memory": memory,
        "memory_per_adapter_mb": {m["adapters"]: (m["rss_mb"] - base_rss) / m["adapters"] for m in memory
                                  if m["adapters"] > 0},
        "add_adapter_s": adds, "step": times, "step_median_s": median,
        "switch_cost_s": switch_cost,  # read + feeds, measured directly; the step timings below cross-check it
        "switch_cost_of_20_step_request": switch_cost / (20 * median["same_adapter_s"]),
        # medians of the ratios measured within each round
        "switched_step_over_same_adapter_step": median["switched_first_step_over_same_adapter"],
        "adapter_step_over_no_adapter": median["same_adapter_over_no_adapter"],
        "no_adapter_over_plain_export": median["no_adapter_over_plain_export"],
        "machine": f"{os.cpu_count()} CPU cores, ONNX Runtime CPU",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k not in ("memory", "step")}, indent=2))
    for m in memory:
        print(f"{m['adapters']:>3} adapters: RSS {m['rss_mb']:8.0f} MB (UNet loaded: {m['rss_base_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
