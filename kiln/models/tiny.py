"""A tiny Stable Diffusion pipeline with random weights, built from configs (as diffusers' own tests
do), with the real CLIP tokenizer. It is the fixture for tests and the default model for deploys."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from kiln.models.tokenizer import EOS, write_clip_tokenizer

PREDICTION_TYPES = ("epsilon", "v_prediction")


def build_tiny_pipeline(prediction_type: str = "epsilon", seed: int = 0):
    """Return a StableDiffusionPipeline with SD's component classes and tiny widths.

    `v_prediction` gives an SD 2.x-style model: linear attention projections, `!` padding and a
    DDIM scheduler configured for v-prediction, as stabilityai/stable-diffusion-2-1 ships.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline
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
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 64, 64),  # four levels: the 8x spatial factor of SD's VAE
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        sample_size=64,
    )
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


def write_tiny_model(out_dir: Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Build the tiny pipeline and save it as a plain diffusers folder (atomically)."""
    from kiln.artifacts import write_folder_atomically

    pipe = build_tiny_pipeline(prediction_type, seed)
    with write_folder_atomically(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_clip_tokenizer(tmp / "tokenizer", pipe.tokenizer.pad_token)
    return out_dir
