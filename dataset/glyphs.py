"""`kiln data glyphs OUT`: a captioned image set of digits rendered from the fonts on the machine, in
named colours on named backgrounds, with varied fonts, sizes, positions and small rotations.
Deterministic for a seed; written in the folder format `kiln data prepare` reads."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from kiln.artifacts import write_folder_atomically
from kiln.errors import DatasetError

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (235, 200, 25),
    "purple": (135, 45, 185),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 240),
    "black": (20, 20, 25),
    "gray": (125, 125, 125),
}
DIGITS = tuple(range(10))
FONT_DIRS = (Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/truetype"))
# Three bold DejaVu faces (all also bundled with matplotlib): strokes thick enough to survive 32 pixels
# and a 4x autoencoder. Not the monospace face: its dotted zero reads as an 8 at this size.
FONT_FACES = ("DejaVuSans-Bold.ttf", "DejaVuSans-BoldOblique.ttf", "DejaVuSerif-Bold.ttf")


@dataclass(frozen=True)
class Glyph:
    digit: int
    colour: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} digit {self.digit} on a {self.background} background"


def _matplotlib_fonts() -> list[Path]:
    import importlib.util

    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        return []
    return sorted((Path(spec.submodule_search_locations[0]) / "mpl-data" / "fonts" / "ttf").glob("*.ttf"))


@lru_cache(maxsize=1)
def available_fonts() -> tuple[Path, ...]:
    """FONT_FACES from the system (fonts-dejavu) or, where absent, the copies matplotlib bundles: the
    same faces either way, so renders match across machines."""
    by_name: dict[str, Path] = {}
    for path in [p for folder in FONT_DIRS if folder.is_dir() for p in sorted(folder.glob("DejaVu*.ttf"))] + _matplotlib_fonts():
        if path.name in FONT_FACES:
            by_name.setdefault(path.name, path)
    if not by_name:
        raise DatasetError(f"none of the fonts {list(FONT_FACES)} found",
                           hint="apt-get install fonts-dejavu-core (or pip install matplotlib)")
    return tuple(by_name[name] for name in sorted(by_name))


@lru_cache(maxsize=256)
def _font(path: Path, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(path), size)


@dataclass(frozen=True)
class Placement:
    """Where and how large glyphs are drawn: height as a fraction of the image, offset from the centre
    as a fraction of its side."""

    heights: tuple[float, float] = (0.65, 0.85)
    shift: float = 0.06


CENTRED = Placement()
# the ControlNet demo's: smaller and further off centre, so that the control image decides where
SCATTERED = Placement(heights=(0.45, 0.8), shift=0.16)


def render(glyph: Glyph, size: int, rng: np.random.Generator) -> Image.Image:
    """One glyph: a random font, height 65-85 % of the image, shifted up to 6 % and rotated up to 8 degrees."""
    return render_with_mask(glyph, size, rng)[0]


def render_with_mask(glyph: Glyph, size: int, rng: np.random.Generator,
                     placement: Placement = CENTRED) -> tuple[Image.Image, Image.Image]:
    """render's image and the digit's silhouette in it (white on black, RGB): the exact shape and
    place the glyph was drawn at, a ControlNet's control image."""
    fonts = available_fonts()
    scale = 4  # draw large, then downsample: smooth edges at small sizes
    canvas = size * scale
    font = _font(fonts[rng.integers(len(fonts))], int(canvas * rng.uniform(*placement.heights)))
    layer = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(layer)
    left, top, right, bottom = draw.textbbox((0, 0), str(glyph.digit), font=font)
    x = (canvas - (right - left)) / 2 - left + rng.uniform(-placement.shift, placement.shift) * canvas
    y = (canvas - (bottom - top)) / 2 - top + rng.uniform(-placement.shift, placement.shift) * canvas
    draw.text((x, y), str(glyph.digit), fill=255, font=font)
    layer = layer.rotate(rng.uniform(-8, 8), resample=Image.BICUBIC)
    image = Image.new("RGB", (canvas, canvas), BACKGROUNDS[glyph.background])
    image.paste(Image.new("RGB", (canvas, canvas), COLOURS[glyph.colour]), mask=layer)
    silhouette = layer.resize((size, size), Image.BOX).point(lambda v: 255 if v >= 128 else 0).convert("RGB")
    return image.resize((size, size), Image.LANCZOS), silhouette


def _probabilities(weights: tuple[float, ...] | None, count: int, what: str) -> np.ndarray | None:
    if weights is None:
        return None
    p = np.asarray(weights, dtype=float)
    if p.shape != (count,) or (p < 0).any() or p.sum() <= 0:
        raise DatasetError(f"{what} weights {list(weights)} are invalid: expected {count} non-negative numbers, not all 0")
    return p / p.sum()


def sample_glyphs(count: int, rng: np.random.Generator, digits=DIGITS, colours=tuple(COLOURS),
                  backgrounds=tuple(BACKGROUNDS), colour_weights: tuple[float, ...] | None = None,
                  background_weights: tuple[float, ...] | None = None) -> list[Glyph]:
    """Balanced over digits; colours and backgrounds drawn uniformly, or with weights (one per choice)."""
    def pick(choices: tuple[str, ...], p: np.ndarray | None) -> str:
        return choices[rng.integers(len(choices)) if p is None else rng.choice(len(choices), p=p)]

    colour_p = _probabilities(colour_weights, len(colours), "colour")
    background_p = _probabilities(background_weights, len(backgrounds), "background")
    return [Glyph(digits[i % len(digits)], pick(colours, colour_p), pick(backgrounds, background_p)) for i in range(count)]


def write_glyphs(out: Path, count: int = 5000, seed: int = 0, size: int = 32, colours=tuple(COLOURS),
                 digits=DIGITS, backgrounds=tuple(BACKGROUNDS), colour_weights: tuple[float, ...] | None = None,
                 background_weights: tuple[float, ...] | None = None, control: bool = False,
                 placement: Placement = CENTRED) -> Path:
    """Render `count` glyphs into `out` (images/ + metadata.jsonl), atomically; `control`: each digit's
    silhouette too (conditioning/, conditioning_file_name), for ControlNet training."""
    from tqdm import tqdm

    unknown = [c for c in colours if c not in COLOURS]
    if unknown:
        raise DatasetError(f"--colours {unknown} unknown: expected some of {list(COLOURS)}")
    rng = np.random.default_rng(seed)
    glyphs = sample_glyphs(count, rng, tuple(digits), tuple(colours), tuple(backgrounds), colour_weights,
                           background_weights)
    rows = []
    with write_folder_atomically(out) as tmp:
        (tmp / "images").mkdir()
        if control:
            (tmp / "conditioning").mkdir()
        for i, glyph in enumerate(tqdm(glyphs, desc="render glyphs", unit="image")):
            name = f"images/{i:06d}.png"
            image, silhouette = render_with_mask(glyph, size, rng, placement)
            image.save(tmp / name)
            rows.append({"file_name": name, "text": glyph.caption, "digit": glyph.digit, "colour": glyph.colour,
                         "background": glyph.background})
            if control:
                rows[-1]["conditioning_file_name"] = f"conditioning/{i:06d}.png"
                silhouette.save(tmp / rows[-1]["conditioning_file_name"])
        (tmp / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return Path(out)
