"""A small CNN that reads a rendered glyph's digit and colour. Trained only on fresh renders (never on
generated images), it judges prompt accuracy and is the offline feature extractor for FID, KID, IS
and LPIPS where the standard backbones cannot be downloaded."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kiln.dataset.glyphs import BACKGROUNDS, COLOURS, DIGITS, render, sample_glyphs
from kiln.errors import KilnError

INPUT_SIZE = 32
WEIGHTS, CONFIG = "classifier.safetensors", "classifier.json"


class GlyphClassifier(nn.Module):
    def __init__(self, colours: tuple[str, ...] = tuple(COLOURS), width: int = 16):
        super().__init__()
        self.colours = tuple(colours)

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())

        self.blocks = nn.ModuleList([block(3, width), block(width, 2 * width), block(2 * width, 4 * width)])
        self.num_features = 4 * width
        self.digit_head = nn.Linear(self.num_features, len(DIGITS))
        self.colour_head = nn.Linear(self.num_features, len(self.colours))

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: (N, 3, 32, 32) in [0, 1]. Maps after each block, at 32, 16 and 8 pixels."""
        maps = []
        for i, block in enumerate(self.blocks):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            maps.append(x)
        return maps

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_maps(x)[-1].mean(dim=(2, 3))  # (N, 128)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return self.digit_head(f), self.colour_head(f)


def to_input(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) or (N, 3, H, W), or float in [0, 1] -> float (N, 3, 32, 32) in [0, 1]."""
    x = torch.as_tensor(np.asarray(images) if isinstance(images, np.ndarray) else images)
    if x.ndim == 4 and x.shape[-1] == 3 and x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if x.shape[-1] != INPUT_SIZE or x.shape[-2] != INPUT_SIZE:
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x


def render_batch(count: int, rng: np.random.Generator, colours=tuple(COLOURS)):
    glyphs = sample_glyphs(count, rng, DIGITS, tuple(colours), tuple(BACKGROUNDS))
    rng.shuffle(glyphs)
    images = np.stack([np.asarray(render(g, INPUT_SIZE, rng)) for g in glyphs])
    digits = torch.tensor([g.digit for g in glyphs])
    colour_ids = torch.tensor([colours.index(g.colour) for g in glyphs])
    return to_input(images), digits, colour_ids


def degrade(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Four in five of a batch as a generated glyph looks: blurred (sigma 0.3-1.5 px), its contrast
    lowered (to 50-100 % about the image's mean), speckled with per-pixel colour noise (std up to 0.08)
    and with smooth colour noise at the latent grid's scale (8x8, std up to 0.10). The judge must read
    the digit and colour a model drew, not the sharpness of a render: a judge trained on sharp renders
    changed its verdict on 13 % of the demo's generated digits with nothing but its seed changed, one
    trained so agrees with re-seeded copies of itself on 96-98 % (benchmarks/results/demo-judge/judge.md)."""
    from kornia.filters import gaussian_blur2d

    picked = torch.rand(len(x), generator=generator) < 0.8
    count = int(picked.sum())
    if not count:
        return x
    x = x.clone()

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return torch.empty(count, *shape).uniform_(low, high, generator=generator)

    y = gaussian_blur2d(x[picked], (7, 7), uniform(0.3, 1.5, 2))
    mean = y.mean(dim=(2, 3), keepdim=True)
    y = mean + (y - mean) * uniform(0.5, 1.0, 1, 1, 1)
    y = y + uniform(0.0, 0.08, 1, 1, 1) * torch.randn(y.shape, generator=generator)
    smooth = F.interpolate(torch.randn(count, 3, 8, 8, generator=generator), size=y.shape[-2:], mode="bilinear",
                           align_corners=False)
    x[picked] = (y + uniform(0.0, 0.10, 1, 1, 1) * smooth).clamp(0, 1)
    return x


@dataclass
class ClassifierReport:
    path: Path
    digit_accuracy: float  # on clean held-out renders
    colour_accuracy: float
    degraded_digit_accuracy: float  # on the same renders through `degrade` (a generator of their own)
    degraded_colour_accuracy: float


@torch.no_grad()
def accuracy(model: GlyphClassifier, x, digits, colours) -> tuple[float, float]:
    model.eval()
    d, c = model(x)
    return float((d.argmax(1) == digits).float().mean()), float((c.argmax(1) == colours).float().mean())


def train_classifier(out_dir: Path, samples: int = 8000, steps: int = 600, seed: int = 0) -> ClassifierReport:
    """Train on `samples` fresh renders (seeded) seen through `degrade`, report accuracy on 2,000 other
    renders as rendered and as degraded, save."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 1])
    x, digits, colours = render_batch(samples, rng)
    test = render_batch(2000, np.random.default_rng([seed, 2]))
    model = GlyphClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    for _ in tqdm(range(steps), desc="train glyph classifier", unit="step"):
        model.train()
        idx = torch.randint(0, samples, (64,))
        d, c = model(degrade(x[idx]))
        loss = F.cross_entropy(d, digits[idx]) + F.cross_entropy(c, colours[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    digit_acc, colour_acc = accuracy(model, *test)
    degraded = degrade(test[0], torch.Generator().manual_seed(seed + 1))
    degraded_digit_acc, degraded_colour_acc = accuracy(model, degraded, *test[1:])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(out_dir / WEIGHTS))
    (out_dir / CONFIG).write_text(json.dumps({"colours": list(model.colours), "seed": seed, "samples": samples,
                                              "steps": steps, "augmentation": "degrade", "digit_accuracy": digit_acc,
                                              "colour_accuracy": colour_acc, "degraded_digit_accuracy": degraded_digit_acc,
                                              "degraded_colour_accuracy": degraded_colour_acc}, indent=2))
    return ClassifierReport(out_dir, digit_acc, colour_acc, degraded_digit_acc, degraded_colour_acc)


def load_classifier(folder: Path) -> GlyphClassifier:
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / WEIGHTS).is_file():
        raise KilnError(f"{folder} holds no {WEIGHTS}", hint="kiln eval classifier OUT (trains it on rendered glyphs)")
    config = json.loads((folder / CONFIG).read_text())
    model = GlyphClassifier(tuple(config["colours"]))
    model.load_state_dict(load_file(str(folder / WEIGHTS)))
    return model.eval()


class GlyphFeatures(nn.Module):
    """torchmetrics feature extractor: uint8 images of any size -> (N, 128) classifier features."""

    def __init__(self, classifier: GlyphClassifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.num_features

    def forward(self, images):
        return self.classifier.features(to_input(images))


class GlyphLogits(GlyphFeatures):
    """For Inception Score: the digit logits."""

    def forward(self, images):
        return self.classifier(to_input(images))[0]
