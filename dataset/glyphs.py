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

from kiln.errors import DatasetError
from kiln.models.folder import write_folder_atomically

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
    """The DejaVu faces that draw digits plainly, from the system (fonts-dejavu) or, where it is
    absent, the copies matplotlib bundles: the same set either way, so renders match across machines."""
    by_name: dict[str, Path] = {}
    for path in [p for folder in FONT_DIRS if folder.is_dir() for p in sorted(folder.glob("DejaVu*.ttf"))] + _matplotlib_fonts():
        name = path.name
        if not name.startswith("DejaVu") or any(skip in name for skip in ("Math", "ExtraLight", "Display")):
            continue
        by_name.setdefault(name, path)
    if not by_name:
        raise DatasetError("no DejaVu TrueType fonts found", hint="apt-get install fonts-dejavu-core (or pip install matplotlib)")
    return tuple(by_name[name] for name in sorted(by_name))


@lru_cache(maxsize=256)
def _font(path: Path, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(path), size)


def render(glyph: Glyph, size: int, rng: np.random.Generator) -> Image.Image:
    """One glyph: a random font, height 50-80 % of the image, shifted and rotated a little."""
    fonts = available_fonts()
    scale = 4  # draw large, then downsample: smooth edges at small sizes
    canvas = size * scale
    font = _font(fonts[rng.integers(len(fonts))], int(canvas * rng.uniform(0.55, 0.85)))
    layer = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(layer)
    left, top, right, bottom = draw.textbbox((0, 0), str(glyph.digit), font=font)
    x = (canvas - (right - left)) / 2 - left + rng.uniform(-0.1, 0.1) * canvas
    y = (canvas - (bottom - top)) / 2 - top + rng.uniform(-0.1, 0.1) * canvas
    draw.text((x, y), str(glyph.digit), fill=255, font=font)
    layer = layer.rotate(rng.uniform(-12, 12), resample=Image.BICUBIC)
    image = Image.new("RGB", (canvas, canvas), BACKGROUNDS[glyph.background])
    image.paste(Image.new("RGB", (canvas, canvas), COLOURS[glyph.colour]), mask=layer)
    return image.resize((size, size), Image.LANCZOS)


def sample_glyphs(count: int, rng: np.random.Generator, digits=DIGITS, colours=tuple(COLOURS),
                  backgrounds=tuple(BACKGROUNDS)) -> list[Glyph]:
    """Balanced over digits, colours drawn uniformly."""
    return [Glyph(digits[i % len(digits)], colours[rng.integers(len(colours))], backgrounds[rng.integers(len(backgrounds))])
            for i in range(count)]


def write_glyphs(out: Path, count: int = 5000, seed: int = 0, size: int = 32, colours=tuple(COLOURS),
                 digits=DIGITS, backgrounds=tuple(BACKGROUNDS)) -> Path:
    """Render `count` glyphs into `out` (images/ + metadata.jsonl), atomically."""
    from tqdm import tqdm

    unknown = [c for c in colours if c not in COLOURS]
    if unknown:
        raise DatasetError(f"--colours {unknown} unknown: expected some of {list(COLOURS)}")
    rng = np.random.default_rng(seed)
    glyphs = sample_glyphs(count, rng, tuple(digits), tuple(colours), tuple(backgrounds))
    rows = []
    with write_folder_atomically(out) as tmp:
        (tmp / "images").mkdir()
        for i, glyph in enumerate(tqdm(glyphs, desc="render glyphs", unit="image")):
            name = f"images/{i:06d}.png"
            render(glyph, size, rng).save(tmp / name)
            rows.append({"file_name": name, "text": glyph.caption, "digit": glyph.digit, "colour": glyph.colour,
                         "background": glyph.background})
        (tmp / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return Path(out)
