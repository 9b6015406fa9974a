"""What reduced precision costs in image quality: the same model exported fp32, fp16, int8 (ONNX
Runtime's dynamic MatMul quantisation, the CPU path) and int8-qdq (the UNet calibrated with NVIDIA
ModelOpt, the input of TensorRT int8 engines), the same prompts and seeds through Kiln's ONNX Runtime pipeline, judged by the glyph classifier (prompt
accuracy) and against the fp32 images (mean and max |difference| on 0-255; fraction of black images).

    python -m kiln.benchmarks.precision MODEL_DIR CLASSIFIER_DIR OUT [--seeds 8]

Meant for the glyph demo model (`make deploy` builds it under artifacts/demo/).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

PRECISIONS = ("fp32", "fp16", "int8", "int8-qdq-entropy", "int8-qdq-max")  # int8-qdq-METHOD: ModelOpt calibration
COLOURS = ("red", "green", "blue", "yellow")


def run(model_dir: Path, classifier_dir: Path, out: Path, seeds: int = 8, steps: int = 20, guidance: float = 4.0) -> dict:
    from kiln.dataset.glyphs import Glyph
    from kiln.evaluation import metrics
    from kiln.evaluation.classifier import load_classifier
    from kiln.artifacts import read_export
    from kiln.export.onnx_export import export_onnx
    from kiln.export.quantize import QDQ_PRECISION, Calibration, export_qdq
    from kiln.pipeline.onnx_pipeline import OnnxPipeline
    from kiln.pipeline.request import GenerationRequest

    classifier = load_classifier(classifier_dir)
    glyphs = [Glyph(d, COLOURS[(s * 10 + d) % 4], ("white", "black", "gray")[(s * 10 + d) // 4 % 3])
              for s in range(seeds) for d in range(10)]
    report, images = {"model": str(model_dir), "prompts": len(glyphs), "steps": steps, "guidance": guidance}, {}
    report["qdq"] = qdq = {}
    for precision in PRECISIONS:
        if precision.startswith(QDQ_PRECISION):  # calibrated on other captions and seeds than the measured ones
            calibration = Calibration(prompts=tuple(Glyph(d, COLOURS[(d + k) % 4], ("white", "black", "gray")[k % 3]).caption
                                                    for k in range(3) for d in range(10))[::2],
                                      holdout=3, steps=steps, guidance=guidance, seed=10_000,
                                      method=precision.removeprefix(QDQ_PRECISION + "-"))
            onnx_dir = export_qdq(out / "onnx-fp32", out / f"onnx-{precision}", calibration)
            manifest = read_export(onnx_dir)
            qdq[precision] = {"quantization": manifest.quantization, "parity": manifest.components[manifest.family.quantised.name].parity}
        else:
            onnx_dir = export_onnx(model_dir, out / f"onnx-{precision}", precision=precision).out_dir
        pipe = OnnxPipeline(onnx_dir)
        drawn = np.concatenate([pipe(GenerationRequest(g.caption, "", i // 10, steps, guidance, 32, 32, "euler"))
                                for i, g in enumerate(glyphs)])
        images[precision] = drawn
        accuracy = metrics.prompt_accuracy(metrics.predict(drawn, classifier), [g.digit for g in glyphs], [g.colour for g in glyphs])
        diff = np.abs(drawn.astype(int) - images["fp32"].astype(int))
        report[precision] = {"accuracy": accuracy, "mean_abs_vs_fp32": float(diff.mean()), "max_abs_vs_fp32": int(diff.max()),
                             "black_images": int((drawn.reshape(len(drawn), -1).max(1) < 16).sum()),
                             "finite": bool(np.isfinite(drawn).all())}
    out.mkdir(parents=True, exist_ok=True)
    (out / "precision.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"{report['prompts']} prompts, {steps} steps, guidance {guidance}, ONNX Runtime pipeline", "",
             "| precision | digit acc. | colour acc. | mean abs vs fp32 | max abs vs fp32 | black images |", "|---|---|---|---|---|---|"]
    for p in PRECISIONS:
        r = report[p]
        lines.append(f"| {p} | {r['accuracy']['digit']:.3f} | {r['accuracy']['colour']:.3f} | {r['mean_abs_vs_fp32']:.2f} | "
                     f"{r['max_abs_vs_fp32']} | {r['black_images']} |")
    lines.append("")
    for name, q in qdq.items():
        calibration, parity = q["quantization"]["calibration"], q["parity"]
        lines.append(f"{name}: UNet quantised by {q['quantization']['toolkit']} ({calibration['method']} calibration, "
                     f"{calibration['calibration_steps']} denoising steps of {len(calibration['prompts']) - calibration['holdout']} "
                     f"prompts); against the fp32 UNet on {parity['steps']} held-out steps: median rel L2 "
                     f"{parity['median_rel_l2']:.3f}, max {parity['max_rel_l2']:.3f}.")
    (out / "precision.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("classifier_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seeds", type=int, default=8)
    args = parser.parse_args(argv)
    run(args.model_dir, args.classifier_dir, args.out, args.seeds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
