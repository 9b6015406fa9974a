"""`kiln export qdq ONNX_DIR OUT_DIR`: a calibrated int8 UNet with explicit Q/DQ nodes (NVIDIA ModelOpt).

TensorRT builds int8 engines from explicit quantisation: QuantizeLinear/DequantizeLinear pairs whose
scales were fixed by calibration. ONNX Runtime runs the same file on the CPU, so what int8 costs in
image quality is measured before a GPU is involved (benchmarks/precision.py).

Calibration inputs are the UNet's real inputs: every denoising step of the fp32 export drawing the
calibration prompts (latents at every noise level, the prompt and negative-prompt embeddings), as
NVIDIA's diffusion recipes calibrate. Only the UNet is quantised: it runs steps x 2 times per image;
the text encoder stays fp32 here (TensorRT builds it fp16) and the VAE stays fp32 (fp16 and int8
VAEs lose colour and can decode to black).

The result is checked against the fp32 UNet on held-out prompts (not used for calibration) with the
tolerance below, and written atomically beside copies of the other components, with a manifest that
records the toolkit, its version and the calibration, so a changed calibration rebuilds it.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kiln.artifacts import (MANIFEST_NAME, file_sha256, fingerprint, onnx_file, read_export, read_manifest,
                            write_json_atomically)
from kiln.errors import ExportError, ParityError
from kiln.export.precision import is_large
from kiln.export.specs import QDQ_PRECISION, ComponentSpec

log = logging.getLogger("kiln.export")

QDQ_FORMAT = 1  # bump when the quantisation code changes what it writes
METHODS = ("entropy", "max")  # ModelOpt's int8 activation calibrators
# int8 UNet vs fp32 UNet on held-out denoising inputs (relative L2 of the predicted noise). Measured
# on the glyph demo: median 0.03, worst step 0.11 (entropy calibration).
QDQ_TOLERANCE = {"median_rel_l2": 0.10, "max_rel_l2": 0.30}
# Used when no prompts are given: varied subjects, styles and colours. A deployment calibrates best
# on prompts like the ones it will serve (--prompts FILE).
DEFAULT_PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a watercolor painting of a lighthouse at dawn",
    "a red sports car parked on a city street at night",
    "a bowl of fruit on a wooden table, studio lighting",
    "a portrait of an old man with a white beard, oil painting",
    "a snowy mountain landscape under a blue sky",
    "a cute cat sleeping on a green sofa",
    "an isometric illustration of a small village",
    "a close-up of a yellow flower with water drops",
    "a futuristic city skyline in purple neon light",
    "a black and white sketch of a sailing ship",
    "a plate of sushi, top view, high detail",
)


@dataclass(frozen=True)
class Calibration:
    """How the UNet's calibration inputs are drawn; validated before any model is loaded."""

    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    holdout: int = 2  # the last prompts are kept out of calibration and used for the parity check
    steps: int = 20
    guidance: float = 7.5
    seed: int = 0
    height: int | None = None  # None: the model's native size
    width: int | None = None
    method: str = "entropy"

    def validate(self) -> "Calibration":
        if self.method not in METHODS:
            raise ExportError(f"--method {self.method!r} is not one of {METHODS}",
                              hint="entropy (ModelOpt's int8 default) suits diffusion UNets; max keeps every outlier")
        if len(self.prompts) < self.holdout + 1:
            raise ExportError(f"{len(self.prompts)} calibration prompts with holdout {self.holdout}: "
                              f"at least {self.holdout + 1} are needed", hint="give more prompts (--prompts FILE, one per line)")
        if self.holdout < 1:
            raise ExportError(f"--holdout {self.holdout} must be at least 1: the int8 UNet is checked on held-out prompts")
        if not 1 <= self.steps <= 200:
            raise ExportError(f"--steps {self.steps} is out of range 1..200")
        if self.guidance <= 1.0:
            raise ExportError(f"--guidance {self.guidance} must be above 1: served requests use classifier-free "
                              "guidance, so the UNet is calibrated on prompt and negative-prompt batches")
        return self


def read_prompts(path: Path) -> tuple[str, ...]:
    if not Path(path).is_file():
        raise ExportError(f"--prompts {path} does not exist", hint="a text file with one prompt per line")
    prompts = tuple(line.strip() for line in Path(path).read_text().splitlines() if line.strip())
    if not prompts:
        raise ExportError(f"--prompts {path} holds no prompt", hint="a text file with one prompt per line")
    return prompts


def record_unet_inputs(onnx_dir: Path, prompts, calibration: Calibration) -> list[list[dict[str, np.ndarray]]]:
    """The quantised component's inputs at every denoising step while the fp32 export draws each
    prompt (one list per prompt)."""
    from tqdm import tqdm

    from kiln.pipeline.onnx_pipeline import OnnxPipeline
    from kiln.pipeline.request import GenerationRequest

    pipe = OnnxPipeline(onnx_dir)
    height = calibration.height or pipe.defaults.height
    width = calibration.width or pipe.defaults.width
    run = pipe.engines.run
    recorded: list[list[dict[str, np.ndarray]]] = []

    def recording(spec, feeds, outputs):
        if spec.quantisable:
            recorded[-1].append({t.name: np.array(feeds[t.name], t.dtype) for t in spec.inputs})
        return run(spec, feeds, outputs)

    recording.device = run.device
    pipe.engines.run = recording
    for i, prompt in enumerate(tqdm(prompts, desc="record UNet inputs", unit="prompt")):
        recorded.append([])
        pipe(GenerationRequest(prompt, "", calibration.seed + i, calibration.steps, calibration.guidance, height, width,
                               "euler"))
    return recorded


def _stack(feeds: list[dict[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], str]:
    """ModelOpt's calibration format: inputs concatenated along the batch, and one step's shapes."""
    data = {name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]}
    shapes = ",".join(f"{name}:{'x'.join(str(d) for d in value.shape)}" for name, value in feeds[0].items())
    return data, shapes


def quantize_unet(fp32_path: Path, out_path: Path, feeds: list[dict[str, np.ndarray]], method: str) -> None:
    """ModelOpt rewrites its input in place (shape inference) and leaves intermediate files beside
    it, so it is given a private copy of the fp32 UNet's folder."""
    try:
        from modelopt.onnx.quantization import quantize
    except ImportError as exc:
        raise ExportError(f"NVIDIA ModelOpt's ONNX quantiser is not importable ({exc})",
                          hint="pip install 'kiln[int8]' (make setup installs it)") from exc
    import onnxruntime as ort

    data, shapes = _stack(feeds)
    providers = ["cuda:0", "cpu"] if "CUDAExecutionProvider" in ort.get_available_providers() else ["cpu"]
    work = Path(tempfile.mkdtemp(prefix=".modelopt.", dir=Path(out_path).parent.parent))
    try:
        source = work / "fp32" / fp32_path.name
        shutil.copytree(fp32_path.parent, source.parent)
        chatter = io.StringIO()  # ONNX Runtime's calibrator prints a line per histogram pass
        with contextlib.redirect_stdout(chatter):
            quantize(str(source), quantize_mode="int8", calibration_data=data, calibration_shapes=shapes,
                     calibration_method=method, calibration_eps=providers, high_precision_dtype="fp32",
                     use_external_data_format=is_large(source), output_path=str(out_path), log_level="WARNING")
        log.debug("ModelOpt calibration output:\n%s", chatter.getvalue())
    finally:
        shutil.rmtree(work, ignore_errors=True)


def unet_parity(fp32_path: Path, qdq_path: Path, feeds: list[dict[str, np.ndarray]], spec: ComponentSpec) -> dict:
    """Relative L2 of the int8 UNet's predicted noise against the fp32 UNet's, per held-out step."""
    from kiln.export.parity import compare
    from kiln.pipeline.onnx_session import ComponentSession

    reference, quantised = ComponentSession(spec, fp32_path), ComponentSession(spec, qdq_path)
    out = spec.output_names[0]
    diffs = [compare(out, quantised.run(f)[out], reference.run(f)[out]) for f in feeds]
    rel = np.array([d.rel_l2 for d in diffs])
    report = {"steps": len(feeds), "median_rel_l2": float(np.median(rel)), "max_rel_l2": float(rel.max()),
              "max_abs": max(d.max_abs for d in diffs), "tolerance": QDQ_TOLERANCE}
    worse = [k for k, limit in QDQ_TOLERANCE.items() if not report[k] <= limit]  # NaN fails too
    if worse:
        raise ParityError(f"int8 UNet vs fp32 on held-out prompts: {', '.join(f'{k} {report[k]:.3g} > {QDQ_TOLERANCE[k]}' for k in worse)}",
                          hint="calibrate on prompts like the served ones (--prompts FILE), or try --method max")
    return report


def export_qdq(onnx_dir: Path, out_dir: Path, calibration: Calibration = Calibration(), force: bool = False) -> Path:
    """Write `out_dir`: the fp32 export `onnx_dir` with its UNet quantised to int8 (Q/DQ)."""
    calibration.validate()
    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    manifest = read_export(onnx_dir)
    if manifest.precision != "fp32":
        raise ExportError(f"{onnx_dir} is a {manifest.precision} export; int8 is calibrated from the fp32 export",
                          hint="kiln export onnx MODEL ONNX_DIR (without --fp16/--int8), then kiln export qdq ONNX_DIR OUT")
    name = manifest.family.quantised.name
    fp32_path = onnx_file(onnx_dir, name)
    toolkit = f"nvidia-modelopt {_modelopt_version()}"
    source = manifest.components[name]
    key = fingerprint({name: source.sha256, "calibration": asdict(calibration), "toolkit": toolkit, "format": QDQ_FORMAT})
    fp32_entries = manifest.model_dump(mode="json", include={"components"}, exclude_none=True)["components"]
    previous = read_manifest(out_dir)
    if (not force and previous.get("quantization", {}).get("key") == key
            and previous.get("components") == {**fp32_entries, name: previous.get("components", {}).get(name)}
            and _files_intact(out_dir, previous)):
        log.info("int8 export in %s is current (same UNet, calibration and toolkit): reusing it", out_dir)
        return out_dir

    recorded = record_unet_inputs(onnx_dir, calibration.prompts, calibration)
    calibrate = [f for prompt in recorded[:-calibration.holdout] for f in prompt]
    held_out = [f for prompt in recorded[-calibration.holdout:] for f in prompt]
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".qdq.", dir=out_dir))
    try:
        qdq_path = onnx_file(scratch, name)
        qdq_path.parent.mkdir()
        log.info("calibrating the UNet on %d denoising steps of %d prompts (%s)", len(calibrate),
                 len(recorded) - calibration.holdout, calibration.method)
        quantize_unet(fp32_path, qdq_path, calibrate, calibration.method)
        parity = unet_parity(fp32_path, qdq_path, held_out, manifest.family.quantised)
        log.info("int8 UNet vs fp32 on %d held-out steps: median rel L2 %.3g, max %.3g", parity["steps"],
                 parity["median_rel_l2"], parity["max_rel_l2"])
        for entry in sorted(onnx_dir.iterdir()):
            if entry.is_dir() and entry.name != name and not entry.name.startswith("."):
                shutil.copytree(entry, scratch / entry.name)
        # swap in: the manifest goes first, so a swap cut short leaves a folder no reader accepts
        (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
        for entry in sorted(out_dir.iterdir()):
            if entry != scratch:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        for entry in sorted(scratch.iterdir()):
            entry.rename(out_dir / entry.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    quantised = source.model_copy(update={"precision": QDQ_PRECISION, "sha256": file_sha256(onnx_file(out_dir, name)),
                                          "source_sha256_fp32": source.sha256, "parity": parity})
    write_json_atomically(out_dir / MANIFEST_NAME, manifest.model_copy(update={
        "precision": QDQ_PRECISION, "components": {**manifest.components, name: quantised},
        "quantization": {"key": key, "toolkit": toolkit, "component": name, "format": "int8 Q/DQ",
                         "calibration": {**asdict(calibration), "calibration_steps": len(calibrate),
                                         "held_out_steps": len(held_out)}, "source_export": str(onnx_dir.resolve())},
    }))
    return out_dir


def _files_intact(out_dir: Path, manifest: dict) -> bool:
    entries = manifest.get("components", {})
    return all((out_dir / e["file"]).is_file() and file_sha256(out_dir / e["file"]) == e["sha256"] for e in entries.values())


def _modelopt_version() -> str:
    try:
        return importlib.metadata.version("nvidia-modelopt")
    except importlib.metadata.PackageNotFoundError:
        return "absent"
