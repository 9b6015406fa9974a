"""The denoising loop in plain Python around single-step engines.

The same functions run inside Triton's BLS model and in-process: `engines` (kiln.pipeline.engines)
runs each component on some backend and hands back torch tensors on its device, so the core works on
torch tensors alone and latents stay on that device between steps. It reproduces diffusers'
StableDiffusionPipeline, StableDiffusionXLPipeline and their img2img pipelines step for step: latent noise from seeded
CPU torch.Generators (one per image, so image i of a request equals a one-image request with seed i),
diffusers' own scheduler classes, classifier-free guidance, and the same VAE pre- and post-processing.
SDXL adds a second text encoder (hidden states side by side), the pooled text embedding and the size
conditioning (original size, crop top-left, target size) as further UNet inputs.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from kiln.errors import GenerationError, RequestError
from kiln.pipeline.engines import Engines
from kiln.pipeline.prompt_weights import TokenChunks, apply_weights
from kiln.pipeline.request import SizeConditioning


@dataclass(frozen=True)
class ModelConstants:
    latent_channels: int
    vae_scale_factor: int
    scaling_factor: float
    zero_empty_negative: bool = False  # SDXL: an empty negative prompt is zeros, not the encoded ""


@dataclass(frozen=True)
class Conditioning:
    """What the UNet sees besides the latents, one row per UNet batch row (unconditional rows first
    under guidance): the text embeddings and, by input name, any further inputs (SDXL: text_embeds,
    time_ids)."""

    embeddings: torch.Tensor  # (rows, 77k, D)
    added: dict[str, torch.Tensor]


@dataclass(frozen=True)
class Control:
    """One ControlNet's part in a generation (diffusers' StableDiffusionControlNetPipeline): its
    component, the control image (1, 3, H, W) in [0, 1] at the generated size, the conditioning scale,
    and the fractions of the schedule between which it acts."""

    component: str
    image: torch.Tensor
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def acts(self, index: int, total: int) -> bool:
        """diffusers' controlnet_keep for step `index` of `total` (outside it the scale is 0: skipped here)."""
        return not (index / total < self.start or (index + 1) / total > self.end)


def control_residuals(engines: Engines, controls: tuple[Control, ...], model_input: torch.Tensor, timestep: torch.Tensor,
                      cond: Conditioning, index: int, total: int) -> dict[str, torch.Tensor]:
    """The residuals of every ControlNet acting at this step, summed in order (diffusers'
    MultiControlNetModel), by the UNet input they feed; {} when none acts."""
    summed: dict[str, torch.Tensor] = {}
    rows = model_input.shape[0]
    for control in controls:
        if not control.acts(index, total):
            continue
        image = control.image.to(engines.device).expand(rows, -1, -1, -1).contiguous()
        scale = torch.full((rows,), control.scale, dtype=torch.float32, device=engines.device)
        out = engines.control(control.component, model_input, timestep, cond.embeddings, cond.added, image, scale)
        summed = {k: summed[k] + v for k, v in out.items()} if summed else out
    return summed


def step_kwargs(scheduler, generator) -> dict:
    """The extra arguments diffusers' pipeline passes to `scheduler.step` (eta=0 for DDIM)."""
    params = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = 0.0
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, as diffusers' image processor does."""
    images = np.clip(images / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
    return (images * 255).round().astype(np.uint8)


def check_finite(values: torch.Tensor, stage: str) -> None:
    """NaN or inf anywhere would reach the image as black: fail with where it happened instead."""
    if not bool(torch.isfinite(values).all()):
        raise GenerationError(f"the {stage} became non-finite (NaN or inf)",
                              hint="lower the prompt's weights or guidance_scale; if it persists, the model's "
                                   "weights overflow at this precision")


def encode_prompts(engines: Engines, prompt: tuple[TokenChunks, ...], negative: tuple[TokenChunks, ...] | None,
                   count: int, zero_negative: bool = False) -> Conditioning:
    """Both prompts through each of the family's text encoders (one call per encoder, the encoder's
    own tokens: `prompt[i]` for encoder i), weights applied per encoder, hidden states side by side,
    each repeated per image: 2N rows, negative first, under guidance (`negative` given), else N.
    `zero_negative`: the negative side is zeros, embeddings and pooled alike, and is not encoded
    (diffusers' SDXL for an empty negative prompt). The pooled embedding (SDXL) is the first chunk's."""
    family = engines.family
    encode_negative = negative is not None and not zero_negative
    conds, unconds, pooled = [], [], None
    for encoder, tokens, negative_tokens in zip(family.text_encoders, prompt, negative or prompt, strict=True):
        k = negative_tokens.ids.shape[0] if encode_negative else 0
        ids = np.concatenate([negative_tokens.ids, tokens.ids]) if encode_negative else tokens.ids
        outputs = engines.encode_text(encoder, torch.from_numpy(ids).to(engines.device))  # (k + chunks, 77, D), ...
        hidden = outputs[family.spec(encoder).output_names[0]]
        conds.append(apply_weights(hidden[k:], tokens.weights))
        if encode_negative:
            unconds.append(apply_weights(hidden[:k], negative_tokens.weights))
        if family.pooled and family.pooled[0] == encoder:
            values = outputs[family.pooled[1]]
            pooled = (values[k : k + 1], values[:1] if encode_negative else torch.zeros_like(values[:1]))
    cond = torch.cat(conds, dim=-1)  # (1, 77k, D1 + D2 ...)
    check_finite(cond, "prompt embeddings")
    added = {}
    if negative is None:
        if pooled is not None:
            added["text_embeds"] = pooled[0].repeat(count, 1)
        return Conditioning(cond.repeat(count, 1, 1), added)
    uncond = torch.cat(unconds, dim=-1) if encode_negative else torch.zeros_like(cond)
    check_finite(uncond, "negative prompt embeddings")
    if pooled is not None:
        added["text_embeds"] = torch.cat([pooled[1].repeat(count, 1), pooled[0].repeat(count, 1)])
    return Conditioning(torch.cat([uncond.repeat(count, 1, 1), cond.repeat(count, 1, 1)]), added)


def with_size_conditioning(engines: Engines, cond: Conditioning, sizes: SizeConditioning, height: int,
                           width: int) -> Conditioning:
    """Adds the UNet's `time_ids` row for every embedding row when the family's UNet takes them."""
    if "time_ids" not in engines.family.spec("unet").input_names:
        return cond
    rows = cond.embeddings.shape[0]
    time_ids = torch.tensor([sizes.time_ids(height, width)], dtype=torch.float32, device=engines.device).repeat(rows, 1)
    return Conditioning(cond.embeddings, {**cond.added, "time_ids": time_ids})


def _generators(seeds: list[int]):
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    return generators[0] if len(generators) == 1 else generators


def prepare_latents(engines: Engines, scheduler, constants: ModelConstants, generator, count: int, steps: int,
                    height: int, width: int, init_image: np.ndarray | None = None,
                    strength: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The starting latents (N, C, h, w) and the timesteps to run. Noise is drawn on the CPU, as
    diffusers does with CPU generators, so every device draws the same images. With `init_image`
    (1, 3, H, W) in [-1, 1]: diffusers' img2img, the first (1 - strength) of the schedule skipped and
    the encoded image noised to where it starts."""
    from diffusers.utils.torch_utils import randn_tensor

    device = engines.device
    scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps
    shape = (count, constants.latent_channels, height // constants.vae_scale_factor, width // constants.vae_scale_factor)
    if init_image is None:
        return randn_tensor(shape, generator=generator, dtype=torch.float32, device=device) * scheduler.init_noise_sigma, timesteps
    start = max(steps - min(int(steps * strength), steps), 0)
    timesteps = timesteps[start * scheduler.order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start * scheduler.order)
    parameters = engines.encode_image(torch.from_numpy(init_image.astype(np.float32)).to(device))  # (1, 2C, h, w)
    mean, logvar = parameters.chunk(2, dim=1)
    std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
    per_image = generator if isinstance(generator, list) else [generator]
    sampled = torch.cat([mean + std * randn_tensor(mean.shape, generator=g, dtype=mean.dtype, device=device)
                         for g in per_image])
    init_latents = constants.scaling_factor * sampled  # (N, C, h, w)
    noise = randn_tensor(init_latents.shape, generator=generator, dtype=torch.float32, device=device)
    return scheduler.add_noise(init_latents, noise, timesteps[:1].repeat(count)), timesteps


def guided_step(engines: Engines, scheduler, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                guidance_scale: float, extra: dict, controls: tuple[Control, ...] = (), index: int = 0,
                total: int = 1) -> torch.Tensor:
    """One denoising step (`index` of `total`): the ControlNets acting at it and the UNet on the
    (unconditional, conditional) pair when guided, the guided noise, the scheduler's update. `cond` is
    encode_prompts' for this guidance."""
    guided = guidance_scale > 1.0
    model_input = scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)  # (2N | N, C, h, w)
    timestep = torch.full((model_input.shape[0],), float(t), dtype=torch.float32, device=engines.device)
    residuals = control_residuals(engines, controls, model_input, timestep, cond, index, total) if controls else {}
    noise_pred = engines.predict_noise(model_input, timestep, cond.embeddings, {**cond.added, **residuals})
    if guided:
        noise_uncond, noise_text = noise_pred.chunk(2)
        noise_pred = noise_uncond + guidance_scale * (noise_text - noise_uncond)
    return scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]


def conditional_half(cond: Conditioning) -> Conditioning:
    """The prompt's rows of a guided Conditioning (the second half: negative first), for unguided steps."""
    rows = cond.embeddings.shape[0] // 2
    return Conditioning(cond.embeddings[rows:], {name: value[rows:] for name, value in cond.added.items()})


def guided_steps(steps: int, cutoff: float = 1.0, interval: tuple[float, float] = (0.0, 1.0)) -> list[bool]:
    """Which of `steps` denoising steps run classifier-free guidance. `cutoff`: none after step
    int(steps x cutoff) (diffusers' SDCFGCutoffCallback turns guidance off at that step's end);
    `interval` (start, end): only steps i with start <= i / steps < end (guidance in a limited interval,
    Kynkaanniemi et al. 2024, arXiv 2404.07724: guidance at the noisiest steps costs diversity and at
    the last ones does little)."""
    start, end = interval
    return [i <= int(steps * cutoff) and start <= i / steps < end for i in range(steps)]


def decode(engines: Engines, constants: ModelConstants, latents: torch.Tensor) -> np.ndarray:
    """Latents -> (N, H, W, 3) uint8 images."""
    decoded = engines.decode_latents(latents / constants.scaling_factor)
    check_finite(decoded, "decoded image")
    return to_uint8(decoded.cpu().numpy())


def generate(
    engines: Engines,
    scheduler,
    constants: ModelConstants,
    prompt: tuple[TokenChunks, ...],
    negative: tuple[TokenChunks, ...],
    seeds: list[int],
    steps: int,
    guidance_scale: float,
    height: int,
    width: int,
    init_image: np.ndarray | None = None,
    strength: float = 1.0,
    on_step: Callable[[int, int], None] | None = None,
    zero_negative: bool = False,
    sizes: SizeConditioning = SizeConditioning(),
    controls: tuple[Control, ...] = (),
    guidance_cutoff: float = 1.0,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
) -> np.ndarray:
    """One image per seed; `init_image` (1, 3, H, W) in [-1, 1] makes it img2img; `controls` add
    ControlNets (their images at the generated size); `guidance_cutoff` and `guidance_interval`: which
    steps are guided (guided_steps), the others run on the prompt alone at batch 1. `prompt` and
    `negative`: one TokenChunks per text encoder of the family, all with the same chunk count
    (tokenize_prompts). Returns (N, H, W, 3) uint8."""
    guided = guidance_scale > 1.0
    shapes = {c.ids.shape for c in (*prompt, *(negative if guided else ()))}
    if len(prompt) != len(engines.family.text_encoders) or len(shapes) > 1:
        raise ValueError(f"{len(prompt)} prompt tokenizations of chunk shapes {sorted(shapes)} for the text encoders "
                         f"{engines.family.text_encoders}: tokenize them with tokenize_prompts")
    cond = encode_prompts(engines, prompt, negative if guided else None, len(seeds), zero_negative)
    generator = _generators(seeds)
    latents, timesteps = prepare_latents(engines, scheduler, constants, generator, len(seeds), steps, height, width,
                                         init_image, strength)
    factor = constants.vae_scale_factor
    cond = with_size_conditioning(engines, cond, sizes, latents.shape[2] * factor, latents.shape[3] * factor)
    extra = step_kwargs(scheduler, generator)
    on = guided_steps(len(timesteps), guidance_cutoff, guidance_interval) if guided else [False] * len(timesteps)
    unguided = conditional_half(cond) if guided and not all(on) else cond
    for i, t in enumerate(timesteps):
        latents = guided_step(engines, scheduler, latents, t, cond if on[i] else unguided,
                              guidance_scale if on[i] else 0.0, extra, controls, i, len(timesteps))
        check_finite(latents, f"latents at step {i + 1} of {len(timesteps)}")
        if on_step is not None:
            on_step(i + 1, len(timesteps))
    return decode(engines, constants, latents)


def load_init_image(data: bytes, height: int | None, width: int | None, multiple: int,
                    max_pixels: int = 4096 * 4096, field: str = "init_image") -> np.ndarray:
    """Encoded PNG/JPEG -> (1, 3, H, W) in [-1, 1], resized (Lanczos, as diffusers) to the requested
    size or to its own size rounded down to `multiple`."""
    return load_pixels(data, height, width, multiple, max_pixels, field) * 2 - 1


def load_pixels(data: bytes, height: int | None, width: int | None, multiple: int = 1,
                max_pixels: int = 4096 * 4096, field: str = "init_image") -> np.ndarray:
    """Encoded PNG/JPEG -> (1, 3, H, W) RGB in [0, 1], resized with Lanczos (diffusers' image
    processor) to the requested size or to its own size rounded down to `multiple`. Its pixel count is
    bounded from the header, before decoding; what is not an image is refused naming `field`."""
    import io

    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError:  # PIL's own bound, far above max_pixels
        raise RequestError(field, f"<{len(data)} bytes>", f"an image of at most {max_pixels / 1e6:.1f} megapixels") from None
    except Exception:
        raise RequestError(field, f"<{len(data)} bytes>", "a PNG or JPEG file") from None
    if image.width * image.height > max_pixels:  # before decoding: a small file can hold a huge image
        raise RequestError(field, f"<{image.width}x{image.height} pixels>",
                           f"an image of at most {max_pixels / 1e6:.1f} megapixels")
    try:
        image.load()
        image = image.convert("RGB")
    except Exception:
        raise RequestError(field, f"<{len(data)} bytes>", "a PNG or JPEG file that decodes") from None
    target = (width or image.width // multiple * multiple, height or image.height // multiple * multiple)
    if image.size != target:
        image = image.resize(target, Image.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return array.transpose(2, 0, 1)[None]


def generate_request(engines: Engines, request, scheduler_config: dict, constants: ModelConstants,
                     prompt: tuple[TokenChunks, ...], negative: tuple[TokenChunks, ...], size_multiple: int,
                     on_step: Callable[[int, int], None] | None = None) -> np.ndarray:
    """A validated GenerationRequest through `generate`: scheduler built, init image decoded. `on_step(i, n)`
    runs after each step (it may raise to stop the generation: a cancelled request)."""
    from kiln.pipeline.schedulers import make_scheduler

    from kiln.export.specs import CONTROLNET_PREFIX

    init_image = None
    if request.image is not None:
        init_image = load_init_image(request.image, request.height, request.width, size_multiple)
    controls = tuple(Control(CONTROLNET_PREFIX + c.name,
                             torch.from_numpy(load_pixels(c.image, request.height, request.width, field="control_image")),
                             c.scale, c.start, c.end) for c in request.controls)
    return generate(
        engines,
        make_scheduler(request.scheduler, scheduler_config, engines.family.name),
        constants,
        prompt,
        negative,
        seeds=request.seeds,
        steps=request.steps,
        guidance_scale=request.guidance_scale,
        height=request.height,
        width=request.width,
        init_image=init_image,
        strength=request.strength,
        zero_negative=constants.zero_empty_negative and not request.negative_prompt.strip(),
        sizes=request.sizes,
        controls=controls,
        guidance_cutoff=request.guidance_cutoff,
        guidance_interval=(request.guidance_start, request.guidance_end),
        on_step=on_step,
    )
