"""What Kiln's embedding cache on the text encoder saves: the text encoder called through the
server with fresh prompts (misses) and with a repeated one (hits), and one-step generations with
fresh versus repeated prompts. Medians of several runs; JSON saved.

    python -m kiln.benchmarks.embedding_cache REPO_DIR OUT_DIR [--runs 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np


def _median_ms(samples: list[float]) -> float:
    return round(1000 * statistics.median(samples), 3)


def measure(url: str, runs: int) -> dict:
    import tritonclient.http as httpclient

    from kiln.clients.client import KilnClient

    client = httpclient.InferenceServerClient(url)

    def encode(ids: np.ndarray) -> float:
        tensor = httpclient.InferInput("input_ids", list(ids.shape), "INT32")
        tensor.set_data_from_numpy(ids)
        start = time.perf_counter()
        client.infer("text_encoder", [tensor])
        return time.perf_counter() - start

    rng = np.random.default_rng(0)
    fresh = [encode(rng.integers(0, 49000, (1, 77)).astype(np.int32)) for _ in range(runs)]
    repeated_ids = rng.integers(0, 49000, (1, 77)).astype(np.int32)
    encode(repeated_ids)
    repeated = [encode(repeated_ids) for _ in range(runs)]
    with KilnClient(url, "http") as kiln:
        kiln.generate("warm-up", steps=1, seed=0)
        unique = [kiln.generate(f"a prompt number {i} {rng.random()}", steps=1, seed=0).seconds for i in range(runs)]
        kiln.generate("the same prompt", steps=1, seed=0)
        same = [kiln.generate("the same prompt", steps=1, seed=0).seconds for _ in range(runs)]
    return {
        "text_encoder_ms": {"miss": _median_ms(fresh), "hit": _median_ms(repeated)},
        "txt2img_1_step_ms": {"fresh_prompt": _median_ms(unique), "repeated_prompt": _median_ms(same)},
        "runs": runs,
    }


def main(argv=None) -> None:
    from kiln.export.manifest import write_json_atomically
    from kiln.serving import server

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repo_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args(argv)
    ports = server.Ports(server.free_port(), server.free_port(), server.free_port())
    _, info = server.start(args.repo_dir, ports)
    try:
        result = measure(info.http_url, args.runs)
    finally:
        server.stop(ports)
    result["repository"] = str(args.repo_dir)
    write_json_atomically(args.out_dir / "embedding_cache.json", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
