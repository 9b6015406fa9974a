"""The GPU check's models (benchmarks/gpu_check.py): a family's architecture built with random weights
in memory on the device, diffusers' pipeline as built and Kiln's engines over the same modules (the
product's TorchRunner wrappers around that pipeline's UNet and text encoders, and Kiln's own fp32 VAE),
and the configs folder Kiln reads to know the model. Nothing but configs and tokenizers is written."""

from __future__ import annotations

import json
from pathlib import Path

GUIDANCE = 7.5
PROMPT = "a red digit 7 on a white background"
SEED = 0


def write_configs(pipe, folder: Path) -> Path:
    """The pipeline's diffusers folder without its weights (model_index.json, each component's config,
    the tokenizers, the scheduler): what Kiln reads to know a model; the weights stay in memory."""
    from kiln.models.tokenizer import write_clip_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_config(folder)
    for name, component in pipe.components.items():
        if name.startswith("tokenizer") and component is not None:
            write_clip_tokenizer(folder / name, component.pad_token)
        elif hasattr(component, "save_config"):  # diffusers' models and schedulers
            component.save_config(folder / name)
        elif component is not None:  # transformers' text encoders
            component.config.save_pretrained(folder / name)
    return folder


def shared_runner(pipe, vae, model_dir: Path, device: str, dtype):
    """kiln.pipeline.engines.TorchRunner over modules already in memory: the product's wrappers,
    components and calls, the weights those of diffusers' pipeline beside it (the same UNet and text
    encoder objects; the VAE, which the spec keeps in fp32, Kiln's own copy)."""
    import torch

    from kiln.export import wrappers
    from kiln.export.specs import family
    from kiln.models.folder import inspect_model
    from kiln.pipeline.engines import TorchComponent, TorchRunner

    class SharedRunner(TorchRunner):
        def __init__(self):  # TorchRunner's attributes, its modules not loaded from a folder
            self.device, self.dtype = torch.device(device), dtype
            self.family = family(inspect_model(model_dir).family)
            specs = {n: s for n, s in self.family.components.items() if s.required}
            self.modules = {n: TorchComponent(s, getattr(wrappers, s.wrapper)(vae if s.source == "vae" else
                                                                              getattr(pipe, s.source)).eval(),
                                              self.device, dtype) for n, s in specs.items()}
            self.components = tuple(self.modules)

    return SharedRunner()


class Generation:
    """One prompt, tokenized once, drawn through kiln.pipeline.denoise.generate on any engines."""

    def __init__(self, model_dir: Path, size: int, steps: int, scheduler: str):
        from kiln.export.specs import family
        from kiln.models.folder import inspect_model
        from kiln.pipeline.denoise import ModelConstants
        from kiln.pipeline.prompt_weights import tokenize_prompts
        from kiln.pipeline.prompts import load_tokenizer

        info = inspect_model(model_dir)
        self.constants = ModelConstants(info.latent_channels, info.vae_scale_factor, info.scaling_factor,
                                        info.zero_empty_negative)
        tokenizers = [load_tokenizer(Path(model_dir) / name) for name in family(info.family).tokenizers]
        self.prompt, self.negative = tokenize_prompts(tokenizers, PROMPT, "")
        self.scheduler_config = json.loads((Path(model_dir) / "scheduler" / "scheduler_config.json").read_text())
        self.size, self.steps, self.scheduler = size, steps, scheduler

    def __call__(self, engines, seeds: tuple[int, ...] = (SEED,)):
        from kiln.pipeline.denoise import generate
        from kiln.pipeline.schedulers import make_scheduler

        return generate(engines, make_scheduler(self.scheduler, self.scheduler_config, engines.family.name),
                        self.constants, self.prompt, self.negative, list(seeds), self.steps, GUIDANCE, self.size,
                        self.size, zero_negative=self.constants.zero_empty_negative)


class LoadedFamily:
    """A family's random-weight pipeline built on the device (`check`: gpu_check.FamilyCheck), diffusers'
    side and Kiln's over it."""

    def __init__(self, check, work: Path, device: str, dtype, scheduler: str):
        import copy

        import torch
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.check, self.device, self.dtype = check, torch.device(device), dtype
        try:  # random initialisation on the GPU takes seconds where the CPU takes minutes for SDXL
            with torch.device(device):
                pipe = check.build()
            self.built_on = device
        except Exception as exc:
            pipe, self.built_on = check.build().to(device), f"cpu, then {device} ({type(exc).__name__}: {exc})"
        vae = copy.deepcopy(pipe.vae).float()  # Kiln's: the spec keeps the VAE in fp32
        pipe = pipe.to(device, dtype)
        for module in (pipe.unet, pipe.vae, vae):
            module.set_attn_processor(AttnProcessor2_0())  # torch's scaled_dot_product_attention
        pipe.set_progress_bar_config(disable=True)
        self.pipe, self.folder = pipe, write_configs(pipe, work / check.name / "configs")
        # the scheduler as a pipeline loaded from that folder holds it: every key written, none left to
        # the next class's defaults when a user switches (PNDM's `leading` spacing carries over to Euler)
        pipe.scheduler = type(pipe.scheduler).from_pretrained(self.folder / "scheduler")
        self.generation = Generation(self.folder, check.size, check.steps, scheduler)
        from kiln.pipeline.engines import Engines

        self.engines = Engines(shared_runner(pipe, vae, self.folder, device, dtype))
        self.weights: Path | None = None  # a folder with the weights, written only for the ONNX backends
        self.plain_engine: Path | None = None

    def attention(self) -> dict:
        """How each of Kiln's components computes attention (AttnProcessor2_0 and sdpa: torch's SDPA)."""
        from kiln.pipeline.engines import attention_kind

        return {name: attention_kind(component.module) for name, component in self.engines.run.modules.items()}
