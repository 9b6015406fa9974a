"""Training images: a prepared folder (metadata.jsonl + images), read in a deterministic order that
depends only on the seed and the step, so a resumed run reads exactly what an uninterrupted one would."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kiln.dataset.augment import Augmentations, build_augmentation, build_paired_augmentation
from kiln.dataset.prepare import resize_for_training
from kiln.errors import TrainingError


@dataclass(frozen=True)
class Example:
    path: Path
    caption: str
    conditioning: Path | None = None  # its control image (ControlNet training), metadata's conditioning_file_name


def read_examples(folder: Path, caption: str | None = None) -> list[Example]:
    """Rows of metadata.jsonl; `caption` replaces every caption (DreamBooth's instance prompt), and
    then a plain folder of images is accepted too."""
    folder = Path(folder)
    metadata = folder / "metadata.jsonl"
    if metadata.is_file():
        rows = [json.loads(line) for line in metadata.read_text().splitlines() if line.strip()]
        examples = [Example(folder / r["file_name"], caption or r.get("text") or r.get("caption") or "",
                            folder / r["conditioning_file_name"] if r.get("conditioning_file_name") else None)
                    for r in rows]
    elif caption is not None:
        from kiln.dataset.captions import IMAGE_SUFFIXES

        examples = [Example(p, caption) for p in sorted(folder.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    else:
        raise TrainingError(f"{folder} has no metadata.jsonl", hint=f"kiln data prepare SRC {folder}")
    if not examples:
        raise TrainingError(f"{folder} holds no training images")
    return examples


@lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, count: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(count)


def stream_indices(seed: int, count: int, start: int, length: int) -> list[int]:
    """Positions [start, start+length) of the endless stream of per-epoch shuffles of `count` items."""
    return [int(_permutation(seed, p // count, count)[p % count]) for p in range(start, start + length)]


def _size_conditioning(width: int, height: int, resolution: int) -> tuple[int, int, int, int]:
    """(original height, original width, crop top, crop left) for resize_for_training's centre crop."""
    scale = resolution / min(width, height)
    resized_w, resized_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    return height, width, (resized_h - resolution) // 2, (resized_w - resolution) // 2


class ImageBatches:
    """Loads the micro-batch of one process for one accumulation step."""

    def __init__(self, examples: list[Example], resolution: int, augment: Augmentations, seed: int,
                 batch_size: int, num_processes: int, process_index: int, caption_dropout: float = 0.0):
        self.examples = examples
        self.resolution = resolution
        self.augmentation = build_augmentation(augment, resolution)
        self.paired_augmentation = build_paired_augmentation(augment, resolution)
        self.seed = seed
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.process_index = process_index
        self.caption_dropout = caption_dropout
        self._cache: dict[int, torch.Tensor] = {}
        self._controls: dict[int, torch.Tensor] = {}
        self._sizes: dict[int, tuple[int, int, int, int]] = {}

    def pixels(self, index: int) -> torch.Tensor:
        """(3, R, R) in [0, 1]; decoded images are kept, the sets are small."""
        if index not in self._cache:
            with Image.open(self.examples[index].path) as image:
                self._sizes[index] = _size_conditioning(image.width, image.height, self.resolution)
                image = resize_for_training(image.convert("RGB"), self.resolution, "center")
                array = np.asarray(image, dtype=np.float32) / 255.0
            self._cache[index] = torch.from_numpy(array.transpose(2, 0, 1).copy())
        return self._cache[index]

    def control(self, index: int) -> torch.Tensor:
        """(3, R, R) in [0, 1]: the example's control image, resized and cropped as its image is."""
        if index not in self._controls:
            example = self.examples[index]
            if example.conditioning is None:
                raise TrainingError(f"{example.path} has no control image (conditioning_file_name in metadata.jsonl)",
                                    hint="make them with kiln data prepare SRC OUT --control canny (or mask)")
            try:
                with Image.open(example.conditioning) as image:
                    image = resize_for_training(image.convert("RGB"), self.resolution, "center")
                    array = np.asarray(image, dtype=np.float32) / 255.0
            except OSError as e:
                raise TrainingError(f"control image {example.conditioning} cannot be read ({e})",
                                    hint="re-run kiln data prepare --control") from None
            self._controls[index] = torch.from_numpy(array.transpose(2, 0, 1).copy())
        return self._controls[index]

    def check_controls(self) -> None:
        """Every example has a control image file (before any training step)."""
        missing = [e.path for e in self.examples if e.conditioning is None or not e.conditioning.is_file()]
        if missing:
            raise TrainingError(f"{len(missing)} of {len(self.examples)} training images have no control image "
                                f"(first: {missing[0]}; conditioning_file_name in metadata.jsonl)",
                                hint="make them with kiln data prepare SRC OUT --control canny (or mask)")
        for example in self.examples:  # each file read once, not kept: a damaged one fails now, not at step N
            try:
                with Image.open(example.conditioning) as image:
                    image.verify()
            except Exception as e:  # noqa: BLE001 - whatever PIL finds wrong
                raise TrainingError(f"control image {example.conditioning} (for {example.path}) cannot be read "
                                    f"({type(e).__name__}: {e})", hint="re-run kiln data prepare --control") from None

    def load_with_control(self, indices: list[int], augment: bool = True) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        """load's images in [-1, 1] and captions, with each one's control image (B, 3, R, R) in [0, 1]
        under the same crop, flip and rotation."""
        pixels = torch.stack([self.pixels(i) for i in indices])
        control = torch.stack([self.control(i) for i in indices])
        if augment and self.paired_augmentation is not None:
            pixels, control = self.paired_augmentation(pixels, control)
            pixels, control = pixels.clamp(0, 1), control.clamp(0, 1)
        captions = self._captions(indices, augment)
        return pixels * 2 - 1, captions, control

    def sizes(self, indices: list[int]) -> torch.Tensor:
        """SDXL's size conditioning per image, (B, 6): its size as the set holds it (height, width),
        the top-left of the centre crop after the resize, and the training size, as diffusers' SDXL
        training example records them."""
        for i in indices:
            self.pixels(i)
        return torch.tensor([[*self._sizes[i], self.resolution, self.resolution] for i in indices], dtype=torch.float32)

    def indices(self, micro_step: int) -> list[int]:
        per_step = self.batch_size * self.num_processes
        start = micro_step * per_step + self.process_index * self.batch_size
        return stream_indices(self.seed, len(self.examples), start, self.batch_size)

    def load(self, indices: list[int], augment: bool = True) -> tuple[torch.Tensor, list[str]]:
        """(B, 3, R, R) in [-1, 1] and the captions. Draws from torch's global RNG (seeded per step)."""
        pixels = torch.stack([self.pixels(i) for i in indices])
        if augment and self.augmentation is not None:
            pixels = self.augmentation(pixels).clamp(0, 1)
        return pixels * 2 - 1, self._captions(indices, augment)

    def _captions(self, indices: list[int], augment: bool) -> list[str]:
        captions = [self.examples[i].caption for i in indices]
        if augment and self.caption_dropout:
            keep = torch.rand(len(captions)) >= self.caption_dropout
            captions = [c if k else "" for c, k in zip(captions, keep.tolist())]
        return captions
