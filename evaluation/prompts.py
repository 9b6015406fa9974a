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
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from kiln.artifacts import write_json_atomically
from kiln.dataset.prepare import cover
from kiln.errors import ConfigError
from kiln.evaluation import metrics

log = logging.getLogger("kiln.evaluation")

MAX_PROMPTS = 100_000
MAX_PROMPT_CHARS = 10_000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
ROW_KEYS = ("prompt", "negative_prompt", "seed")
MAX_SEED = 2 ** 63 - 2 ** 20  # a row's first seed; --seeds more follow it within int64


def _require(path: Path, option: str, file: bool, hint: str | None = None) -> None:
    """A path option that must be a file (or a folder): missing and the wrong kind say which."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{option} {path} does not exist", hint=hint)
    if file and not path.is_file():
        raise ConfigError(f"{option} {path} is a folder: expected a file", hint=hint)
    if not file and not path.is_dir():
        raise ConfigError(f"{option} {path} is a file: expected a folder", hint=hint)


@dataclass(frozen=True)
class PromptRow:
    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None  # the row's first seed; the file's rows without one start at 0


def read_prompts(path: Path) -> list[PromptRow]:
    """A prompt file: text (one prompt a line; blank lines and lines starting with # skipped) or JSON
    Lines (.jsonl: {"prompt": ..., "negative_prompt": ..., "seed": ...} a line)."""
    path = Path(path)
    _require(path, "--prompts", file=True, hint="give a text file (one prompt a line) or a .jsonl file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the first prompt
    except UnicodeDecodeError as e:
        raise ConfigError(f"--prompts {path} is not UTF-8 text: {e}", hint="save the prompt file as UTF-8") from None
    rows = []
    json_lines = path.suffix.lower() in (".jsonl", ".json")
    for number, line in enumerate(text.split("\n"), start=1):  # newlines only: U+2028 or a form feed is text
        line = line.removesuffix("\r")
        if not line.strip() or (not json_lines and line.lstrip().startswith("#")):
            continue
        where = f"--prompts {path}, line {number}"
        rows.append(_json_row(line, where) if json_lines else PromptRow(_prompt(line.strip(), where)))
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
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
        raise ConfigError(f"{where}: seed={seed!r} is invalid: expected a whole number in [0, {MAX_SEED}] "
                          "(room for the seeds that follow it)")
    return PromptRow(_prompt(row.get("prompt"), where), negative, seed)


@dataclass(frozen=True)
class Endpoint:
    label: str
    url: str
    model: str  # the served model (its public ensemble): txt2img for a single-model repository


def parse_endpoint(label: str, value: str, default_url: str | None = None) -> Endpoint:
    """HOST:PORT[/MODEL], or MODEL alone on `default_url`'s server. The label names this model's
    folder and files under --out: letters, digits, `_`, `.`, `-`."""
    from kiln.clients.client import PUBLIC_MODEL

    from kiln.pipeline.adapters import NAME  # a plain name: it names folders and files under --out

    if not NAME.fullmatch(label or ""):
        raise ConfigError(f"endpoint label {label!r} is invalid: expected letters, digits, _ . - (at most 64, not "
                          "starting with . or -)", hint="for example --endpoint int8=localhost:8000/sd15-int8")
    example = "for example localhost:8000 or localhost:8000/sd15-int8 (no scheme)"
    if "://" in value:
        raise ConfigError(f"endpoint {label}={value!r} is invalid: give HOST:PORT without a scheme", hint=example)
    if ":" in value.split("/", 1)[0]:
        url, _, model = value.partition("/")
        host, _, port = url.rpartition(":")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ConfigError(f"endpoint {label}={value!r} is invalid: expected HOST:PORT with a port in [1, 65535]", hint=example)
    else:  # a served model's name alone, on the first endpoint's server
        url, model = default_url, value.strip("/")
        if default_url is None or not model:
            raise ConfigError(f"endpoint {label}={value!r} is invalid: expected HOST:PORT[/MODEL]", hint=example)
    if "/" in model or any(c.isspace() for c in model):
        raise ConfigError(f"endpoint {label}={value!r} is invalid: model {model!r} is not a model name", hint=example)
    return Endpoint(label, url, model or PUBLIC_MODEL)


def check_endpoints(endpoints: list[Endpoint], protocol: str) -> None:
    """Every server answers and serves its model, before anything is drawn."""
    from kiln.clients.client import KilnClient
    from kiln.errors import ClientError

    for endpoint in endpoints:
        with KilnClient(endpoint.url, protocol, model=endpoint.model, timeout_s=30) as client:
            try:
                ready = client.model_ready()
            except ClientError as exc:
                raise ConfigError(f"endpoint {endpoint.label}: {exc}", hint=exc.hint) from None
            except Exception as exc:  # noqa: BLE001 - a port that speaks another protocol, say
                raise ConfigError(f"endpoint {endpoint.label}: {protocol}://{endpoint.url} does not answer as Triton's "
                                  f"{protocol} endpoint ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
                                  hint="the HTTP port for --protocol http (8000), the gRPC port for --protocol grpc (8001)") from None
        if not ready:
            raise ConfigError(f"endpoint {endpoint.label}: {protocol}://{endpoint.url} serves no ready model {endpoint.model!r}",
                              hint="kiln models lists the served models; a repository of several names each after its model")


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
        values, seen = asdict(cls()), set()
        for item in items:
            name, _, text = item.partition("=")
            if name in seen:
                raise ConfigError(f"--gate {item!r}: {name} is given twice", hint="give each metric once")
            seen.add(name)
            if name not in values:
                raise ConfigError(f"--gate {item!r}: unknown metric {name!r}", hint=f"one of {', '.join(values)}, e.g. --gate fid=0.05")
            if text.lower() in ("off", "none"):
                values[name] = None
                continue
            try:
                value = float(text) if re.fullmatch(r"[0-9.eE+-]+", text) else math.nan
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
                     "limit": need, "passed": candidate["clip_score"] >= need})
    if window.fid is not None and reference.get("fid") is not None:
        need = reference["fid"] * (1 + window.fid)
        bars.append({"bar": f"{label}: FID", "value": candidate["fid"], "need": f"<= {need:.3f}", "limit": need,
                     "passed": candidate["fid"] <= need})
    if window.lpips is not None and pair.get("lpips") is not None:
        bars.append({"bar": f"{label}: LPIPS to reference", "value": pair["lpips"], "need": f"<= {window.lpips}",
                     "limit": window.lpips, "passed": pair["lpips"] <= window.lpips})
    if window.psnr is not None:
        bars.append({"bar": f"{label}: PSNR to reference (dB)", "value": pair["psnr_db"], "need": f">= {window.psnr}",
                     "limit": window.psnr, "passed": pair["identical"] or pair["psnr_db"] >= window.psnr})
    return bars


# ---------------------------------------------------------------- images in and out

def reference_files(folder: Path, limit: int) -> list[Path]:
    """Up to `limit` image files of `folder` (sorted, sub-folders included, hidden files skipped), each
    opened once so that an unreadable one is named before anything is drawn."""
    folder = Path(folder)
    _require(folder, "--real", file=False, hint="give a folder of reference images (PNG, JPEG, WebP)")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))[:limit]
    if len(files) < 2:
        raise ConfigError(f"--real {folder} holds {len(files)} images: FID needs at least 2 (thousands for a stable figure)",
                          hint=f"PNG, JPEG or WebP files ({', '.join(IMAGE_SUFFIXES)})")
    for file in files:
        try:
            with Image.open(file) as image:
                image.size  # the header, read now
        except (OSError, Image.DecompressionBombError) as e:
            raise ConfigError(f"--real {file} is not a readable image: {e}", hint="remove it from the folder") from None
    return files


def _rgb8(image: Image.Image) -> Image.Image:
    """8-bit RGB, 16-bit greyscale scaled rather than clipped (PIL's convert clips it to white)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.int64)
        shift = 8 if array.max(initial=0) > 255 else 0
        return Image.fromarray((np.clip(array, 0, 65535) >> shift).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def reference_images(files: list[Path], size: tuple[int, int]) -> np.ndarray:
    """`files` centre-cropped to the aspect of `size` (height, width) and resized to it: FID compares
    like with like."""
    height, width = size
    out = np.empty((len(files), height, width, 3), np.uint8)
    for i, file in enumerate(files):
        try:
            with Image.open(file) as image:
                image = _rgb8(image)
        except (OSError, Image.DecompressionBombError) as e:
            raise ConfigError(f"--real {file} is not a readable image: {e}") from None
        out[i] = np.asarray(cover(image, width, height, Image.BICUBIC))
    return out


def draw(endpoint: Endpoint, protocol: str, rows: list[PromptRow], seeds: int, sampling: dict, out_dir: Path,
         shape: tuple | None = None) -> tuple[np.ndarray, list[str]]:
    """Every row x seeds through `endpoint`, saved as PNGs under out_dir/LABEL/; (images, prompts).
    `shape`: the size every image must have (the models before this one drew it), checked at the first."""
    from tqdm import tqdm

    from kiln.clients.client import KilnClient

    jobs = [(row, (row.seed or 0) + k) for row in rows for k in range(seeds)]
    folder = Path(out_dir) / endpoint.label
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    with KilnClient(endpoint.url, protocol, model=endpoint.model) as client:
        for i, (row, seed) in enumerate(tqdm(jobs, desc=f"generate {endpoint.label} ({endpoint.model} @ {endpoint.url})", unit="image")):
            image = client.generate(row.prompt, negative_prompt=row.negative_prompt, seed=seed, **sampling).images[0]
            if shape is not None and image.shape != shape:
                raise ConfigError(f"{endpoint.label} draws {image.shape[1]}x{image.shape[0]} images, the models before it "
                                  f"{shape[1]}x{shape[0]}: pairs and FID compare like with like",
                                  hint="pass --width and --height")
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

    def check(self, window: Window | None, images: int) -> list[Path] | None:
        """Refuse, before anything is drawn, what cannot be measured as asked; the reference files for FID."""
        if (self.real is None) != (self.inception is None):
            raise ConfigError("FID needs both --real DIR (reference images) and --inception-weights FILE",
                              hint=f"NVIDIA's TorchScript {metrics.INCEPTION_TORCHSCRIPT} or torch-fidelity's {metrics.INCEPTION_WEIGHTS}")
        if self.clip is not None:
            _require(self.clip, "--clip-model", file=False)
        for name, path in (("--inception-weights", self.inception), ("--lpips-weights", self.lpips)):
            if path is not None:
                _require(path, name, file=True)
        if self.lpips is not None and window is None:
            raise ConfigError("--lpips-weights measures each model against the reference: name it with --against",
                              hint="--against LABEL=HOST:PORT[/MODEL]")
        if self.real is not None and images < 2:
            raise ConfigError(f"FID needs at least 2 drawn images a model; the prompts and seeds give {images}",
                              hint="more prompts, or --seeds 2 or more")
        if window is not None:
            if window.lpips is not None and self.lpips is None:
                raise ConfigError("--gate lpips=... needs --lpips-weights FILE", hint=f"torchvision's {metrics.ALEXNET_WEIGHTS}")
            gated = [(window.clip_score, self.clip), (window.fid, self.inception), (window.lpips, self.lpips), (window.psnr, True)]
            if not any(limit is not None and measured is not None for limit, measured in gated):
                raise ConfigError("--against gates nothing: no gated metric can be measured",
                                  hint="give --clip-model DIR (CLIP score), --real DIR --inception-weights FILE (FID), or state "
                                  "--gate psnr=MIN_DB / --gate lpips=MAX (with --lpips-weights)")
        return reference_files(self.real, self.real_limit) if self.real is not None else None


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
    from kiln.evaluation.report import grid

    real_files = measures.check(window, len(rows) * seeds)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file: expected a folder for the report and images")
    sampling = {k: v for k, v in (sampling or {}).items() if v is not None}
    scorer = extractor = lpips_model = None
    if measures.clip is not None:  # loaded before drawing: a bad folder fails in seconds, not after the images
        from kiln.dataset.filters import ClipScorer

        scorer = ClipScorer(measures.clip)
    if measures.inception is not None:
        extractor = metrics.inception(measures.inception)
    if measures.lpips is not None:
        lpips_model = metrics.Lpips(measures.lpips)
    check_endpoints(endpoints, protocol)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out_dir} cannot be written: {e.strerror}") from None
    shutil.rmtree(out_dir / "images", ignore_errors=True)  # an earlier run's images and grids are not this run's
    for stale in [*out_dir.glob("grid-*.png"), out_dir / "report.json", out_dir / "report.md"]:
        stale.unlink(missing_ok=True)
    drawn, results, real, shape = {}, [], None, None
    for endpoint in endpoints:
        images, prompts = draw(endpoint, protocol, rows, seeds, sampling, out_dir / "images", shape)
        shape = images.shape[1:]
        drawn[endpoint.label] = images
        result = PromptModelResult(endpoint.label, endpoint.url, endpoint.model, len(images))
        if scorer is not None:
            result.clip_score = metrics.clip_score(images, prompts, scorer)
        if extractor is not None:
            if real is None:
                real = reference_images(real_files, images.shape[1:3])
            result.fid = metrics.fid(real, images, extractor)
            if not math.isfinite(result.fid):
                raise metrics.MetricError(f"FID of {endpoint.label} is {result.fid}: --inception-weights {measures.inception} "
                                          "gave features that are not finite", hint="check the Inception file")
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
