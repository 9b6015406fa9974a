"""Throughput of the served pipeline under concurrency: N requests one after another, then the same
N requests from 2, 4 and 8 concurrent clients, on one repository and tuning. Medians over rounds;
JSON saved; also checks that every concurrent image equals its one-at-a-time twin.

    python -m kiln.benchmarks.throughput ONNX_DIR OUT_DIR [--pipeline-instances 4] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np


def _draw(url: str, seeds: list[int], steps: int, concurrency: int) -> tuple[float, dict[int, np.ndarray]]:
    """Wall time for all `seeds`, `concurrency` clients pulling from one list."""
    from kiln.clients.client import KilnClient

    pending = list(seeds)
    lock = threading.Lock()
    images: dict[int, np.ndarray] = {}

    def worker():
        with KilnClient(url, "grpc") as client:
            while True:
                with lock:
                    if not pending:
                        return
                    seed = pending.pop()
                images[seed] = client.generate("a red digit 7 on a white background", seed=seed, steps=steps).images

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, images


def measure(url: str, requests: int, steps: int, rounds: int, levels=(2, 4, 8)) -> dict:
    seeds = list(range(1000, 1000 + requests))
    _draw(url, seeds[:2], steps, 1)  # warm-up
    sequential, alone = [], {}
    for _ in range(rounds):
        seconds, alone = _draw(url, seeds, steps, 1)
        sequential.append(seconds)
    result = {"requests": requests, "steps": steps, "rounds": rounds,
              "sequential_rps": requests / statistics.median(sequential), "concurrent": {}}
    for level in levels:
        times, max_diff = [], 0
        for _ in range(rounds):
            seconds, images = _draw(url, seeds, steps, level)
            times.append(seconds)
            max_diff = max(max_diff, max(int(np.abs(images[s].astype(int) - alone[s]).max()) for s in seeds))
        rps = requests / statistics.median(times)
        result["concurrent"][level] = {"rps": rps, "speedup": rps / result["sequential_rps"],
                                       "max_abs_diff_vs_alone": max_diff}
    return result


def main(argv=None) -> None:
    from kiln.artifacts import write_json_atomically
    from kiln.model_repository.builder import build_repository
    from kiln.model_repository.configs import Tuning
    from kiln.serving.server import running_server

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--pipeline-instances", type=int, default=Tuning().pipeline_instances)
    parser.add_argument("--onnx-threads", type=int, default=Tuning().onnx_threads)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    tuning = Tuning(pipeline_instances=args.pipeline_instances, onnx_threads=args.onnx_threads)
    with tempfile.TemporaryDirectory() as tmp:
        repo = build_repository(args.onnx_dir, Path(tmp) / "repository", tuning=tuning)
        with running_server(repo) as info:
            result = measure(info.grpc_url, args.requests, args.steps, args.rounds)
    result["tuning"] = asdict(tuning)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    name = f"throughput-p{args.pipeline_instances}-t{args.onnx_threads}.json"
    write_json_atomically(args.out_dir / name, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
