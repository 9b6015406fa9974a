"""Scheduler names accepted on a request, mapped to diffusers' own scheduler classes."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from kiln.errors import RequestError


@dataclass(frozen=True)
class SchedulerChoice:
    class_name: str
    overrides: dict = field(default_factory=dict)


KARRAS = {"use_karras_sigmas": True}
_DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}
_DPMPP_2M_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}
SCHEDULERS: dict[str, SchedulerChoice] = {
    "ddim": SchedulerChoice("DDIMScheduler"),
    "ddpm": SchedulerChoice("DDPMScheduler"),
    "pndm": SchedulerChoice("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": SchedulerChoice("EulerDiscreteScheduler"),
    "euler_karras": SchedulerChoice("EulerDiscreteScheduler", KARRAS),
    "euler_a": SchedulerChoice("EulerAncestralDiscreteScheduler"),
    "heun": SchedulerChoice("HeunDiscreteScheduler"),
    "heun_karras": SchedulerChoice("HeunDiscreteScheduler", KARRAS),
    "lms": SchedulerChoice("LMSDiscreteScheduler"),
    "lms_karras": SchedulerChoice("LMSDiscreteScheduler", KARRAS),
    "dpm2": SchedulerChoice("KDPM2DiscreteScheduler"),
    "dpm2_karras": SchedulerChoice("KDPM2DiscreteScheduler", KARRAS),
    "dpm2_a": SchedulerChoice("KDPM2AncestralDiscreteScheduler"),
    "dpm2_a_karras": SchedulerChoice("KDPM2AncestralDiscreteScheduler", KARRAS),
    "dpmpp_2m": SchedulerChoice("DPMSolverMultistepScheduler", _DPMPP_2M),
    "dpmpp_2m_karras": SchedulerChoice("DPMSolverMultistepScheduler", {**_DPMPP_2M, **KARRAS}),
    "dpmpp_2m_sde": SchedulerChoice("DPMSolverMultistepScheduler", _DPMPP_2M_SDE),
    "dpmpp_2m_sde_karras": SchedulerChoice("DPMSolverMultistepScheduler", {**_DPMPP_2M_SDE, **KARRAS}),
    "unipc": SchedulerChoice("UniPCMultistepScheduler"),
}
DEFAULT = "default"  # the scheduler the model folder ships with
_BY_CLASS = {choice.class_name.lower(): name for name, choice in SCHEDULERS.items() if not choice.overrides}
_BY_CLASS.update({"pndmscheduler": "pndm", "dpmsolvermultistepscheduler": "dpmpp_2m"})

# The names people type elsewhere, each mapped to one of SCHEDULERS. A1111's sampler menu (its
# k-diffusion samplers plus DDIM, PLMS, UniPC; "Karras" picks Karras sigmas) and ComfyUI's KSampler
# names. A1111_SAMPLERS is what the A1111 door lists, in A1111's order.
A1111_SAMPLERS: dict[str, str] = {
    "DPM++ 2M": "dpmpp_2m", "DPM++ 2M Karras": "dpmpp_2m_karras", "DPM++ 2M SDE": "dpmpp_2m_sde",
    "DPM++ 2M SDE Karras": "dpmpp_2m_sde_karras", "Euler a": "euler_a", "Euler": "euler", "LMS": "lms",
    "LMS Karras": "lms_karras", "Heun": "heun", "DPM2": "dpm2", "DPM2 Karras": "dpm2_karras", "DPM2 a": "dpm2_a",
    "DPM2 a Karras": "dpm2_a_karras", "DDIM": "ddim", "DDPM": "ddpm", "PLMS": "pndm", "UniPC": "unipc",
}
COMFYUI_SAMPLERS: dict[str, str] = {
    "euler": "euler", "euler_ancestral": "euler_a", "heun": "heun", "dpm_2": "dpm2", "dpm_2_ancestral": "dpm2_a",
    "lms": "lms", "dpmpp_2m": "dpmpp_2m", "dpmpp_2m_sde": "dpmpp_2m_sde", "ddim": "ddim", "ddpm": "ddpm",
    "uni_pc": "unipc",
}
# Names those tools offer that no diffusers scheduler draws the same way: refused, with the reason.
UNSUPPORTED: dict[str, str] = {
    "dpmpp_2s_a": "DPM++ 2S a (k-diffusion's singlestep ancestral sampler) has no diffusers scheduler",
    "dpmpp_2s_ancestral": "DPM++ 2S a (k-diffusion's singlestep ancestral sampler) has no diffusers scheduler",
    "dpmpp_sde": "DPM++ SDE needs diffusers' DPMSolverSDEScheduler and the torchsde package, which this server "
                 "does not install",
    "dpmpp_3m_sde": "DPM++ 3M SDE has no diffusers scheduler with k-diffusion's exponential schedule",
    "dpm_fast": "DPM fast (k-diffusion's adaptive-order solver) has no diffusers scheduler",
    "dpm_adaptive": "DPM adaptive (k-diffusion's adaptive step size) has no diffusers scheduler",
    "restart": "Restart has no diffusers scheduler",
    "lcm": "LCM sampling needs a latent-consistency model",
    "uni_pc_bh2": "UniPC bh2 is not offered: use UniPC",
}
A1111_SCHEDULES = {"automatic": "", "karras": "_karras"}  # A1111 >= 1.9 names the sigma schedule apart


def _key(name: str) -> str:
    """A name as the tables key it: lower case, runs of spaces or hyphens as _, ++ as pp, no k_ prefix
    and _ka as _karras (A1111's aliases k_euler_a, k_dpmpp_2m_ka, ...)."""
    key = re.sub(r"[\s-]+", "_", name.strip().lower()).replace("++", "pp")
    key = key[2:] if key.startswith("k_") else key
    return key[:-3] + "_karras" if key.endswith("_ka") else key


_ALIASES = {_key(k): v for table in (COMFYUI_SAMPLERS, A1111_SAMPLERS) for k, v in table.items()}
_ALIASES.update({"plms": "pndm", "dpm_2_a": "dpm2_a"})
_UNSUPPORTED = {_key(k): v for k, v in UNSUPPORTED.items()}


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
    """Kiln's short names, 'default', A1111's and ComfyUI's sampler names ("Euler a", "DPM++ 2M
    Karras", "euler_ancestral", ...), or any diffusers scheduler class a Stable Diffusion pipeline
    accepts (any case): a configured short name where Kiln has one, else the class name itself."""
    key = name.strip().lower()
    if key == DEFAULT or key in SCHEDULERS:
        return key
    if key in _BY_CLASS:
        return _BY_CLASS[key]
    short = _key(name)
    if short in SCHEDULERS:
        return short
    if short in _ALIASES:
        return _ALIASES[short]
    if short.endswith("_karras") and _ALIASES.get(short[:-len("_karras")], "") + "_karras" in SCHEDULERS:
        return _ALIASES[short[:-len("_karras")]] + "_karras"
    classes = _stable_diffusion_classes()
    if key in classes:
        return classes[key]
    reason = _UNSUPPORTED.get(short) or _UNSUPPORTED.get(short.removesuffix("_karras"))
    allowed = (", ".join([DEFAULT, *SCHEDULERS]) + "; A1111's " + ", ".join(A1111_SAMPLERS) + "; ComfyUI's "
               + ", ".join(COMFYUI_SAMPLERS) + "; or a diffusers scheduler class: " + ", ".join(sorted(classes.values())))
    raise RequestError("scheduler", name, f"a sampler this server draws ({reason}): {allowed}" if reason else allowed)


def with_schedule(sampler: str, schedule: str | None, field: str = "scheduler") -> str:
    """A1111's separate sigma schedule ("Automatic", "Karras") applied to a sampler name; the result is
    a canonical name."""
    name = canonical_name(sampler)
    suffix = A1111_SCHEDULES.get((schedule or "automatic").strip().lower())
    if suffix is None:
        raise RequestError(field, schedule, "Automatic or Karras (the sigma schedules this server draws)")
    if not suffix or name.endswith(suffix):
        return name
    if f"{name}{suffix}" not in SCHEDULERS:
        karras = ", ".join(a for a, k in A1111_SAMPLERS.items() if k.endswith(suffix))
        raise RequestError(field, schedule, f"Automatic: {sampler} has no Karras variant here "
                           f"(the Karras samplers: {karras})")
    return f"{name}{suffix}"


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
