"""What Kiln's embedding cache on the text encoder saves: the text encoder called through the
server with fresh prompts (misses) and with a repeated one (hits), and one-step generations with
fresh versus repeated prompts. Medians of several runs; JSON saved.

    python -m kiln.benchmarks.embedding_cache REPO_DIR OUT_DIR [--runs 20]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np


def measure(url: str, runs: int) -> dict:
    import tritonclient.http as httpclient

    from kiln.benchmarks.timing import timed
    from kiln.clients.client import KilnClient
    from kiln.export.specs import SD

    client = httpclient.InferenceServerClient(url)
    (encoder,) = SD.cached  # the demo's SD model: one text encoder
    (ids_spec,) = encoder.inputs
    rng = np.random.default_rng(0)

    def encode(ids: np.ndarray) -> None:
        tensor = httpclient.InferInput(ids_spec.name, list(ids.shape), "INT32")
        tensor.set_data_from_numpy(ids)
        client.infer(encoder.name, [tensor])

    def fresh_ids() -> np.ndarray:
        return rng.integers(0, 49000, (1, 77)).astype(np.int32)

    repeated_ids = fresh_ids()
    prompts = iter(f"a prompt number {i} {rng.random()}" for i in range(runs + 1))
    with KilnClient(url, "http") as kiln:
        result = {
            "text_encoder_ms": {"miss": timed(lambda: encode(fresh_ids()), runs).to_json(),
                                "hit": timed(lambda: encode(repeated_ids), runs).to_json()},
            "txt2img_1_step_ms": {
                "fresh_prompt": timed(lambda: kiln.generate(next(prompts), steps=1, seed=0), runs).to_json(),
                "repeated_prompt": timed(lambda: kiln.generate("the same prompt", steps=1, seed=0), runs).to_json()},
        }
    return {**result, "runs": runs}


def main(argv=None) -> None:
    from kiln.artifacts import write_json_atomically
    from kiln.serving.server import running_server

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repo_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args(argv)
    with running_server(args.repo_dir) as info:
        result = measure(info.http_url, args.runs)
    result["repository"] = str(args.repo_dir)
    write_json_atomically(args.out_dir / "embedding_cache.json", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
