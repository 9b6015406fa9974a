"""`kiln eval`: generate a fixed prompt set through served endpoints, measure each, write a report
(JSON, a markdown table, sample grids per prompt set, and a before/after grid)."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from kiln.dataset.glyphs import BACKGROUNDS, COLOURS, DIGITS, SCATTERED, Glyph
from kiln.evaluation import metrics
from kiln.evaluation.classifier import load_classifier
from kiln.artifacts import write_json_atomically

log = logging.getLogger("kiln.evaluation")


@dataclass(frozen=True)
class EvalSpec:
    seeds: int = 8
    # The demo's sampler, chosen by `kiln eval --sweep --demo`: the fastest setting within 1 point of the digit
    # and colour accuracy of 20 Euler steps in both sweeps (benchmarks/results/demo-settings-sweep, 160 prompts:
    # 1.80x through Triton; demo-settings-confirm, 480 prompts on another host's demo: 1.42x, where 8 steps
    # lost 1.04 points of colour).
    steps: int = 10
    guidance_scale: float = 4.0  # the demo model reads digits best here (160 prompts: 4 -> 92.5 %, 5 -> 90 %, 7.5 -> 84 %)
    scheduler: str = "dpmpp_2m"
    guidance_cutoff: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow")  # the prompt set for digit accuracy
    focus_colour: str | None = "purple"  # what the fine-tune taught: its own prompt set
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)


@dataclass
class PromptSet:
    name: str
    glyphs: list[Glyph]
    seeds: list[int]


def prompt_sets(spec: EvalSpec) -> list[PromptSet]:
    """10 digits x `seeds` seeds per set; colours and backgrounds cycle so every combination shows up."""
    sets = [("digits", spec.colours)] + ([("focus", (spec.focus_colour,))] if spec.focus_colour else [])
    out = []
    for name, colours in sets:
        glyphs, seeds = [], []
        for seed in range(spec.seeds):
            for digit in DIGITS:
                k = seed * len(DIGITS) + digit
                glyphs.append(Glyph(digit, colours[k % len(colours)], spec.backgrounds[(k // len(colours)) % len(spec.backgrounds)]))
                seeds.append(seed)
        out.append(PromptSet(name, glyphs, seeds))
    return out


@dataclass
class ControlSet:
    """Prompts each with a control image: the silhouette of its own digit, drawn at a place and size
    of its own (SCATTERED), as PNG bytes and as a boolean mask."""

    glyphs: list[Glyph]
    seeds: list[int]
    images: list[bytes]
    masks: np.ndarray  # (N, H, W) bool


CONTROL_SEED = 1234  # control silhouettes held out of the ControlNet's training renders (their seeds are small)


def control_set(spec: EvalSpec, size: int = 32, seed: int = CONTROL_SEED, colours: tuple[str, ...] = tuple(COLOURS)) -> ControlSet:
    """10 digits x `spec.seeds`, every colour (the taught one too) and background cycling."""
    import io

    from kiln.dataset.glyphs import render_with_mask

    rng = np.random.default_rng(seed)
    glyphs, seeds, images, masks = [], [], [], []
    for s in range(spec.seeds):
        for digit in DIGITS:
            k = s * len(DIGITS) + digit
            glyph = Glyph(digit, colours[k % len(colours)], spec.backgrounds[(k // len(colours)) % len(spec.backgrounds)])
            _, silhouette = render_with_mask(glyph, size, rng, SCATTERED)
            buffer = io.BytesIO()
            silhouette.save(buffer, "PNG")
            glyphs.append(glyph)
            seeds.append(s)
            images.append(buffer.getvalue())
            masks.append(np.asarray(silhouette.convert("L")) > 127)
    return ControlSet(glyphs, seeds, images, np.stack(masks))


def generate(url: str, protocol: str, prompts: PromptSet | ControlSet, spec: EvalSpec, controlnet: str | None = None,
             name: str | None = None) -> np.ndarray:
    """One image per prompt and seed; with `controlnet`, each drawn with its control image (a ControlSet)."""
    from tqdm import tqdm

    from kiln.clients.client import KilnClient

    images = []
    controls = prompts.images if controlnet else [None] * len(prompts.glyphs)
    with KilnClient(url, protocol) as client:
        for glyph, seed, control in tqdm(list(zip(prompts.glyphs, prompts.seeds, controls)),
                                         desc=f"generate {name or prompts.name} @ {url}", unit="image"):
            extra = {"controlnet": controlnet, "control_image": control} if controlnet else {}
            images.append(client.generate(glyph.caption, seed=seed, **sampling(spec), **extra).images[0])
    return np.stack(images)


def sampling(spec: EvalSpec) -> dict:
    """The client's sampler arguments for `spec`."""
    return {"steps": spec.steps, "guidance_scale": spec.guidance_scale, "scheduler": spec.scheduler,
            "guidance_cutoff": spec.guidance_cutoff, "guidance_start": spec.guidance_start, "guidance_end": spec.guidance_end}


def _resized(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A control mask at the drawn image's size (the server resizes control images to the request's)."""
    if mask.shape == tuple(shape):
        return mask
    image = Image.fromarray(mask.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.LANCZOS)
    return np.asarray(image) > 127


def evaluate_control(url: str, protocol: str, controlnet: str, classifier, spec: EvalSpec, out_dir: Path) -> dict:
    """How well the served digits follow their control images: the mean intersection over union of each
    drawn digit's mask (kiln.dataset.control.foreground) with its control silhouette, with and without
    the ControlNet on the same prompts and seeds, and whether digit and colour still follow the prompt."""
    import io

    from kiln.dataset.control import foreground, iou

    prompts = control_set(spec)
    asked = [g.colour for g in prompts.glyphs]
    result = {"controlnet": controlnet, "prompts": len(prompts.glyphs)}
    for label, name in (("controlled", controlnet), ("uncontrolled", None)):
        images = generate(url, protocol, prompts, spec, name, name=f"control ({label})")
        ious = np.array([iou(foreground(Image.fromarray(image)), _resized(mask, image.shape[:2]))
                         for image, mask in zip(images, prompts.masks)])
        predictions = metrics.predict(images, classifier)
        result[label] = {"iou": float(ious.mean()), "iou_p10": float(np.percentile(ious, 10)),
                         **metrics.prompt_accuracy(predictions, [g.digit for g in prompts.glyphs], asked),
                         "colour_by_colour": {c: float(np.mean([p.colour == c for p, a in zip(predictions, asked) if a == c]))
                                              for c in dict.fromkeys(asked)}}
        if label == "controlled":
            side = images.shape[2], images.shape[1]
            controls = np.stack([np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize(side, Image.NEAREST))
                                 for data in prompts.images[: len(DIGITS)]])
            path = Path(out_dir) / "grid-control.png"
            grid(np.concatenate([controls, images[: len(DIGITS)]]), len(DIGITS)).save(path)
            result["grid"] = str(path)
    return result


def grid(images: np.ndarray, columns: int, scale: int = 3) -> Image.Image:
    """Images in rows of `columns`, enlarged without smoothing so pixels stay visible."""
    n, h, w, _ = images.shape
    rows = (n + columns - 1) // columns
    canvas = np.full((rows * (h + 2), columns * (w + 2), 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        canvas[r * (h + 2) + 1 : r * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = image
    return Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST)


@dataclass
class ModelResult:
    label: str
    url: str
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    digit_by_colour: dict[str, float] = field(default_factory=dict)  # every prompt set together
    digit_by_background: dict[str, float] = field(default_factory=dict)
    fid: float | None = None
    kid: tuple[float, float] | None = None
    inception_score: tuple[float, float] | None = None
    clip_score: float | None = None
    grids: dict[str, str] = field(default_factory=dict)


def real_images(folder: Path, limit: int = 400) -> np.ndarray:
    rows = [json.loads(line) for line in (Path(folder) / "metadata.jsonl").read_text().splitlines()][:limit]
    return np.stack([np.asarray(Image.open(Path(folder) / r["file_name"]).convert("RGB")) for r in rows])


def evaluate(endpoints: dict[str, str], protocol: str, classifier_dir: Path, real_dir: Path, out_dir: Path,
             spec: EvalSpec = EvalSpec(), clip_model: Path | None = None, inception_weights: Path | None = None,
             bars: Callable[[dict], list[dict]] | None = None, control: tuple[str, str] | None = None) -> dict:
    """Measure every endpoint on the same prompts and seeds; the first is the reference for LPIPS.
    `bars` turns the report into quality bars ({bar, value, need, passed}), written with it. `control`:
    (endpoint label, ControlNet name) whose control-following evaluate_control measures too."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    classifier = load_classifier(classifier_dir)
    extractor = metrics.feature_extractor(classifier, inception_weights)
    real = real_images(real_dir)
    sets = prompt_sets(spec)
    results, drawn = [], {}
    for label, url in endpoints.items():
        result = ModelResult(label, url)
        judged: list = []
        for prompts in sets:
            images = generate(url, protocol, prompts, spec)
            drawn[(label, prompts.name)] = images
            predictions = metrics.predict(images, classifier)
            result.accuracy[prompts.name] = metrics.prompt_accuracy(
                predictions, [g.digit for g in prompts.glyphs], [g.colour for g in prompts.glyphs])
            judged += zip(predictions, prompts.glyphs)
            path = out_dir / f"grid-{label}-{prompts.name}.png"
            grid(images, len(DIGITS)).save(path)
            result.grids[prompts.name] = str(path)
        predictions, glyphs = [p for p, _ in judged], [g for _, g in judged]
        result.digit_by_colour = metrics.digit_accuracy_by(predictions, [g.digit for g in glyphs], [g.colour for g in glyphs])
        result.digit_by_background = metrics.digit_accuracy_by(predictions, [g.digit for g in glyphs],
                                                               [g.background for g in glyphs])
        digits = drawn[(label, "digits")]
        result.fid = metrics.fid(real, digits, extractor)
        result.kid = metrics.kid(real, digits, extractor)
        result.inception_score = metrics.inception_score(digits, classifier)
        if clip_model is not None:
            result.clip_score = metrics.clip_score(digits, [g.caption for g in sets[0].glyphs], clip_model)
        results.append(result)
        log.info("%s: digit accuracy %.3f, FID %.2f", label, result.accuracy["digits"]["digit"], result.fid)
    labels = list(endpoints)
    lpips = {}
    for other in labels[1:]:
        for prompts in sets:
            lpips[f"{labels[0]} vs {other} ({prompts.name})"] = float(
                metrics.glyph_lpips(drawn[(labels[0], prompts.name)], drawn[(other, prompts.name)], classifier).mean())
    if len(labels) > 1 and spec.focus_colour:
        pairs = np.concatenate([drawn[(label, "focus")][: len(DIGITS)] for label in labels])
        grid(pairs, len(DIGITS)).save(out_dir / "before-after-focus.png")
    report = {"spec": asdict(spec), "real_images": len(real), "results": [asdict(r) for r in results], "lpips": lpips,
              "feature_extractor": "inception" if inception_weights else "glyph classifier"}
    if control is not None:
        label, controlnet = control
        report["control"] = {"label": label, **evaluate_control(endpoints[label], protocol, controlnet, classifier, spec,
                                                                out_dir)}
    if bars is not None:
        report["bars"] = bars(report)
    write_json_atomically(out_dir / "report.json", report)
    (out_dir / "report.md").write_text(to_markdown(report))
    return report


def to_markdown(report: dict) -> str:
    lines = ["| model | digit acc. | colour acc. | focus colour acc. | FID | KID | IS | CLIP score |",
             "|---|---|---|---|---|---|---|---|"]
    def number(value, digits):
        return "-" if value is None else f"{value:.{digits}f}"

    for r in report["results"]:
        digits = r["accuracy"]["digits"]
        focus = r["accuracy"].get("focus", {}).get("colour")
        lines.append(f"| {r['label']} | {digits['digit']:.3f} | {digits['colour']:.3f} | {number(focus, 3)} | "
                     f"{r['fid']:.2f} | {r['kid'][0]:.4f} | {r['inception_score'][0]:.2f} | {number(r['clip_score'], 2)} |")
    colours = list(dict.fromkeys(c for r in report["results"] for c in r.get("digit_by_colour", {})))
    backgrounds = list(dict.fromkeys(b for r in report["results"] for b in r.get("digit_by_background", {})))
    if colours:
        lines += ["", "Digit accuracy per colour and per background (every prompt set):", "",
                  "| model | " + " | ".join(colours + [f"on {b}" for b in backgrounds]) + " |",
                  "|---|" + "---|" * (len(colours) + len(backgrounds))]
        for r in report["results"]:
            values = [r["digit_by_colour"].get(c) for c in colours] + [r["digit_by_background"].get(b) for b in backgrounds]
            lines.append(f"| {r['label']} | " + " | ".join(number(v, 3) for v in values) + " |")
    lines += ["", f"Features for FID/KID/IS: {report['feature_extractor']}; real images: {report['real_images']}.", ""]
    lines += [f"- unweighted LPIPS-form distance (glyph-classifier features) {k}: {v:.4f}" for k, v in report["lpips"].items()]
    control = report.get("control")
    if control:
        lines += ["", f"Control following ({control['label']} with ControlNet {control['controlnet']}, {control['prompts']} "
                  "prompts, each with its digit's silhouette at a place and size of its own; IoU: drawn digit's mask "
                  "against the silhouette):", "",
                  "| requests | mean IoU | IoU 10th percentile | digit acc. | colour acc. |", "|---|---|---|---|---|"]
        for label in ("controlled", "uncontrolled"):
            row = control[label]
            lines.append(f"| {label} | {row['iou']:.3f} | {row['iou_p10']:.3f} | {row['digit']:.3f} | {row['colour']:.3f} |")
    if report.get("bars"):
        lines += ["", "| quality bar | measured | needed | |", "|---|---|---|---|"]
        lines += [f"| {b['bar']} | {b['value']:.3f} | {b['need']} | {'pass' if b['passed'] else 'FAIL'} |"
                  for b in report["bars"]]
    return "\n".join(lines) + "\n"
