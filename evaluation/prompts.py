"""`kiln eval --prompts FILE`: a quality report for any served model, and a gate between two.

Every endpoint draws the same prompts with the same seeds (the file's rows x `seeds`). Per model: CLIP
score from local CLIP weights, FID against a folder of reference images with a local Inception. Per
pair (each model against the reference, `--against`): weighted LPIPS when AlexNet's weights are
given, PSNR and pixel differences always. With a reference, the gate compares each model with it and
fails when a stated window is left, the way MLPerf bounds its SDXL accuracy by the reference's own
FID and CLIP score.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from kiln.artifacts import write_json_atomically
from kiln.errors import ConfigError
from kiln.evaluation import metrics

log = logging.getLogger("kiln.evaluation")

MAX_PROMPTS = 100_000
MAX_PROMPT_CHARS = 10_000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
ROW_KEYS = ("prompt", "negative_prompt", "seed")


@dataclass(frozen=True)
class PromptRow:
    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None  # the row's first seed; the file's rows without one start at 0


def read_prompts(path: Path) -> list[PromptRow]:
    """A prompt file: text (one prompt a line; blank lines and lines starting with # skipped) or JSON
    Lines (.jsonl: {"prompt": ..., "negative_prompt": ..., "seed": ...} a line)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--prompts {path} does not exist", hint="give a text file (one prompt a line) or a .jsonl file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"--prompts {path} is not UTF-8 text: {e}", hint="save the prompt file as UTF-8") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or (path.suffix != ".jsonl" and line.lstrip().startswith("#")):
            continue
        where = f"--prompts {path}, line {number}"
        rows.append(_json_row(line, where) if path.suffix == ".jsonl" else PromptRow(_prompt(line.strip(), where)))
        if len(rows) > MAX_PROMPTS:
            raise ConfigError(f"{where}: more than {MAX_PROMPTS} prompts", hint="split the file")
    if not rows:
        raise ConfigError(f"--prompts {path} holds no prompt", hint="one prompt a line, or a .jsonl row {\"prompt\": ...} a line")
    return rows


def _prompt(value, where: str, key: str = "prompt") -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: {key}={value!r} is invalid: expected non-empty text")
    if len(value) > MAX_PROMPT_CHARS:
        raise ConfigError(f"{where}: {key} has {len(value)} characters: expected at most {MAX_PROMPT_CHARS}",
                          hint="shorten it; the text encoder reads 77 tokens a chunk")
    return value


def _json_row(line: str, where: str) -> PromptRow:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where} is not JSON: {e.msg} at column {e.colno}", hint='expected {"prompt": "...", "seed": 0}') from None
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: expected an object, got {type(row).__name__}", hint='expected {"prompt": "...", "seed": 0}')
    unknown = sorted(set(row) - set(ROW_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}", hint=f"a row may hold {', '.join(ROW_KEYS)}")
    negative = row.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise ConfigError(f"{where}: negative_prompt={negative!r} is invalid: expected text")
    seed = row.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63 - 2 ** 20):
        raise ConfigError(f"{where}: seed={seed!r} is invalid: expected a whole number from 0 below 2^63")
    return PromptRow(_prompt(row.get("prompt"), where), negative, seed)


@dataclass(frozen=True)
class Endpoint:
    label: str
    url: str
    model: str  # the served model (its public ensemble): txt2img for a single-model repository


def parse_endpoint(label: str, value: str, default_url: str | None = None) -> Endpoint:
    """HOST:PORT[/MODEL], or /MODEL or MODEL alone on `default_url`'s server."""
    from kiln.clients.client import PUBLIC_MODEL

    if ":" in value.split("/", 1)[0]:
        url, _, model = value.partition("/")
    else:  # a served model's name alone, on the first endpoint's server
        url, model = default_url, value.strip("/")
        if default_url is None or not model or "/" in model:
            raise ConfigError(f"endpoint {label}={value!r} is invalid: expected HOST:PORT[/MODEL]",
                              hint="for example localhost:8000 or localhost:8000/sd15-int8")
    return Endpoint(label, url, model or PUBLIC_MODEL)


# ---------------------------------------------------------------- the gate

@dataclass(frozen=True)
class Window:
    """How far a model may fall from the reference. clip_score and fid: fractions of the reference's
    own value (MLPerf states its SDXL bounds so); lpips: the largest mean LPIPS; psnr: the lowest PSNR
    in dB. None: not gated."""

    clip_score: float | None = 0.01
    fid: float | None = 0.05
    lpips: float | None = None
    psnr: float | None = None

    @classmethod
    def parse(cls, items: list[str]) -> "Window":
        values = asdict(cls())
        for item in items:
            name, _, text = item.partition("=")
            if name not in values:
                raise ConfigError(f"--gate {item!r}: unknown metric {name!r}", hint=f"one of {', '.join(values)}, e.g. --gate fid=0.05")
            if text.lower() in ("off", "none"):
                values[name] = None
                continue
            try:
                value = float(text)
            except ValueError:
                value = math.nan
            if not math.isfinite(value) or value < 0 or (name in ("clip_score", "fid") and value > 1):
                raise ConfigError(f"--gate {item!r}: {text!r} is invalid", hint="clip_score and fid: a fraction in [0, 1] of "
                                  "the reference's value; lpips: a distance >= 0; psnr: dB >= 0; or off")
            values[name] = value
        return cls(**values)


def gate(reference: dict, candidate: dict, pair: dict, window: Window) -> list[dict]:
    """Quality bars of one candidate against the reference: {bar, value, need, passed}, for every
    gated metric both sides measured."""
    bars = []
    label = candidate["label"]
    if window.clip_score is not None and reference.get("clip_score") is not None:
        need = reference["clip_score"] * (1 - window.clip_score)
        bars.append({"bar": f"{label}: CLIP score", "value": candidate["clip_score"], "need": f">= {need:.3f}",
                     "passed": candidate["clip_score"] >= need})
    if window.fid is not None and reference.get("fid") is not None:
        need = reference["fid"] * (1 + window.fid)
        bars.append({"bar": f"{label}: FID", "value": candidate["fid"], "need": f"<= {need:.3f}", "passed": candidate["fid"] <= need})
    if window.lpips is not None and pair.get("lpips") is not None:
        bars.append({"bar": f"{label}: LPIPS to reference", "value": pair["lpips"], "need": f"<= {window.lpips}",
                     "passed": pair["lpips"] <= window.lpips})
    if window.psnr is not None:
        bars.append({"bar": f"{label}: PSNR to reference (dB)", "value": pair["psnr_db"], "need": f">= {window.psnr}",
                     "passed": pair["identical"] or pair["psnr_db"] >= window.psnr})
    return bars


# ---------------------------------------------------------------- images in and out

def reference_images(folder: Path, size: tuple[int, int], limit: int) -> np.ndarray:
    """Up to `limit` images of `folder` (sorted, sub-folders included), centre-cropped to the aspect of
    `size` (height, width) and resized to it: FID compares like with like."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"--real {folder} is not a folder", hint="give a folder of reference images (PNG, JPEG, WebP)")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if len(files) < 2:
        raise ConfigError(f"--real {folder} holds {len(files)} images: FID needs at least 2 (thousands for a stable figure)")
    height, width = size
    out = np.empty((len(files), height, width, 3), np.uint8)
    for i, file in enumerate(files):
        try:
            with Image.open(file) as image:
                image = image.convert("RGB")
        except (OSError, Image.DecompressionBombError) as e:
            raise ConfigError(f"--real {file} is not a readable image: {e}") from None
        scale = max(width / image.width, height / image.height)
        image = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))), Image.BICUBIC)
        left, top = (image.width - width) // 2, (image.height - height) // 2
        out[i] = np.asarray(image.crop((left, top, left + width, top + height)))
    return out


def draw(endpoint: Endpoint, protocol: str, rows: list[PromptRow], seeds: int, sampling: dict, out_dir: Path) -> tuple[np.ndarray, list[str]]:
    """Every row x seeds through `endpoint`, saved as PNGs under out_dir/LABEL/; (images, prompts)."""
    from tqdm import tqdm

    from kiln.clients.client import KilnClient

    jobs = [(row, (row.seed or 0) + k) for row in rows for k in range(seeds)]
    folder = Path(out_dir) / endpoint.label
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    with KilnClient(endpoint.url, protocol, model=endpoint.model) as client:
        for i, (row, seed) in enumerate(tqdm(jobs, desc=f"generate {endpoint.label} ({endpoint.model} @ {endpoint.url})", unit="image")):
            image = client.generate(row.prompt, negative_prompt=row.negative_prompt, seed=seed, **sampling).images[0]
            Image.fromarray(image).save(folder / f"{i:05d}-seed{seed}.png")
            images.append(image)
    sizes = {image.shape for image in images}
    if len(sizes) > 1:
        raise ConfigError(f"{endpoint.label} drew images of several sizes {sorted(sizes)}", hint="pass --width and --height")
    return np.stack(images), [row.prompt for row, _ in jobs]


# ---------------------------------------------------------------- the report

@dataclass
class Measures:
    clip: Path | None = None  # CLIP folder, transformers' or open_clip's layout
    real: Path | None = None  # reference images for FID
    inception: Path | None = None
    lpips: Path | None = None  # torchvision's AlexNet weights
    real_limit: int = 5000

    def check(self, window: Window | None) -> None:
        """Refuse, before anything is drawn, what cannot be measured as asked."""
        if (self.real is None) != (self.inception is None):
            raise ConfigError("FID needs both --real DIR (reference images) and --inception-weights FILE",
                              hint=f"NVIDIA's TorchScript {metrics.INCEPTION_TORCHSCRIPT} or torch-fidelity's {metrics.INCEPTION_WEIGHTS}")
        for name, path, is_file in (("--clip-model", self.clip, False), ("--inception-weights", self.inception, True),
                                    ("--lpips-weights", self.lpips, True), ("--real", self.real, False)):
            if path is not None and not (Path(path).is_file() if is_file else Path(path).is_dir()):
                raise ConfigError(f"{name} {path} does not exist")
        if window is None:
            return
        if window.lpips is not None and self.lpips is None:
            raise ConfigError("--gate lpips=... needs --lpips-weights FILE", hint=f"torchvision's {metrics.ALEXNET_WEIGHTS}")
        gated = [(window.clip_score, self.clip), (window.fid, self.inception), (window.lpips, self.lpips), (window.psnr, True)]
        if not any(limit is not None and measured is not None for limit, measured in gated):
            raise ConfigError("--against gates nothing: no gated metric can be measured",
                              hint="give --clip-model DIR (CLIP score), --real DIR --inception-weights FILE (FID), or state "
                              "--gate psnr=MIN_DB / --gate lpips=MAX (with --lpips-weights)")


@dataclass
class PromptModelResult:
    label: str
    url: str
    model: str
    images: int
    clip_score: float | None = None
    fid: float | None = None
    versus: dict = field(default_factory=dict)  # against the reference: lpips, psnr_db, mean/max_abs_diff


def evaluate_prompts(endpoints: list[Endpoint], protocol: str, rows: list[PromptRow], out_dir: Path, seeds: int = 1,
                     sampling: dict | None = None, measures: Measures = Measures(), reference: str | None = None,
                     window: Window | None = None) -> dict:
    """Draw `rows` x `seeds` on every endpoint, measure each, and (with `reference`, a label among
    them) compare every other with it and gate. Writes report.json and report.md in `out_dir`."""
    measures.check(window)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sampling = {k: v for k, v in (sampling or {}).items() if v is not None}
    scorer = extractor = lpips_model = None
    if measures.clip is not None:  # loaded before drawing: a bad folder fails in seconds, not after the images
        from kiln.dataset.filters import ClipScorer

        scorer = ClipScorer(measures.clip)
    if measures.inception is not None:
        extractor = metrics.inception(measures.inception)
    if measures.lpips is not None:
        lpips_model = metrics.Lpips(measures.lpips)
    drawn, results, real = {}, [], None
    for endpoint in endpoints:
        images, prompts = draw(endpoint, protocol, rows, seeds, sampling, out_dir / "images")
        drawn[endpoint.label] = images
        result = PromptModelResult(endpoint.label, endpoint.url, endpoint.model, len(images))
        if scorer is not None:
            result.clip_score = metrics.clip_score(images, prompts, scorer)
        if extractor is not None:
            if real is None:
                real = reference_images(measures.real, images.shape[1:3], measures.real_limit)
            result.fid = metrics.fid(real, images, extractor)
        from kiln.evaluation.report import grid

        grid(images[:16], min(8, len(images))).save(out_dir / f"grid-{endpoint.label}.png")
        results.append(result)
        log.info("%s: %d images, CLIP score %s, FID %s", endpoint.label, len(images), result.clip_score, result.fid)
    bars = []
    if reference is not None:
        ref = next(r for r in results if r.label == reference)
        for result in results:
            if result.label == reference:
                continue
            result.versus = metrics.pixel_difference(drawn[reference], drawn[result.label])
            if lpips_model is not None:
                result.versus["lpips"] = float(metrics.lpips(drawn[reference], drawn[result.label], lpips_model).mean())
            bars += gate(asdict(ref), asdict(result), result.versus, window or Window())
    report = {"prompts": len(rows), "seeds_per_prompt": seeds, "sampling": sampling, "reference": reference,
              "window": asdict(window or Window()) if reference else None,
              "measures": {"clip_model": str(measures.clip) if measures.clip else None,
                           "clip_layout": scorer.layout if scorer else None,
                           "fid_reference_images": len(real) if real is not None else None,
                           "inception": str(measures.inception) if measures.inception else None,
                           "lpips": "weighted (torchvision AlexNet + torchmetrics' linear layers)" if lpips_model else None},
              "results": [asdict(r) for r in results], "bars": bars, "images": str(out_dir / "images")}
    write_json_atomically(out_dir / "report.json", report)
    (out_dir / "report.md").write_text(to_markdown(report))
    return report


def to_markdown(report: dict) -> str:
    def number(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [f"{report['prompts']} prompts x {report['seeds_per_prompt']} seeds, sampling {report['sampling'] or 'server defaults'}.", "",
             "| model | served as | images | CLIP score | FID | LPIPS to ref. | PSNR to ref. (dB) | mean abs diff (/255) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        v = r["versus"]
        lines.append(f"| {r['label']}{' (reference)' if r['label'] == report['reference'] else ''} | {r['model']} @ {r['url']} | "
                     f"{r['images']} | {number(r['clip_score'])} | {number(r['fid'])} | {number(v.get('lpips'), 4)} | "
                     f"{'identical' if v.get('identical') else number(v.get('psnr_db'), 2)} | {number(v.get('mean_abs_diff'), 2)} |")
    m = report["measures"]
    clip = f"{m['clip_model']} ({m['clip_layout']} layout)" if m["clip_model"] else "not measured (--clip-model)"
    fid = (f"{m['fid_reference_images']} reference images, Inception {m['inception']}" if m["inception"]
           else "not measured (--real, --inception-weights)")
    lines += ["", f"CLIP: {clip}; FID: {fid}; LPIPS: {m['lpips'] or 'not measured (--lpips-weights)'}."]
    if report["bars"]:
        lines += ["", "| gate | measured | needed | |", "|---|---|---|---|"]
        lines += [f"| {b['bar']} | {'identical' if b['value'] is None else number(b['value'], 3)} | {b['need']} | "
                  f"{'pass' if b['passed'] else 'FAIL'} |" for b in report["bars"]]
    elif report["reference"]:
        lines += ["", "Nothing gated: measure CLIP score or FID, or state --gate lpips=... / psnr=..."]
    return "\n".join(lines) + "\n"
