"""The denoising loop in plain Python around single-step engines.

The same functions run inside Triton's BLS model and in-process: `engines` (kiln.pipeline.engines)
runs each component on some backend and hands back torch tensors on its device, so the core works on
torch tensors alone and latents stay on that device between steps. It reproduces diffusers'
StableDiffusionPipeline and StableDiffusionImg2ImgPipeline step for step: latent noise from seeded
CPU torch.Generators (one per image, so image i of a request equals a one-image request with seed i),
diffusers' own scheduler classes, classifier-free guidance, and the same VAE pre- and post-processing.
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


@dataclass(frozen=True)
class ModelConstants:
    latent_channels: int
    vae_scale_factor: int
    scaling_factor: float


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


def encode_prompts(engines: Engines, prompt: TokenChunks, negative: TokenChunks | None,
                   count: int) -> torch.Tensor:
    """Both prompts through the text encoder in one call, weights applied, each repeated per image:
    (2N, 77k, D) negative first under guidance (`negative` given), else (N, 77k, D)."""
    ids = prompt.ids if negative is None else np.concatenate([negative.ids, prompt.ids])
    encoded = engines.encode_text(torch.from_numpy(ids).to(engines.device))  # (k or 2k, 77, D)
    if negative is None:
        cond = apply_weights(encoded, prompt.weights)
        check_finite(cond, "prompt embeddings")
        return cond.repeat(count, 1, 1)
    k = negative.ids.shape[0]
    cond, uncond = apply_weights(encoded[k:], prompt.weights), apply_weights(encoded[:k], negative.weights)
    check_finite(torch.cat([cond, uncond]), "prompt embeddings")
    return torch.cat([uncond.repeat(count, 1, 1), cond.repeat(count, 1, 1)])


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


def guided_step(engines: Engines, scheduler, latents: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor,
                guidance_scale: float, extra: dict) -> torch.Tensor:
    """One denoising step: the UNet on the (unconditional, conditional) pair when guided, the guided
    noise, the scheduler's update. `embeddings` are encode_prompts' for this guidance."""
    guided = guidance_scale > 1.0
    model_input = scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)  # (2N | N, C, h, w)
    timestep = torch.full((model_input.shape[0],), float(t), dtype=torch.float32, device=engines.device)
    noise_pred = engines.predict_noise(model_input, timestep, embeddings)
    if guided:
        noise_uncond, noise_text = noise_pred.chunk(2)
        noise_pred = noise_uncond + guidance_scale * (noise_text - noise_uncond)
    return scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]


def decode(engines: Engines, constants: ModelConstants, latents: torch.Tensor) -> np.ndarray:
    """Latents -> (N, H, W, 3) uint8 images."""
    decoded = engines.decode_latents(latents / constants.scaling_factor)
    check_finite(decoded, "decoded image")
    return to_uint8(decoded.cpu().numpy())


def generate(
    engines: Engines,
    scheduler,
    constants: ModelConstants,
    prompt: TokenChunks,
    negative: TokenChunks,
    seeds: list[int],
    steps: int,
    guidance_scale: float,
    height: int,
    width: int,
    init_image: np.ndarray | None = None,
    strength: float = 1.0,
    on_step: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """One image per seed; `init_image` (1, 3, H, W) in [-1, 1] makes it img2img. Returns (N, H, W, 3) uint8."""
    guided = guidance_scale > 1.0
    if guided and prompt.ids.shape != negative.ids.shape:
        raise ValueError(f"prompt chunks {prompt.ids.shape} and negative chunks {negative.ids.shape} differ: "
                         "tokenize them with tokenize_pair")
    embeddings = encode_prompts(engines, prompt, negative if guided else None, len(seeds))
    generator = _generators(seeds)
    latents, timesteps = prepare_latents(engines, scheduler, constants, generator, len(seeds), steps, height, width,
                                         init_image, strength)
    extra = step_kwargs(scheduler, generator)
    for i, t in enumerate(timesteps):
        latents = guided_step(engines, scheduler, latents, t, embeddings, guidance_scale, extra)
        check_finite(latents, f"latents at step {i + 1} of {len(timesteps)}")
        if on_step is not None:
            on_step(i + 1, len(timesteps))
    return decode(engines, constants, latents)


def load_init_image(data: bytes, height: int | None, width: int | None, multiple: int,
                    max_pixels: int = 4096 * 4096) -> np.ndarray:
    """Encoded PNG/JPEG -> (1, 3, H, W) in [-1, 1], resized (Lanczos, as diffusers) to the requested
    size or to its own size rounded down to `multiple`."""
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(data))  # reads the header only
    if image.width * image.height > max_pixels:  # before decoding: a small file can hold a huge image
        raise RequestError("init_image", f"<{image.width}x{image.height} pixels>",
                           f"an image of at most {max_pixels / 1e6:.1f} megapixels")
    image.load()
    image = image.convert("RGB")
    target = (width or image.width // multiple * multiple, height or image.height // multiple * multiple)
    if image.size != target:
        image = image.resize(target, Image.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return (array * 2 - 1).transpose(2, 0, 1)[None]


def generate_request(engines: Engines, request, scheduler_config: dict, constants: ModelConstants,
                     prompt: TokenChunks, negative: TokenChunks, size_multiple: int) -> np.ndarray:
    """A validated GenerationRequest through `generate`: scheduler built, init image decoded."""
    from kiln.pipeline.schedulers import make_scheduler

    init_image = None
    if request.image is not None:
        try:
            init_image = load_init_image(request.image, request.height, request.width, size_multiple)
        except RequestError:
            raise
        except Exception:
            raise RequestError("init_image", f"<{len(request.image)} bytes>", "a PNG or JPEG file") from None
    return generate(
        engines,
        make_scheduler(request.scheduler, scheduler_config),
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
    )
