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


def _geometric(spec: Augmentations, resolution: int) -> list:
    import kornia.augmentation as K

    steps = [K.RandomResizedCrop((resolution, resolution), scale=spec.crop_scale, ratio=(1.0, 1.0), p=1.0)]
    if spec.flip_probability > 0:
        steps.append(K.RandomHorizontalFlip(p=spec.flip_probability))
    if spec.rotation_degrees > 0:
        steps.append(K.RandomRotation(degrees=spec.rotation_degrees, p=1.0))
    return steps


def _colour(spec: Augmentations) -> list:
    import kornia.augmentation as K

    if spec.brightness or spec.contrast or spec.hue:
        return [K.ColorJitter(brightness=spec.brightness, contrast=spec.contrast, hue=spec.hue, p=1.0)]
    return []


def build_augmentation(spec: Augmentations, resolution: int):
    """A module mapping (B, 3, H, W) in [0, 1] to augmented (B, 3, resolution, resolution) in [0, 1]."""
    if not spec.enabled:
        return None
    return torch.nn.Sequential(*_geometric(spec, resolution), *_colour(spec))


class PairedAugmentation(torch.nn.Module):
    """The same crop, flip and rotation on each image and its control image (a ControlNet learns where
    the control puts things); colour jitter on the image alone (a mask or edge map has no colour)."""

    def __init__(self, spec: Augmentations, resolution: int):
        super().__init__()
        self.geometric = torch.nn.Sequential(*_geometric(spec, resolution))
        self.colour = torch.nn.Sequential(*_colour(spec))

    def forward(self, pixels: torch.Tensor, control: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        both = self.geometric(torch.cat([pixels, control], dim=1))
        pixels, control = both[:, :3], both[:, 3:]
        return (self.colour(pixels) if len(self.colour) else pixels), control


def build_paired_augmentation(spec: Augmentations, resolution: int) -> PairedAugmentation | None:
    return PairedAugmentation(spec, resolution) if spec.enabled else None
