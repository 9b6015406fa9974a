"""`kiln data prepare SRC OUT`: keep the usable, captioned, distinct images, resized for training,
and say why each of the others was dropped."""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from kiln import __version__
from kiln.dataset.captions import scan
from kiln.artifacts import write_folder_atomically, write_json_atomically

log = logging.getLogger("kiln.dataset")
MANIFEST = "manifest.json"


CROPS = ("center", "none")  # center: square crops at the resolution; none: the shorter side resized only


@dataclass(frozen=True)
class PrepareOptions:
    resolution: int = 512
    min_size: int | None = None  # shorter side below this is "tiny"; default resolution // 2
    dedup_distance: int = 4  # perceptual-hash Hamming distance at or below which images are duplicates
    crop: str = "center"  # center: square crops at `resolution`; none: shorter side resized only
    clip_model: Path | None = None
    min_clip_score: float = 0.0
    aesthetic_weights: Path | None = None
    min_aesthetic: float = 0.0
    control: str | None = None  # canny | mask (kiln.dataset.control): a control image beside each image


@dataclass
class PrepareReport:
    out_dir: Path
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    drops: list[dict] = field(default_factory=list)


def cover(image: Image.Image, width: int, height: int, resample) -> Image.Image:
    """`image` scaled until it covers width x height, then its centre cut to that size."""
    scale = max(width / image.width, height / image.height)
    image = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))), resample)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def resize_for_training(image: Image.Image, resolution: int, crop: str) -> Image.Image:
    if crop == "center":
        return cover(image, resolution, resolution, Image.LANCZOS)
    scale = resolution / min(image.size)
    return image.resize((max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))),
                        Image.LANCZOS)


def perceptual_hash(image: Image.Image) -> np.ndarray:
    import imagehash

    return imagehash.phash(image).hash.reshape(-1)  # 64 booleans


def _load(path: Path) -> Image.Image:
    with Image.open(path) as probe:
        probe.verify()  # catches truncated and corrupt files before decoding
    image = Image.open(path)
    image = ImageOps.exif_transpose(image)
    return image.convert("RGB")


def prepare(src: Path, out_dir: Path, options: PrepareOptions = PrepareOptions()) -> PrepareReport:
    from tqdm import tqdm

    from kiln.dataset.filters import AestheticScorer, ClipScorer

    from kiln.dataset.control import CONTROLS, make_control
    from kiln.errors import DatasetError

    if options.crop not in CROPS:
        raise DatasetError(f"--crop {options.crop!r} is not one of {', '.join(CROPS)}")
    if options.control is not None and options.control not in CONTROLS:
        raise DatasetError(f"--control {options.control!r} is not one of {', '.join(CONTROLS)}")
    src, out_dir = Path(src), Path(out_dir)
    clip = ClipScorer(options.clip_model) if options.clip_model else None
    aesthetic = AestheticScorer(options.aesthetic_weights, clip) if options.aesthetic_weights else None
    min_size = options.min_size or options.resolution // 2
    entries = scan(src)
    report = PrepareReport(out_dir)
    hashes: list[np.ndarray] = []
    kept_names: list[str] = []
    rows = []

    def drop(entry, reason: str, detail: str = "") -> None:
        report.drops.append({"file": str(entry.path.relative_to(src)), "reason": reason, "detail": detail})

    with write_folder_atomically(out_dir) as tmp:
        (tmp / "images").mkdir()
        if options.control:
            (tmp / "conditioning").mkdir()
        for entry in tqdm(entries, desc="prepare", unit="image"):
            try:
                image = _load(entry.path)
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
                drop(entry, "corrupt", f"{type(e).__name__}: {e}")
                continue
            if min(image.size) < min_size:
                drop(entry, "tiny", f"{image.width}x{image.height}, shorter side < {min_size}")
                continue
            if entry.caption is None:
                drop(entry, "no caption", "no metadata.jsonl row and no .txt sidecar")
                continue
            bits = perceptual_hash(image)
            if hashes:
                distances = (np.stack(hashes) != bits).sum(axis=1)
                nearest = int(distances.argmin())
                if distances[nearest] <= options.dedup_distance:
                    drop(entry, "duplicate", f"of {kept_names[nearest]} (hash distance {int(distances[nearest])})")
                    continue
            if clip is not None and (score := clip.score(image, entry.caption)) < options.min_clip_score:
                drop(entry, "clip score", f"{score:.1f} < {options.min_clip_score}")
                continue
            if aesthetic is not None and (score := aesthetic.score(image)) < options.min_aesthetic:
                drop(entry, "aesthetic", f"{score:.2f} < {options.min_aesthetic}")
                continue
            name = f"images/{len(rows):06d}.png"
            resized = resize_for_training(image, options.resolution, options.crop)
            resized.save(tmp / name)
            hashes.append(bits)
            kept_names.append(str(entry.path.relative_to(src)))
            rows.append({"file_name": name, "text": entry.caption, "source": kept_names[-1]})
            if options.control:  # made from the training image itself, so it lines up pixel for pixel
                rows[-1]["conditioning_file_name"] = f"conditioning/{len(rows) - 1:06d}.png"
                make_control(options.control, resized).save(tmp / rows[-1]["conditioning_file_name"])
        (tmp / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        report.kept = len(rows)
        report.dropped = dict(Counter(d["reason"] for d in report.drops))
        write_json_atomically(
            tmp / MANIFEST,
            {
                "kiln_version": __version__,
                "source": str(src.resolve()),
                "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
                "seen": len(entries),
                "kept": report.kept,
                "dropped": report.dropped,
                "drops": report.drops,
            },
        )
    log.info("kept %d of %d images in %s; dropped %s", report.kept, len(entries), out_dir, report.dropped or "none")
    return report
