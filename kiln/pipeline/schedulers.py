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


def make_scheduler(name: str, model_config: dict):
    """A fresh scheduler instance (they hold per-run state) built from the model's own config,
    as `Scheduler.from_config(pipe.scheduler.config)` does in diffusers."""
    import diffusers

    canonical = canonical_name(name)
    if canonical == DEFAULT:
        cls, overrides = getattr(diffusers, model_config["_class_name"]), {}
    elif canonical not in SCHEDULERS:  # a diffusers class name
        cls, overrides = getattr(diffusers, canonical), {}
    else:
        choice = SCHEDULERS[canonical]
        cls, overrides = getattr(diffusers, choice.class_name), dict(choice.overrides)
    scheduler = cls.from_config(model_config, **overrides)
    # The corrections diffusers' Stable Diffusion pipelines make to an old scheduler config when they
    # are built (clip_sample off, steps_offset 1), so every path draws what those pipelines draw.
    fixes = {}
    if getattr(scheduler.config, "clip_sample", False) is True:
        fixes["clip_sample"] = False
    if getattr(scheduler.config, "steps_offset", 1) != 1:
        fixes["steps_offset"] = 1
    return cls.from_config(model_config, **overrides, **fixes) if fixes else scheduler
