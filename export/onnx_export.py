"""Export a Stable Diffusion folder to ONNX: one model per component spec, each checked against
PyTorch at two shapes, keyed in a manifest so unchanged inputs reuse the artifacts."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError

from kiln import __version__
from kiln.artifacts import (
    MANIFEST_NAME,
    ComponentEntry,
    ExportManifest,
    file_sha256,
    fingerprint,
    library_versions,
    onnx_file,
    read_manifest,
    tree_sha256,
    write_json_atomically,
)
from kiln.errors import ExportError
from kiln.export import parity
from kiln.export.precision import PRECISIONS, convert, is_large, save_model
from kiln.export.specs import ComponentSpec, dummy_inputs, family, parity_points
from kiln.models.folder import ModelDims, inspect_model, model_dims

log = logging.getLogger("kiln.export")

DEFAULT_OPSET = 17
EXPORT_FORMAT = 1  # bump when the export code changes what it writes
COPIED_FOLDERS = ("scheduler",)  # and the family's tokenizers


@dataclass
class ComponentResult:
    name: str
    path: Path
    reused: bool
    precision: str
    parity: list[dict] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class ExportResult:
    out_dir: Path
    components: list[ComponentResult]

    @property
    def manifest(self) -> Path:
        return self.out_dir / MANIFEST_NAME


def run_torch(module: torch.nn.Module, spec: ComponentSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with torch.inference_mode():
        out = module(*(torch.from_numpy(feeds[name]) for name in spec.input_names))
    out = out if isinstance(out, tuple) else (out,)
    return {name: t.numpy() for name, t in zip(spec.output_names, out)}


def check_parity(module, spec: ComponentSpec, onnx_path: Path, dims: ModelDims, precision: str) -> list[dict]:
    """Run ONNX Runtime and PyTorch at both parity shapes; raise ParityError beyond tolerance."""
    from kiln.pipeline.onnx_session import ComponentSession

    session = ComponentSession(spec, onnx_path)
    tolerance = spec.onnx_tolerance(precision)
    report = []
    for i, point in enumerate(parity_points(dims)):
        feeds = dummy_inputs(spec, point, dims, seed=i)
        expected = run_torch(module, spec, feeds)
        actual = session.run(feeds)
        diffs = [parity.compare(name, actual[name], expected[name]) for name in spec.output_names]
        parity.check(spec.name, diffs, tolerance)
        report.append({"shape": asdict(point), "tolerance": asdict(tolerance), "tensors": [asdict(d) for d in diffs]})
    return report


def export_component(module, spec: ComponentSpec, dims: ModelDims, path: Path, opset: int) -> None:
    feeds = dummy_inputs(spec, parity_points(dims)[1], dims)  # batch 2: no axis gets specialised to 1
    args = tuple(torch.from_numpy(feeds[name]) for name in spec.input_names)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes(),
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    # Re-save so large models keep their weights in one model.onnx_data file, as optimum does.
    import onnx

    large = is_large(path)
    model = onnx.load(str(path))
    for stray in path.parent.iterdir():
        stray.unlink()
    save_model(model, path, large)


def export_onnx(
    model_dir: Path,
    out_dir: Path,
    precision: str = "fp32",
    opset: int = DEFAULT_OPSET,
    components: tuple[str, ...] | None = None,
    force: bool = False,
) -> ExportResult:
    """Export (or reuse) every requested component of `model_dir` (default: all of its family's) into `out_dir`."""
    from tqdm import tqdm

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if precision not in PRECISIONS:
        raise ExportError(f"precision={precision!r} is not one of {PRECISIONS}", hint="use --fp16 or --int8")
    info = inspect_model(model_dir)
    layout = family(info.family)
    components = tuple(layout.components) if components is None else tuple(components)
    unknown = [c for c in components if c not in layout.components]
    if unknown:
        raise ExportError(f"unknown components {unknown}: a {info.family} model has {list(layout.components)}")
    dims = model_dims(model_dir, info)
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = {k: v for k, v in _previous_entries(out_dir).items() if k in layout.components}
    versions = library_versions()
    source_hashes: dict[str, str] = {}
    entries, results = {}, []
    for name in tqdm(components, desc="export onnx", unit="model"):
        spec = layout.spec(name)
        if spec.source not in source_hashes:
            source_hashes[spec.source] = tree_sha256(model_dir / spec.source)
        component_precision = spec.precision(precision)
        key = fingerprint(
            {
                "source": source_hashes[spec.source],
                "spec": spec.identity(),
                "dims": asdict(dims),
                "opset": opset,
                "precision": component_precision,
                "versions": versions,
                "format": EXPORT_FORMAT,
            }
        )
        path = onnx_file(out_dir, name)
        old = previous.get(name)
        if not force and old and old.key == key and path.is_file() and file_sha256(path) == old.sha256:
            log.info("%s: unchanged inputs, reusing %s", name, path)
            entries[name] = old
            results.append(ComponentResult(name, path, True, component_precision, old.parity))
            continue
        start = time.perf_counter()
        report = _build_component(model_dir, spec, dims, out_dir, opset, component_precision)
        seconds = time.perf_counter() - start
        entries[name] = ComponentEntry(key=key, file=f"{name}/model.onnx", sha256=file_sha256(path),
                                       precision=component_precision, source_sha256=source_hashes[spec.source],
                                       inputs=[asdict(t) for t in spec.inputs], outputs=[asdict(t) for t in spec.outputs],
                                       parity=report, seconds=round(seconds, 2))
        worst = max(t["max_abs"] for r in report for t in r["tensors"])
        log.info("%s: exported to %s in %.1f s, parity max|diff| %.2e", name, path, seconds, worst)
        results.append(ComponentResult(name, path, False, component_precision, report, seconds))
    for folder in (*layout.tokenizers, *COPIED_FOLDERS):
        _copy_folder(model_dir / folder, out_dir / folder)
    write_json_atomically(out_dir / MANIFEST_NAME, ExportManifest(
        kiln_version=__version__, format=EXPORT_FORMAT, source={"path": str(model_dir.resolve()), "sha256": source_hashes},
        model=replace(info, path=None), dims=dims, opset=opset, precision=precision, libraries=versions,
        components={**previous, **entries}))
    return ExportResult(out_dir, results)


def _previous_entries(out_dir: Path) -> dict[str, ComponentEntry]:
    """What an earlier export into `out_dir` recorded; nothing if its manifest is not one Kiln reads."""
    try:
        return {name: ComponentEntry.model_validate(entry)
                for name, entry in read_manifest(out_dir).get("components", {}).items()}
    except ValidationError:
        return {}


def _build_component(model_dir, spec, dims, out_dir, opset, precision) -> list[dict]:
    """Export into a scratch folder, check it, then move it into place in one rename."""
    module = spec.load_torch(model_dir)
    scratch = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", dir=out_dir))
    try:
        fp32_path = scratch / "fp32" / "model.onnx"
        fp32_path.parent.mkdir()
        export_component(module, spec, dims, fp32_path, opset)
        final_path = fp32_path
        if precision != "fp32":
            final_path = scratch / precision / "model.onnx"
            final_path.parent.mkdir()
            convert(fp32_path, final_path, precision)
        report = check_parity(module, spec, final_path, dims, precision)
        target = out_dir / spec.name
        if target.exists():
            shutil.rmtree(target)
        final_path.parent.rename(target)
        return report
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _copy_folder(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
