"""`kiln repo build`: a Triton model repository from a Kiln ONNX export.

Embedded target (the tritonserver in the nvidia-pytriton wheel, which has no ONNX Runtime backend):
every component is a Python-backend model running ONNX Runtime; `pipeline` is the BLS denoising
loop; `tokenizer` turns text into ids; `txt2img` is the ensemble clients call.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import asdict
from importlib import resources
from pathlib import Path

from kiln import __version__
from kiln.errors import RepositoryError
from kiln.export.manifest import MANIFEST_NAME, fingerprint, write_json_atomically
from kiln.export.specs import COMPONENTS, ModelDims
from kiln.model_repository import configs
from kiln.models.folder import write_folder_atomically
from kiln.pipeline.onnx_pipeline import model_constants, model_defaults, read_export, size_multiple
from kiln.pipeline.request import Limits

log = logging.getLogger("kiln.model_repository")

TARGETS = ("embedded",)
SERVED_COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
PUBLIC_MODEL = "txt2img"


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


def build_repository(
    onnx_dir: Path,
    repo_dir: Path,
    target: str = "embedded",
    limits: Limits = Limits(),
    tuning: configs.Tuning = configs.Tuning(),
) -> Path:
    """Write the whole repository into a scratch folder, then swap it into place."""
    onnx_dir, repo_dir = Path(onnx_dir), Path(repo_dir)
    if target not in TARGETS:
        raise RepositoryError(f"--target {target!r} is not supported: expected one of {TARGETS}")
    manifest = read_export(onnx_dir)
    dims = ModelDims(**manifest["dims"])
    components = [c for c in SERVED_COMPONENTS if (onnx_dir / c / "model.onnx").is_file()]
    with write_folder_atomically(repo_dir) as tmp:
        for name in components:
            files = {f.name: f for f in (onnx_dir / name).iterdir() if f.is_file()}
            settings = {"component": name, "onnx_threads": tuning.onnx_threads}
            _write_model(tmp, configs.component_config(COMPONENTS[name], dims, tuning, settings), files=files)
        _write_model(tmp, configs.tokenizer_config({"tokenizer": "tokenizer", "max_prompt_tokens": limits.max_prompt_tokens}),
                     folders={"tokenizer": onnx_dir / "tokenizer"})
        pipeline_settings = {
            "constants": asdict(model_constants(manifest)),
            "defaults": asdict(model_defaults(manifest)),
            "limits": asdict(limits),
            "size_multiple": size_multiple(manifest),
        }
        _write_model(
            tmp,
            configs.pipeline_config(tuning, pipeline_settings),
            folders={"scheduler": onnx_dir / "scheduler"},
        )
        _write_model(tmp, configs.txt2img_config())
        write_json_atomically(
            tmp / MANIFEST_NAME,
            {
                "kiln_version": __version__,
                "target": target,
                "public_model": PUBLIC_MODEL,
                "source": {"onnx_dir": str(onnx_dir.resolve()), "export_key": fingerprint(manifest["components"])},
                "model": manifest["model"],
                "precision": manifest["precision"],
                "limits": asdict(limits),
                "tuning": asdict(tuning),
                "models": sorted([*components, "tokenizer", "pipeline", PUBLIC_MODEL]),
            },
        )
    log.info("model repository for target %s written to %s", target, repo_dir)
    return repo_dir
