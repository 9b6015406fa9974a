"""Export a Stable Diffusion folder to ONNX: one model per component spec, each checked against
PyTorch at two shapes, keyed in a manifest so unchanged inputs reuse the artifacts."""

from __future__ import annotations

import json
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
from kiln.export.specs import CONTROLNET_PREFIX, ComponentSpec, dummy_inputs, family, parity_points
from kiln.models.folder import ModelDims, controlled_dims, inspect_model, model_dims

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


def input_order(spec: ComponentSpec, layers=None) -> list[str]:
    """The exported graph's inputs: the spec's, then each adapted layer's A and B."""
    from kiln.pipeline.adapters import live

    return spec.input_names + [name for layer in live(layers) for name in layer.inputs]


def run_torch(module: torch.nn.Module, spec: ComponentSpec, feeds: dict[str, np.ndarray], layers=None) -> dict[str, np.ndarray]:
    with torch.inference_mode():
        out = module(*(torch.from_numpy(feeds[name]) for name in input_order(spec, layers)))
    out = out if isinstance(out, tuple) else (out,)
    return {name: t.numpy() for name, t in zip(spec.output_names, out)}


def lora_dummies(layers, rank: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Random adapter feeds for an adapted export's checks (empty for a plain one)."""
    from kiln.pipeline.adapters import live

    rng = np.random.default_rng(seed)
    feeds = {}
    for layer in live(layers):
        a, b = layer.inputs
        feeds[a] = rng.normal(0, 0.1, (rank, layer.in_features)).astype(np.float32)
        feeds[b] = rng.normal(0, 0.1, (layer.out_features, rank)).astype(np.float32)
    return feeds


def check_parity(module, spec: ComponentSpec, onnx_path: Path, dims: ModelDims, precision: str,
                 layers=None) -> list[dict]:
    """Run ONNX Runtime and PyTorch at both parity shapes; raise ParityError beyond tolerance. An
    adapted export (`layers`) runs with random rank-2 adapters, a different rank at each shape."""
    from kiln.pipeline.onnx_session import ComponentSession

    session = ComponentSession(spec, onnx_path)
    tolerance = spec.onnx_tolerance(precision)
    report = []
    for i, point in enumerate(parity_points(dims)):
        feeds = {**dummy_inputs(spec, point, dims, seed=i), **lora_dummies(layers, rank=2 + i, seed=i)}
        expected = run_torch(module, spec, feeds, layers)
        actual = session.run(feeds)
        diffs = [parity.compare(name, actual[name], expected[name]) for name in spec.output_names]
        parity.check(spec.name, diffs, tolerance)
        report.append({"shape": asdict(point), "tolerance": asdict(tolerance), "tensors": [asdict(d) for d in diffs]})
    return report


def export_component(module, spec: ComponentSpec, dims: ModelDims, path: Path, opset: int, layers=None) -> None:
    from kiln.pipeline.adapters import live

    # batch 2 and rank 2: no axis gets specialised to 1
    feeds = {**dummy_inputs(spec, parity_points(dims)[1], dims), **lora_dummies(layers)}
    names = input_order(spec, layers)
    args = tuple(torch.from_numpy(feeds[name]) for name in names)
    axes = spec.dynamic_axes()
    for i, layer in enumerate(live(layers)):  # each layer's rank varies on its own (adapters differ per layer)
        a, b = layer.inputs
        axes[a], axes[b] = {0: f"rank_{i}"}, {1: f"rank_{i}"}
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=names,
            output_names=spec.output_names,
            dynamic_axes=axes,
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
    lora_inputs: bool = False,
    controlnets: dict[str, Path] | None = None,
) -> ExportResult:
    """Export (or reuse) every requested component of `model_dir` (default: all of its family's) into
    `out_dir`. `lora_inputs`: the UNet and text encoders also take per-request LoRA adapters
    (kiln.pipeline.adapters). `controlnets`: name -> diffusers ControlNet folder, each exported as the
    component controlnet_<name>, and the UNet taking their residuals."""
    from tqdm import tqdm

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if precision not in PRECISIONS:
        raise ExportError(f"precision={precision!r} is not one of {PRECISIONS}", hint="use --fp16 or --int8")
    if lora_inputs and precision == "int8":
        raise ExportError("--lora-inputs with --int8: the adapters' updates would bypass the quantised weights",
                          hint="export fp32 or --fp16 with --lora-inputs")
    info = inspect_model(model_dir)
    layout = family(info.family)
    components = tuple(layout.components) if components is None else tuple(components)
    unknown = [c for c in components if c not in layout.components]
    if unknown:
        raise ExportError(f"unknown components {unknown}: a {info.family} model has {list(layout.components)}")
    dims = model_dims(model_dir, info)
    sources = {spec.name: model_dir / spec.source for spec in layout.specs}
    if controlnets:
        from kiln.models.controlnet import check_controlnets

        checked = check_controlnets(controlnets, model_dir)
        dims = controlled_dims(model_dir, dims)
        layout = layout.controlled(dims, [CONTROLNET_PREFIX + name for name in checked])
        sources.update({CONTROLNET_PREFIX + name: folder for name, folder in checked.items()})
        components = tuple(dict.fromkeys((*components, *layout.controlnets)))
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = {k: v for k, v in _previous_entries(out_dir).items() if k in layout.components}
    versions = library_versions()
    source_hashes: dict[str, str] = {}
    entries, results = {}, []
    for name in tqdm(components, desc="export onnx", unit="model"):
        spec = layout.spec(name)
        source = name if name in layout.controlnets else spec.source  # ControlNets come from their own folders
        if source not in source_hashes:
            source_hashes[source] = tree_sha256(sources[name])
        component_precision = spec.precision(precision)
        key = fingerprint(
            {
                "source": source_hashes[source],
                "spec": spec.identity(),  # a controlled UNet's residual inputs are part of it
                "dims": {k: v for k, v in asdict(dims).items() if k != "control"},
                "opset": opset,
                "precision": component_precision,
                "versions": versions,
                "format": EXPORT_FORMAT,
                **({"lora_inputs": True} if lora_inputs and spec.adaptable else {}),
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
        report = _build_component(model_dir, spec, dims, out_dir, opset, component_precision,
                                  info.family if lora_inputs and spec.adaptable else None, sources[name])
        seconds = time.perf_counter() - start
        entries[name] = ComponentEntry(key=key, file=f"{name}/model.onnx", sha256=file_sha256(path),
                                       precision=component_precision, source_sha256=source_hashes[source],
                                       inputs=[asdict(t) for t in spec.inputs], outputs=[asdict(t) for t in spec.outputs],
                                       parity=report, seconds=round(seconds, 2))
        worst = max(t["max_abs"] for r in report for t in r["tensors"])
        log.info("%s: exported to %s in %.1f s, parity max|diff| %.2e", name, path, seconds, worst)
        results.append(ComponentResult(name, path, False, component_precision, report, seconds))
    for folder in (*layout.tokenizers, *COPIED_FOLDERS):
        _copy_folder(model_dir / folder, out_dir / folder)
    source = {"path": str(model_dir.resolve()), "sha256": source_hashes}
    if layout.controlnets:  # their own folders (the repository's torch backend loads from them)
        source["controlnets"] = {name: str(Path(sources[name]).resolve()) for name in layout.controlnets}
    write_json_atomically(out_dir / MANIFEST_NAME, ExportManifest(
        kiln_version=__version__, format=EXPORT_FORMAT, source=source,
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


def _build_component(model_dir, spec, dims, out_dir, opset, precision, adapted_family: str | None = None,
                     source: Path | None = None) -> list[dict]:
    """Export into a scratch folder, check it, then move it into place in one rename. With
    `adapted_family`, the component takes LoRA inputs, declared beside its model.onnx. `source`: the
    folder its weights come from (default the model's subfolder the spec names)."""
    module = spec.load_torch(model_dir, source)
    layers = None
    if adapted_family:
        from kiln.export.wrappers import WithLoraInputs, adaptable_layers

        unet_config = json.loads((Path(model_dir) / "unet" / "config.json").read_text()) if spec.name == "unet" else None
        layers = adaptable_layers(module, spec.name, adapted_family, unet_config)
        module = WithLoraInputs(module, layers).eval()
    scratch = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", dir=out_dir))
    try:
        fp32_path = scratch / "fp32" / "model.onnx"
        fp32_path.parent.mkdir()
        export_component(module, spec, dims, fp32_path, opset, layers)
        if layers:  # layers whose output the component never uses lose their inputs in the graph
            import dataclasses

            import onnx

            taken = {i.name for i in onnx.load(str(fp32_path), load_external_data=False).graph.input}
            layers = [dataclasses.replace(x, inert=x.inputs[0] not in taken) for x in layers]
            module.layers = [x for x in layers if not x.inert]
        final_path = fp32_path
        if precision != "fp32":
            final_path = scratch / precision / "model.onnx"
            final_path.parent.mkdir()
            convert(fp32_path, final_path, precision)
        if layers:
            from kiln.pipeline.adapters import write_layers

            write_layers(final_path.parent, layers)
        report = check_parity(module, spec, final_path, dims, precision, layers)
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
