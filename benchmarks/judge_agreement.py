"""How far the glyph judge's verdicts can be trusted: judges trained with the shipped recipe and
different seeds read the same generated images (the demo model drawn in-process with the eval's
sampler, every colour on every background); a judge worth its numbers agrees with its re-seeded
copies on nearly every image. Writes each judge's digit accuracy per cell, its accuracy on held-out
renders (clean and degraded), and the pairwise agreement to OUT/judge.json and OUT/judge.md.

    python -m kiln.benchmarks.judge_agreement MODEL_DIR OUT [--seeds 0 1 2] [--images 6] [--steps 2000]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import torch


def draw_cells(model_dir: Path, images: int) -> dict[tuple[str, str], tuple[np.ndarray, list[int]]]:
    """{(colour, background): (uint8 images, digits)}: `images` seeds x 10 digits per cell."""
    from kiln.dataset.glyphs import BACKGROUNDS, COLOURS, DIGITS, Glyph
    from kiln.evaluation.report import EvalSpec
    from kiln.pipeline.reference import diffusers_image, load_diffusers_pipeline

    spec = EvalSpec()
    pipe = load_diffusers_pipeline(model_dir)
    cells = {}
    for colour, background in itertools.product(COLOURS, BACKGROUNDS):
        glyphs = [Glyph(d, colour, background) for d in DIGITS]
        drawn = [diffusers_image(pipe, spec.scheduler, g.caption, "", seed, spec.steps, spec.guidance_scale, 32, 32)[0]
                 for seed in range(images) for g in glyphs]
        cells[colour, background] = (np.stack(drawn), [g.digit for _ in range(images) for g in glyphs])
    return cells


def measure(model_dir: Path, seeds: list[int], images: int, steps: int) -> dict:
    from tqdm import tqdm

    from kiln.evaluation import metrics
    from kiln.evaluation.classifier import load_classifier, train_classifier

    cells = draw_cells(model_dir, images)
    judges, verdicts = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in tqdm(seeds, desc="judges", unit="judge"):
            report = train_classifier(Path(tmp) / str(seed), steps=steps, seed=seed)
            judge = load_classifier(report.path)
            predicted = {k: [p.digit for p in metrics.predict(x, judge)] for k, (x, _) in cells.items()}
            verdicts[seed] = np.concatenate([predicted[k] for k in cells])
            judges[str(seed)] = {
                "renders": {"digit": report.digit_accuracy, "digit_degraded": report.degraded_digit_accuracy},
                "cells": {f"{c}/{b}": float(np.mean(np.equal(predicted[c, b], cells[c, b][1]))) for c, b in cells},
            }
    agreement = {f"{a}-{b}": float(np.mean(verdicts[a] == verdicts[b])) for a, b in itertools.combinations(seeds, 2)}
    return {"model": str(model_dir), "images_per_cell": images * 10, "steps": steps, "judges": judges,
            "agreement": agreement}


def to_markdown(result: dict) -> str:
    cells = list(next(iter(result["judges"].values()))["cells"])
    lines = [f"Judges of the shipped recipe ({result['steps']} steps), seeds {', '.join(result['judges'])}, reading "
             f"{result['images_per_cell']} generated digits per cell of `{result['model']}`.", "",
             "| judge seed | renders | degraded renders | " + " | ".join(cells) + " |",
             "|---|---|---|" + "---|" * len(cells)]
    for seed, judge in result["judges"].items():
        lines.append(f"| {seed} | {judge['renders']['digit']:.3f} | {judge['renders']['digit_degraded']:.3f} | "
                     + " | ".join(f"{judge['cells'][c]:.2f}" for c in cells) + " |")
    lines += ["", "Agreement between judges (share of generated images given the same digit): "
              + ", ".join(f"{pair} {value:.3f}" for pair, value in result["agreement"].items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--images", type=int, default=6, help="seeds per digit in each cell")
    parser.add_argument("--steps", type=int, default=2000, help="judge training steps (the demo's)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    result = measure(args.model_dir, args.seeds, args.images, args.steps)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "judge.json").write_text(json.dumps(result, indent=2))
    (args.out / "judge.md").write_text(to_markdown(result))
    print(to_markdown(result))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
