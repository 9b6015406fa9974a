"""Local diffusers folders: what is in them, and writing them so an interruption leaves nothing half-done."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import ModelError

REQUIRED_COMPONENTS = ("text_encoder", "tokenizer", "unet", "vae", "scheduler")


@dataclass(frozen=True)
class ModelInfo:
    """What the export and serving stages need to know about a Stable Diffusion folder."""

    path: Path
    prediction_type: str  # epsilon | v_prediction
    scheduler_class: str
    vae_scale_factor: int
    latent_channels: int
    default_size: int  # pixels: unet sample_size * vae_scale_factor
    text_hidden_size: int
    max_length: int
    scaling_factor: float


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{path} is missing") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"{path} is not valid JSON: {e}") from None


def inspect_model(model_dir: Path) -> ModelInfo:
    """Validate a local Stable Diffusion 1.x/2.x diffusers folder and describe it, loading no weights."""
    model_dir = Path(model_dir)
    if not (model_dir / "model_index.json").is_file():
        raise ModelError(
            f"{model_dir} is not a diffusers folder (no model_index.json)",
            hint="pass a local folder saved with StableDiffusionPipeline.save_pretrained, "
            "or make one with: kiln model tiny OUT",
        )
    missing = [c for c in REQUIRED_COMPONENTS if not (model_dir / c).is_dir()]
    if missing:
        raise ModelError(f"{model_dir} lacks the component folders {missing}")
    unet = _read_json(model_dir / "unet" / "config.json")
    vae = _read_json(model_dir / "vae" / "config.json")
    text = _read_json(model_dir / "text_encoder" / "config.json")
    scheduler = _read_json(model_dir / "scheduler" / "scheduler_config.json")
    tok = _read_json(model_dir / "tokenizer" / "tokenizer_config.json")
    vae_scale = 2 ** (len(vae["block_out_channels"]) - 1)
    prediction = scheduler.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise ModelError(f"scheduler prediction_type={prediction!r} is not supported (epsilon, v_prediction)")
    sample_size = unet["sample_size"]
    sample_size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
    return ModelInfo(
        path=model_dir,
        prediction_type=prediction,
        scheduler_class=scheduler["_class_name"],
        vae_scale_factor=vae_scale,
        latent_channels=vae["latent_channels"],
        default_size=sample_size * vae_scale,
        text_hidden_size=text["hidden_size"],
        max_length=min(int(tok.get("model_max_length", 77)), text.get("max_position_embeddings", 77)),
        scaling_factor=float(vae.get("scaling_factor", 0.18215)),
    )


def hash_tree(path: Path) -> str:
    """sha256 over every file under `path` (relative names and contents), in a stable order."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def write_folder_atomically(out_dir: Path):
    """Yield a temporary folder beside `out_dir`; on success it replaces `out_dir` in one rename."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old.{os.getpid()}")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
