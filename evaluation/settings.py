"""`kiln eval --sweep`: the cost and the quality of sampler settings on one served model, side by
side: for each setting (scheduler, steps, guidance, its cutoff and interval), the seconds per image
through Triton, the UNet rows it runs, and the digit and colour accuracy of the glyph classifier on
the same prompts and seeds; with the model folder, diffusers' own pipeline at the first setting too.
The fastest setting whose accuracy stays within a stated window of the first is named."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from kiln.artifacts import write_json_atomically
from kiln.evaluation import metrics
from kiln.evaluation.report import EvalSpec, PromptSet, prompt_sets

log = logging.getLogger("kiln.evaluation")


@dataclass(frozen=True)
class Setting:
    name: str
    scheduler: str = "euler"
    steps: int = 20
    guidance_scale: float = 4.0
    guidance_cutoff: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0

    def request(self) -> dict:
        """The client's keyword arguments."""
        return {"scheduler": self.scheduler, "steps": self.steps, "guidance_scale": self.guidance_scale,
                "guidance_cutoff": self.guidance_cutoff, "guidance_start": self.guidance_start,
                "guidance_end": self.guidance_end}

    def diffusers_callbacks(self) -> dict:
        """diffusers_image's arguments that draw this setting's guidance cutoff and interval."""
        extra = {}
        if self.guidance_cutoff < 1.0:
            extra["guidance_cutoff"] = self.guidance_cutoff
        if (self.guidance_start, self.guidance_end) != (0.0, 1.0):
            extra["guidance_interval"] = (self.guidance_start, self.guidance_end)
        return extra

    def unet_rows(self) -> int:
        """UNet rows one image costs: two per guided step, one per other step."""
        from kiln.pipeline.denoise import guided_steps

        if self.guidance_scale <= 1.0:
            return self.steps
        return sum(2 if on else 1 for on in guided_steps(self.steps, self.guidance_cutoff,
                                                          (self.guidance_start, self.guidance_end)))


# The first is the reference (the demo's evaluated default); the others do less work per image: fewer
# steps with the multistep solvers, guidance stopped early, guidance in an interval, and combinations.
DEMO_SETTINGS: tuple[Setting, ...] = (
    Setting("euler 20 (the reference)"),
    Setting("euler 12", steps=12),
    Setting("dpmpp_2m 12", "dpmpp_2m", 12),
    Setting("dpmpp_2m 10", "dpmpp_2m", 10),
    Setting("dpmpp_2m 8", "dpmpp_2m", 8),
    Setting("unipc 10", "unipc", 10),
    Setting("unipc 8", "unipc", 8),
    Setting("euler 20, cutoff 0.8", guidance_cutoff=0.8),
    Setting("euler 20, cutoff 0.5", guidance_cutoff=0.5),
    Setting("euler 20, interval [0.2, 1)", guidance_start=0.2),
    Setting("euler 20, interval [0, 0.7)", guidance_end=0.7),
    Setting("dpmpp_2m 10, interval [0, 0.7)", "dpmpp_2m", 10, guidance_end=0.7),
    Setting("dpmpp_2m 10, interval [0.2, 1)", "dpmpp_2m", 10, guidance_start=0.2),
    Setting("unipc 8, interval [0, 0.7)", "unipc", 8, guidance_end=0.7),
)


@dataclass
class SettingResult:
    setting: Setting
    runtime: str  # "triton" or "diffusers"
    seconds_per_image: dict  # median, p90, min, max over the images
    unet_rows: int
    accuracy: dict = field(default_factory=dict)  # digit, colour, both over every prompt
    digit_by_colour: dict = field(default_factory=dict)
    digit_by_background: dict = field(default_factory=dict)


def _summary(seconds: list[float]) -> dict:
    a = np.asarray(seconds)
    return {"median": float(np.median(a)), "p90": float(np.percentile(a, 90)), "min": float(a.min()),
            "max": float(a.max()), "total": float(a.sum()), "images": int(a.size)}


def _judge(result: SettingResult, images: np.ndarray, sets: list[PromptSet], classifier) -> SettingResult:
    glyphs = [g for s in sets for g in s.glyphs]
    predictions = metrics.predict(images, classifier)
    result.accuracy = metrics.prompt_accuracy(predictions, [g.digit for g in glyphs], [g.colour for g in glyphs])
    result.digit_by_colour = metrics.digit_accuracy_by(predictions, [g.digit for g in glyphs], [g.colour for g in glyphs])
    result.digit_by_background = metrics.digit_accuracy_by(predictions, [g.digit for g in glyphs],
                                                           [g.background for g in glyphs])
    return result


def served(url: str, protocol: str, setting: Setting, sets: list[PromptSet], classifier) -> SettingResult:
    """Every prompt through the endpoint one at a time, each request timed at the client."""
    from tqdm import tqdm

    from kiln.clients.client import KilnClient

    images, seconds = [], []
    prompts = [(g, seed) for s in sets for g, seed in zip(s.glyphs, s.seeds)]
    with KilnClient(url, protocol) as client:
        client.generate(prompts[0][0].caption, seed=prompts[0][1], **setting.request())  # warm-up, not timed
        for glyph, seed in tqdm(prompts, desc=f"{setting.name} @ {url}", unit="image"):
            began = time.perf_counter()
            images.append(client.generate(glyph.caption, seed=seed, **setting.request()).images[0])
            seconds.append(time.perf_counter() - began)
    result = SettingResult(setting, "triton", _summary(seconds), setting.unet_rows())
    return _judge(result, np.stack(images), sets, classifier)


def diffusers_eager(model_dir: Path, setting: Setting, sets: list[PromptSet], classifier) -> SettingResult:
    """diffusers' own pipeline in this process (PyTorch eager, float32) on the same prompts and seeds."""
    import torch
    from tqdm import tqdm

    from kiln.pipeline.reference import diffusers_image, load_diffusers_pipeline

    pipe = load_diffusers_pipeline(model_dir)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    extra = setting.diffusers_callbacks()

    def draw(caption: str, seed: int) -> np.ndarray:
        return diffusers_image(pipe, setting.scheduler, caption, "", seed, setting.steps, setting.guidance_scale,
                               size, size, **extra)[0]

    images, seconds = [], []
    prompts = [(g, seed) for s in sets for g, seed in zip(s.glyphs, s.seeds)]
    with torch.inference_mode():
        draw(prompts[0][0].caption, prompts[0][1])  # warm-up
        for glyph, seed in tqdm(prompts, desc=f"{setting.name} (diffusers)", unit="image"):
            began = time.perf_counter()
            images.append(draw(glyph.caption, seed))
            seconds.append(time.perf_counter() - began)
    result = SettingResult(setting, "diffusers", _summary(seconds), setting.unet_rows())
    return _judge(result, np.stack(images), sets, classifier)


@dataclass(frozen=True)
class Window:
    """How much accuracy a cheaper setting may lose against the reference (fractions: 0.01 = 1 point)."""

    digit: float = 0.01
    colour: float = 0.01


def choose(results: list[SettingResult], window: Window) -> dict:
    """The fastest served setting whose digit and colour accuracy stay within `window` of the first's."""
    reference = results[0]
    within = [r for r in results if r.runtime == "triton"
              and r.accuracy["digit"] >= reference.accuracy["digit"] - window.digit
              and r.accuracy["colour"] >= reference.accuracy["colour"] - window.colour]
    best = min(within, key=lambda r: r.seconds_per_image["median"])
    return {"setting": best.setting.name, "speedup_vs_reference": reference.seconds_per_image["median"]
            / best.seconds_per_image["median"], "digit_change": best.accuracy["digit"] - reference.accuracy["digit"],
            "colour_change": best.accuracy["colour"] - reference.accuracy["colour"], "window": asdict(window)}


def sweep(url: str, protocol: str, classifier_dir: Path, out_dir: Path, settings: tuple[Setting, ...] = DEMO_SETTINGS,
          spec: EvalSpec = EvalSpec(), model_dir: Path | None = None, window: Window = Window()) -> dict:
    """Each setting through the endpoint; with `model_dir`, diffusers eager at the first setting (the
    runtime and the settings a user starts from). Writes sweep.json and sweep.md to `out_dir`."""
    from kiln.evaluation.classifier import load_classifier

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    classifier = load_classifier(classifier_dir)
    sets = prompt_sets(spec)
    results = [served(url, protocol, s, sets, classifier) for s in settings]
    chosen = choose(results, window)
    if model_dir is not None:
        results.append(diffusers_eager(model_dir, settings[0], sets, classifier))
        eager = results[-1]
        fastest = next(r for r in results if r.setting.name == chosen["setting"] and r.runtime == "triton")
        chosen["speedup_vs_diffusers_eager"] = eager.seconds_per_image["median"] / fastest.seconds_per_image["median"]
        chosen["digit_change_vs_diffusers_eager"] = fastest.accuracy["digit"] - eager.accuracy["digit"]
        chosen["colour_change_vs_diffusers_eager"] = fastest.accuracy["colour"] - eager.accuracy["colour"]
    report = {"spec": asdict(spec), "prompts": sum(len(s.glyphs) for s in sets), "endpoint": url,
              "results": [asdict(r) for r in results], "chosen": chosen}
    write_json_atomically(out_dir / "sweep.json", report)
    (out_dir / "sweep.md").write_text(to_markdown(report))
    return report


def to_markdown(report: dict) -> str:
    rows = report["results"]
    reference = rows[0]["seconds_per_image"]["median"]
    lines = [f"{report['prompts']} prompts x setting, one request at a time, seconds per image at the client "
             "(median, p90); accuracy by the glyph classifier over every prompt", "",
             "| setting | runtime | UNet rows/image | s/image (median) | p90 | speed-up | digit acc. | colour acc. |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["seconds_per_image"]
        lines.append(f"| {r['setting']['name']} | {r['runtime']} | {r['unet_rows']} | {s['median']:.3f} | {s['p90']:.3f} | "
                     f"{reference / s['median']:.2f}x | {r['accuracy']['digit']:.3f} | {r['accuracy']['colour']:.3f} |")
    c = report["chosen"]
    lines += ["", f"- chosen: **{c['setting']}**, {c['speedup_vs_reference']:.2f}x the first setting through Triton, "
              f"digit accuracy {100 * c['digit_change']:+.1f} points, colour {100 * c['colour_change']:+.1f} points "
              f"(window: {100 * c['window']['digit']:.0f} point digit, {100 * c['window']['colour']:.0f} point colour)"]
    if "speedup_vs_diffusers_eager" in c:
        lines.append(f"- against diffusers eager at the first setting: {c['speedup_vs_diffusers_eager']:.2f}x, digit "
                     f"{100 * c['digit_change_vs_diffusers_eager']:+.1f} points, colour "
                     f"{100 * c['colour_change_vs_diffusers_eager']:+.1f} points")
    return "\n".join(lines) + "\n"


def parse_setting(text: str) -> Setting:
    """NAME=scheduler:steps[:guidance[:cutoff[:start[:end]]]] (kiln eval --setting)."""
    from kiln.errors import KilnError

    name, _, values = text.partition("=")
    parts = values.split(":")
    fields = ["scheduler", "steps", "guidance_scale", "guidance_cutoff", "guidance_start", "guidance_end"]
    if not name or not values or len(parts) > len(fields):
        raise KilnError(f"--setting {text!r}: expected NAME=scheduler:steps[:guidance[:cutoff[:start[:end]]]]",
                        hint="for example --setting fast=dpmpp_2m:10:4:1:0:0.7")
    try:
        kinds = [str, int, float, float, float, float]
        setting = replace(Setting(name), **{f: k(p) for f, k, p in zip(fields, kinds, parts)})
    except ValueError as exc:
        raise KilnError(f"--setting {text!r}: {exc}", hint="steps is an integer, the others numbers") from None
    import math

    s, problems = setting, []
    if s.steps < 1:
        problems.append(f"steps {s.steps}: at least 1")
    if not (math.isfinite(s.guidance_scale) and s.guidance_scale >= 0):
        problems.append(f"guidance {s.guidance_scale}: a finite number >= 0")
    problems += [f"{f} {getattr(s, f)}: in [0, 1]" for f in ("guidance_cutoff", "guidance_start", "guidance_end")
                 if not 0.0 <= getattr(s, f) <= 1.0]
    if s.guidance_start >= s.guidance_end:
        problems.append(f"guidance start {s.guidance_start} >= end {s.guidance_end}")
    if problems:
        raise KilnError(f"--setting {text!r}: {'; '.join(problems)}", hint="for example --setting fast=dpmpp_2m:10:4:1:0:0.7")
    return setting
