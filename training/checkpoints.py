"""Checkpoints: accelerate's state (optimizer, scheduler, RNG, registered objects) plus only the
trainable parameters of each model, rotated to a limit, found again by `--resume latest`."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kiln.errors import TrainingError

PREFIX = "checkpoint-"


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"{PREFIX}{step}"


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    root = Path(output_dir) / "checkpoints"
    found = []
    for path in root.glob(f"{PREFIX}*") if root.is_dir() else []:
        match = re.fullmatch(rf"{PREFIX}(\d+)", path.name)
        if match and (path / "kiln_step.txt").is_file():  # written last: a complete checkpoint
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume(output_dir: Path, resume: str | None) -> tuple[int, Path] | None:
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise TrainingError(f"--resume latest: no checkpoint under {Path(output_dir) / 'checkpoints'}",
                                hint="run without --resume to start from step 0")
        return found[-1]
    path = Path(resume)
    if not (path / "kiln_step.txt").is_file():
        raise TrainingError(f"--resume {resume}: not a complete Kiln checkpoint", hint="use --resume latest")
    return int((path / "kiln_step.txt").read_text()), path


def rotate(output_dir: Path, limit: int | None) -> list[Path]:
    """Delete the oldest checkpoints beyond `limit`."""
    if limit is None:
        return []
    found = list_checkpoints(output_dir)
    removed = [path for _, path in found[: max(0, len(found) - limit)]]
    for path in removed:
        shutil.rmtree(path)
    return removed


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def install_hooks(accelerator) -> None:
    """Save and load only the parameters that train (LoRA layers, embeddings, or the whole UNet)."""

    def save(models, weights, output_dir):
        for i, model in enumerate(models):
            save_file(trainable_state(accelerator.unwrap_model(model)), str(Path(output_dir) / f"trainable_{i}.safetensors"))
        weights.clear()

    def load(models, input_dir):
        for i, model in enumerate(list(models)):
            state = load_file(str(Path(input_dir) / f"trainable_{i}.safetensors"))
            unwrapped = accelerator.unwrap_model(model)
            expected = {n for n, p in unwrapped.named_parameters() if p.requires_grad}
            if set(state) != expected:
                raise TrainingError(f"checkpoint {input_dir} does not match this run's trainable parameters "
                                    f"({len(state)} saved, {len(expected)} expected)",
                                    hint="resume with the same method and adapter settings")
            unwrapped.load_state_dict(state, strict=False)
        models.clear()

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def save_checkpoint(accelerator, output_dir: Path, step: int, limit: int | None) -> Path:
    path = checkpoint_dir(output_dir, step)
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        (path / "kiln_step.txt").write_text(str(step))
        rotate(output_dir, limit)
    accelerator.wait_for_everyone()
    return path
