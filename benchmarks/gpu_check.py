"""`make gpu-check`: Kiln's denoising loop against diffusers' own pipeline on one GPU, full-size SD 1.5
(512x512, 50 steps) and SDXL base (1024x1024, 30 steps), fp16 with SDPA attention, batch 1 and 4, in
one run under a time budget (default 8 minutes), one JSON report.

Each family's architecture is built from its configs with random weights, in memory and on the GPU
(kiln.models.benchmark): nothing is downloaded or written but the configs and tokenizers Kiln reads.
Both sides run the same weights: diffusers' StableDiffusion(XL)Pipeline in fp16 as built, and
kiln.pipeline.denoise.generate over the product's TorchRunner wrapping that pipeline's UNet and text
encoders (fp16) and its own fp32 copy of the VAE (the spec keeps the VAE in fp32), with the same
scheduler, steps, guidance and seeds. Per family and batch: the UNet's time per step (timed inside
the generations), end-to-end seconds, images/s, peak GPU memory, and how far Kiln's images are from
diffusers' (1/255 units). Then, when the budget allows, runtime LoRA adapters. The models in memory
are gpu_check_models', the ONNX-file backends gpu_check_onnx's, the LoRA check gpu_check_lora's.

TensorRT and ONNX Runtime's CUDA provider are timed when importable (`make gpu-setup`), through the
same loop over their engines; otherwise they are reported as skipped, with why, and nothing is
exported (an ONNX export of full-size SDXL alone takes minutes).

The budget: each case first estimates its cost (from what was measured so far, else from the
family's priors) and is skipped, with the numbers, when it would not fit; the report is rewritten
after every case, so a run stopped from outside still leaves one.

Runs without `make setup` from a copy of the repository, on a host's own torch (no network):
    python3 benchmarks/gpu_check.py OUT_DIR           # or: timeout 540 benchmarks/gpu_check.sh
What such a host lacks (diffusers; CLIP's vocabulary file, from the open-clip-torch wheel) is named
in the report and the exit status is 3; benchmarks/gpu_check.sh unpacks carried wheels first.
`--tiny` runs the same code on the tiny models (the CPU, fp32), as the test suite does.

Published reference for the same shape: TensorRT about 0.82-0.86 s for 50 steps at 512x512 fp16 on
an A100 (NVIDIA's TensorRT demo).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # everything else is imported where used: a bare host learns what it lacks first
    from kiln.benchmarks.gpu_check_models import LoadedFamily

REFERENCE = "TensorRT 0.82-0.86 s for 50 steps, 512x512, fp16, A100 (NVIDIA TensorRT demo)"
VERSIONS = ("torch", "diffusers", "transformers", "tokenizers", "safetensors", "accelerate", "numpy",
            "onnxruntime", "onnxruntime-gpu", "tensorrt", "nvidia-modelopt")
# Kiln's images against diffusers', 1/255 units. fp32: the same computation step for step (as
# tests/test_pipeline_core.py asserts); fp16: Kiln keeps latents and the VAE in fp32 where diffusers'
# fp16 pipeline keeps them in fp16 (SD 1.5's VAE; SDXL's upcasts), a first estimate until GPU runs say more.
PARITY = {"fp32": {"max_abs": 1}, "fp16": {"mean_abs": 3.0}}
# (module, distribution) the check imports; what a bare GPU host lacks is named, with the wheel to carry
REQUIRED = (("torch", "torch"), ("numpy", "numpy"), ("diffusers", "diffusers"), ("transformers", "transformers"),
            ("tokenizers", "tokenizers"), ("safetensors", "safetensors"), ("PIL", "pillow"))
CARRY = {"diffusers": "diffusers==0.42.1", "open-clip-torch": "open-clip-torch==3.3.0"}  # pyproject's, make setup's


@dataclass(frozen=True)
class FamilyCheck:
    """One architecture measured: what builds it with random weights, at what size and steps, and
    generous costs on the target GPU for the budget before anything is measured."""

    name: str
    model: str
    size: int
    steps: int
    builder: tuple[str, str, dict]  # module, function, keyword arguments
    build_s: float
    step_s: float  # seconds per image per guided step
    onnx_s: float  # ONNX export, engines and their timings

    def build(self):
        module, function, kwargs = self.builder
        return getattr(importlib.import_module(module), function)(**kwargs)


FULL = {
    "sd15": FamilyCheck("sd15", "SD 1.5 architecture (UNet 860M parameters), random weights", 512, 50,
                        ("kiln.models.benchmark", "build_sd15_pipeline", {"width": "full"}), 60, 0.03, 600),
    "sdxl": FamilyCheck("sdxl", "SDXL base architecture (UNet 2.6B parameters), random weights", 1024, 30,
                        ("kiln.models.benchmark", "build_sdxl_pipeline", {"width": "full"}), 120, 0.12, 1800),
}
TINY = {
    "sd15": FamilyCheck("sd15", "tiny SD 1.x, random weights", 64, 2,
                        ("kiln.models.tiny", "build_tiny_pipeline", {}), 10, 0.5, 120),
    "sdxl": FamilyCheck("sdxl", "tiny SDXL, random weights", 64, 2,
                        ("kiln.models.tiny", "build_tiny_sdxl_pipeline", {}), 10, 0.5, 120),
}


class Budget:
    """Wall-clock seconds for the whole check; a case that would not fit is skipped, not started."""

    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def refuse(self, need: float) -> str | None:
        """None when `need` seconds fit in what is left, else why not (for the report)."""
        left = self.seconds - self.elapsed()
        if need <= left:
            return None
        return (f"out of time: needs about {need:.0f} s, {max(left, 0):.0f} s of the {self.seconds:.0f} s budget "
                "left (--budget raises it)")


def missing_requirements() -> dict[str, str]:
    """What this host lacks to run the check, by distribution, each with what to carry; found
    without importing anything heavy."""
    from kiln.errors import ModelError
    from kiln.models.tokenizer import find_bpe_file  # the standard library only

    missing = {dist: f"no module {module}" for module, dist in REQUIRED if importlib.util.find_spec(module) is None}
    try:
        find_bpe_file()
    except ModelError as exc:
        missing["open-clip-torch"] = f"{exc} (only its vocabulary file is read; it is not imported)"
    return {dist: f"{why}: carry {CARRY.get(dist, dist)}" for dist, why in missing.items()}


def _failure(exc: Exception) -> str:
    """One line for the report: the error, its hint, and where it was raised."""
    hint = getattr(exc, "hint", None)
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    return (f"{type(exc).__name__}: {exc}" + (f" ({hint})" if hint else "")
            + (f" [{Path(where.filename).name}:{where.lineno}]" if where else ""))


def _versions() -> dict:
    import torch

    found = {"python": platform.python_version(), "torch_cuda": torch.version.cuda,
             "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None}
    for name in VERSIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


# ------------------------------------------------------------------ measuring one case


class UNetClock:
    """Times every call of the UNet inside the generations timed (CUDA events on a GPU, so the loop
    is never synchronised per step) and records the batch it saw."""

    def __init__(self, unet, cuda: bool):
        self.unet, self.cuda, self.calls, self.batches = unet, cuda, [], set()

    def _before(self, module, args, kwargs):
        import torch

        sample = args[0] if args else kwargs["sample"]
        self.batches.add(int(sample.shape[0]))
        start = torch.cuda.Event(enable_timing=True) if self.cuda else time.perf_counter()
        if self.cuda:
            start.record()
        self.calls.append([start, None])

    def _after(self, module, args, kwargs, output):
        import torch

        end = torch.cuda.Event(enable_timing=True) if self.cuda else time.perf_counter()
        if self.cuda:
            end.record()
        self.calls[-1][1] = end

    def __enter__(self):
        self.hooks = [self.unet.register_forward_pre_hook(self._before, with_kwargs=True),
                      self.unet.register_forward_hook(self._after, with_kwargs=True)]
        return self

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()

    def median_ms(self) -> float:
        import statistics

        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return statistics.median(a.elapsed_time(b) for a, b in self.calls)
        return statistics.median(1000 * (b - a) for a, b in self.calls)


def measure_side(draw, model: LoadedFamily, batch: int, runs: int):
    """One warm-up generation (its images kept for parity), then `runs` timed ones -> (images, timings)."""
    import torch

    from kiln.benchmarks.timing import timed

    cuda = model.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    images = draw()
    with UNetClock(model.pipe.unet, cuda) as clock:
        whole = timed(draw, runs, warmup=0, sync=torch.cuda.synchronize if cuda else None)
    return images, {"unet_step_ms": round(clock.median_ms(), 3), "unet_calls_per_run": len(clock.calls) / runs,
                    "unet_batch": sorted(clock.batches), "end_to_end_s": round(whole.median_ms / 1000, 4),
                    "images_per_s": round(batch * 1000 / whole.median_ms, 4), "spread": round(whole.spread, 3),
                    "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None}


def compare_images(ours, theirs, precision: str) -> dict:
    """Kiln's uint8 images against diffusers', in 1/255 units, with the stated tolerance."""
    import numpy as np

    if ours.shape != theirs.shape:
        return {"shapes": [list(ours.shape), list(theirs.shape)], "within": False}
    diff = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
    found = {"max_abs": int(diff.max()), "mean_abs": round(float(diff.mean()), 4),
             "p99_abs": float(np.percentile(diff, 99)), "over_8": round(float((diff > 8).mean()), 6)}
    tolerance = PARITY[precision]
    return {**found, "tolerance": tolerance, "within": all(found[k] <= v for k, v in tolerance.items())}


def measure_case(model: LoadedFamily, batch: int, runs: int) -> dict:
    """Kiln's loop and diffusers' pipeline, `batch` images (seeds SEED...), timed and compared."""
    from kiln.benchmarks.gpu_check_models import GUIDANCE, PROMPT, SEED
    from kiln.pipeline.reference import diffusers_image

    check, generation = model.check, model.generation
    seeds = list(range(SEED, SEED + batch))
    ours, kiln = measure_side(lambda: generation(model.engines, seeds), model, batch, runs)
    theirs, diffusers = measure_side(lambda: diffusers_image(model.pipe, generation.scheduler, PROMPT, "", SEED,
                                                             check.steps, GUIDANCE, check.size, check.size,
                                                             num_images=batch), model, batch, runs)
    precision = "fp16" if str(model.dtype).endswith("float16") else "fp32"
    return {"batch": batch, "kiln": kiln, "diffusers": diffusers, "parity_255": compare_images(ours, theirs, precision),
            "kiln_time_vs_diffusers": round(kiln["end_to_end_s"] / diffusers["end_to_end_s"], 3)}


def case_estimate(check: FamilyCheck, measured: dict, batch: int, runs: int) -> float:
    """Seconds for both sides' warm-up and timed generations: scaled from the largest batch measured
    (linearly, which overestimates), else from the family's prior."""
    if measured:
        done = max(measured)
        per_image = sum(measured[done][s]["end_to_end_s"] for s in ("kiln", "diffusers")) / 2 / done
    else:
        per_image = check.step_s * check.steps
    return 1.2 * (1 + runs) * 2 * per_image * batch



# ------------------------------------------------------------------ the check


def _write(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".gpu_check.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out / "gpu_check.json")  # whole after every case, even if the run is stopped from outside


@dataclass(frozen=True)
class Settings:
    """What every family's cases share."""

    work: Path  # scratch: configs, ONNX, LoRA files
    batches: tuple[int, ...]
    runs: int
    device: str
    dtype: object  # torch.float16 on a GPU, else torch.float32
    scheduler: str
    onnx: tuple[str, ...]  # the ONNX-file backends to time
    lora: bool


def attempt(skipped: dict, name: str, budget: Budget, need: float, step):
    """`step()` when `need` seconds fit in the budget, else None and `name` skipped with the numbers;
    a step that fails is skipped with its error, and costs only its own results."""
    reason = budget.refuse(need)
    if reason:
        skipped[name] = reason
        return None
    try:
        return step()
    except Exception as exc:
        skipped[name] = _failure(exc)
        return None


def run_family(check: FamilyCheck, report: dict, budget: Budget, settings: Settings, save) -> None:
    """Build one family, then its cases in order, each only if the budget still holds it; the
    pipeline is dropped at the end (one family in memory at a time)."""
    from kiln.benchmarks.gpu_check_models import LoadedFamily

    section = report["families"][check.name] = {"model": check.model, "size": check.size, "steps": check.steps,
                                                "cases": {}}
    skipped, runs, started = report["skipped"], settings.runs, time.perf_counter()
    first = case_estimate(check, {}, min(settings.batches), runs)  # building and measuring nothing is no use
    model = attempt(skipped, check.name, budget, check.build_s + first, lambda: LoadedFamily(
        check, settings.work, settings.device, settings.dtype, settings.scheduler))
    if model is None:
        return
    section.update(build_s=round(time.perf_counter() - started, 1), built_on=model.built_on,
                   attention=model.attention())
    measured: dict = {}
    for batch in settings.batches:
        name = f"{check.name}/batch_{batch}"
        case = attempt(skipped, name, budget, case_estimate(check, measured, batch, runs),
                       lambda: measure_case(model, batch, runs))
        if case is not None:
            measured[batch] = section["cases"][f"batch_{batch}"] = case
            print(f"{name}: {json.dumps(case)}", flush=True)
        save()
    extras(model, section, measured, budget, settings, skipped)


def extras(model: LoadedFamily, section: dict, measured: dict, budget: Budget, settings: Settings,
           skipped: dict) -> None:
    """The ONNX-file backends when installed, then runtime LoRA adapters, each if the budget holds it."""
    from kiln.benchmarks.gpu_check_lora import lora_check, lora_engines
    from kiln.benchmarks.gpu_check_onnx import onnx_backends

    check, runs, work, wanted = model.check, settings.runs, settings.work, settings.onnx
    if wanted:
        done = attempt(skipped, f"{check.name}/onnx_backends", budget, check.onnx_s,
                       lambda: onnx_backends(model, work, runs, wanted))
        if done is not None:
            section["onnx_backends"], failures = done
            skipped.update({f"{check.name}/{name}": _failure(exc) for name, exc in failures.items()})
    if not settings.lora:
        return
    step_s = measured[min(measured)]["kiln"]["unet_step_ms"] / 1000 if measured else check.step_s
    done = attempt(skipped, f"{check.name}/lora_adapters", budget, 5 + 1.5 * step_s * (4 * (5 * runs + 2) + 3),
                   lambda: lora_check(model, work, runs))
    if done is not None:
        section["lora_adapters"], adapters = done
        try:
            section["lora_adapters"]["tensorrt"] = lora_engines(model, work, runs, adapters)
        except Exception as exc:  # no TensorRT, no GPU, no plain engine, a failed build
            section["lora_adapters"]["tensorrt"] = {"skipped": _failure(exc)}


def run(out: Path, work: Path, checks: list[FamilyCheck], batches: tuple[int, ...] = (1, 4), runs: int = 3,
        scheduler: str = "euler", budget_s: float = 480.0, onnx: str = "auto", lora: bool = True) -> dict:
    """The whole check; writes OUT/gpu_check.json after every case and returns the report."""
    import torch

    from kiln.benchmarks.gpu_check_models import GUIDANCE, PROMPT, SEED
    from kiln.benchmarks.gpu_check_onnx import onnx_wanted

    budget, cuda = Budget(budget_s), torch.cuda.is_available()
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    wanted, skipped = onnx_wanted(onnx, cuda)
    report: dict = {
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "device_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
        "versions": _versions(),
        "settings": {"precision": "fp16" if cuda else "fp32", "attention": "sdpa", "scheduler": scheduler,
                     "guidance": GUIDANCE, "prompt": PROMPT, "seed": SEED, "batches": list(batches), "runs": runs,
                     "budget_s": budget_s, "onnx": onnx, "lora": lora,
                     "peak_memory": "torch.cuda.max_memory_allocated over a side's generations, weights included "
                                    "(the UNet and text encoders shared by both sides, each side's VAE)"},
        "reference": REFERENCE, "families": {}, "skipped": skipped}
    settings = Settings(Path(work), tuple(batches), runs, device, dtype, scheduler, tuple(wanted), lora)

    def save():
        report["elapsed_s"] = round(budget.elapsed(), 1)
        _write(Path(out), report)

    for check in checks:
        run_family(check, report, budget, settings, save)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        save()
    report["complete"] = all(f"batch_{b}" in report["families"][c.name]["cases"] for c in checks for b in batches)
    save()
    return report


def check_settings(families: list[str], batches: tuple[int, ...], runs: int, budget: float, scheduler: str) -> str:
    """Refuse what would waste a GPU run before any work; returns the scheduler's canonical name."""
    from kiln.errors import RequestError
    from kiln.pipeline.request import Limits
    from kiln.pipeline.schedulers import canonical_name

    if not families or set(families) - set(FULL):
        raise RequestError("families", ",".join(families), f"a comma-separated list of {list(FULL)}")
    if not batches or not all(1 <= b <= Limits().max_images for b in batches):
        raise RequestError("batches", ",".join(map(str, batches)), f"images per request, 1 to {Limits().max_images}")
    if runs < 1:
        raise RequestError("runs", runs, "at least 1")
    if not budget > 0:
        raise RequestError("budget", budget, "seconds, more than 0")
    return canonical_name(scheduler)


def summary(report: dict) -> list[str]:
    lines = [f"{report['device']}: {report['settings']['precision']}, {report['elapsed_s']} s"]
    for family, section in report["families"].items():
        for name, case in section["cases"].items():
            kiln, theirs, parity = case["kiln"], case["diffusers"], case["parity_255"]
            lines.append(f"{family} {section['size']}px {section['steps']} steps {name}: Kiln {kiln['end_to_end_s']} s "
                         f"({kiln['images_per_s']} images/s, UNet {kiln['unet_step_ms']} ms/step), diffusers "
                         f"{theirs['end_to_end_s']} s (UNet {theirs['unet_step_ms']} ms/step); images differ by "
                         f"{parity.get('max_abs')}/255 at most, {parity.get('mean_abs')}/255 on average"
                         f"{'' if parity['within'] else ' (OUTSIDE the tolerance)'}")
    lines += [f"skipped {name}: {why}" for name, why in report["skipped"].items()]
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("out_dir", type=Path, help="where gpu_check.json goes (and nothing else)")
    parser.add_argument("--families", default="sd15,sdxl", help="comma-separated, from sd15 and sdxl")
    parser.add_argument("--batches", default="1,4", help="images per generation, comma-separated")
    parser.add_argument("--runs", type=int, default=3, help="timed generations per side after one warm-up")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check (default 8 minutes)")
    parser.add_argument("--scheduler", default="euler", help="any name `kiln generate --scheduler` takes")
    parser.add_argument("--onnx", choices=("auto", "on", "off"), default="auto",
                        help="TensorRT / ONNX Runtime: auto times those installed on a CUDA host")
    parser.add_argument("--no-lora", dest="lora", action="store_false", help="leave out the runtime LoRA check")
    parser.add_argument("--tiny", action="store_true",
                        help="the tiny models (on the CPU without a GPU): the code path, no timings worth reading")
    parser.add_argument("--work", type=Path, default=None,
                        help="scratch folder (configs, ONNX, LoRA files); default a temporary one, removed")
    args = parser.parse_args(argv)
    args.families = [f.strip() for f in args.families.split(",") if f.strip()]
    try:
        args.batches = tuple(int(b) for b in args.batches.split(","))
    except ValueError:
        parser.error(f"batches={args.batches!r} is invalid: expected comma-separated integers")
    args.error = parser.error
    return args


def main(argv=None) -> int:
    import shutil
    import tempfile

    args = parse_args(argv)
    missing = missing_requirements()
    if missing:  # a bare GPU host: say what to carry, build nothing
        wheels = " ".join(CARRY.get(d, d) for d in missing)
        _write(args.out_dir, {"missing": missing, "carry": "benchmarks/gpu_check.sh unpacks the wheels in "
                              f"$GPU_CHECK_WHEELS (default .whl): pip download --no-deps -d .whl {wheels}"})
        print("gpu-check cannot run here, missing:", *(f"  {d}: {why}" for d, why in missing.items()), sep="\n",
              file=sys.stderr)
        return 3
    from kiln.errors import KilnError

    try:
        scheduler = check_settings(args.families, args.batches, args.runs, args.budget, args.scheduler)
    except KilnError as exc:
        args.error(str(exc))  # exit 2, before anything is built
    import torch

    if not args.tiny and not torch.cuda.is_available():
        why = ("no CUDA GPU (torch.cuda.is_available() is False): the full-size check runs on a GPU host; "
               "--tiny runs its code on the tiny models")
        _write(args.out_dir, {"families": args.families, "skipped": {"all": why}})
        print(why)
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="kiln-gpu-check-"))
    try:
        report = run(args.out_dir, work, [(TINY if args.tiny else FULL)[f] for f in args.families], args.batches,
                     args.runs, scheduler, args.budget, args.onnx, args.lora)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print("\n".join(summary(report)))
    print(f"report written to {args.out_dir / 'gpu_check.json'}")
    return 0


def _from_source_tree() -> None:
    """`python3 benchmarks/gpu_check.py` from a copy of the repository where Kiln is not installed (a
    bare GPU host): the stage folders are kiln's subpackages (pyproject's package-dir), so the
    repository joins kiln's path, and benchmarks/ leaves sys.path (its modules are not top-level)."""
    root = Path(__file__).resolve().parents[1]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root / "benchmarks"]
    sys.path.insert(0, str(root))
    import kiln

    if str(root) not in kiln.__path__:
        kiln.__path__.append(str(root))


if __name__ == "__main__":
    if not __package__:
        _from_source_tree()
    sys.exit(main())
