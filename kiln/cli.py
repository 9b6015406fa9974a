"""The `kiln` command: one subcommand group per stage of the data path."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from kiln.cli_choices import (
    CALIBRATION,
    LIMITS,
    PORTS,
    REQUEST_DEFAULTS,
    SCHEDULER_HELP,
    TUNING,
    URLS,
    Backend,
    CalibrationMethod,
    Crop,
    ImportFamily,
    ControlKind,
    Method,
    OrtAccelerator,
    Precision,
    PredictionType,
    Protocol,
    Scenario,
    Target,
    TinyFamily,
    TorchDevice,
    TorchDtype,
    LOAD_USERS,
    Width,
    declared,
    protocol_list,
    scheduler_name,
)
from kiln.errors import KilnError

# transformers warns on import that torchvision is absent (it cannot load beside the CPU torch);
# Kiln never uses the image processors that need it.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

console = Console(stderr=True, soft_wrap=True)
app = typer.Typer(help="Stable Diffusion from fine-tuning to a Triton deployment.", no_args_is_help=True)
model_app = typer.Typer(help="Stable Diffusion model folders.", no_args_is_help=True)
data_app = typer.Typer(help="Captioned image folders -> training sets.", no_args_is_help=True)
export_app = typer.Typer(help="Export components to ONNX, checked against PyTorch.", no_args_is_help=True)
repo_app = typer.Typer(help="Triton model repositories.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(data_app, name="data")
app.add_typer(export_app, name="export")
app.add_typer(repo_app, name="repo")
lora_app = typer.Typer(help="LoRA files: diffusers' layout and kohya's (A1111, ComfyUI).", no_args_is_help=True)
app.add_typer(lora_app, name="lora")
cluster_app = typer.Typer(help="Kubernetes manifests for NVIDIA's Triton container.", no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")


HTTP_PORT = typer.Option(PORTS.http, "--http-port")
GRPC_PORT = typer.Option(PORTS.grpc, "--grpc-port")
METRICS_PORT = typer.Option(PORTS.metrics, "--metrics-port")
URL = typer.Option(None, "--url", help=f"host:port (default {URLS['http']} for http, {URLS['grpc']} for grpc)")
PROTOCOL = typer.Option(Protocol.http, "--protocol")

TINY = declared("kiln.models.tiny", "write_tiny_model")
SD15 = declared("kiln.models.benchmark", "write_sd15_model")
SDXL = declared("kiln.models.benchmark", "write_sdxl_model")


@model_app.command("tiny")
def model_tiny(
    out: Path,
    prediction_type: PredictionType = typer.Option(PredictionType(TINY.prediction_type),
                                                   help="epsilon: SD 1.x style; v_prediction: SD 2.x style (sd family)"),
    family: TinyFamily = typer.Option(TinyFamily(TINY.family), "--family",
                                      help="sd: SD 1.x/2.x layout; sdxl: SDXL's (two text encoders, size conditioning)"),
    seed: int = TINY.seed,
    controlnet: Optional[Path] = typer.Option(None, "--controlnet", help="also write a tiny ControlNet of it to this folder"),
):
    """Write a tiny SD or SDXL pipeline with random weights and the real CLIP tokenizer."""
    from kiln.models.tiny import write_tiny_model

    write_tiny_model(out, prediction_type.value, seed, family.value)
    console.print(f"tiny {family} {prediction_type} model written to {out}")
    if controlnet is not None:
        from kiln.models.controlnet import write_tiny_controlnet

        write_tiny_controlnet(out, controlnet, seed)
        console.print(f"tiny ControlNet written to {controlnet}; export both with: kiln export onnx {out} ONNX_DIR "
                      f"--controlnet NAME={controlnet}")


@model_app.command("tiny-controlnet")
def model_tiny_controlnet(model_dir: Path, out: Path, seed: int = typer.Option(0, "--seed")):
    """Write a ControlNet of MODEL_DIR's UNet with random weights (control moves the image from the first
    step): the fixture for control tests and the default deploy."""
    from kiln.models.controlnet import write_tiny_controlnet

    write_tiny_controlnet(model_dir, out, seed)
    console.print(f"tiny ControlNet of {model_dir} written to {out}; export it with: kiln export onnx {model_dir} "
                  f"ONNX_DIR --controlnet NAME={out}")


@model_app.command("sd15")
def model_sd15(out: Path, width: Width = typer.Option(Width(SD15.width), "--width",
                                                      help="full: SD 1.5 exactly; half: half the UNet and VAE widths"),
               seed: int = SD15.seed):
    """Write SD 1.5's architecture with random weights, for benchmarks at real size."""
    from kiln.models.benchmark import write_sd15_model

    write_sd15_model(out, width.value, seed)
    console.print(f"SD 1.5 architecture ({width} width, random weights) written to {out}")


@model_app.command("sdxl")
def model_sdxl(out: Path, width: Width = typer.Option(Width(SDXL.width), "--width",
                                                      help="full: SDXL base exactly; half: half of every width"),
               seed: int = SDXL.seed):
    """Write SDXL base's architecture with random weights, for benchmarks at real size."""
    from kiln.models.benchmark import write_sdxl_model

    write_sdxl_model(out, width.value, seed)
    console.print(f"SDXL base architecture ({width} width, random weights) written to {out}")


@model_app.command("import")
def model_import(
    file: Path,
    out: Path,
    family: Optional[ImportFamily] = typer.Option(None, "--family", help="when the keys cannot tell (default: read from "
                                                  "the file; sd2: 512 px epsilon, sd2-v: 768 px v-prediction)"),
    prediction_type: Optional[PredictionType] = typer.Option(None, "--prediction-type",
                                                             help="overrides what the file says (default: its metadata "
                                                                  "or v_pred key, else epsilon; SD 2.x must say or be told)"),
    config: Optional[Path] = typer.Option(None, "--config", help="a diffusers folder of the checkpoint's architecture "
                                          "(default: Kiln's configs of SD 1.5, SD 2.x or SDXL base)"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="load a .ckpt/.pt pickle (it runs the code it holds: "
                                      "only for files you trust)"),
):
    """Convert a single-file checkpoint (A1111/ComfyUI layout) into a diffusers folder, offline, checked
    tensor by tensor against the file."""
    from kiln.models.single_file import MANIFEST, import_single_file

    import_single_file(file, out, family.value if family else None, prediction_type.value if prediction_type else None,
                       config, allow_pickle)
    import json

    manifest = json.loads((out / MANIFEST).read_text())
    console.print(f"{file} ({manifest['family']}, {manifest['prediction_type']}: {manifest['decided_by']}) imported to "
                  f"{out}: {manifest['tensors']} tensors, max |diff| {manifest['max_abs_diff']}, "
                  f"{manifest['unused_keys']} unused; deploy it with: make deploy MODEL={out}")


@model_app.command("export-single-file")
def model_export_single_file(model_dir: Path, out: Path,
                             fp16: bool = typer.Option(False, "--fp16", help="store the weights in fp16 (half the size)")):
    """Write a diffusers folder as one .safetensors file in the original layout A1111 and ComfyUI load."""
    from kiln.models.single_file import export_single_file

    export_single_file(model_dir, out, fp16)
    console.print(f"{model_dir} written to {out} ({out.stat().st_size / 2**20:.1f} MiB)")


@lora_app.command("convert")
def lora_convert(lora: Path, out: Path, base: Path = typer.Option(..., "--base", help="the model folder the LoRA was "
                                                                  "trained on (it names the layers)")):
    """Rewrite a diffusers-format LoRA (what Kiln trains) in kohya's layout, which A1111 and ComfyUI load."""
    from kiln.models.lora_files import scan, to_kohya

    to_kohya(lora, base, out)
    summary = scan(out)
    console.print(f"{lora} written in kohya's layout to {out}: modules {summary.modules}, "
                  f"{summary.convolutions} convolution (LoCon)")


@lora_app.command("info")
def lora_info(lora: Path):
    """Name a LoRA file's layout and modules; refuses (naming them) keys Kiln would not apply."""
    from kiln.models.lora_files import scan

    summary = scan(lora)
    typer.echo(f"layout: {summary.layout}")
    typer.echo(f"modules: {summary.modules}")
    typer.echo(f"convolution modules (LoCon): {summary.convolutions}")


REPO_OPTION = typer.Option(Path("artifacts/repository"), "--repo", help="the model repository the server runs")
SERVED_MODEL_OPTION = typer.Option(None, "--model", help="the served model (default: the one that takes adapters)")


@lora_app.command("add")
def lora_add(name: str, lora: Path, repo: Path = REPO_OPTION, model: Optional[str] = SERVED_MODEL_OPTION,
             replace: bool = typer.Option(False, "--replace", help="replace an adapter of that name (requests in "
                                          "flight finish with the old one)")):
    """Register a LoRA file (diffusers' or kohya's layout) with a served model, while it serves:
    requests choose it with loras="NAME:SCALE"."""
    import time

    from kiln.pipeline.adapters import served_registry

    start = time.perf_counter()
    model, registry, layers = served_registry(repo, model)
    entry = registry.add(name, lora, layers, replace=replace)
    console.print(f"{name} added to {model} in {time.perf_counter() - start:.1f} s: modules {entry['modules']}, "
                  f"rank {entry['rank']}, {entry['bytes'] / 2**20:.1f} MiB, id {entry['id']}; "
                  f"use it with: kiln generate PROMPT --lora {name}:0.8")


@lora_app.command("list")
def lora_list(repo: Path = REPO_OPTION, model: Optional[str] = SERVED_MODEL_OPTION):
    """The adapters registered with a served model."""
    from kiln.pipeline.adapters import served_registry

    model, registry, _ = served_registry(repo, model)
    entries = registry.entries()
    if not entries:
        console.print(f"no adapters registered with {model}; add one with: kiln lora add NAME FILE")
    for name, entry in sorted(entries.items()):
        typer.echo(f"{name}\trank {entry['rank']}\t{entry['bytes'] / 2**20:.1f} MiB\t{entry['modules']}\t{entry['source']}")


@lora_app.command("remove")
def lora_remove(name: str, repo: Path = REPO_OPTION, model: Optional[str] = SERVED_MODEL_OPTION):
    """Unregister an adapter: requests already using it finish, later ones are refused."""
    from kiln.pipeline.adapters import GRACE_S, served_registry

    model, registry, _ = served_registry(repo, model)
    registry.remove(name)
    console.print(f"{name} removed from {model}; requests in flight finish with it (its file is deleted after "
                  f"{GRACE_S / 60:.0f} minutes)")


@model_app.command("info")
def model_info(model_dir: Path):
    """Describe a local Stable Diffusion folder (SD 1.x, 2.x or XL) without loading its weights."""
    from kiln.models.folder import FAMILY_NAMES, inspect_model

    info = inspect_model(model_dir)
    typer.echo(f"family: {info.family} ({FAMILY_NAMES[info.family]})")
    for key, value in vars(info).items():
        if key != "family":
            typer.echo(f"{key}: {value}")


PREPARE = declared("kiln.dataset.prepare", "PrepareOptions")
GLYPHS = declared("kiln.dataset.glyphs", "write_glyphs")


@data_app.command("prepare")
def data_prepare(
    src: Path,
    out: Path,
    resolution: int = typer.Option(PREPARE.resolution, "--resolution"),
    min_size: Optional[int] = typer.Option(None, "--min-size", help="drop images whose shorter side is below (default resolution/2)"),
    dedup_distance: int = typer.Option(PREPARE.dedup_distance, "--dedup-distance", help="perceptual-hash distance that counts as a duplicate"),
    crop: Crop = typer.Option(Crop(PREPARE.crop), "--crop", help="center: square crops; none: shorter side resized only"),
    clip_model: Optional[Path] = typer.Option(None, "--clip-model", help="local CLIPModel folder for the similarity filter"),
    min_clip_score: float = typer.Option(PREPARE.min_clip_score, "--min-clip-score"),
    aesthetic_weights: Optional[Path] = typer.Option(None, "--aesthetic-weights", help="LAION aesthetic predictor .pth"),
    min_aesthetic: float = typer.Option(PREPARE.min_aesthetic, "--min-aesthetic"),
    control: Optional[ControlKind] = typer.Option(None, "--control", help="also write a control image per image "
                                                  "(conditioning_file_name), for kiln train controlnet: canny edges, "
                                                  "or the subject's mask on a plain background"),
):
    """Keep usable, captioned, distinct images resized for training; report why others were dropped."""
    from kiln.dataset.prepare import PrepareOptions, prepare

    options = PrepareOptions(resolution=resolution, min_size=min_size, dedup_distance=dedup_distance, crop=crop.value,
                             clip_model=clip_model, min_clip_score=min_clip_score, aesthetic_weights=aesthetic_weights,
                             min_aesthetic=min_aesthetic, control=control.value if control else None)
    report = prepare(src, out, options)
    dropped = ", ".join(f"{k}: {v}" for k, v in report.dropped.items()) or "none"
    console.print(f"kept {report.kept} images, dropped {sum(report.dropped.values())} ({dropped}); "
                  f"manifest: {out / 'manifest.json'}")


@data_app.command("glyphs")
def data_glyphs(
    out: Path,
    count: int = typer.Option(GLYPHS.count, "--count"),
    seed: int = typer.Option(GLYPHS.seed, "--seed"),
    size: int = typer.Option(GLYPHS.size, "--size", help="pixels"),
    colours: Optional[str] = typer.Option(None, "--colours", help="comma-separated subset, e.g. red,green,blue"),
    control: bool = typer.Option(False, "--control", help="each digit's silhouette too (conditioning_file_name), "
                                 "for kiln train controlnet"),
    scattered: bool = typer.Option(False, "--scattered", help="digits smaller and further off centre (the demo "
                                   "ControlNet's data)"),
):
    """Render captioned digits from the fonts on this machine (deterministic for a seed)."""
    from kiln.dataset.glyphs import CENTRED, COLOURS, SCATTERED, write_glyphs

    chosen = tuple(c.strip() for c in colours.split(",")) if colours else tuple(COLOURS)
    write_glyphs(out, count=count, seed=seed, size=size, colours=chosen, control=control,
                 placement=SCATTERED if scattered else CENTRED)
    console.print(f"{count} glyphs ({', '.join(chosen)}) written to {out}")


@app.command(context_settings={"allow_extra_args": False})
def train(
    method: Method = typer.Argument(..., help="the fine-tuning method, or base: then DATA_DIR OUT_DIR and key=value settings"),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value settings over the config file"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML training config"),
    resume: Optional[str] = typer.Option(None, "--resume", help="latest, or a checkpoint folder"),
):
    """Fine-tune a model (or `base`: train the demo model from scratch on a glyph folder, DATA OUT).
    Runs under `accelerate launch` unchanged for several processes or machines."""
    from kiln.training.run import run_training

    if method == Method.base:
        from kiln.training.base import train_base

        if not overrides or len(overrides) < 2:
            raise KilnError("kiln train base needs DATA_DIR OUT_DIR", hint="kiln data glyphs data/glyphs first")
        spec, vae_data = _base_settings(overrides[2:])
        model = train_base(Path(overrides[0]), Path(overrides[1]), spec, vae_data)
        console.print(f"base model written to {model}")
        return

    summary = run_training(method.value, config, overrides or [], resume)
    if summary:
        loss = summary["fixed_batch_loss"]
        console.print(f"{method}: {summary['steps']} steps, fixed-batch loss {loss['start']:.4f} -> {loss['end']:.4f}; "
                      f"wrote {', '.join(summary['artifacts'])}")


def _base_settings(items: list[str]):
    """`kiln train base DATA_DIR OUT_DIR [key=value ...]`: BaseSpec's fields, and vae_data (the
    autoencoder's own image set, default DATA_DIR), validated as training overrides are."""
    from kiln.training.base import BaseSpec
    from kiln.training.config import parse_overrides, settings_model, validate

    what = "kiln train base setting"
    schema = settings_model(BaseSpec, vae_data=(Optional[Path], None))
    chosen = validate(schema, parse_overrides(items, what=what, example="unet_steps=500"), what + "s",
                      hint="settings: vae_data=DIR and BaseSpec's fields (training/base.py)")
    return BaseSpec(**chosen.model_dump(exclude={"vae_data"})), chosen.vae_data


@app.command()
def merge(
    base: Path,
    out: Path,
    lora: Optional[list[str]] = typer.Option(None, "--lora", help="FILE[:SCALE], repeatable"),
    textual_inversion: Optional[list[Path]] = typer.Option(None, "--textual-inversion", help="FILE, repeatable"),
    single_file: Optional[Path] = typer.Option(None, "--single-file", help="also write the merged model as one "
                                               ".safetensors file in the original layout (A1111, ComfyUI)"),
):
    """Fuse LoRA adapters and Textual Inversion tokens into a plain diffusers folder with a manifest."""
    from kiln.merge.fuse import merge as run, parse_lora

    run(base, out, [parse_lora(item) for item in lora or []], list(textual_inversion or []), single_file=single_file)
    console.print(f"merged model written to {out}; export it with: kiln export onnx {out} ONNX_DIR")
    if single_file:
        console.print(f"and as one file for A1111/ComfyUI: {single_file}")


def _precision(fp16: bool, int8: bool) -> str:
    if fp16 and int8:
        raise KilnError("--fp16 and --int8 were both given", hint="choose one precision per export folder")
    return "fp16" if fp16 else "int8" if int8 else "fp32"


@export_app.command("onnx")
def export_onnx(
    model_dir: Path,
    out_dir: Path,
    fp16: bool = typer.Option(False, "--fp16", help="fp16 weights for text encoder and UNet (VAE stays fp32)"),
    int8: bool = typer.Option(False, "--int8", help="dynamic int8 MatMuls for text encoder and UNet (CPU; for TensorRT: kiln export qdq)"),
    opset: int = typer.Option(declared("kiln.export.onnx_export", "DEFAULT_OPSET"), "--opset"),
    force: bool = typer.Option(False, "--force", help="rebuild even when the manifest says nothing changed"),
    lora_inputs: bool = typer.Option(False, "--lora-inputs", help="the UNet and text encoders also take LoRA adapters "
                                     "per request (kiln lora add, then loras=NAME:SCALE); about +1%% per step"),
    controlnet: list[str] = typer.Option([], "--controlnet", help="NAME=DIR: a diffusers ControlNet of this base, exported "
                                         "as controlnet_NAME beside a UNet that takes its residuals (repeatable)"),
):
    """Export text_encoder, unet, vae_decoder and vae_encoder to ONNX and check each against PyTorch."""
    from kiln.export.onnx_export import export_onnx as run
    from kiln.training.config import parse_named

    controlnets = {name: Path(folder) for name, folder in parse_named(controlnet, "--controlnet", "canny=DIR").items()}
    result = run(model_dir, out_dir, precision=_precision(fp16, int8), opset=opset, force=force, lora_inputs=lora_inputs,
                 controlnets=controlnets)
    for c in result.components:
        worst = max((t["max_abs"] for r in c.parity for t in r["tensors"]), default=float("nan"))
        state = "reused" if c.reused else f"exported in {c.seconds:.1f} s"
        console.print(f"{c.name:<13} {c.precision:<5} {state:<20} parity max|diff| {worst:.2e}  {c.path}")
    console.print(f"manifest: {result.manifest}")


@export_app.command("qdq")
def export_qdq(
    onnx_dir: Path,
    out_dir: Path,
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="calibration prompts, one per line (default: "
                                           "12 varied prompts; prompts like the served ones calibrate best)"),
    holdout: int = typer.Option(CALIBRATION.holdout, "--holdout", help="last prompts kept out of calibration for the parity check"),
    steps: int = typer.Option(CALIBRATION.steps, "--steps", help="denoising steps drawn per prompt (each one is a calibration sample)"),
    guidance: float = typer.Option(CALIBRATION.guidance, "--guidance"),
    size: Optional[int] = typer.Option(None, "--size", help="image side (default: the model's native size)"),
    method: CalibrationMethod = typer.Option(CalibrationMethod(CALIBRATION.method), "--method",
                                             help="activation calibration (entropy suits diffusion UNets; max keeps every outlier)"),
    force: bool = typer.Option(False, "--force", help="recalibrate even when the manifest says nothing changed"),
):
    """Calibrated int8 UNet with explicit Q/DQ nodes (NVIDIA ModelOpt), checked against fp32 on held-out prompts:
    the input of `kiln export trt --int8`, and runnable by ONNX Runtime."""
    from kiln.artifacts import read_export
    from kiln.export.quantize import DEFAULT_PROMPTS, Calibration, export_qdq as run, read_prompts

    calibration = Calibration(prompts=read_prompts(prompts) if prompts else DEFAULT_PROMPTS, holdout=holdout,
                              steps=steps, guidance=guidance, height=size, width=size, method=method.value).validate()
    run(onnx_dir, out_dir, calibration, force=force)
    manifest = read_export(out_dir)
    parity, quant = manifest.components[manifest.family.quantised.name].parity, manifest.quantization
    console.print(f"int8 UNet ({quant['toolkit']}, {method}, {quant['calibration']['calibration_steps']} calibration steps) "
                  f"vs fp32 on {parity['steps']} held-out steps: median rel L2 {parity['median_rel_l2']:.3g}, "
                  f"max {parity['max_rel_l2']:.3g}")
    console.print(f"written to {out_dir}; TensorRT int8 engines: kiln export trt {out_dir} ENGINE_DIR --int8")


@export_app.command("trt")
def export_trt(
    onnx_dir: Path,
    out_dir: Path,
    fp16: bool = typer.Option(False, "--fp16", help="fp16 engines (the VAE and attention softmax stay fp32)"),
    int8: bool = typer.Option(False, "--int8", help="int8 UNet from a kiln export qdq folder (text encoder fp16, VAE fp32)"),
    profile: list[str] = typer.Option([], "--profile", help="IMAGESxSIZE:IMAGESxSIZE:IMAGESxSIZE (min:opt:max); "
                                      "repeat for several optimisation profiles. Default 1..4 images, half to 1.5x the native size"),
    plan_only: bool = typer.Option(False, "--plan", help="print the engine plan (shapes, precision) and stop: no GPU needed"),
    reuse: bool = typer.Option(False, "--reuse", help="OUT_DIR is an engine store (a cluster's volume): engines go to "
                               "OUT_DIR/<TensorRT>-sm<CC>-<GPU>/, and those there that fit this TensorRT, GPU, export "
                               "and plan are kept (nothing is built)"),
    repository: Optional[Path] = typer.Option(None, "--repository", help="then write the --target ngc repository "
                                              "serving these engines here (kiln repo build's defaults)"),
):
    """Build TensorRT engines (on the GPU that will run them), checked against ONNX Runtime."""
    import json

    from kiln.export.tensorrt import Runtime, check_engines, export_engines, plan_engines, trt_parity_check

    plan = plan_engines(onnx_dir, _precision(fp16, int8), profile or None)
    if plan_only:
        console.print_json(json.dumps(plan.to_json()))
        return
    runtime = Runtime.detect()
    built = True
    if reuse:
        from kiln.export.engine_store import ensure_engines

        out_dir, built = ensure_engines(onnx_dir, out_dir, plan, lambda o, d, p: export_engines(o, d, p, trt_parity_check),
                                        runtime)
    else:
        export_engines(onnx_dir, out_dir, plan, trt_parity_check)
    manifest = check_engines(out_dir, runtime, plan.export_key)
    for name, info in manifest["parity"].items():
        console.print(f"{name}: {info}")
    console.print(f"engines {'written to' if built else 'reused from'} {out_dir}")
    if repository is None:
        console.print(f"serve them with: kiln repo build {onnx_dir} REPO --target ngc --backend tensorrt --engines {out_dir}")
        return
    from kiln.model_repository.builder import build_repository

    build_repository(onnx_dir, repository, target="ngc", backend="tensorrt", engine_dir=out_dir)
    console.print(f"model repository (ngc, tensorrt) written to {repository}")


CLUSTER = declared("kiln.serving.kubernetes", "ClusterSpec")


@cluster_app.command("render")
def cluster_render(
    out_dir: Path,
    image: str = typer.Option(CLUSTER.image, "--image", help="built from deploy/Dockerfile, in your registry"),
    repository: str = typer.Option(CLUSTER.repository, "--repository",
                                   help="s3://BUCKET/PATH, gs://BUCKET/PATH or pvc:CLAIM holding a --target ngc repository"),
    namespace: str = typer.Option(CLUSTER.namespace, "--namespace"),
    min_replicas: int = typer.Option(CLUSTER.min_replicas, "--min-replicas"),
    max_replicas: int = typer.Option(CLUSTER.max_replicas, "--max-replicas"),
    gpus_per_pod: int = typer.Option(CLUSTER.gpus_per_pod, "--gpus-per-pod", help="1: one Triton per GPU; the node's GPU count: one per node"),
    queue_target_ms: float = typer.Option(CLUSTER.queue_target_ms, "--queue-target-ms", help="scale out above this mean queue time per generation"),
    engines: str = typer.Option(CLUSTER.engines, "--engines", help="prebuilt: the repository holds its models; build: an "
                                "init container builds TensorRT engines on each pod's GPU into --repository pvc:CLAIM "
                                "(ONNX export at onnx/), reused on restart, then the repository Triton serves"),
    builder_image: str = typer.Option(CLUSTER.builder_image, "--builder-image", help="--engines build: deploy/Dockerfile "
                                      "built with --build-arg KILN_EXTRAS=embedded --build-arg WITH_TENSORRT=1"),
    engine_precision: str = typer.Option(CLUSTER.engine_precision, "--engine-precision", help="--engines build: fp32, "
                                         "fp16 or int8 (onnx/ then a kiln export qdq folder)"),
    engine_profile: list[str] = typer.Option([], "--engine-profile", help="--engines build: kiln export trt --profile, "
                                             "repeatable"),
):
    """Render and validate (offline, against the Kubernetes schemas) the cluster manifests."""
    from kiln.serving.kubernetes import ClusterSpec, render

    spec = ClusterSpec(image=image, repository=repository, namespace=namespace, min_replicas=min_replicas,
                       max_replicas=max_replicas, gpus_per_pod=gpus_per_pod, queue_target_ms=queue_target_ms,
                       engines=engines, builder_image=builder_image, engine_precision=engine_precision,
                       engine_profiles=tuple(engine_profile))
    paths = render(spec, out_dir)
    console.print(f"{len(paths)} manifests validated and written to {out_dir}: {', '.join(sorted(paths))}")
    console.print(f"apply with: kubectl create namespace {namespace}; "
                  f"kubectl -n {namespace} create secret generic {spec.admin_secret} --from-literal=key=$(openssl rand -hex 16); "
                  f"kubectl apply -k {out_dir}")


BUILD = declared("kiln.model_repository.builder", "build_models_repository")
TORCH = declared("kiln.model_repository.torch_backend", "TorchOptions")


@repo_app.command("build")
def repo_build(
    onnx_dir: Path,
    repo_dir: Path,
    target: Target = typer.Option(Target(BUILD.target), "--target", help="embedded: Python-backend models on ONNX Runtime "
                                  "(CPU); ngc: NVIDIA's Triton container, native backends on the GPU"),
    backend: Backend = typer.Option(Backend(BUILD.backend), "--backend", help="torch: the embedded target, PyTorch "
                                    "modules from the export's source folder (CUDA fp16 with a GPU, else CPU fp32); "
                                    "openvino: the embedded target, the same ONNX files on OpenVINO's CPU plugin (f32); "
                                    "tensorrt: the ngc target only"),
    engines: Optional[Path] = typer.Option(None, "--engines", help="--backend tensorrt: the kiln export trt folder"),
    torch_device: TorchDevice = typer.Option(TorchDevice(TORCH.device), "--torch-device",
                                             help="--backend torch: where the modules run (auto: cuda if present)"),
    torch_dtype: TorchDtype = typer.Option(TorchDtype(TORCH.dtype), "--torch-dtype",
                                           help="--backend torch (auto: float16 on cuda, float32 on cpu; the VAE stays float32)"),
    torch_compile: bool = typer.Option(TORCH.compile, "--torch-compile", help="--backend torch: torch.compile each module"),
    ort_accelerator: OrtAccelerator = typer.Option(OrtAccelerator(TUNING.ort_accelerator), "--ort-accelerator",
                                                   help="ngc + onnxruntime: CUDA, or ONNX Runtime's TensorRT provider"),
    name: str = typer.Option("base", "--name", help="with --also: the first model's ensemble name"),
    also: list[str] = typer.Option([], "--also", help="NAME=ONNX_DIR[,ENGINE_DIR]: another model served side by side "
                                   "(identical components are stored and loaded once)"),
    max_steps: int = typer.Option(LIMITS.max_steps, "--max-steps"),
    max_size: int = typer.Option(LIMITS.max_size, "--max-size", help="largest height or width a request may ask for "
                                 "(0: per model, twice its native size and at least 1024: SD 1.5 1024, SDXL 2048)"),
    max_batch_size: int = typer.Option(TUNING.max_batch_size, "--max-batch-size"),
    pipeline_instances: int = typer.Option(TUNING.pipeline_instances, "--pipeline-instances", help="BLS denoising loops feeding the batched models"),
    max_queue: int = typer.Option(TUNING.max_queue, "--max-queue", help="generations allowed to wait; more are refused at once"),
    onnx_threads: int = typer.Option(TUNING.onnx_threads, "--onnx-threads", help="ONNX Runtime threads per model (0: automatic)"),
    default_guidance: Optional[float] = typer.Option(None, "--default-guidance", help="guidance for requests that leave it out "
                                                     f"({REQUEST_DEFAULTS.guidance_scale})"),
    default_guidance_cutoff: Optional[float] = typer.Option(None, "--default-guidance-cutoff", help="fraction of the "
                                                            "schedule after which requests that leave it out stop "
                                                            "classifier-free guidance (1: never)"),
    default_guidance_start: Optional[float] = typer.Option(None, "--default-guidance-start", help="fraction of the "
                                                           "schedule where guidance starts, for requests that leave it out (0)"),
    default_guidance_end: Optional[float] = typer.Option(None, "--default-guidance-end", help="fraction of the "
                                                         "schedule where guidance ends, for requests that leave it out (1)"),
    default_steps: Optional[int] = typer.Option(None, "--default-steps", help="steps for requests that leave them out "
                                                f"({REQUEST_DEFAULTS.steps})"),
    default_scheduler: Optional[str] = typer.Option(None, "--default-scheduler", metavar="<name>", parser=scheduler_name,
                                                    help=f"for requests that leave it out (default: the model's own): {SCHEDULER_HELP}"),
):
    """Write a Triton model repository (tokenizer, components, BLS pipeline, txt2img ensemble)."""
    from kiln.model_repository.builder import PUBLIC_MODEL, build_models_repository
    from kiln.model_repository.configs import Tuning
    from kiln.pipeline.request import Limits
    from kiln.training.config import parse_named

    limits = Limits(max_steps=max_steps, max_size=max_size)
    tuning = Tuning(max_batch_size=max_batch_size, pipeline_instances=pipeline_instances, onnx_threads=onnx_threads,
                    max_queue=max_queue, ort_accelerator=ort_accelerator.value)
    models = {name if also else PUBLIC_MODEL: onnx_dir}
    engine_dirs = {name if also else PUBLIC_MODEL: engines} if engines else {}
    for other, paths in parse_named(also, "--also", "tuned=ONNX_DIR or tuned=ONNX_DIR,ENGINE_DIR").items():
        if other in models:
            raise KilnError(f"--also {other}={paths}: the name {other!r} is also --name's", hint="pick another --name")
        onnx_path, _, engine_path = paths.partition(",")
        models[other] = Path(onnx_path)
        if engine_path:
            engine_dirs[other] = Path(engine_path)
    chosen = {"guidance_scale": default_guidance, "steps": default_steps, "scheduler": default_scheduler,
              "guidance_cutoff": default_guidance_cutoff, "guidance_start": default_guidance_start,
              "guidance_end": default_guidance_end}
    from kiln.model_repository.torch_backend import TorchOptions

    build_models_repository(models, repo_dir, target=target.value, backend=backend.value, limits=limits, tuning=tuning,
                            engines=engine_dirs, defaults={k: v for k, v in chosen.items() if v is not None},
                            torch_options=TorchOptions(torch_device.value, torch_dtype.value, torch_compile))
    import json

    ensembles = json.loads((repo_dir / "manifest.json").read_text())["ensembles"]
    names = ", ".join(f"{n} ({e['model']['family']}, {e['model']['default_size']} px, up to {e['limits']['max_size']})"
                      for n, e in ensembles.items())
    console.print(f"model repository ({target}, {backend}) for {names} written to {repo_dir}; "
                  + (f"serve it with: kiln serve {repo_dir}" if target == "embedded" else "serve it with NVIDIA's Triton container (see deploy/)"))


def _print_endpoints(info) -> None:
    console.print(f"Triton is ready (pid {info.pid}), serving {info.repository} on {info.host}")
    console.print(f"  HTTP     {info.http_url}")
    console.print(f"  gRPC     {info.grpc_url}")
    console.print(f"  metrics  {info.metrics_url}")
    console.print(f"  log      {info.log_file}")


@app.command()
def serve(
    repo_dir: Path,
    http_port: int = HTTP_PORT,
    grpc_port: int = GRPC_PORT,
    metrics_port: int = METRICS_PORT,
    background: bool = typer.Option(False, "--background", help="return once ready; stop with kiln stop"),
    host: str = typer.Option(declared("kiln.serving.server", "HOST"), "--host", help="the address the HTTP, gRPC "
                             "and metrics ports listen on: an IPv4 address of this machine or a name resolving to "
                             "one; 0.0.0.0 answers other machines too"),
):
    """Serve a model repository on the embedded Triton until Ctrl-C or SIGTERM."""
    from kiln.serving import server

    ports = server.Ports(http=http_port, grpc=grpc_port, metrics=metrics_port)
    if background:
        _, info = server.start(repo_dir, ports, host=host)
        _print_endpoints(info)
        console.print(f"stop it with: kiln stop --http-port {http_port}")
        return
    def on_ready(info, restarts: int) -> None:
        if restarts:
            console.print(f"tritonserver restarted ({restarts} restart(s) so far; why: {info.log_file})")
            return
        _print_endpoints(info)
        console.print("Ctrl-C stops it; the server is restarted if it dies")

    code = server.serve_foreground(repo_dir, ports, on_ready, host=host)
    console.print("server stopped")
    raise typer.Exit(code)


@app.command()
def stop(http_port: int = HTTP_PORT, grpc_port: int = GRPC_PORT, metrics_port: int = METRICS_PORT):
    """Stop the background server started with these ports."""
    from kiln.serving import front_process, server

    for door in front_process.stop_fronting(http_port):
        console.print(f"stopped the {door.kind} (pid {door.pid}) at {door.url}")
    result = server.stop(server.Ports(http=http_port, grpc=grpc_port, metrics=metrics_port))
    if result.was_running:
        console.print(f"stopped the server (pid {result.pid}) on HTTP port {http_port}")
    else:
        console.print(f"no server was running on HTTP port {http_port} (pid {result.pid} had exited); its record is cleared")


PUBLIC_MODEL = declared("kiln.clients.client", "PUBLIC_MODEL")
GATEWAY_PORT, UI_PORT = 7860, 7861


def _front_door(kind: str, url: Optional[str], host: str, port: int, background: bool, argv: list[str]) -> str:
    """The Triton url a door fronts; with `background`, starts the door detached and returns ''."""
    triton = url or URLS["http"]
    if background:
        from kiln.serving import front_process

        door = front_process.start(kind, ["--url", triton, "--host", host, "--port", str(port), *argv], host, port, triton)
        console.print(f"the {kind} is up at {door.url} (pid {door.pid}) in front of Triton at {triton}; log {door.log_file}")
        console.print(f"it stops with its server: kiln stop --http-port {triton.rsplit(':', 1)[-1]}")
        return ""
    return triton


@app.command()
def gateway(
    url: Optional[str] = typer.Option(None, "--url", help=f"the Triton server's HTTP host:port (default {URLS['http']})"),
    host: str = typer.Option("127.0.0.1", "--host", help="0.0.0.0 answers other machines too"),
    port: int = typer.Option(GATEWAY_PORT, "--port"),
    api_key_file: Optional[Path] = typer.Option(None, "--api-key-file", help="clients must send 'Authorization: Bearer "
                                                "KEY' with the key in this file (default: no key)"),
    admin_key: Optional[str] = typer.Option(None, "--admin-key", help="lists every served model (default: the key kiln "
                                            "serve kept for that port; without one only txt2img is offered)"),
    model: Optional[list[str]] = typer.Option(None, "--model", help="an endpoint to offer besides those listed, repeatable"),
    background: bool = typer.Option(False, "--background", help="return once it answers; kiln stop stops it with its server"),
):
    """A1111's and OpenAI's image APIs (REST, FastAPI) in front of a running Kiln Triton server; /docs lists them."""
    from kiln.serving.gateway import read_key, serve as run

    key = read_key(api_key_file)  # a bad key file fails here, not in the background process
    argv = [*(["--api-key-file", str(api_key_file)] if api_key_file else []), *(["--admin-key", admin_key] if admin_key else []),
            *(a for m in model or [] for a in ("--model", m))]
    triton = _front_door("gateway", url, host, port, background, argv)
    if triton:
        console.print(f"gateway for Triton at {triton}: http://{host}:{port} (API reference: /docs); Ctrl-C stops it")
        run(triton, host, port, api_key=key, admin_key=admin_key or _local_admin_key(triton, Protocol.http),
            models=tuple(model or ()))


@app.command()
def ui(
    url: Optional[str] = typer.Option(None, "--url", help=f"the Triton server's HTTP host:port (default {URLS['http']})"),
    host: str = typer.Option("127.0.0.1", "--host", help="0.0.0.0 answers other machines too"),
    port: int = typer.Option(UI_PORT, "--port"),
    background: bool = typer.Option(False, "--background", help="return once it answers; kiln stop stops it with its server"),
):
    """A web page (Gradio) for drawing with the served models and looking at the images."""
    from kiln.serving.ui import create_page

    triton = _front_door("ui", url, host, port, background, [])
    if triton:
        console.print(f"page for Triton at {triton}: http://{host}:{port}; Ctrl-C stops it")
        page = create_page(triton, admin_key=_local_admin_key(triton, Protocol.http))
        page.queue(default_concurrency_limit=4).launch(server_name=host, server_port=port, show_error=True, quiet=True)


def _pair_option(separator: str):
    """`A<separator>B` of two integers -> (A, B); anything else is refused with the expected form."""

    def parse(value: str) -> tuple[int, int]:
        parts = value.split(separator)
        if len(parts) != 2 or not all(p.strip().lstrip("-").isdigit() for p in parts):
            form = "HEIGHTxWIDTH, e.g. 1024x1024" if separator == "x" else "TOP,LEFT, e.g. 0,0"
            raise typer.BadParameter(f"{value!r}: expected {form}")
        return int(parts[0]), int(parts[1])

    return parse


@app.command()
def generate(
    prompt: str,
    output: Path = typer.Option(Path("out.png"), "-o", "--output"),
    url: Optional[str] = URL,
    protocol: Protocol = PROTOCOL,
    seed: Optional[int] = typer.Option(None, "--seed"),
    steps: Optional[int] = typer.Option(None, "--steps"),
    guidance: Optional[float] = typer.Option(None, "--guidance"),
    guidance_cutoff: Optional[float] = typer.Option(None, "--guidance-cutoff", help="stop guidance after this fraction of "
                                                    "the schedule (the rest runs at batch 1; 1: never)"),
    guidance_start: Optional[float] = typer.Option(None, "--guidance-start", help="guidance only from this fraction of the "
                                                   "schedule (a guidance interval; the rest runs at batch 1)"),
    guidance_end: Optional[float] = typer.Option(None, "--guidance-end", help="guidance only up to this fraction of the schedule"),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", metavar="<name>", parser=scheduler_name,
                                            help=f"{SCHEDULER_HELP}; default: the repository's"),
    negative: Optional[str] = typer.Option(None, "--negative"),
    height: Optional[int] = typer.Option(None, "--height"),
    width: Optional[int] = typer.Option(None, "--width"),
    num_images: Optional[int] = typer.Option(None, "--num-images", help="image i uses seed + i"),
    image: Optional[Path] = typer.Option(None, "--image", help="img2img: a PNG or JPEG to start from",
                                         exists=True, dir_okay=False, readable=True),
    strength: Optional[float] = typer.Option(None, "--strength", help="img2img: 0 keeps the image, 1 redraws it"),
    model: str = typer.Option(PUBLIC_MODEL, "--model", help=f"the ensemble to call: {PUBLIC_MODEL}, or a model's name in a "
                              "repository serving several; pipeline (pipeline_NAME) for the loop itself, which a gRPC "
                              "client's deadline or cancellation stops"),
    original_size: Optional[str] = typer.Option(None, "--original-size", metavar="HxW", parser=_pair_option("x"),
                                                help="SDXL: the size conditioning's original size (default: the image's)"),
    crop: Optional[str] = typer.Option(None, "--crop", metavar="TOP,LEFT", parser=_pair_option(","),
                                       help="SDXL: the crop conditioning's top-left corner (default 0,0)"),
    target_size: Optional[str] = typer.Option(None, "--target-size", metavar="HxW", parser=_pair_option("x"),
                                              help="SDXL: the size conditioning's target size (default: the image's)"),
    lora: Optional[list[str]] = typer.Option(None, "--lora", metavar="NAME[:SCALE]",
                                             help="a LoRA adapter registered with the server (kiln lora add); repeat for several"),
    control_image: Optional[list[Path]] = typer.Option(None, "--control-image", help="a control image (PNG or JPEG) for "
                                                       "each ControlNet, in --controlnet's order; repeat for several",
                                                       exists=True, dir_okay=False, readable=True),
    controlnet: Optional[list[str]] = typer.Option(None, "--controlnet", metavar="NAME",
                                                   help="ControlNets to use (default: every one the model serves)"),
    control_scale: Optional[list[float]] = typer.Option(None, "--control-scale", help="0 to 2: once for all, or once each"),
    control_start: Optional[list[float]] = typer.Option(None, "--control-start", help="fraction of the schedule where control begins"),
    control_end: Optional[list[float]] = typer.Option(None, "--control-end", help="fraction of the schedule where control ends"),
):
    """Generate images through the served txt2img endpoint and save them as PNG.
    Prompts take weights: (word), \\[word], (word:1.5); BREAK starts a new 77-token chunk."""
    from kiln.clients.client import KilnClient

    with KilnClient(url, protocol.value, model=model) as client:
        result = client.generate(prompt, negative_prompt=negative, seed=seed, steps=steps, guidance_scale=guidance,
                                 guidance_cutoff=guidance_cutoff, guidance_start=guidance_start, guidance_end=guidance_end,
                                 height=height, width=width, scheduler=scheduler, num_images=num_images, image=image,
                                 strength=strength, original_size=original_size, crop_top_left=crop,
                                 target_size=target_size, loras=",".join(lora or []), control_image=control_image or None,
                                 controlnet=controlnet or None, control_scale=control_scale or None,
                                 control_start=control_start or None, control_end=control_end or None)
    paths = result.save(output)
    console.print(f"{len(paths)} image(s) in {result.seconds:.2f} s over {protocol} (seeds {result.seeds}): "
                  + ", ".join(map(str, paths)))


@app.command()
def health(url: Optional[str] = URL, protocol: Protocol = PROTOCOL):
    """Whether the server is live and ready (exit code 1 when not ready)."""
    from kiln.clients.client import KilnClient

    with KilnClient(url, protocol.value) as client:
        state = client.health()
    typer.echo(f"live: {state['live']}  ready: {state['ready']}")
    local = _local_state(url, protocol)
    if local is not None and "restarts" in local:
        last = f" (last: {local['last_exit']})" if local.get("last_exit") else ""
        typer.echo(f"restarts: {local['restarts']}{last}  log: {local['log_file']}")
    raise typer.Exit(0 if state["ready"] else 1)


def _local_state(url: Optional[str], protocol: Protocol) -> Optional[dict]:
    """The state `kiln serve` keeps for a server on this machine, found by its port."""
    from kiln.serving import server

    port = int((url or URLS[protocol.value]).rsplit(":", 1)[1])
    for path in (server.kiln_home() / "run").glob("triton-*.json"):
        import json

        state = json.loads(path.read_text())
        if port in state["ports"].values():
            return state
    return None


def _local_admin_key(url: Optional[str], protocol: Protocol) -> Optional[str]:
    """The key `kiln serve` wrote for a server on this machine, found by its port."""
    from kiln.serving import server

    state = _local_state(url, protocol)
    if state is None:
        return None
    key_file = server.admin_key_file(server.Ports(**state["ports"]))
    return key_file.read_text() if key_file.is_file() else None


@app.command()
def models(url: Optional[str] = URL, protocol: Protocol = PROTOCOL,
           admin_key: Optional[str] = typer.Option(None, "--admin-key", help="default: the key kiln serve kept for that port")):
    """List the served models and their state (a protected API: needs the admin key)."""
    from kiln.clients.client import KilnClient

    with KilnClient(url, protocol.value, admin_key=admin_key or _local_admin_key(url, protocol)) as client:
        for m in client.models():
            typer.echo(f"{m['name']:<14} {m['version'] or '-':<4} {m['state']}")


@app.command()
def deploy(
    model: Optional[Path] = typer.Option(None, "--model", help="a local diffusers folder or a single-file "
                                         ".safetensors checkpoint (imported first; default: the glyph demo model, built or reused)"),
    tiny: bool = typer.Option(False, "--tiny", help="the tiny random-weight model instead (seconds; draws noise)"),
    artifacts: Path = typer.Option(Path("artifacts"), "--artifacts"),
    precision: Precision = typer.Option(Precision(declared("kiln.deploy", "deploy").precision), "--precision"),
    http_port: int = HTTP_PORT,
    grpc_port: int = GRPC_PORT,
    metrics_port: int = METRICS_PORT,
    lora_inputs: bool = typer.Option(False, "--lora-inputs", help="export so that requests choose LoRA adapters "
                                     "(kiln lora add NAME FILE, then --lora NAME:SCALE)"),
    controlnet: list[str] = typer.Option([], "--controlnet", help="NAME=DIR: a diffusers ControlNet of the model, "
                                         "served beside it (repeatable; the demo has its own, `digit`)"),
    backend: Backend = typer.Option(Backend(BUILD.backend), "--backend", help="onnxruntime; torch: the components' "
                                    "PyTorch modules (CUDA fp16 with a GPU, else CPU fp32); openvino: the ONNX files "
                                    "on OpenVINO's CPU plugin (f32)"),
):
    """Export, build the repository, serve it in the background and draw one smoke image."""
    from kiln.deploy import deploy as run
    from kiln.serving.server import Ports
    from kiln.training.config import parse_named

    if model and tiny:
        raise KilnError("--model and --tiny were both given", hint="pass one")
    controlnets = {name: Path(folder) for name, folder in parse_named(controlnet, "--controlnet", "canny=DIR").items()}
    d = run(model, artifacts, Ports(http=http_port, grpc=grpc_port, metrics=metrics_port), precision=precision.value,
            demo=not (model or tiny), lora_inputs=lora_inputs, controlnets=controlnets, backend=backend.value)
    _print_endpoints(d.info)
    console.print(f"model {d.model_dir} -> ONNX {d.onnx_dir} -> repository {d.repo_dir}")
    console.print(f"smoke image: {d.smoke_png} ({d.smoke_seconds:.2f} s)")
    if d.samples_png:
        console.print(f"sample grid, drawn through Triton (digits 0-9 in red, green, blue, yellow and the LoRA-taught "
                      f"purple): {d.samples_png}")
    kiln = _kiln_command()
    console.print("try next:")
    console.print(f'  {kiln} generate "a blue digit 3" -o out.png --url {d.info.http_url}')
    console.print(f'  {kiln} generate "a blue digit 3" -o out.png --protocol grpc --url {d.info.grpc_url} --scheduler euler_a')
    console.print(f"  {kiln} models --url {d.info.http_url}")
    if lora_inputs:
        console.print(f"  {kiln} lora add NAME lora.safetensors --repo {d.repo_dir}   # then: generate ... --lora NAME:0.8")
    for name in d.controlnets:
        console.print(f'  {kiln} generate "a blue digit 3" --control-image control.png --controlnet {name} -o out.png '
                      f"--url {d.info.http_url}")
    console.print(f"  {kiln} stop --http-port {http_port}")


def _kiln_command() -> str:
    """How the user can type this command: `kiln` when it is on PATH, else its path."""
    import shutil

    here = Path(sys.argv[0]).resolve()
    on_path = shutil.which("kiln")
    if on_path and Path(on_path).resolve() == here:
        return "kiln"
    try:
        return str(here.relative_to(Path.cwd()))
    except ValueError:
        return str(here)


EVAL = declared("kiln.evaluation.report", "EvalSpec")


@app.command("eval")
def evaluate(
    endpoint: Optional[list[str]] = typer.Option(None, "--endpoint", help="LABEL=HOST:PORT\\[/MODEL], repeatable (glyph "
                                                 "models: the first is the reference; --prompts: --against names it)"),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="any model: a prompt file (a prompt a line, or .jsonl rows "
                                           "{prompt, negative_prompt, seed}); CLIP score, FID, LPIPS, PSNR as their weights are given"),
    against: Optional[str] = typer.Option(None, "--against", help="with --prompts: the reference model, LABEL=HOST:PORT\\[/MODEL] "
                                          "or a model name on the first endpoint's server; exits non-zero when a --gate window is left"),
    gate: Optional[list[str]] = typer.Option(None, "--gate", metavar="METRIC=LIMIT", help="with --against: clip_score=0.01 and "
                                             "fid=0.05 (fractions of the reference's value; the defaults), lpips=MAX, psnr=MIN_DB, "
                                             "or METRIC=off; repeatable"),
    demo: bool = typer.Option(False, "--demo", help="serve and measure the demo's untrained, base and merged models"),
    classifier: Optional[Path] = typer.Option(None, "--classifier", help="glyph classifier folder (kiln eval --demo builds one)"),
    real: Optional[Path] = typer.Option(None, "--real", help="folder of reference images FID is measured against"),
    out: Path = typer.Option(Path("artifacts/eval"), "--out"),
    artifacts: Path = typer.Option(Path("artifacts"), "--artifacts"),
    protocol: Protocol = PROTOCOL,
    seeds: Optional[int] = typer.Option(None, "--seeds", min=1, max=10_000, help=f"seeds per prompt (glyphs: {EVAL.seeds}; --prompts: 1)"),
    steps: Optional[int] = typer.Option(None, "--steps", help=f"(glyphs: {EVAL.steps}; --prompts: the server's default)"),
    guidance: Optional[float] = typer.Option(None, "--guidance", help=f"(glyphs: {EVAL.guidance_scale}; --prompts: the server's default)"),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="--prompts: the sampler (default: the server's)"),
    width: Optional[int] = typer.Option(None, "--width", help="--prompts: image width (default: the model's)"),
    height: Optional[int] = typer.Option(None, "--height", help="--prompts: image height (default: the model's)"),
    clip_model: Optional[Path] = typer.Option(None, "--clip-model", help="local CLIP folder (transformers or open_clip layout) for CLIP score"),
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", help="local FID Inception: NVIDIA's TorchScript "
                                                     "inception-2015-12-05.pt or torch-fidelity's weights"),
    lpips_weights: Optional[Path] = typer.Option(None, "--lpips-weights", help="--prompts: torchvision's AlexNet weights "
                                                 "(alexnet-owt-7be5be79.pth) for weighted LPIPS"),
    sweep: bool = typer.Option(False, "--sweep", help="cost and accuracy of sampler settings on one served model "
                               "(with --demo: the merged model), the fastest within --window named"),
    setting: Optional[list[str]] = typer.Option(None, "--setting", metavar="NAME=scheduler:steps[:guidance[:cutoff[:start[:end]]]]",
                                                help="--sweep: a setting to measure, repeatable; the first is the "
                                                "reference (default: a built-in list from euler 20)"),
    model_dir: Optional[Path] = typer.Option(None, "--model-dir", help="--sweep: the served model's diffusers folder, "
                                             "to measure diffusers' own pipeline beside it"),
    window: float = typer.Option(0.01, "--window", help="--sweep: accuracy a setting may lose against the first (0.01: 1 point)"),
):
    """Quality of served models: any model from a prompt file (CLIP score, FID, LPIPS, PSNR, and a gate
    against a reference model), or the glyph demo's prompt accuracy, FID, KID, IS; writes a report."""
    from kiln.evaluation.report import EvalSpec, evaluate as run

    if prompts is not None:
        _evaluate_prompts(endpoint, prompts, against, gate, protocol.value, out, seeds or 1, real, clip_model, inception_weights,
                          lpips_weights, {"steps": steps, "guidance_scale": guidance, "scheduler": scheduler,
                                          "width": width, "height": height})
        return
    if against is not None or gate or lpips_weights is not None:
        raise KilnError("--against, --gate and --lpips-weights go with --prompts FILE", hint="kiln eval --prompts FILE --endpoint "
                        "new=localhost:8000 --against old=localhost:8000/OLD_MODEL")
    glyphs = EvalSpec(seeds=seeds or EVAL.seeds, steps=steps or EVAL.steps,
                      guidance_scale=EVAL.guidance_scale if guidance is None else guidance)
    if sweep:
        _sweep(endpoint, demo, classifier, model_dir, out, artifacts, protocol.value, glyphs.seeds, setting, window)
        return
    if demo:
        from dataclasses import replace

        from kiln.demo import DemoSpec, evaluate_demo

        spec = DemoSpec()
        report = evaluate_demo(artifacts, out, spec=spec, eval_spec=replace(glyphs, colours=spec.base_colours,
                                                                       focus_colour=spec.taught_colour),
                               protocol=protocol.value)
    else:
        from kiln.training.config import parse_named

        if not endpoint or classifier is None or real is None:
            raise KilnError("kiln eval needs --prompts FILE and --endpoint LABEL=HOST:PORT (any model), or --endpoint, "
                            "--classifier DIR and --real DIR (glyph models), or --demo")
        endpoints = parse_named(endpoint, "--endpoint", f"reference={URLS['http']}")
        report = run(endpoints, protocol.value, classifier_dir=classifier, real_dir=real, out_dir=out, spec=glyphs,
                     clip_model=clip_model, inception_weights=inception_weights)
    from kiln.evaluation.report import to_markdown

    typer.echo(to_markdown(report))
    console.print(f"report: {out / 'report.md'}, {out / 'report.json'}; grids: {out}/grid-*.png")
    _fail_on_bars(report, out)


def _fail_on_bars(report: dict, out: Path) -> None:
    from kiln.errors import QualityBarsMissed

    failed = [b["bar"] for b in report.get("bars", []) if not b["passed"]]
    if failed:
        raise QualityBarsMissed(f"quality bars missed: {', '.join(failed)}", hint=f"see {out / 'report.md'}")


def _evaluate_prompts(endpoint, prompts: Path, against, gate, protocol: str, out: Path, seeds: int, real, clip_model,
                      inception_weights, lpips_weights, sampling: dict) -> None:
    """kiln eval --prompts: every endpoint (and --against) draws the file's prompts; measured and gated."""
    from kiln.evaluation.prompts import Measures, Window, evaluate_prompts, parse_endpoint, read_prompts, to_markdown
    from kiln.training.config import parse_named

    if not endpoint:
        raise KilnError("kiln eval --prompts needs --endpoint LABEL=HOST:PORT[/MODEL]", hint=f"for example --endpoint new={URLS[protocol]}")
    named = parse_named(endpoint, "--endpoint", f"new={URLS[protocol]}")
    endpoints = [parse_endpoint(label, value) for label, value in named.items()]
    reference = None
    if against is not None:
        label, sep, value = against.partition("=")
        if not sep:
            label, value = "reference", against
        if label in named:
            raise KilnError(f"--against {against!r}: the label {label!r} is also an --endpoint", hint="give it a label of its own")
        reference = parse_endpoint(label, value, default_url=endpoints[0].url)
        endpoints.insert(0, reference)
    elif gate:
        raise KilnError("--gate needs --against, the model the others are held to", hint="--against LABEL=HOST:PORT[/MODEL]")
    window = Window.parse(gate or []) if reference else None
    report = evaluate_prompts(endpoints, protocol, read_prompts(prompts), out, seeds=seeds, sampling=sampling,
                              measures=Measures(clip=clip_model, real=real, inception=inception_weights, lpips=lpips_weights),
                              reference=reference.label if reference else None, window=window)
    typer.echo(to_markdown(report))
    console.print(f"report: {out / 'report.md'}, {out / 'report.json'}; images: {report['images']}")
    _fail_on_bars(report, out)


def _sweep(endpoint, demo: bool, classifier, model_dir, out: Path, artifacts: Path, protocol: str, seeds: int,
           setting, window: float) -> None:
    """kiln eval --sweep: on the endpoint given, or the demo's merged model served on free ports."""
    import contextlib

    from kiln.evaluation.report import EvalSpec
    from kiln.evaluation.settings import DEMO_SETTINGS, Window, parse_setting, sweep, to_markdown

    settings = tuple(parse_setting(s) for s in setting) if setting else DEMO_SETTINGS
    if not 0.0 <= window <= 1.0:
        raise KilnError(f"--window {window}: expected a fraction in [0, 1] (0.01: 1 point)")
    with contextlib.ExitStack() as stack:
        if demo:
            from kiln.demo import DemoSpec, build_demo
            from kiln.export.onnx_export import export_onnx
            from kiln.model_repository.builder import build_repository
            from kiln.serving.server import running_server

            spec = DemoSpec()
            models = build_demo(artifacts, spec)
            onnx_dir = export_onnx(models.merged, artifacts / "onnx" / "demo-merged-plain").out_dir
            info = stack.enter_context(running_server(build_repository(onnx_dir, artifacts / "eval-repositories" / "sweep")))
            url = info.http_url if protocol == "http" else info.grpc_url
            classifier, model_dir = classifier or models.classifier, model_dir or models.merged
            eval_spec = EvalSpec(seeds=seeds, colours=spec.base_colours, focus_colour=spec.taught_colour)
        else:
            if not endpoint or len(endpoint) != 1 or classifier is None:
                raise KilnError("kiln eval --sweep needs one --endpoint LABEL=HOST:PORT and --classifier DIR (or --demo)")
            url = endpoint[0].partition("=")[2] or endpoint[0]
            eval_spec = EvalSpec(seeds=seeds)
        report = sweep(url, protocol, classifier, out, settings, eval_spec, model_dir, Window(window, window))
    typer.echo(to_markdown(report))
    console.print(f"sweep: {out / 'sweep.md'}, {out / 'sweep.json'}")


BENCH = declared("kiln.benchmarks.latency", "BenchSpec")


@app.command()
def bench(
    model_dir: Path,
    onnx_dir: Path,
    out: Path = typer.Option(Path("artifacts/bench"), "--out"),
    steps: int = typer.Option(BENCH.steps, "--steps"),
    size: Optional[int] = typer.Option(None, "--size", help="pixels (default: the model's native size)"),
    runs: int = typer.Option(BENCH.runs, "--runs"),
    pipeline_instances: int = typer.Option(TUNING.pipeline_instances, "--pipeline-instances", help="BLS denoising loops feeding the batched models"),
    onnx_threads: int = typer.Option(TUNING.onnx_threads, "--onnx-threads"),
    price_per_hour: Optional[float] = typer.Option(None, "--price-per-hour", help="the machine's hourly price: adds the "
                                                   "cost of 1,000 images per path"),
    peers: str = typer.Option(",".join(declared("kiln.benchmarks.latency", "PEERS")), "--peers",
                              help="the runtimes timed beside Kiln's, comma-separated (none: only PyTorch eager, Kiln "
                              "and Triton); one that cannot run here is reported as skipped"),
    guidance: float = typer.Option(BENCH.guidance_scale, "--guidance", help="classifier-free guidance scale of every path"),
    setting: Optional[list[str]] = typer.Option(None, "--setting", metavar="NAME=scheduler:steps[:guidance[:cutoff[:start[:end]]]]",
                                                help="Kiln through Triton at another sampler setting too (for example the one "
                                                "kiln eval --sweep chose), beside diffusers eager at that setting; repeatable"),
    perf_analyzer_input: Optional[Path] = typer.Option(None, "--perf-analyzer-input", metavar="OUT",
                                                       help="instead of timing: write perf_analyzer input data and a Model "
                                                       "Analyzer configuration (BLS composing models) for ONNX_DIR's model"),
):
    """Latency and parity per stage and end to end: diffusers PyTorch (eager, torch.compile), Kiln on ONNX
    Runtime (plain and fused attention) and OpenVINO, Triton HTTP and gRPC; with --setting, Kiln at other
    sampler settings beside diffusers at the same."""
    if perf_analyzer_input is not None:
        from kiln.benchmarks.perf_inputs import write

        files = write(onnx_dir, perf_analyzer_input, steps=steps)
        console.print(f"perf_analyzer and Model Analyzer inputs: {', '.join(str(f) for f in files.values())}")
        return
    from kiln.benchmarks.latency import BenchSpec, run, to_markdown
    from kiln.evaluation.settings import parse_setting
    from kiln.model_repository.configs import Tuning

    chosen = tuple(p.strip() for p in peers.split(",") if p.strip() and p.strip() != "none")
    known = declared("kiln.benchmarks.latency", "PEERS")
    if any(p not in known for p in chosen):
        raise typer.BadParameter(f"{peers!r}: expected some of {', '.join(known)} (comma-separated), or none",
                                 param_hint="--peers")
    settings = tuple(parse_setting(s) for s in setting or ())
    report = run(model_dir, onnx_dir, out, BenchSpec(steps=steps, size=size, runs=runs, peers=chosen,
                                                     guidance_scale=guidance, settings=settings),
                 Tuning(pipeline_instances=pipeline_instances, onnx_threads=onnx_threads), price_per_hour=price_per_hour)
    typer.echo(to_markdown(report))
    console.print(f"saved {out / 'bench.json'}, {out / 'bench.md'}, {out / 'bench.png'}")


LOADTEST = declared("kiln.benchmarks.loadtest", "run")


@app.command()
def loadtest(
    users: int = typer.Option(4, "--users"),
    spawn_rate: float = typer.Option(4.0, "--spawn-rate"),
    duration: int = typer.Option(60, "--duration", help="seconds"),
    http_url: str = typer.Option(URLS["http"], "--http-url"),
    grpc_url: str = typer.Option(URLS["grpc"], "--grpc-url"),
    metrics_url: str = typer.Option(f"http://{declared('kiln.serving.server', 'HOST')}:{PORTS.metrics}/metrics", "--metrics-url"),
    gateway_url: str = typer.Option(f"http://127.0.0.1:{GATEWAY_PORT}", "--gateway-url",
                                    help="kiln gateway's address, for the gateway user"),
    gateway_key_file: Optional[Path] = typer.Option(None, "--gateway-key-file", help="the gateway's API key, if it has one"),
    protocols: str = typer.Option(LOADTEST.protocols, "--protocols", metavar=f"<{'|'.join(LOAD_USERS)}>[,...]",
                                  parser=protocol_list, help="which Locust users, comma-separated (gateway: A1111's "
                                  "txt2img through kiln gateway)"),
    steps: int = typer.Option(LOADTEST.steps, "--steps"),
    slo_p95_ms: Optional[float] = typer.Option(None, "--slo-p95-ms"),
    min_rps: Optional[float] = typer.Option(None, "--min-rps"),
    out: Path = typer.Option(Path("artifacts/loadtest"), "--out"),
    price_per_hour: Optional[float] = typer.Option(None, "--price-per-hour", help="the machine's hourly price: adds the "
                                                   "cost of 1,000 images at the measured rate"),
):
    """Locust, headless, against a running server; exits 1 when a request fails or a level is missed."""
    from kiln.benchmarks.loadtest import run, to_markdown

    from kiln.serving.gateway import read_key

    report = run(http_url, grpc_url, metrics_url, out, users=users, spawn_rate=spawn_rate, duration_s=duration,
                 protocols=protocols, steps=steps, slo_p95_ms=slo_p95_ms, min_rps=min_rps, gateway_url=gateway_url,
                 gateway_key=read_key(gateway_key_file), price_per_hour=price_per_hour)
    typer.echo(to_markdown(report))
    console.print(f"CSV, HTML and JSON in {out}")
    raise typer.Exit(1 if report.violations else 0)


LOADGEN = declared("kiln.benchmarks.loadgen", "LoadGenSpec")


@app.command()
def loadgen(
    scenario: Scenario = typer.Option(Scenario(LOADGEN.scenario), "--scenario", help="MLPerf Inference's scenario: "
                                      "SingleStream (one at a time, p90), Server (Poisson arrivals at --target-qps, VALID "
                                      "when p99 <= --target-latency-ms), Offline (all at once, samples per second)"),
    url: Optional[str] = typer.Option(None, "--url", help="the server (default: this machine's gRPC or HTTP port)"),
    protocol: Protocol = typer.Option(Protocol(LOADGEN.protocol), "--protocol"),
    samples: int = typer.Option(LOADGEN.samples, "--samples", help="prompts in the query sample library"),
    steps: Optional[int] = typer.Option(None, "--steps", help="denoising steps (default: the server's)"),
    min_duration: float = typer.Option(LOADGEN.min_duration_s, "--min-duration", help="seconds"),
    min_queries: int = typer.Option(LOADGEN.min_queries, "--min-queries", help="LoadGen's early stopping needs about 460 "
                                    "for a VALID Server p99, 64 for SingleStream"),
    target_qps: float = typer.Option(LOADGEN.target_qps, "--target-qps", help="Server: arrival rate; Offline: expected rate"),
    target_latency_ms: float = typer.Option(LOADGEN.target_latency_ms, "--target-latency-ms", help="Server: the p99 bound"),
    workers: int = typer.Option(LOADGEN.workers, "--workers", help="requests in flight at most (Server, Offline)"),
    out: Path = typer.Option(Path("artifacts/loadgen"), "--out"),
):
    """MLPerf Inference's LoadGen against a running server; writes its logs and a Kiln report; exits 1 when INVALID."""
    from kiln.benchmarks.loadgen import LoadGenSpec, run, to_markdown

    spec = LoadGenSpec(scenario=scenario.value, protocol=protocol.value, samples=samples, steps=steps,
                       min_duration_s=min_duration, min_queries=min_queries, target_qps=target_qps,
                       target_latency_ms=target_latency_ms, workers=workers)
    report = run(url or URLS[protocol.value], out, spec)
    typer.echo(to_markdown(report))
    console.print(f"LoadGen's logs and loadgen.json, loadgen.md in {out}")
    raise typer.Exit(0 if report["valid"] else 1)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[_log_handler()])
    try:
        code = app(standalone_mode=False)  # returns typer.Exit's code instead of raising
        if isinstance(code, int) and code:
            sys.exit(code)
    except KilnError as e:
        from rich.markup import escape

        console.print(f"[red]error:[/red] {escape(str(e))}", markup=True, highlight=False)
        if e.hint:
            console.print(f"next: {e.hint}", markup=False, highlight=False)
        sys.exit(getattr(e, "exit_code", 1))
    except (typer.Exit, SystemExit) as e:
        sys.exit(getattr(e, "exit_code", getattr(e, "code", 0)))
    except typer.Abort:
        sys.exit(130)
    except Exception as e:  # usage errors arrive here in standalone_mode=False
        # click's ClickException; Typer >= 0.26 vendors click and raises its own (a typer.TyperException)
        if callable(getattr(e, "show", None)) and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            sys.exit(e.exit_code)
        raise


def _log_handler() -> logging.Handler:
    from rich.logging import RichHandler

    return RichHandler(console=console, show_path=False, show_time=False)


if __name__ == "__main__":
    main()
