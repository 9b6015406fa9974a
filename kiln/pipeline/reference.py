"""What diffusers' own pipelines draw in-process: the reference every served image is compared with.
Plain prompts go to diffusers as text; weighted or long prompts go as embeddings computed with
Kiln's weighting on the PyTorch text encoders. SDXL folders get StableDiffusionXLPipeline (an empty
negative prompt goes as None, which diffusers encodes as zeros, as Kiln does)."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import torch

from kiln.pipeline.prompt_weights import apply_weights, tokenize_prompts
from kiln.pipeline.request import SizeConditioning
from kiln.pipeline.schedulers import scheduler_class


def is_sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


def load_diffusers_pipeline(model_dir: Path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from kiln.models.folder import inspect_model

    sdxl = inspect_model(model_dir).family == "sdxl"
    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    pipe = cls.from_pretrained(str(model_dir), dtype=torch.float32, **({"add_watermarker": False} if sdxl else {}))
    pipe.set_progress_bar_config(disable=True)
    # what every switch starts from, as a diffusers user's X.from_config(pipe.scheduler.config) right
    # after loading: the pipeline's own config, its own corrections applied by diffusers, not Kiln
    pipe.kiln_scheduler = pipe.scheduler
    return pipe


@torch.no_grad()
def weighted_embeddings(pipe, prompt: str, negative: str) -> dict[str, torch.Tensor]:
    """diffusers' embedding arguments, from the PyTorch text encoders with Kiln's chunking and weights:
    each (1, 77k, D); SDXL: both encoders' penultimate hidden states side by side, and the pooled
    embedding of the first chunk (zeros for an empty negative prompt, as diffusers)."""
    sdxl = is_sdxl(pipe)
    tokenizers = [pipe.tokenizer, pipe.tokenizer_2] if sdxl else [pipe.tokenizer]
    encoders = [pipe.text_encoder, pipe.text_encoder_2] if sdxl else [pipe.text_encoder]
    prompts, negatives = tokenize_prompts(tokenizers, prompt, negative)
    sides = {"prompt_embeds": ("pooled_prompt_embeds", prompts),
             "negative_prompt_embeds": ("negative_pooled_prompt_embeds", negatives)}
    embeds = {}
    for key, (pooled_key, tokenized) in sides.items():
        hidden = []
        for encoder, chunks in zip(encoders, tokenized):
            result = encoder(torch.from_numpy(chunks.ids).long(), output_hidden_states=True)
            hidden.append(apply_weights(result.hidden_states[-2] if sdxl else result[0], chunks.weights))
            if sdxl and encoder is pipe.text_encoder_2:
                embeds[pooled_key] = result.text_embeds[:1]
        embeds[key] = torch.cat(hidden, dim=-1)
    if sdxl and not negative.strip() and pipe.config.force_zeros_for_empty_prompt:
        embeds["negative_prompt_embeds"] = torch.zeros_like(embeds["prompt_embeds"])
        embeds["negative_pooled_prompt_embeds"] = torch.zeros_like(embeds["pooled_prompt_embeds"])
    return embeds


def diffusers_image(pipe, scheduler: str, prompt: str, negative: str, seed: int, steps: int, guidance: float,
                    height: int, width: int, num_images: int = 1, weighted: bool = False,
                    image=None, strength: float = 0.8, sizes: SizeConditioning = SizeConditioning(),
                    controls: list | None = None, guidance_cutoff: float | None = None,
                    guidance_interval: tuple[float, float] | None = None) -> np.ndarray:
    """(N, H, W, 3) uint8, image i drawn with seed + i; `image` (PIL) makes it img2img; `sizes`: SDXL's
    size conditioning; `controls`: (ControlNetModel, control image (PIL), scale, start, end) for each
    ControlNet, drawn by diffusers' ControlNet pipelines (several: its MultiControlNetModel);
    `guidance_cutoff`: diffusers' SD(XL)CFGCutoffCallback with that cutoff_step_ratio (one image);
    `guidance_interval`: (start, end) fractions of the schedule, drawn with GuidanceIntervalCallback
    (one image, no ControlNet)."""
    import diffusers

    sdxl = is_sdxl(pipe)
    loaded = getattr(pipe, "kiln_scheduler", pipe.scheduler)  # the folder's, not the last call's switch
    pipe.scheduler = loaded  # never the last call's switch (its class and overrides would carry over)
    target = pipe
    extra = {}
    if controls:
        names = {(False, False): "StableDiffusionControlNetPipeline", (False, True): "StableDiffusionControlNetImg2ImgPipeline",
                 (True, False): "StableDiffusionXLControlNetPipeline", (True, True): "StableDiffusionXLControlNetImg2ImgPipeline"}
        cls = getattr(diffusers, names[sdxl, image is not None])
        nets = [c[0] for c in controls]
        components = {k: v for k, v in pipe.components.items() if k in inspect.signature(cls.__init__).parameters}
        target = cls(**{**components, "scheduler": loaded, "controlnet": nets[0] if len(nets) == 1 else nets})
        target.set_progress_bar_config(disable=True)
        single = len(controls) == 1
        values = [[c[i] for c in controls] for i in range(1, 5)]
        images, scales, starts, ends = (v[0] if single else v for v in values)
        extra = {"control_image" if image is not None else "image": images, "controlnet_conditioning_scale": scales,
                 "control_guidance_start": starts, "control_guidance_end": ends}
    elif image is not None:  # built as a user loads it (the folder's scheduler), then switched like the other
        cls = diffusers.StableDiffusionXLImg2ImgPipeline if sdxl else diffusers.StableDiffusionImg2ImgPipeline
        target = cls(**{**pipe.components, "scheduler": loaded})
        target.set_progress_bar_config(disable=True)
    class_name, overrides = scheduler_class(scheduler, type(loaded).__name__)
    target.scheduler = getattr(diffusers, class_name).from_config(target.scheduler.config, **overrides)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(num_images)]
    kwargs = dict(num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                  generator=generators[0] if num_images == 1 else generators)
    if sdxl:
        kwargs.update(original_size=sizes.original, crops_coords_top_left=sizes.crop_top_left, target_size=sizes.target)
    if weighted:
        embeds = weighted_embeddings(pipe, prompt, negative)
        kwargs.update({k: v.repeat(num_images, *[1] * (v.dim() - 1)) for k, v in embeds.items()})
    else:
        empty = sdxl and not negative.strip()  # diffusers' SDXL zeroes a negative prompt of None, not ""
        kwargs.update(prompt=prompt, negative_prompt=None if empty else negative, num_images_per_prompt=num_images)
    kwargs.update(extra)
    if guidance_cutoff is not None:
        from diffusers.callbacks import SDCFGCutoffCallback, SDXLCFGCutoffCallback

        callback = (SDXLCFGCutoffCallback if sdxl else SDCFGCutoffCallback)(cutoff_step_ratio=guidance_cutoff)
        kwargs.update(callback_on_step_end=callback, callback_on_step_end_tensor_inputs=callback.tensor_inputs)
    if guidance_interval is not None:
        callback = GuidanceIntervalCallback(target, prompt, negative, guidance, steps, *guidance_interval)
        kwargs.update(callback.arguments())
    if image is None:
        images = target(height=height, width=width, **kwargs).images
    else:
        images = target(image=image, strength=strength, **({"height": height, "width": width} if controls else {}),
                        **kwargs).images
    return (images * 255).round().astype(np.uint8)


class GuidanceIntervalCallback:
    """Classifier-free guidance only at the steps i with start <= i / steps < end, in diffusers' own
    loop: the pipeline starts guided or not as step 0 is, with both prompts' embeddings given, and at
    each step's end this callback switches guidance (and the batch of the prompt tensors) for the next
    step, as SD(XL)CFGCutoffCallback does to switch it off."""

    def __init__(self, pipe, prompt: str, negative: str, guidance: float, steps: int, start: float, end: float):
        self.sdxl = is_sdxl(pipe)
        self.guidance, self.steps, self.start, self.end = guidance, steps, start, end
        empty = self.sdxl and not negative.strip()  # diffusers' SDXL zeroes a negative prompt of None, not ""
        with torch.no_grad():
            encoded = pipe.encode_prompt(prompt=prompt, device=pipe.device, num_images_per_prompt=1,
                                         do_classifier_free_guidance=True,
                                         negative_prompt=None if empty else negative)
        names = (["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
                 if self.sdxl else ["prompt_embeds", "negative_prompt_embeds"])
        self.embeds = dict(zip(names, encoded))
        # the unconditional rows each switched tensor gains when guidance comes on (SDXL's time ids: its own)
        self.negatives = {"prompt_embeds": self.embeds["negative_prompt_embeds"]}
        if self.sdxl:
            self.negatives.update(add_text_embeds=self.embeds["negative_pooled_prompt_embeds"], add_time_ids=None)
        self.tensor_inputs = list(self.negatives)

    def guided(self, i: int) -> bool:
        return self.start <= i / self.steps < self.end

    def arguments(self) -> dict:
        """The pipeline call's arguments this callback needs (they replace prompt and negative_prompt)."""
        return {**self.embeds, "prompt": None, "negative_prompt": None, "num_images_per_prompt": 1,
                "guidance_scale": self.guidance if self.guided(0) else 1.0,
                "callback_on_step_end": self, "callback_on_step_end_tensor_inputs": self.tensor_inputs}

    def __call__(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        now, then = self.guided(step), self.guided(step + 1)
        if now == then:
            return callback_kwargs
        pipe._guidance_scale = self.guidance if then else 1.0
        for name, negative in self.negatives.items():
            value = callback_kwargs[name]
            if then:
                callback_kwargs[name] = torch.cat([value if negative is None else negative, value])
            else:
                callback_kwargs[name] = value[value.shape[0] // 2:]
        return callback_kwargs
