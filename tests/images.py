"""Synthetic captioned images for dataset and training tests: coloured shapes on light backgrounds."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220), "yellow": (230, 200, 40)}


def shape_image(index: int, size: int = 96) -> tuple[Image.Image, str]:
    colour = list(COLOURS)[index % len(COLOURS)]
    shape = ("square", "circle", "triangle")[(index // len(COLOURS)) % 3]
    image = Image.new("RGB", (size, size), (240, 240 - 10 * (index % 4), 235))
    draw = ImageDraw.Draw(image)
    x, y, s = 8 + (index * 7) % 30, 10 + (index * 11) % 30, size // 2
    if shape == "square":
        draw.rectangle([x, y, x + s, y + s], fill=COLOURS[colour])
    elif shape == "circle":
        draw.ellipse([x, y, x + s, y + s], fill=COLOURS[colour])
    else:
        draw.polygon([(x, y + s), (x + s, y + s), (x + s // 2, y)], fill=COLOURS[colour])
    return image, f"a {colour} {shape}"


def write_folder(folder: Path, count: int = 8, sidecars: bool = False, size: int = 96) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        image, caption = shape_image(i, size)
        image.save(folder / f"img{i:02d}.png")
        if sidecars:
            (folder / f"img{i:02d}.txt").write_text(caption + "\n")
        else:
            rows.append({"file_name": f"img{i:02d}.png", "text": caption})
    if rows:
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder
