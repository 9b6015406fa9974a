"""Parity report: served image vs diffusers' in-process image (each scheduler over HTTP and gRPC), and
ONNX vs PyTorch per component, for one model folder of any family. Prints a table and saves JSON and
markdown.

    python -m kiln.benchmarks.parity MODEL_DIR OUT_DIR [--steps 4] [--size 64]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np

SCHEDULERS = ("ddim", "euler", "euler_a", "dpmpp_2m", "pndm")
PROMPT, NEGATIVE = "a red digit 7 on a white background", "blurry, low quality"


def export_rows(manifest) -> list[dict]:
    rows = []
    for name, entry in manifest.components.items():
        for report in entry.parity:
            for t in report["tensors"]:
                rows.append({"component": name, "tensor": t["tensor"], "shape": t["shape"],
                             "max_abs": t["max_abs"], "rel_l2": t["rel_l2"]})
    return rows


def serve_rows(model_dir: Path, repo_dir: Path, steps: int, size: int, seed: int) -> list[dict]:
    from kiln.clients.client import KilnClient
    from kiln.pipeline.reference import diffusers_image, load_diffusers_pipeline
    from kiln.serving.server import running_server

    pipe = load_diffusers_pipeline(model_dir)
    rows = []
    with running_server(repo_dir) as info:
        for scheduler in SCHEDULERS:
            expected = diffusers_image(pipe, scheduler, PROMPT, NEGATIVE, seed, steps, 7.5, size, size)
            for protocol, url in (("http", info.http_url), ("grpc", info.grpc_url)):
                with KilnClient(url, protocol) as client:
                    served = client.generate(PROMPT, NEGATIVE, seed, steps, 7.5, size, size, scheduler).images
                diff = np.abs(served.astype(int) - expected)
                rows.append({"scheduler": scheduler, "protocol": protocol, "max_abs": int(diff.max()),
                             "mean_abs": float(diff.mean()), "pixels_differing": float((diff > 0).mean())})
    return rows


def to_markdown(export: list[dict], served: list[dict]) -> str:
    lines = ["## ONNX vs PyTorch", "", "| component | tensor | shape | max abs diff | rel-L2 |", "|---|---|---|---|---|"]
    lines += [f"| {r['component']} | {r['tensor']} | {r['shape']} | {r['max_abs']:.2e} | {r['rel_l2']:.2e} |" for r in export]
    lines += ["", "## Triton vs diffusers (0-255 scale)", "",
              "| scheduler | protocol | max abs diff | mean abs diff | pixels differing |", "|---|---|---|---|---|"]
    lines += [f"| {r['scheduler']} | {r['protocol']} | {r['max_abs']} | {r['mean_abs']:.4f} | {r['pixels_differing']:.2%} |"
              for r in served]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    from kiln.artifacts import read_export, write_json_atomically
    from kiln.export.onnx_export import export_onnx
    from kiln.model_repository.builder import build_repository

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=None, help="pixels (default: the model's native size)")
    parser.add_argument("--seed", type=int, default=31)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_dir = args.out_dir / "onnx"
        export_onnx(args.model_dir, onnx_dir)
        manifest = read_export(onnx_dir)
        size = args.size or manifest.model.default_size
        repo = build_repository(onnx_dir, Path(tmp) / "repository")
        served = serve_rows(args.model_dir, repo, args.steps, size, args.seed)
    export = export_rows(manifest)
    report = {"model": str(args.model_dir), "family": manifest.model.family, "prediction_type": manifest.model.prediction_type,
              "steps": args.steps, "size": size, "export": export, "served": served}
    write_json_atomically(args.out_dir / "parity.json", report)
    markdown = to_markdown(export, served)
    (args.out_dir / "parity.md").write_text(markdown)
    print(markdown)
    print(f"saved {args.out_dir / 'parity.json'} and {args.out_dir / 'parity.md'}")


if __name__ == "__main__":
    main()
