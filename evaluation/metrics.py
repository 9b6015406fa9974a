"""FID, KID, Inception Score, CLIP score and LPIPS through torchmetrics, plus PSNR and prompt accuracy.

The standard backbones load from local files given by path, nothing is downloaded: Inception for FID
(NVIDIA's TorchScript `inception-2015-12-05.pt`, which StyleGAN's and EDM's FID use, or torch-fidelity's
state dict where torch-fidelity imports), CLIP in transformers' or open_clip's layout (kiln.models.clip),
and AlexNet for LPIPS (torchvision's state dict, with the linear layer weights torchmetrics ships).
For the glyph demo, FID, KID and IS take Kiln's glyph classifier as the feature extractor
(torchmetrics' `feature=`), and prompt accuracy asks it which digit and colour it sees; the distance on
its feature maps has LPIPS's form with equal layer weights and is named as such (unweighted).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kiln.errors import KilnError
from kiln.evaluation.classifier import GlyphClassifier, GlyphFeatures, GlyphLogits, to_input

INCEPTION_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"  # torch-fidelity's state dict
INCEPTION_TORCHSCRIPT = "inception-2015-12-05.pt"  # NVIDIA's TorchScript FID Inception (StyleGAN, EDM)
ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"  # torchvision's AlexNet, LPIPS's default backbone


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
    return inception(inception_weights)


class ScriptedInception(torch.nn.Module):
    """NVIDIA's TorchScript FID Inception: uint8 (N, 3, H, W) in, its 2048 pool features out (it
    resizes to 299 itself, as TensorFlow's FID graph does)."""

    def __init__(self, detector):
        super().__init__()
        self.detector = detector

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.detector(images, return_features=True)


def inception(path: Path) -> torch.nn.Module:
    """The FID Inception in `path`: NVIDIA's TorchScript file, else torch-fidelity's state dict."""
    path = Path(path)
    if not path.is_file():
        raise MetricError(f"--inception-weights {path} does not exist",
                          hint=f"give NVIDIA's TorchScript FID Inception ({INCEPTION_TORCHSCRIPT}) or torch-fidelity's "
                          f"weights ({INCEPTION_WEIGHTS})")
    try:
        detector = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception:  # noqa: BLE001 - not TorchScript: a state dict, or neither
        detector = None
    if detector is not None:
        module = ScriptedInception(detector)
        try:
            with torch.no_grad():
                features = module(torch.zeros(2, 3, 299, 299, dtype=torch.uint8))
        except Exception as e:  # noqa: BLE001 - any TorchScript module can be handed in
            raise MetricError(f"--inception-weights {path} is TorchScript but not an FID Inception: calling it with "
                              f"uint8 images and return_features=True failed: {str(e).splitlines()[0]}",
                              hint=f"give NVIDIA's {INCEPTION_TORCHSCRIPT}") from None
        if features.ndim != 2 or features.shape[0] != 2:
            raise MetricError(f"--inception-weights {path} returned features of shape {tuple(features.shape)} for 2 "
                              "images: expected (2, features)", hint=f"give NVIDIA's {INCEPTION_TORCHSCRIPT}")
        return module
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - text, a truncated file, a pickle of anything
        state = None
    if not isinstance(state, dict):
        raise MetricError(f"--inception-weights {path} is neither TorchScript nor a state dict",
                          hint=f"give NVIDIA's TorchScript {INCEPTION_TORCHSCRIPT} or torch-fidelity's {INCEPTION_WEIGHTS}")
    try:  # torch-fidelity's Inception, through torchmetrics (torch-fidelity imports torchvision)
        from torchmetrics.image.fid import NoTrainInceptionV3

        return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(path))
    except (ImportError, RuntimeError) as e:
        raise MetricError(f"--inception-weights {path} is a state dict, and torch-fidelity's Inception cannot load here: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}",
                          hint=f"use NVIDIA's TorchScript {INCEPTION_TORCHSCRIPT} (no extra package), or install "
                          "torch-fidelity beside a torchvision that matches torch") from None


def fid(real: np.ndarray, fake: np.ndarray, extractor, batch: int = 64) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=extractor, normalize=False)
    for images, is_real in ((real, True), (fake, False)):
        for i in range(0, len(images), batch):  # the extractor sees a batch at a time
            metric.update(_nchw_uint8(images[i:i + batch]), real=is_real)
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
    """LPIPS's form, unweighted: unit-normalised channels, squared difference, spatial mean, summed over
    layers, on the glyph classifier's feature maps with equal layer weights (no learned linear
    layers, no AlexNet: not comparable with published LPIPS figures). One value per pair."""
    maps_a = classifier.feature_maps(to_input(a))
    maps_b = classifier.feature_maps(to_input(b))
    total = torch.zeros(len(a))
    for fa, fb in zip(maps_a, maps_b):
        fa, fb = F.normalize(fa, dim=1), F.normalize(fb, dim=1)
        total += (fa - fb).pow(2).sum(dim=1).mean(dim=(1, 2))
    return total.numpy()


def clip_score(images: np.ndarray, prompts: list[str], clip_model: Path | object) -> float:
    """CLIPScore (100 x the cosine of image and prompt embeddings, floored at 0), averaged: torchmetrics'
    definition, computed by Kiln's ClipScorer so that open_clip folders work too. `clip_model`: a folder
    or a loaded ClipScorer."""
    return float(np.mean(clip_scores(images, prompts, clip_model)))


def clip_scores(images: np.ndarray, prompts: list[str], clip_model: Path | object) -> np.ndarray:
    from PIL import Image

    from kiln.dataset.filters import ClipScorer

    scorer = clip_model if isinstance(clip_model, ClipScorer) else ClipScorer(Path(clip_model))
    return np.array([scorer.score(Image.fromarray(image), prompt) for image, prompt in zip(images, prompts, strict=True)])


def _alexnet_features() -> torch.nn.Sequential:
    """torchvision's AlexNet `features` (indices and shapes as its state dict names them)."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(),
    )


class Lpips(torch.nn.Module):
    """LPIPS (Zhang et al. 2018) as torchmetrics computes it with net_type="alex": its input scaling,
    AlexNet's five ReLU outputs unit-normalised over channels, squared differences weighted by the
    linear layers torchmetrics ships (lpips_models/alex.pth), averaged over space, summed over layers.
    The AlexNet backbone comes from torchvision's state dict given by path (no torchvision needed)."""

    SLICES = (2, 5, 8, 10, 12)  # the features' indices after each of the five ReLUs

    def __init__(self, alexnet_weights: Path):
        super().__init__()
        from torchmetrics.functional.image import lpips as tm

        path = Path(alexnet_weights)
        if not path.is_file():
            raise MetricError(f"--lpips-weights {path} does not exist",
                              hint=f"give torchvision's AlexNet weights ({ALEXNET_WEIGHTS}), LPIPS's backbone")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a pickle of anything, TorchScript, text
            raise MetricError(f"--lpips-weights {path} is not a state dict (a file torch.save wrote of tensors by name)",
                              hint=f"give torchvision's AlexNet weights ({ALEXNET_WEIGHTS})") from None
        self.features = _alexnet_features()
        expected = {f"features.{k}": tuple(v.shape) for k, v in self.features.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in state.items() if torch.is_tensor(v)} if isinstance(state, dict) else {}
        wrong = [f"{k} {'missing' if k not in found else f'of shape {found[k]}, expected {shape}'}"
                 for k, shape in expected.items() if found.get(k) != shape]
        if wrong:
            raise MetricError(f"--lpips-weights {path} is not torchvision's AlexNet: {'; '.join(wrong[:3])}",
                              hint=f"give {ALEXNET_WEIGHTS}")
        self.features.load_state_dict({k.removeprefix("features."): state[k] for k in expected})
        self.scaling = tm.ScalingLayer()
        self.lins = torch.nn.ModuleList(torch.nn.Conv2d(c, 1, 1, bias=False) for c in (64, 192, 384, 256, 256))
        shipped = torch.load(Path(tm.__file__).parent / "lpips_models" / "alex.pth", map_location="cpu", weights_only=True)
        for i, lin in enumerate(self.lins):
            lin.weight.data.copy_(shipped[f"lin{i}.model.1.weight"])
        self._normalize, self._average = tm._normalize_tensor, tm._spatial_average
        self.eval().requires_grad_(False)

    def _maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps, start = [], 0
        x = self.scaling(x)
        for end in self.SLICES:
            x = self.features[start:end](x)
            maps.append(self._normalize(x))
            start = end
        return maps

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a, b: (N, 3, H, W) in [-1, 1] -> (N,) distances."""
        total = torch.zeros(len(a))
        for fa, fb, lin in zip(self._maps(a), self._maps(b), self.lins):
            total += self._average(lin((fa - fb) ** 2), keep_dim=True).flatten()
        return total


def lpips(a: np.ndarray, b: np.ndarray, model: Lpips, batch: int = 16) -> np.ndarray:
    """Weighted LPIPS per image pair (N, H, W, 3) uint8, both sides the same size."""
    def signed(images):
        return _nchw_uint8(images).float() / 127.5 - 1.0

    return np.concatenate([model(signed(a[i:i + batch]), signed(b[i:i + batch])).numpy() for i in range(0, len(a), batch)])


def pixel_difference(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """How far paired images are apart in pixels: PSNR of the pooled squared error (None when every pair
    is identical, which `identical` says), mean and largest absolute difference in 1/255 steps."""
    if a.shape != b.shape:
        raise MetricError(f"paired images differ in shape: {a.shape} and {b.shape}",
                          hint="generate both at the same size (--width, --height)")
    diff = a.astype(np.float64) - b.astype(np.float64)
    mse = float((diff ** 2).mean())
    return {"identical": mse == 0, "psnr_db": None if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse)),
            "mean_abs_diff": float(np.abs(diff).mean()), "max_abs_diff": float(np.abs(diff).max())}


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
