"""A tiny Stable Diffusion pipeline with random weights, built from configs (as diffusers' own tests
do), with the real CLIP tokenizer. It is the fixture for tests and the default model for deploys."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from kiln.models.tokenizer import EOS, write_clip_tokenizer

PREDICTION_TYPES = ("epsilon", "v_prediction")
TINY_FAMILIES = ("sd", "sdxl")  # sd: SD 1.x (epsilon) or 2.x (v_prediction) style; sdxl: SDXL's layout


def build_tiny_pipeline(prediction_type: str = "epsilon", seed: int = 0):
    """Return a StableDiffusionPipeline with SD's component classes and tiny widths.

    `v_prediction` gives an SD 2.x-style model: linear attention projections, `!` padding and a
    DDIM scheduler configured for v-prediction, as stabilityai/stable-diffusion-2-1 ships.
    """
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r}: expected one of {PREDICTION_TYPES}")
    sd2 = prediction_type == "v_prediction"
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        use_linear_projection=sd2,
    )
    vae = _tiny_vae()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=49408,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=0 if sd2 else 49407,
            projection_dim=32,
            hidden_act="gelu" if sd2 else "quick_gelu",
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(tmp), "!" if sd2 else EOS))
    schedule = dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    if sd2:
        scheduler = DDIMScheduler(clip_sample=False, **schedule)
    else:
        scheduler = PNDMScheduler(skip_prk_steps=True, **schedule)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _tiny_vae(scaling_factor: float = 0.18215):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 32, 64, 64),  # four levels: the 8x spatial factor of SD's VAE
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        sample_size=64,
        scaling_factor=scaling_factor,
    )


def build_tiny_sdxl_pipeline(prediction_type: str = "epsilon", seed: int = 0):
    """A StableDiffusionXLPipeline with SDXL's component classes and tiny widths: CLIPTextModel and
    CLIPTextModelWithProjection of different widths (32 and 48, so a swapped concatenation cannot
    pass), a UNet with `text_time` added conditioning, SDXL's VAE scaling and Euler scheduler, and both
    tokenizers (the second pads with `!`, as SDXL's does)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r}: expected one of {PREDICTION_TYPES}")
    torch.manual_seed(seed)
    widths, pooled, time_embed = (32, 48), 40, 8
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * time_embed + pooled,
        cross_attention_dim=sum(widths),
    )
    common = dict(intermediate_size=37, num_attention_heads=4, num_hidden_layers=3, vocab_size=49408,
                  max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=widths[0], pad_token_id=49407, projection_dim=32,
                                                hidden_act="quick_gelu", **common))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=widths[1], pad_token_id=0,
                                                                projection_dim=pooled, hidden_act="gelu", **common))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(tmp) / "1", EOS))
        tokenizer_2 = CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(tmp) / "2", "!"))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading",
                                       interpolation_type="linear", prediction_type=prediction_type)
    return StableDiffusionXLPipeline(vae=_tiny_vae(0.13025), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)


def save_pipeline(pipe, out_dir: Path, finish=None) -> Path:
    """A pipeline as a plain diffusers folder (atomically), its tokenizers written in full; `finish`
    (the temporary folder) adds to it and checks it before it takes `out_dir`'s place. An existing
    `out_dir` is replaced only if it is a model folder (or empty)."""
    from kiln.artifacts import write_folder_atomically

    with write_folder_atomically(out_dir, replaces=("model_index.json",)) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for name in ("tokenizer", "tokenizer_2"):
            if getattr(pipe, name, None) is not None:
                write_clip_tokenizer(tmp / name, getattr(pipe, name).pad_token)
        if finish is not None:
            finish(tmp)
    return Path(out_dir)


def write_tiny_model(out_dir: Path, prediction_type: str = "epsilon", seed: int = 0, family: str = "sd") -> Path:
    """Build the tiny pipeline of `family` (see TINY_FAMILIES) and save it as a plain diffusers folder."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"family={family!r}: expected one of {TINY_FAMILIES}")
    pipe = (build_tiny_sdxl_pipeline if family == "sdxl" else build_tiny_pipeline)(prediction_type, seed)
    return save_pipeline(pipe, out_dir)


def write_random_lora(layers, out: Path, rank: int = 4, alpha: float | None = None, seed: int = 0,
                      layout: str = "kohya", std: float = 0.1, only: tuple[str, ...] = ()) -> Path:
    """A LoRA file with random weights for the given adapted layers (kiln.pipeline.adapters.AdaptedLayer),
    in kohya's or diffusers' layout: what the tests and benchmarks add to a server. `only`: keep the
    layers whose module path ends with one of these (e.g. the attention projections)."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for layer in layers:
        if only and not layer.module.endswith(only):
            continue
        down = torch.randn(rank, layer.in_features, generator=generator) * std
        up = torch.randn(layer.out_features, rank, generator=generator) * std
        if layer.conv:
            down, up = down[:, :, None, None], up[:, :, None, None]
        if layout == "kohya":
            state[f"{layer.kohya}.lora_down.weight"] = down
            state[f"{layer.kohya}.lora_up.weight"] = up
            state[f"{layer.kohya}.alpha"] = torch.tensor(float(alpha if alpha is not None else rank))
        else:
            state[f"{layer.component}.{layer.module}.lora_A.weight"] = down
            state[f"{layer.component}.{layer.module}.lora_B.weight"] = up
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out))
    return out
