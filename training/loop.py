"""The training loop every method shares: accelerate set-up, deterministic data and noise per step,
gradient accumulation, clipping, checkpoints and resume, logging, validation and the final save.
A method contributes what differs: which parameters train and how the result is saved."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from kiln.dataset.augment import Augmentations
from kiln.artifacts import write_json_atomically
from kiln.errors import ConfigError, TrainingError
from kiln.models.folder import inspect_model
from kiln.training import checkpoints
from kiln.training.config import TrainConfig
from kiln.training.data import ImageBatches, read_examples
from kiln.training.objective import diffusion_loss, sample_noise, target_for
from kiln.training.run_log import CsvLog

log = logging.getLogger("kiln.training")
SUMMARY = "training_summary.json"


@dataclass
class Models:
    model_dir: Path
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object
    family: str = "sd1"  # sd1 | sd2 | sdxl
    # SDXL: the second tokenizer and text encoder (OpenCLIP bigG: penultimate states and pooled projection)
    tokenizer_2: object = None
    text_encoder_2: torch.nn.Module | None = None
    controlnet: torch.nn.Module | None = None  # ControlNet training: steers the frozen UNet with control images

    @property
    def text_encoders(self) -> list[str]:
        return ["text_encoder", "text_encoder_2"] if self.family == "sdxl" else ["text_encoder"]

    def used_layers(self, name: str) -> int:
        """How many of a text encoder's layers the UNet's conditioning depends on: SDXL reads the first
        encoder's penultimate states (its last layer and final norm are never used: training them
        would leave parameters without gradients, which distributed training refuses)."""
        model = getattr(self, name)
        layers = model.config.num_hidden_layers
        return layers - 1 if self.family == "sdxl" and name == "text_encoder" else layers

    def freeze_unused(self, name: str) -> None:
        model = getattr(self, name)
        text_model = getattr(model, "text_model", model)
        for layer in text_model.encoder.layers[self.used_layers(name):]:
            layer.requires_grad_(False)
        if self.used_layers(name) < model.config.num_hidden_layers:
            text_model.final_layer_norm.requires_grad_(False)


@dataclass
class MethodSetup:
    """What a method hands the loop."""

    trainable: list[str]  # attributes of Models that train: "unet" and/or "text_encoder"
    parameters: list[torch.nn.Parameter]
    save: Callable[[Models, Path], list[Path]]  # final artifacts, called on the main process
    after_step: Callable[[Models], None] = lambda models: None
    checkpoint_objects: list = field(default_factory=list)  # e.g. EMA, saved with the checkpoints
    prior: ImageBatches | None = None  # DreamBooth class images, appended to every batch
    caption: Callable[[str], str] = lambda text: text  # e.g. Textual Inversion's placeholder template


def load_models(model_dir: Path) -> Models:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    family = inspect_model(model_dir).family
    model_dir = Path(model_dir)
    sdxl = {}
    if family == "sdxl":
        sdxl = dict(tokenizer_2=CLIPTokenizer.from_pretrained(str(model_dir / "tokenizer_2")),
                    text_encoder_2=CLIPTextModelWithProjection.from_pretrained(str(model_dir / "text_encoder_2")))
    models = Models(
        model_dir=model_dir,
        tokenizer=CLIPTokenizer.from_pretrained(str(model_dir / "tokenizer")),
        text_encoder=CLIPTextModel.from_pretrained(str(model_dir / "text_encoder")),
        vae=AutoencoderKL.from_pretrained(str(model_dir / "vae")),
        unet=UNet2DConditionModel.from_pretrained(str(model_dir / "unet")),
        # The training noise schedule: the model's own betas and objective (epsilon / v_prediction).
        noise_scheduler=DDPMScheduler.from_pretrained(str(model_dir / "scheduler")),
        family=family,
        **sdxl,
    )
    for module in (models.text_encoder, models.text_encoder_2, models.vae, models.unet):
        if module is not None:
            module.requires_grad_(False)
    return models


def inference_pipeline(models: Models, unet=None, text_encoders: dict | None = None):
    """A diffusers pipeline of the family over the models being trained (validation images, DreamBooth's
    class images), with the DPM-Solver++ scheduler configured from the model's own."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    encoders = {name: getattr(models, name) for name in models.text_encoders} | (text_encoders or {})
    common = dict(vae=models.vae, unet=unet or models.unet, tokenizer=models.tokenizer,
                  scheduler=DPMSolverMultistepScheduler.from_config(models.noise_scheduler.config), **encoders)
    if models.family == "sdxl":
        pipe = StableDiffusionXLPipeline(tokenizer_2=models.tokenizer_2, add_watermarker=False, **common)
    else:
        pipe = StableDiffusionPipeline(safety_checker=None, feature_extractor=None, requires_safety_checker=False, **common)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def resolve_mixed_precision(choice: str) -> str:
    cuda = torch.cuda.is_available()
    if choice == "auto":
        if not cuda:
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if choice == "fp16" and not cuda:
        raise ConfigError("mixed_precision=fp16 needs a CUDA GPU", hint="use mixed_precision=auto (or no, or bf16)")
    return choice


def step_seed(seed: int, micro_step: int, process_index: int) -> int:
    return int(np.random.SeedSequence([seed, micro_step, process_index]).generate_state(1)[0])


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode_captions(models: Models, captions: list[str], device, sizes: torch.Tensor | None = None):
    """The UNet's text conditioning: SD's last hidden states; SDXL's two encoders' penultimate states
    side by side, with the second's pooled projection and the size conditioning (original size, crop
    top-left, target size per row) as the added conditions, as diffusers' SDXL pipeline builds them."""
    if models.family != "sdxl":
        return models.text_encoder(tokenize(models.tokenizer, captions).to(device))[0], None
    first = models.text_encoder(tokenize(models.tokenizer, captions).to(device), output_hidden_states=True)
    second = models.text_encoder_2(tokenize(models.tokenizer_2, captions).to(device), output_hidden_states=True)
    hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    return hidden, {"text_embeds": second.text_embeds, "time_ids": sizes.to(device=device, dtype=hidden.dtype)}


class EncodingCache:
    """`cache_latents` / `cache_text_embeddings`: each image's VAE posterior (its moments, so a latent
    is still drawn from it every step) and each caption's text conditioning, computed once, one item
    at a time (so a value never depends on which batch first met it: a resumed run reuses exactly
    what it recomputes), kept on the CPU. The values equal per-batch encoding to float rounding; the
    noise drawn over cached latents is not the uncached run's (randn_like follows the memory layout,
    which oneDNN picks per batch size), so a cached run is its own reproducible run, not a copy."""

    def __init__(self, latents: bool, text: bool):
        self.use_latents, self.use_text = latents, text
        self._moments: dict = {}
        self._text: dict = {}

    @torch.no_grad()
    def posterior(self, models: Models, pixels: torch.Tensor, keys: list):
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        dtype = next(models.vae.parameters()).dtype
        for key, image in zip(keys, pixels):
            if key not in self._moments:
                self._moments[key] = models.vae.encode(image[None].to(dtype)).latent_dist.parameters[0].cpu()
        return DiagonalGaussianDistribution(torch.stack([self._moments[k] for k in keys]).to(pixels.device))

    @torch.no_grad()
    def conditioning(self, models: Models, captions: list[str], device, sizes):
        for caption in captions:
            if caption not in self._text:
                hidden, added = encode_captions(models, [caption], device, sizes[:1] if sizes is not None else None)
                pooled = added["text_embeds"][0].cpu() if added is not None else None
                self._text[caption] = (hidden[0].cpu(), pooled)
        hidden = torch.stack([self._text[c][0] for c in captions]).to(device)
        if models.family != "sdxl":
            return hidden, None
        pooled = torch.stack([self._text[c][1] for c in captions]).to(device)
        return hidden, {"text_embeds": pooled, "time_ids": sizes.to(device=device, dtype=hidden.dtype)}


def compute_loss(models: Models, pixels: torch.Tensor, captions: list[str], config: TrainConfig,
                 prior_count: int = 0, prior_weight: float = 1.0, sizes: torch.Tensor | None = None,
                 keys: list | None = None, cache: EncodingCache | None = None,
                 control: torch.Tensor | None = None) -> torch.Tensor:
    """One denoising loss on a batch; the last `prior_count` rows are DreamBooth's class images;
    `sizes`: SDXL's size conditioning per row (ImageBatches.sizes); `keys` name each row's image for
    the `cache`; `control`: the control images (B, 3, R, R) in [0, 1] when a ControlNet trains, its
    residuals added to the frozen UNet's as diffusers' ControlNet training does."""
    vae_dtype = next(models.vae.parameters()).dtype
    with torch.no_grad():
        if cache is not None and cache.use_latents and keys is not None:
            latents = cache.posterior(models, pixels, keys).sample()
        else:
            latents = models.vae.encode(pixels.to(vae_dtype)).latent_dist.sample()
        latents = (latents * models.vae.config.scaling_factor).float()  # (B, 4, R/8, R/8)
    noise = sample_noise(latents, config.noise_offset)
    steps = models.noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (latents.shape[0],), dtype=torch.long)
    noisy = models.noise_scheduler.add_noise(latents, noise, timesteps)
    if cache is not None and cache.use_text:
        hidden, added = cache.conditioning(models, captions, latents.device, sizes)
    else:
        hidden, added = encode_captions(models, captions, latents.device, sizes)
    if added is not None:
        added = {k: v.to(noisy.dtype) for k, v in added.items()}
    residuals = {}
    if models.controlnet is not None:
        down, mid = models.controlnet(noisy, timesteps, hidden.to(noisy.dtype), controlnet_cond=control.to(noisy.dtype),
                                      added_cond_kwargs=added, return_dict=False)
        residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
    prediction = models.unet(noisy, timesteps, hidden.to(noisy.dtype), added_cond_kwargs=added, **residuals).sample
    target = target_for(models.noise_scheduler, latents, noise, timesteps)
    if not prior_count:
        return diffusion_loss(prediction, target, models.noise_scheduler, timesteps, config.snr_gamma)
    n = latents.shape[0] - prior_count
    instance = diffusion_loss(prediction[:n], target[:n], models.noise_scheduler, timesteps[:n], config.snr_gamma)
    prior = diffusion_loss(prediction[n:], target[n:], models.noise_scheduler, timesteps[n:], config.snr_gamma)
    return instance + prior_weight * prior


@torch.no_grad()
def fixed_batch_loss(models: Models, data: ImageBatches, config: TrainConfig, caption=lambda t: t,
                     draws: int = 4) -> float:
    """The loss on the first images with fixed noise and timesteps, no augmentation: comparable
    before and after training."""
    state = torch.random.get_rng_state()
    modes = {m: m.training for m in (models.unet, models.text_encoder, models.text_encoder_2, models.controlnet)
             if m is not None}
    for module in modes:
        module.eval()
    indices = list(range(min(4, len(data.examples))))
    losses = []
    for draw in range(draws):
        torch.manual_seed(step_seed(config.seed, 10**6 + draw, 0))
        pixels, captions, control = load_batch(models, data, indices, augment=False)
        losses.append(float(compute_loss(models, pixels, [caption(c) for c in captions], config,
                                         sizes=data.sizes(indices), control=control)))
    for module, training in modes.items():
        module.train(training)
    torch.random.set_rng_state(state)
    return float(np.mean(losses))


def load_batch(models: Models, data: ImageBatches, indices: list[int], augment: bool = True):
    """(images, captions, control images or None): the control images when a ControlNet trains."""
    if models.controlnet is not None:
        return data.load_with_control(indices, augment)
    return (*data.load(indices, augment), None)


def make_optimizer(config: TrainConfig, parameters, scale: int):
    lr = config.optim.learning_rate * (scale if config.optim.scale_lr else 1)
    kwargs = dict(lr=lr, betas=(config.optim.adam_beta1, config.optim.adam_beta2),
                  weight_decay=config.optim.adam_weight_decay, eps=config.optim.adam_epsilon)
    if config.optim.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("optim.use_8bit_adam=true needs bitsandbytes", hint="pip install bitsandbytes (CUDA hosts)") from None
        return bnb.optim.AdamW8bit(parameters, **kwargs)
    return torch.optim.AdamW(parameters, **kwargs)


def train(config: TrainConfig, build: Callable[[TrainConfig, Models], MethodSetup], resume: str | None = None) -> dict:
    """Run (or resume) one training job to `config.output_dir`; returns the summary it writes."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from tqdm import tqdm

    output_dir = Path(config.output_dir)
    mixed_precision = resolve_mixed_precision(config.mixed_precision)
    resume_from = checkpoints.resolve_resume(output_dir, resume)
    accelerator = Accelerator(
        # Without CUDA, processes started by `accelerate launch --multi_gpu` (torchrun) join over gloo.
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with="tensorboard" if config.tensorboard else None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    models = load_models(config.model)
    # Every draw before the loop (adapter initialisation, new token embeddings) comes from the seed;
    # the loop reseeds itself per step, so a resumed run draws what an uninterrupted one would.
    set_seed(config.seed)
    setup = build(config, models)
    if config.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        if models.controlnet is not None:
            models.controlnet.enable_gradient_checkpointing()
        for name in models.text_encoders:
            if name in setup.trainable:
                getattr(models, name).gradient_checkpointing_enable()
    frozen_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision)
    for name in ["vae"] + [n for n in ("unet", *models.text_encoders) if n not in setup.trainable]:
        module = getattr(models, name).to(accelerator.device)
        if frozen_dtype is not None:  # frozen weights in half precision; what trains stays fp32
            module.to(dtype=frozen_dtype)

    data = ImageBatches(
        read_examples(config.data.path, config.dreambooth.instance_prompt if config.dreambooth else None),
        config.data.resolution, Augmentations(**config.data.augment.model_dump()), config.seed,
        config.train_batch_size, accelerator.num_processes, accelerator.process_index, config.data.caption_dropout,
    )
    if models.controlnet is not None:
        data.check_controls()
    scale = config.train_batch_size * config.gradient_accumulation_steps * accelerator.num_processes
    optimizer = make_optimizer(config, setup.parameters, scale)
    # accelerate steps a prepared scheduler once per process, hence the factor (as diffusers' examples do)
    lr_scheduler = get_scheduler(
        config.optim.lr_scheduler, optimizer,
        num_warmup_steps=config.optim.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=config.max_train_steps * accelerator.num_processes,
    )
    checkpoints.install_hooks(accelerator)
    prepared = accelerator.prepare(*[getattr(models, n) for n in setup.trainable], optimizer, lr_scheduler)
    for name, module in zip(setup.trainable, prepared):
        setattr(models, name, module)
    optimizer, lr_scheduler = prepared[-2], prepared[-1]
    for obj in setup.checkpoint_objects:
        accelerator.register_for_checkpointing(obj)

    global_step = 0
    if resume_from is not None:
        global_step, path = resume_from
        accelerator.load_state(str(path))
        log.info("resumed from %s at step %d", path, global_step)
    cache = EncodingCache(config.cache_latents, config.cache_text_embeddings)
    start_loss = fixed_batch_loss(models, data, config, setup.caption)
    csv_log = CsvLog(output_dir / "logs" / "train_log.csv", global_step) if accelerator.is_main_process else None
    if config.tensorboard:
        accelerator.init_trackers("kiln", config={"method": config.method, "lr": config.optim.learning_rate,
                                                  "batch": config.train_batch_size, "steps": config.max_train_steps})
    log.info("training %s on %d images, %d process(es), mixed precision %s, %d steps from step %d",
             config.method, len(data.examples), accelerator.num_processes, mixed_precision,
             config.max_train_steps, global_step)
    progress = tqdm(total=config.max_train_steps, initial=global_step, desc=f"train {config.method}",
                    disable=not accelerator.is_local_main_process)
    begun = time.perf_counter() - (csv_log.elapsed if csv_log is not None else 0.0)  # a resumed run's clock goes on
    trainable_modules = [getattr(models, n) for n in setup.trainable]
    for module in trainable_modules:
        module.train()
    while global_step < config.max_train_steps:
        losses = []
        for micro in range(config.gradient_accumulation_steps):
            micro_step = global_step * config.gradient_accumulation_steps + micro
            torch.manual_seed(step_seed(config.seed, micro_step, accelerator.process_index))
            indices = data.indices(micro_step)
            pixels, captions, control = load_batch(models, data, indices)
            sizes = data.sizes(indices)
            captions = [setup.caption(c) for c in captions]
            prior_count = 0
            if setup.prior is not None:
                class_indices = setup.prior.indices(micro_step)
                class_pixels, class_captions = setup.prior.load(class_indices)
                pixels, captions = torch.cat([pixels, class_pixels]), captions + class_captions
                sizes = torch.cat([sizes, setup.prior.sizes(class_indices)])
                prior_count = len(class_captions)
                keys = [("instance", i) for i in indices] + [("class", i) for i in class_indices]
            else:
                keys = [("instance", i) for i in indices]
            with accelerator.accumulate(*trainable_modules):
                loss = compute_loss(models, pixels.to(accelerator.device), captions, config, prior_count,
                                    config.dreambooth.prior_loss_weight if config.dreambooth else 1.0, sizes,
                                    keys, cache, None if control is None else control.to(accelerator.device))
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(setup.parameters, config.optim.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        setup.after_step(models)
        global_step += 1
        step_loss = float(accelerator.gather(torch.stack(losses).mean().reshape(1)).mean())
        if not math.isfinite(step_loss):
            raise TrainingError(f"loss became {step_loss} at step {global_step}",
                                hint="lower optim.learning_rate or use mixed_precision=no")
        lr = lr_scheduler.get_last_lr()[0]
        progress.update(1)
        progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
        if csv_log is not None and global_step % config.logging_steps == 0:
            csv_log.write(global_step, step_loss, lr, time.perf_counter() - begun)
        if config.tensorboard:
            accelerator.log({"loss": step_loss, "lr": lr}, step=global_step)
        if global_step % config.checkpointing_steps == 0 or global_step == config.max_train_steps:
            checkpoints.save_checkpoint(accelerator, output_dir, global_step, config.checkpoints_total_limit)
        if config.validation_steps and global_step % config.validation_steps == 0 and accelerator.is_main_process:
            from kiln.training.validation import write_validation_images

            write_validation_images(models, config, global_step, accelerator,
                                    [e.conditioning for e in data.examples] if models.controlnet is not None else None)
    progress.close()
    accelerator.wait_for_everyone()
    end_loss = fixed_batch_loss(models, data, config, setup.caption)
    for name in setup.trainable:
        setattr(models, name, accelerator.unwrap_model(getattr(models, name)))
    summary = {}
    if accelerator.is_main_process:
        artifacts = setup.save(models, output_dir)
        summary = {
            "method": config.method,
            "steps": global_step,
            "prediction_type": models.noise_scheduler.config.prediction_type,
            "num_processes": accelerator.num_processes,
            "mixed_precision": mixed_precision,
            "fixed_batch_loss": {"start": start_loss, "end": end_loss},
            "artifacts": [str(p) for p in artifacts],
            "config": json.loads(config.model_dump_json()),
        }
        write_json_atomically(output_dir / SUMMARY, summary)
        log.info("fixed-batch loss %.4f -> %.4f; artifacts: %s", start_loss, end_loss, ", ".join(summary["artifacts"]))
    accelerator.end_training()
    return summary
