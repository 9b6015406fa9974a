"""`kiln repo build`: a Triton model repository from one or several Kiln ONNX exports.

Targets:
- embedded (the tritonserver in the nvidia-pytriton wheel, which has no ONNX Runtime backend):
  every component is a Python-backend model running ONNX Runtime on the CPU, with backend `torch`
  its PyTorch module (CUDA fp16 where there is a GPU; model_repository.torch_backend), or with backend
  `openvino` the same ONNX file on OpenVINO's CPU plugin in f32 (kiln.pipeline.openvino_runner);
- ngc (NVIDIA's Triton container): components on the native backends, `onnxruntime_onnx` (CUDA, or
  its TensorRT accelerator) or `tensorrt_plan` engines from `kiln export trt`, GPU instance groups,
  and a BLS loop that keeps latents on the GPU (DLPack).

Either way `pipeline` is the BLS denoising loop (one pipeline core for both targets), `tokenizer`
turns text into ids and an ensemble is what clients call: `txt2img` for one model. With several
models, each gets its own ensemble named after it, and components whose weights are identical (same
SHA-256) are stored and loaded once, shared by every pipeline that uses them.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
from dataclasses import asdict, replace
from importlib import resources
from pathlib import Path

from kiln import __version__
from kiln.errors import KilnError, RepositoryError
from kiln.artifacts import (MANIFEST_NAME, exported_components, fingerprint, read_export, tree_sha256,
                            write_folder_atomically, write_json_atomically)
from kiln.export.specs import CONTROLNET_PREFIX, FAMILIES
from kiln.model_repository import configs, torch_backend
from kiln.model_repository.torch_backend import TorchOptions
from kiln.pipeline.adapters import layers_digest, read_layers
from kiln.pipeline.onnx_pipeline import model_constants, model_defaults
from kiln.pipeline.request import Limits, limits_for

log = logging.getLogger("kiln.model_repository")

TARGETS = ("embedded", "ngc")
BACKENDS = {"embedded": ("onnxruntime", "torch", "openvino"), "ngc": ("onnxruntime", "tensorrt")}
# the Python-backend model each embedded backend's components run as (model_repository.python_models.KINDS)
EMBEDDED_ENGINES = {"onnxruntime": "onnx_component", "torch": "torch_component", "openvino": "openvino_component"}
PUBLIC_MODEL = "txt2img"
MODEL_NAME = re.compile(r"[a-z][a-z0-9_]{0,47}")
RESERVED = {"tokenizer", "pipeline", CONTROLNET_PREFIX.rstrip("_"),
            *(name for layout in FAMILIES.values() for name in layout.components)}


def _place(src: Path, dst: Path) -> None:
    """Hard-link a (possibly multi-GB) artifact into the repository, copying across file systems."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _glue() -> str:
    return resources.files("kiln.model_repository").joinpath("templates/model.py").read_text()


def _write_model(repo: Path, config, files: dict[str, Path] | None = None, folders: dict[str, Path] | None = None):
    model_dir = repo / config.name
    version = model_dir / "1"
    version.mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(configs.to_pbtxt(config))
    if config.backend == "python":
        (version / "model.py").write_text(_glue())
    for name, src in (files or {}).items():
        _place(src, version / name)
    for name, src in (folders or {}).items():
        shutil.copytree(src, version / name)


def _component_files(source: Path, backend: str) -> dict[str, Path]:
    """The files of one component's folder that Triton loads: its ONNX model (and external data), or
    its TensorRT engine."""
    if backend == "tensorrt":
        from kiln.export.tensorrt import ENGINE_NAME

        if not (source / ENGINE_NAME).is_file():
            raise RepositoryError(f"{source} has no {ENGINE_NAME}", hint="kiln export trt ONNX_DIR ENGINE_DIR")
        return {ENGINE_NAME: source / ENGINE_NAME}
    return {f.name: f for f in source.iterdir() if f.is_file()}


def check_models(models: dict[str, Path]) -> None:
    if not models:
        raise RepositoryError("no model given", hint="kiln repo build ONNX_DIR REPO_DIR, or --model NAME=ONNX_DIR ...")
    if len(models) > 1:
        for name in models:
            internal = name in RESERVED or any(name.startswith(f"{word}_") for word in RESERVED)
            if not MODEL_NAME.fullmatch(name) or internal:
                raise RepositoryError(f"model name {name!r} is invalid: expected lower-case letters, digits and _ "
                                      f"(starting with a letter), neither one of {sorted(RESERVED)} nor beginning with "
                                      "one of them and _ (the repository's own model names)")


def build_models_repository(
    models: dict[str, Path],
    repo_dir: Path,
    target: str = "embedded",
    backend: str = "onnxruntime",
    limits: Limits = Limits(),
    tuning: configs.Tuning = configs.Tuning(),
    engines: dict[str, Path] | None = None,
    bls_device: str | None = None,
    defaults: dict | None = None,
    torch_options: TorchOptions = TorchOptions(),
) -> Path:
    """Write the whole repository into a scratch folder, then swap it into place.

    `models` maps a model name to its ONNX export (one model: its ensemble is `txt2img`); `engines`
    maps a model name to its TensorRT engine folder (backend tensorrt). `bls_device` makes the BLS loop
    exchange torch tensors through DLPack on that device (the ngc target: cuda). `defaults` sets what a
    request that leaves out guidance_scale, steps or scheduler gets (see served_defaults). `torch_options`:
    where backend torch runs the modules (device and dtype, chosen when they load)."""
    repo_dir = Path(repo_dir)
    defaults = check_defaults(defaults or {}, limits)
    if target not in TARGETS:
        raise RepositoryError(f"--target {target!r} is not supported: expected one of {TARGETS}")
    if backend not in BACKENDS[target]:
        raise RepositoryError(f"--backend {backend!r} is not available for --target {target}: expected one of {BACKENDS[target]}")
    check_models(models)
    if backend == "openvino" and importlib.util.find_spec("openvino") is None:
        raise RepositoryError("--backend openvino needs OpenVINO, which is not installed in this environment",
                              hint="pip install 'kiln[openvino]' (make setup installs it), or use --backend onnxruntime")
    if backend != torch_backend.BACKEND and torch_options != TorchOptions():
        raise RepositoryError(f"--torch-device, --torch-dtype and --torch-compile apply to --backend torch, not {backend}",
                              hint="add --backend torch, or leave them out")
    if 2 * limits.max_prompt_chunks > tuning.max_batch_size:
        raise RepositoryError(f"max_prompt_chunks {limits.max_prompt_chunks} needs a text-encoder batch of "
                              f"{2 * limits.max_prompt_chunks} (prompt and negative prompt), above max_batch_size "
                              f"{tuning.max_batch_size}", hint="lower the chunk limit or raise the batch size")
    engines = engines or {}
    if backend == "tensorrt":
        missing = [n for n in models if n not in engines]
        if missing:
            raise RepositoryError(f"--backend tensorrt needs engines for {missing}", hint="kiln export trt ONNX_DIR ENGINE_DIR, then --engines ENGINE_DIR")
    single = len(models) == 1
    device = bls_device if bls_device is not None else ("cuda" if target == "ngc" else None)
    manifests = {name: read_export(Path(d)) for name, d in models.items()}
    sources = _torch_sources(models, manifests, torch_options) if backend == torch_backend.BACKEND else {}
    written: dict[str, str | None] = {}  # Triton model name -> the SHA-256 of its files (several models only)
    summary = {}

    def model_name(kind: str, *folders: Path) -> tuple[str, str | None]:
        """One model: the plain name, and no hashing of (possibly GBs of) weights on every build.
        Several: the name carries the files' digest, so identical components become one model."""
        if single:
            return kind, None
        digests = [tree_sha256(folder) for folder in folders]  # the weights' identity: model.onnx and any external data
        digest = digests[0] if len(digests) == 1 else fingerprint(digests)
        return f"{kind}_{digest[:12]}", digest

    with write_folder_atomically(repo_dir) as tmp:
        for name, onnx_dir in models.items():
            onnx_dir = Path(onnx_dir)
            manifest = manifests[name]
            dims = manifest.dims
            layout = manifest.family
            model_limits = limits_for(limits, manifest.model.default_size)
            encoders = len(layout.text_encoders)
            component_models, adapted, layers = {}, [], []
            built = _engine_record(engines[name], manifest.key) if backend == "tensorrt" else None
            controlled = {"controlnets": list(layout.controlnets)} if layout.controlnets else {}
            for component in exported_components(onnx_dir, layout):
                declared = read_layers(onnx_dir / component)
                if declared is not None:
                    adapted.append(component)
                    layers += declared
                spec = layout.spec(component)
                if sources:  # backend torch: the component's diffusers folder, checked against the export
                    weights, weights_digest = sources[name][component]
                    digest = None if single else fingerprint({"weights": weights_digest, "spec": spec.identity()})
                    triton_name = component if single else f"{component}_{digest[:12]}"
                else:
                    source = engines[name] / component if backend == "tensorrt" else onnx_dir / component
                    triton_name, digest = model_name(component, source)
                component_models[component] = triton_name
                if triton_name in written:
                    continue  # identical weights: stored and loaded once
                files = torch_backend.weight_files(weights) if sources else _component_files(source, backend)
                if target == "embedded":
                    settings = {"component": component, "family": layout.name, "onnx_threads": tuning.onnx_threads,
                                "dims": asdict(dims), "limits": asdict(model_limits), **controlled,
                                **({"torch": asdict(torch_options)} if sources else {})}
                    config = configs.component_config(spec, dims, tuning, settings, adapted=component in adapted,
                                                      engine=EMBEDDED_ENGINES[backend])
                elif component in adapted:
                    raise RepositoryError(f"{onnx_dir} was exported with --lora-inputs, which the embedded target "
                                          "serves; the ngc target's plan for adapters is in make gpu-check",
                                          hint="export without --lora-inputs for --target ngc")
                else:
                    config = configs.ngc_component_config(spec, dims, tuning, backend,
                                                          manifest.components[component].precision, triton_name)
                config.name = triton_name
                _write_model(tmp, config, files=files)
                if sources:
                    torch_backend.stamp(tmp / triton_name / "1")
                written[triton_name] = digest
            tokenizer_name, tokenizer_digest = model_name("tokenizer", *(onnx_dir / folder for folder in layout.tokenizers))
            if tokenizer_name not in written:
                config = configs.tokenizer_config({"tokenizers": list(layout.tokenizers), "limits": asdict(model_limits)},
                                                  tuning, encoders)
                config.name = tokenizer_name
                _write_model(tmp, config, folders={folder: onnx_dir / folder for folder in layout.tokenizers})
                written[tokenizer_name] = tokenizer_digest
            pipeline_name = "pipeline" if single else f"pipeline_{name}"
            pipeline_settings = {
                "constants": asdict(model_constants(manifest)),
                "defaults": asdict(replace(model_defaults(manifest), **defaults)),
                "limits": asdict(model_limits),
                "size_multiple": manifest.size_multiple,
                "vocab_size": dims.vocab_size,
                "family": layout.name,
                "models": component_models,
                "device": device,
                "model": PUBLIC_MODEL if single else name,
                "tokenizers": list(layout.tokenizers),  # a direct caller's prompt is tokenized in the loop's model
                **({"adapted": adapted} if adapted else {}),
                **({**controlled, "dims": asdict(dims)} if controlled else {}),
                **({"engines": built["runtime"]} if built else {}),  # checked against the container's at load
            }
            config = configs.pipeline_config(tuning, pipeline_settings, gpu=target == "ngc", encoders=encoders)
            config.name = pipeline_name
            _write_model(tmp, config, folders={"scheduler": onnx_dir / "scheduler",
                                               **{folder: onnx_dir / folder for folder in layout.tokenizers}})
            if adapted:
                _keep_adapters(repo_dir / pipeline_name, tmp / pipeline_name, layers_digest(layers))
            ensemble = PUBLIC_MODEL if single else name
            _write_model(tmp, configs.txt2img_config(ensemble, tokenizer_name, pipeline_name, encoders))
            source_record = {"onnx_dir": str(onnx_dir.resolve()), "export_key": manifest.key}
            if sources:  # what the PyTorch modules were placed from
                source_record.update(model_dir=manifest.source["path"],
                                     weights={c: digest for c, (_, digest) in sources[name].items()})
            summary[ensemble] = {"source": source_record,
                                 "limits": asdict(model_limits),
                                 "model": manifest.model_dump(mode="json", include={"model"}, exclude_none=True)["model"],
                                 "precision": manifest.precision,
                                 "components": component_models, "tokenizer": tokenizer_name, "pipeline": pipeline_name,
                                 **({"controlnets": [n[len(CONTROLNET_PREFIX):] for n in layout.controlnets]}
                                    if controlled else {}),
                                 **({"adapted": adapted, "adapter_layers": layers_digest(layers)} if adapted else {}),
                                 **({"engines": built} if built else {})}
        write_json_atomically(
            tmp / MANIFEST_NAME,
            {
                "kiln_version": __version__,
                "target": target,
                "backend": backend,
                **({"torch": asdict(torch_options)} if sources else {}),
                "public_model": PUBLIC_MODEL if single else sorted(summary),
                "ensembles": summary,
                "limits": asdict(limits),
                "tuning": asdict(tuning),
                "models": sorted([*written, *(s["pipeline"] for s in summary.values()), *summary]),
                "weights": {k: v for k, v in written.items() if v},
            },
        )
    references = sum(len(s["components"]) for s in summary.values())
    unique = len({m for s in summary.values() for m in s["components"].values()})
    log.info("model repository (target %s, backend %s, %d model(s), %d components, %d shared) written to %s",
             target, backend, len(models), unique, references - unique, repo_dir)
    return repo_dir


def _engine_record(engine_dir: Path, export_key: str) -> dict:
    """What the repository keeps of a `kiln export trt` folder: its key and the runtime it was built on
    (TensorRT, GPU, compute capability), which the BLS pipeline checks against the container's at load.
    Engines without a manifest, or from another export, are refused here."""
    from kiln.export.tensorrt import read_engines

    manifest = read_engines(engine_dir, export_key)
    return {"engine_dir": str(Path(engine_dir).resolve()), "key": manifest["key"], "runtime": manifest["runtime"]}


def _torch_sources(models: dict[str, Path], manifests: dict, options: TorchOptions) -> dict[str, dict]:
    """Backend torch, before anything is written: the options and every export checked (refusing what
    only ONNX serves), then each component's diffusers folder checked against its export."""
    options.check()
    for name, onnx_dir in models.items():
        layout = manifests[name].family
        adapted = [c for c in exported_components(Path(onnx_dir), layout) if read_layers(Path(onnx_dir) / c) is not None]
        torch_backend.check_export(Path(onnx_dir), manifests[name], adapted)
    verified: dict[Path, str] = {}  # a folder feeding several components or models is hashed once
    return {name: torch_backend.component_sources(Path(onnx_dir), manifests[name],
                                                  exported_components(Path(onnx_dir), manifests[name].family), verified)
            for name, onnx_dir in models.items()}


def _keep_adapters(old_model: Path, new_model: Path, digest: str) -> None:
    """A rebuilt repository keeps the LoRA adapters registered with a served model whose adaptable
    layers are unchanged (they are part of the repository); adapters for other layers are dropped,
    with a warning naming them."""
    from kiln.pipeline.adapters import INDEX_NAME, REGISTRY_FOLDER, Registry

    old, new = old_model / REGISTRY_FOLDER, new_model / REGISTRY_FOLDER
    try:
        index = Registry(old).read() if (old / INDEX_NAME).is_file() else None
    except KilnError as exc:
        raise RepositoryError(str(exc), hint=exc.hint) from None
    if index and index.get("layers") == digest:
        shutil.copytree(old, new, ignore=shutil.ignore_patterns(".lock", ".*.tmp"))
        log.info("kept the %d LoRA adapter(s) registered with %s", len(index["adapters"]), new_model.name)
        return
    if index and index["adapters"]:
        log.warning("dropped the LoRA adapters registered with %s (%s): the new export's layers differ",
                    new_model.name, ", ".join(sorted(index["adapters"])))
    new.mkdir()
    write_json_atomically(new / INDEX_NAME, {"format": 1, "layers": digest, "adapters": {}, "removed": {}})


def build_repository(onnx_dir: Path, repo_dir: Path, target: str = "embedded", limits: Limits = Limits(),
                     tuning: configs.Tuning = configs.Tuning(), backend: str = "onnxruntime",
                     engine_dir: Path | None = None, defaults: dict | None = None,
                     torch_options: TorchOptions = TorchOptions()) -> Path:
    """One model: its ensemble is `txt2img`."""
    return build_models_repository({PUBLIC_MODEL: Path(onnx_dir)}, repo_dir, target, backend, limits, tuning,
                                   engines={PUBLIC_MODEL: Path(engine_dir)} if engine_dir else None, defaults=defaults,
                                   torch_options=torch_options)


SERVED_DEFAULTS = ("guidance_scale", "steps", "scheduler", "guidance_cutoff", "guidance_start", "guidance_end")  # the size comes from the model


def check_defaults(defaults: dict, limits: Limits) -> dict:
    """A deployment's request defaults, checked against its limits before anything is written;
    the scheduler by its canonical name."""
    from kiln.errors import RequestError
    from kiln.pipeline.schedulers import canonical_name

    unknown = sorted(set(defaults) - set(SERVED_DEFAULTS))
    if unknown:
        raise RepositoryError(f"request defaults {unknown} cannot be set: expected some of {list(SERVED_DEFAULTS)}")
    guidance, steps = defaults.get("guidance_scale"), defaults.get("steps")
    if guidance is not None and not 0.0 <= guidance <= limits.max_guidance:
        raise RepositoryError(f"--default-guidance {guidance} is out of range 0..{limits.max_guidance}")
    cutoff = defaults.get("guidance_cutoff")
    if cutoff is not None and not 0.0 <= cutoff <= 1.0:
        raise RepositoryError(f"--default-guidance-cutoff {cutoff} is out of range 0..1 (1: guided to the end)")
    start, end = defaults.get("guidance_start", 0.0), defaults.get("guidance_end", 1.0)
    if not 0.0 <= start < end <= 1.0:
        raise RepositoryError(f"--default-guidance-start {start} and --default-guidance-end {end}: expected "
                              "0 <= start < end <= 1 (the guided fraction of the schedule)")
    if steps is not None and not 1 <= steps <= limits.max_steps:
        raise RepositoryError(f"--default-steps {steps} is out of range 1..{limits.max_steps}",
                              hint="raise --max-steps too, or ask for fewer steps")
    if "scheduler" in defaults:
        try:
            return {**defaults, "scheduler": canonical_name(defaults["scheduler"])}
        except RequestError as exc:
            raise RepositoryError(f"--default-scheduler: {exc}") from exc
    return defaults

