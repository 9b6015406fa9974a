"""Training-time augmentations on batches (kornia): random crop 0.8-1.0, flip, rotation, colour jitter.
Randomness comes from torch's global generator, which the training loop seeds per step so that a
resumed run sees exactly the augmentations an uninterrupted one would."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Augmentations:
    enabled: bool = True
    crop_scale: tuple[float, float] = (0.8, 1.0)
    flip_probability: float = 0.5
    rotation_degrees: float = 15.0
    brightness: float = 0.2
    contrast: float = 0.2
    hue: float = 0.1


def build_augmentation(spec: Augmentations, resolution: int):
    """A module mapping (B, 3, H, W) in [0, 1] to augmented (B, 3, resolution, resolution) in [0, 1]."""
    import kornia.augmentation as K

    if not spec.enabled:
        return None
    steps = [K.RandomResizedCrop((resolution, resolution), scale=spec.crop_scale, ratio=(1.0, 1.0), p=1.0)]
    if spec.flip_probability > 0:
        steps.append(K.RandomHorizontalFlip(p=spec.flip_probability))
    if spec.rotation_degrees > 0:
        steps.append(K.RandomRotation(degrees=spec.rotation_degrees, p=1.0))
    if spec.brightness or spec.contrast or spec.hue:
        steps.append(K.ColorJitter(brightness=spec.brightness, contrast=spec.contrast, hue=spec.hue, p=1.0))
    return torch.nn.Sequential(*steps)
