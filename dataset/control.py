"""Control images made from training images, for ControlNet training (`kiln data prepare --control`)
and for measuring how well a drawn image follows its control (the glyph demo's evaluation).

- canny: Canny edges (kornia), white on black;
- mask: the subject's silhouette on a plain background, white on black: each pixel's colour distance
  from the background (the median of the border pixels), split at Otsu's threshold.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

CONTROLS = ("canny", "mask")
CANNY_THRESHOLDS = (0.1, 0.2)  # kornia's defaults, on gradient magnitudes of [0, 1] images


def canny(image: Image.Image, low: float = CANNY_THRESHOLDS[0], high: float = CANNY_THRESHOLDS[1]) -> Image.Image:
    import kornia
    import torch

    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    _, edges = kornia.filters.canny(pixels, low_threshold=low, high_threshold=high)
    return Image.fromarray((edges[0, 0].numpy() * 255).round().astype(np.uint8)).convert("RGB")


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """The threshold between two classes of `values` that maximises their between-class variance (Otsu, 1979)."""
    histogram, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(histogram)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(histogram * centres)
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def foreground(image: Image.Image) -> np.ndarray:
    """(H, W) booleans: the pixels that differ from the plain background (the border's median colour)
    more than Otsu's threshold on the colour distances. An image of one colour has no foreground."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    distance = np.linalg.norm(pixels - np.median(border, axis=0), axis=-1)
    if distance.max() - distance.min() < 1e-3:
        return np.zeros(distance.shape, dtype=bool)
    return distance > otsu_threshold(distance)


def mask(image: Image.Image) -> Image.Image:
    return Image.fromarray((foreground(image) * 255).astype(np.uint8)).convert("RGB")


def make_control(kind: str, image: Image.Image) -> Image.Image:
    """The control image of `kind` (CONTROLS) for `image`, the same size, RGB."""
    if kind == "canny":
        return canny(image)
    if kind == "mask":
        return mask(image)
    from kiln.errors import DatasetError

    raise DatasetError(f"--control {kind!r} is not one of {', '.join(CONTROLS)}")


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)
