"""Reading captioned image folders: Hugging Face imagefolder `metadata.jsonl`, or `.txt` sidecars."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import DatasetError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CAPTION_KEYS = ("text", "caption", "prompt")


@dataclass(frozen=True)
class Entry:
    path: Path
    caption: str | None  # None: no caption found


def _metadata_captions(src: Path) -> dict[str, str]:
    captions = {}
    for number, line in enumerate((src / "metadata.jsonl").read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{src / 'metadata.jsonl'} line {number} is not JSON: {e}") from None
        if "file_name" not in row:
            raise DatasetError(f"{src / 'metadata.jsonl'} line {number} has no file_name", hint="imagefolder rows are "
                               '{"file_name": "a.png", "text": "a caption"}')
        caption = next((row[k] for k in CAPTION_KEYS if isinstance(row.get(k), str)), None)
        if caption is not None:
            captions[row["file_name"]] = caption
    return captions


def scan(src: Path) -> list[Entry]:
    """Every image under `src` with its caption: metadata.jsonl first, then a `.txt` beside it."""
    src = Path(src)
    if not src.is_dir():
        raise DatasetError(f"{src} is not a folder of images")
    from_metadata = _metadata_captions(src) if (src / "metadata.jsonl").is_file() else {}
    entries = []
    for path in sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        relative = str(path.relative_to(src))
        caption = from_metadata.get(relative)
        sidecar = path.with_suffix(".txt")
        if caption is None and sidecar.is_file():
            caption = sidecar.read_text().strip()
        entries.append(Entry(path, caption.strip() if caption and caption.strip() else None))
    return entries
