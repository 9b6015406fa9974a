"""The denoising loop in plain Python around single-step engines.

The same function runs inside Triton's BLS model (engines called through Triton) and in-process
(engines called through ONNX Runtime). It reproduces diffusers' StableDiffusionPipeline and
StableDiffusionImg2ImgPipeline step for step: latent noise from seeded torch.Generators (one per
image, so image i of a request equals a one-image request with seed i), diffusers' own scheduler
classes, classifier-free guidance, and the same VAE pre- and post-processing.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch

from kiln.errors import GenerationError, RequestError
from kiln.pipeline.prompt_weights import TokenChunks, apply_weights


class Engines(Protocol):
    """One call per component. Arrays in, arrays out, shapes as in the component specs.

    An engine object with a `device` attribute (a torch device) gets and returns torch tensors on that
    device in predict_noise, decode_latents and encode_image, so latents stay there between steps;
    encode_text takes and returns numpy either way (once per request)."""

    def encode_text(self, input_ids: np.ndarray) -> np.ndarray: ...  # (B, 77) int32 -> (B, 77, D)

    def predict_noise(self, sample: np.ndarray, timestep: np.ndarray, embeddings: np.ndarray) -> np.ndarray: ...

    def decode_latents(self, latents: np.ndarray) -> np.ndarray: ...  # (B, 4, h, w) -> (B, 3, H, W) in [-1, 1]

    def encode_image(self, pixels: np.ndarray) -> np.ndarray: ...  # (B, 3, H, W) in [-1, 1] -> (B, 8, h, w)


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


def encode_prompts(engines: Engines, prompt: TokenChunks, negative: TokenChunks | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Both prompts through the text encoder in one call; weights applied; (1, 77k, D) each."""
    ids = prompt.ids if negative is None else np.concatenate([negative.ids, prompt.ids])
    encoded = engines.encode_text(ids)  # (k or 2k, 77, D)
    if negative is None:
        return apply_weights(encoded, prompt.weights), None
    k = negative.ids.shape[0]
    return apply_weights(encoded[k:], prompt.weights), apply_weights(encoded[:k], negative.weights)


def check_finite(values, stage: str) -> None:
    """NaN or inf anywhere would reach the image as black: fail with where it happened instead."""
    finite = torch.isfinite(values).all() if isinstance(values, torch.Tensor) else np.isfinite(values).all()
    if not bool(finite):
        raise GenerationError(f"the {stage} became non-finite (NaN or inf)",
                              hint="lower the prompt's weights or guidance_scale; if it persists, the model's "
                                   "weights overflow at this precision")


def _generators(seeds: list[int]):
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    return generators[0] if len(generators) == 1 else generators


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
    from diffusers.utils.torch_utils import randn_tensor

    count = len(seeds)
    guided = guidance_scale > 1.0
    if guided and prompt.ids.shape != negative.ids.shape:
        raise ValueError(f"prompt chunks {prompt.ids.shape} and negative chunks {negative.ids.shape} differ: "
                         "tokenize them with tokenize_pair")
    cond, uncond = encode_prompts(engines, prompt, negative if guided else None)
    check_finite(cond if uncond is None else np.concatenate([cond, uncond]), "prompt embeddings")
    embeddings = np.concatenate([np.repeat(uncond, count, 0), np.repeat(cond, count, 0)]) if guided \
        else np.repeat(cond, count, 0)  # (2N, 77k, D) | (N, 77k, D)
    # Engines with a `device` take and return torch tensors there (the GPU target keeps latents on the
    # GPU between steps); the others take numpy. Noise is drawn on the CPU either way, as diffusers does
    # with CPU generators, so both paths draw the same images.
    device = getattr(engines, "device", None)
    if device is not None:
        embeddings = torch.from_numpy(embeddings).to(device)

    generator = _generators(seeds)
    scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps
    shape = (count, constants.latent_channels, height // constants.vae_scale_factor, width // constants.vae_scale_factor)
    if init_image is None:
        latents = randn_tensor(shape, generator=generator, dtype=torch.float32, device=device) * scheduler.init_noise_sigma
    else:
        # diffusers' img2img: skip the first (1 - strength) of the schedule, noise the encoded image to there
        start = max(steps - min(int(steps * strength), steps), 0)
        timesteps = timesteps[start * scheduler.order :]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start * scheduler.order)
        pixels = init_image.astype(np.float32)
        parameters = engines.encode_image(torch.from_numpy(pixels).to(device)) if device is not None \
            else torch.from_numpy(engines.encode_image(pixels))  # (1, 2C, h, w)
        mean, logvar = parameters.chunk(2, dim=1)
        std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
        per_image = generator if isinstance(generator, list) else [generator]
        sampled = torch.cat([mean + std * randn_tensor(mean.shape, generator=g, dtype=mean.dtype, device=device)
                             for g in per_image])
        init_latents = constants.scaling_factor * sampled  # (N, C, h, w)
        noise = randn_tensor(init_latents.shape, generator=generator, dtype=torch.float32, device=device)
        latents = scheduler.add_noise(init_latents, noise, timesteps[:1].repeat(count))
    extra = step_kwargs(scheduler, generator)
    for i, t in enumerate(timesteps):
        model_input = torch.cat([latents] * 2) if guided else latents  # (2N, C, h, w)
        model_input = scheduler.scale_model_input(model_input, t)
        if device is not None:
            timestep = torch.full((model_input.shape[0],), float(t), dtype=torch.float32, device=device)
            noise_pred = engines.predict_noise(model_input, timestep, embeddings)
        else:
            timestep = np.full((model_input.shape[0],), float(t), dtype=np.float32)
            noise_pred = torch.from_numpy(engines.predict_noise(model_input.numpy(), timestep, embeddings))
        if guided:
            noise_uncond, noise_text = noise_pred.chunk(2)
            noise_pred = noise_uncond + guidance_scale * (noise_text - noise_uncond)
        latents = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
        check_finite(latents, f"latents at step {i + 1} of {len(timesteps)}")
        if on_step is not None:
            on_step(i + 1, len(timesteps))
    if device is not None:
        decoded = engines.decode_latents(latents / constants.scaling_factor).cpu().numpy()
    else:
        decoded = engines.decode_latents((latents / constants.scaling_factor).numpy())
    check_finite(decoded, "decoded image")
    return to_uint8(decoded)


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
