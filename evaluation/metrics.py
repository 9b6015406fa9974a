"""FID, KID, Inception Score, CLIP score and LPIPS through torchmetrics, plus prompt accuracy.

The standard backbones (Inception, CLIP, AlexNet for LPIPS) load from local files given by path.
Offline, FID, KID and IS take Kiln's glyph classifier as the feature extractor (torchmetrics'
`feature=`), LPIPS uses its feature maps, and prompt accuracy asks it which digit and colour it sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kiln.errors import KilnError
from kiln.evaluation.classifier import GlyphClassifier, GlyphFeatures, GlyphLogits, to_input

INCEPTION_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"


class MetricError(KilnError):
    """A metric cannot run: missing weights or packages; names what is expected."""


def _nchw_uint8(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) uint8 tensor, as torchmetrics' image metrics take them."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()


def feature_extractor(classifier: GlyphClassifier | None, inception_weights: Path | None):
    """The module FID/KID use: the glyph classifier, or the standard Inception from a local file."""
    if inception_weights is None:
        if classifier is None:
            raise MetricError("FID and KID need a feature extractor", hint="pass --classifier DIR or --inception-weights FILE")
        return GlyphFeatures(classifier)
    path = Path(inception_weights)
    if not path.is_file():
        raise MetricError(f"--inception-weights {path} does not exist",
                          hint=f"give torchmetrics' FID Inception weights, the file {INCEPTION_WEIGHTS}")
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError as e:
        raise MetricError(f"the standard Inception backbone needs torch-fidelity: {e}",
                          hint="pip install --no-deps torch-fidelity") from None
    return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(path))


def fid(real: np.ndarray, fake: np.ndarray, extractor) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=extractor, normalize=False)
    metric.update(_nchw_uint8(real), real=True)
    metric.update(_nchw_uint8(fake), real=False)
    return float(metric.compute())


def kid(real: np.ndarray, fake: np.ndarray, extractor) -> tuple[float, float]:
    from torchmetrics.image.kid import KernelInceptionDistance

    subset = min(len(real), len(fake), 50)
    metric = KernelInceptionDistance(feature=extractor, subset_size=subset, normalize=False)
    metric.update(_nchw_uint8(real), real=True)
    metric.update(_nchw_uint8(fake), real=False)
    mean, std = _seeded(metric.compute)
    return float(mean), float(std)


def inception_score(fake: np.ndarray, classifier: GlyphClassifier, splits: int = 4) -> tuple[float, float]:
    """IS over the classifier's digit distribution: 10 is the most a 10-digit model can reach."""
    from torchmetrics.image.inception import InceptionScore

    metric = InceptionScore(feature=GlyphLogits(classifier), splits=splits, normalize=False)
    metric.update(_nchw_uint8(fake))
    mean, std = _seeded(metric.compute)
    return float(mean), float(std)


def _seeded(compute, seed: int = 0):
    """KID draws its subsets and IS shuffles its splits with torch's global generator: a fixed seed
    (the caller's generator left as it was) makes the same images give the same numbers."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return compute()


@torch.no_grad()
def glyph_lpips(a: np.ndarray, b: np.ndarray, classifier: GlyphClassifier) -> np.ndarray:
    """LPIPS's distance (unit-normalised channels, squared difference, spatial mean, summed over
    layers) on the classifier's feature maps, with equal layer weights. One value per pair."""
    maps_a = classifier.feature_maps(to_input(a))
    maps_b = classifier.feature_maps(to_input(b))
    total = torch.zeros(len(a))
    for fa, fb in zip(maps_a, maps_b):
        fa, fb = F.normalize(fa, dim=1), F.normalize(fb, dim=1)
        total += (fa - fb).pow(2).sum(dim=1).mean(dim=(1, 2))
    return total.numpy()


def clip_score(images: np.ndarray, prompts: list[str], clip_model: Path) -> float:
    """torchmetrics' CLIPScore with a local CLIP folder (no download)."""
    from kiln.dataset.filters import _require_clip_folder

    _require_clip_folder(Path(clip_model))
    from torchmetrics.multimodal.clip_score import CLIPScore

    metric = CLIPScore(model_name_or_path=str(clip_model))
    metric.update(_nchw_uint8(images), prompts)
    return float(metric.compute())


@dataclass(frozen=True)
class Prediction:
    digit: int
    colour: str


@torch.no_grad()
def predict(images: np.ndarray, classifier: GlyphClassifier) -> list[Prediction]:
    digits, colours = classifier(to_input(images))
    return [Prediction(int(d), classifier.colours[int(c)]) for d, c in zip(digits.argmax(1), colours.argmax(1))]


def digit_accuracy_by(predictions: list[Prediction], digits: list[int], groups: list[str]) -> dict[str, float]:
    """Digit accuracy within each group (a colour, a background), groups in first-seen order."""
    correct = np.array([p.digit == d for p, d in zip(predictions, digits)])
    labels = np.array(groups)
    return {g: float(correct[labels == g].mean()) for g in dict.fromkeys(groups)}


def prompt_accuracy(predictions: list[Prediction], digits: list[int], colours: list[str]) -> dict[str, float]:
    """Share of images showing the digit, the colour, and both, that their prompts asked for."""
    digit_ok = np.array([p.digit == d for p, d in zip(predictions, digits)])
    colour_ok = np.array([p.colour == c for p, c in zip(predictions, colours)])
    return {"digit": float(digit_ok.mean()), "colour": float(colour_ok.mean()), "both": float((digit_ok & colour_ok).mean())}
