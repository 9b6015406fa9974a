"""Scheduler names accepted on a request, mapped to diffusers' own scheduler classes."""

from __future__ import annotations

from dataclasses import dataclass, field

from kiln.errors import RequestError


@dataclass(frozen=True)
class SchedulerChoice:
    class_name: str
    overrides: dict = field(default_factory=dict)


SCHEDULERS: dict[str, SchedulerChoice] = {
    "ddim": SchedulerChoice("DDIMScheduler"),
    "ddpm": SchedulerChoice("DDPMScheduler"),
    "pndm": SchedulerChoice("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": SchedulerChoice("EulerDiscreteScheduler"),
    "euler_a": SchedulerChoice("EulerAncestralDiscreteScheduler"),
    "heun": SchedulerChoice("HeunDiscreteScheduler"),
    "dpmpp_2m": SchedulerChoice("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": SchedulerChoice(
        "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}
    ),
    "unipc": SchedulerChoice("UniPCMultistepScheduler"),
}
DEFAULT = "default"  # the scheduler the model folder ships with
_BY_CLASS = {choice.class_name.lower(): name for name, choice in SCHEDULERS.items() if not choice.overrides}
_BY_CLASS.update({"pndmscheduler": "pndm", "dpmsolvermultistepscheduler": "dpmpp_2m"})


def _stable_diffusion_classes() -> dict[str, str]:
    """lower-case name -> class name of every diffusers scheduler Stable Diffusion pipelines accept
    (diffusers' KarrasDiffusionSchedulers: LMSDiscreteScheduler, KDPM2DiscreteScheduler, ...)."""
    import diffusers
    from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers

    # EDM schedulers ignore the model's noise schedule (EDM-trained models only); a class whose
    # optional dependency is missing (DPMSolverSDEScheduler without torchsde) is a placeholder.
    return {member.name.lower(): member.name for member in KarrasDiffusionSchedulers
            if not member.name.startswith("EDM") and not hasattr(getattr(diffusers, member.name, None), "_backends")}


def canonical_name(name: str) -> str:
    """Kiln's short names, 'default', or any diffusers scheduler class a Stable Diffusion pipeline
    accepts (any case): a configured short name where Kiln has one, else the class name itself."""
    key = name.strip().lower()
    if key == DEFAULT or key in SCHEDULERS:
        return key
    if key in _BY_CLASS:
        return _BY_CLASS[key]
    classes = _stable_diffusion_classes()
    if key in classes:
        return classes[key]
    allowed = ", ".join([DEFAULT, *SCHEDULERS]) + " or a diffusers scheduler class: " + ", ".join(sorted(classes.values()))
    raise RequestError("scheduler", name, allowed)


def scheduler_class(name: str, loaded_class: str) -> tuple[str, dict]:
    """The diffusers class and config overrides a request's scheduler name stands for; `default`
    is the class the model folder ships (`loaded_class`)."""
    canonical = canonical_name(name)
    if canonical == DEFAULT:
        return loaded_class, {}
    if canonical not in SCHEDULERS:  # a diffusers class name
        return canonical, {}
    choice = SCHEDULERS[canonical]
    return choice.class_name, dict(choice.overrides)


def pipeline_scheduler_config(model_config: dict, family: str = "sd") -> dict:
    """The scheduler config a diffusers pipeline holds after loading the folder: the shipped class's
    full config (every default filled in: a scheduler switched with `X.from_config(pipe.scheduler.config)`
    inherits those, e.g. PNDM's `leading` timestep spacing), with the corrections
    StableDiffusionPipeline makes when it is built (steps_offset 1, clip_sample off); SDXL's
    pipeline makes none."""
    import diffusers

    config = dict(getattr(diffusers, model_config["_class_name"]).from_config(model_config).config)
    if family != "sdxl":
        if config.get("steps_offset", 1) != 1:
            config["steps_offset"] = 1
        if config.get("clip_sample", False) is True:
            config["clip_sample"] = False
    return config


def make_scheduler(name: str, model_config: dict, family: str = "sd"):
    """A fresh scheduler instance (they hold per-run state), as a diffusers user switches one:
    `X.from_config(pipe.scheduler.config)` on the pipeline of `family` (sd | sdxl) loaded from the
    folder whose scheduler config is `model_config`."""
    import diffusers

    class_name, overrides = scheduler_class(name, model_config["_class_name"])
    return getattr(diffusers, class_name).from_config(pipeline_scheduler_config(model_config, family), **overrides)
