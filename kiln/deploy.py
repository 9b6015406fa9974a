"""`kiln deploy`: the main job on one machine, model folder -> ONNX -> repository -> embedded Triton
-> a smoke image, reusing every artifact whose inputs did not change."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from kiln.export.onnx_export import export_onnx
from kiln.model_repository.builder import build_repository
from kiln.models.folder import inspect_model
from kiln.models.tiny import write_tiny_model
from kiln.serving import server

log = logging.getLogger("kiln.deploy")


@dataclass
class Deployment:
    model_dir: Path
    onnx_dir: Path
    repo_dir: Path
    info: server.ServerInfo
    smoke_png: Path
    smoke_seconds: float
    samples_png: Path | None = None
    controlnets: tuple[str, ...] = ()  # served beside the model, by name


def tiny_model(artifacts: Path) -> Path:
    """The tiny random-weight model: built once, then reused."""
    path = artifacts / "models" / "tiny"
    if not (path / "model_index.json").is_file():
        log.info("building the tiny test model at %s", path)
        write_tiny_model(path)
    return path


def imported_model(checkpoint: Path, artifacts: Path) -> Path:
    """A single-file checkpoint imported to artifacts/models/<name>: imported once, then reused while
    the file's hash is the one imported."""
    import json

    from kiln.artifacts import file_sha256
    from kiln.models.single_file import MANIFEST, import_single_file

    out = artifacts / "models" / checkpoint.stem
    manifest = out / MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text())["source"]["sha256"] == file_sha256(checkpoint):
        log.info("reusing %s, imported from %s", out, checkpoint)
        return out
    log.info("importing the single-file checkpoint %s to %s", checkpoint, out)
    return import_single_file(checkpoint, out)


SAMPLE_COLOURS = ("red", "green", "blue", "yellow", "purple")


def demo_defaults() -> dict:
    """What a request to the demo gets when it leaves them out: the settings it is evaluated at."""
    from kiln.evaluation.report import EvalSpec, sampling

    return sampling(EvalSpec())


def sample_grid(url: str, out: Path, seed: int = 0, controlnet: str | None = None) -> Path:
    """Digits 0-9 (columns) in each colour (rows), drawn through the server; with `controlnet`, two
    more rows: control silhouettes at places and sizes of their own, and the digits drawn with them."""
    import io

    import numpy as np
    from PIL import Image

    from kiln.clients.client import KilnClient
    from kiln.evaluation.report import EvalSpec, control_set, grid, sampling

    spec = EvalSpec()
    images = []
    with KilnClient(url, "http") as client:
        for row, colour in enumerate(SAMPLE_COLOURS):
            background = ("white", "black", "gray")[row % 3]
            for digit in range(10):
                prompt = f"a {colour} digit {digit} on a {background} background"
                images.append(client.generate(prompt, seed=seed + digit, **sampling(spec)).images[0])
        if controlnet:
            controls = control_set(EvalSpec(seeds=1))
            images += [np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in controls.images]
            for glyph, data in zip(controls.glyphs, controls.images):
                images.append(client.generate(glyph.caption, seed=seed + glyph.digit, **sampling(spec),
                                              controlnet=controlnet, control_image=data).images[0])
    grid(np.stack(images), 10, scale=4).save(out)
    return out


def check_backend(backend: str, precision: str, lora_inputs: bool) -> None:
    """Refuse, before any work, a backend the embedded target lacks and options only ONNX Runtime serves."""
    from kiln.errors import RepositoryError
    from kiln.model_repository.builder import BACKENDS

    if backend not in BACKENDS["embedded"]:
        raise RepositoryError(f"--backend {backend} is not available for kiln deploy (the embedded target): expected one "
                              f"of {BACKENDS['embedded']}", hint="kiln repo build ... --target ngc for the other backends")
    if backend == "torch" and precision != "fp32":
        raise RepositoryError(f"--backend torch with --precision {precision}: that precision is the ONNX export's; "
                              "the PyTorch modules run float16 on a GPU and float32 on the CPU by themselves",
                              hint="leave out --precision (PRECISION=fp32) with --backend torch, or use --backend onnxruntime")
    if backend == "torch" and lora_inputs:
        raise RepositoryError("--backend torch with --lora-inputs (LORAS=1): only ONNX Runtime serves per-request LoRA adapters",
                              hint="leave out --lora-inputs with --backend torch, or use --backend onnxruntime")


def deploy(model_dir: Path | None, artifacts: Path, ports: server.Ports, precision: str = "fp32",
           prompt: str = "a red digit 7 on a white background", demo: bool = False,
           lora_inputs: bool = False, controlnets: dict[str, Path] | None = None,
           backend: str = "onnxruntime") -> Deployment:
    """MODEL, or the glyph demo model with `demo` (built or reused), or else the tiny random model.
    `lora_inputs`: exported to take LoRA adapters per request (kiln lora add); `controlnets`: name ->
    diffusers ControlNet folder, exported beside the model (the demo adds its own); `backend`: what runs
    the components (onnxruntime, or torch: their PyTorch modules, from the exported model folder)."""
    from kiln.clients.client import KilnClient

    check_backend(backend, precision, lora_inputs)

    artifacts = Path(artifacts)
    controlnets = dict(controlnets or {})
    if model_dir:
        model_dir = Path(model_dir)
        if model_dir.is_file():
            model_dir = imported_model(model_dir, artifacts)
    elif demo:
        from kiln.demo import DemoSpec, build_demo

        models = build_demo(artifacts)
        model_dir = models.merged
        controlnets.setdefault(DemoSpec().control_name, models.controlnet)
    else:
        model_dir = tiny_model(artifacts)
    inspect_model(model_dir)
    onnx_dir = artifacts / "onnx" / f"{'demo' if demo else model_dir.resolve().name}-{precision}{'-lora' if lora_inputs else ''}"
    export_onnx(model_dir, onnx_dir, precision=precision, lora_inputs=lora_inputs, controlnets=controlnets)
    if server.read_state(ports) is not None:
        log.info("stopping the server already running on HTTP port %d", ports.http)
        server.stop(ports)
    repo_dir = build_repository(onnx_dir, artifacts / "repository", defaults=demo_defaults() if demo else None,
                                backend=backend)
    _, info = server.start(repo_dir, ports)
    with KilnClient(info.http_url, "http") as client:
        result = client.generate(prompt, seed=0)
    smoke = artifacts / "smoke.png"
    result.save(smoke)
    samples = sample_grid(info.http_url, artifacts / "samples.png",
                          controlnet=DemoSpec().control_name if demo else None) if demo else None
    return Deployment(model_dir=model_dir, onnx_dir=onnx_dir, repo_dir=repo_dir, info=info, smoke_png=smoke,
                      smoke_seconds=result.seconds, samples_png=samples, controlnets=tuple(controlnets))
