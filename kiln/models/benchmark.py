"""Stable Diffusion 1.5's architecture with random weights, for measuring costs at the size users
run: `full` is SD 1.5 exactly (UNet 860M parameters); `half` halves the UNet and VAE widths."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from kiln.models.tokenizer import EOS, write_clip_tokenizer

WIDTHS = {"full": 1, "half": 2}


def build_sd15_pipeline(width: str = "half", seed: int = 0):
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if width not in WIDTHS:
        raise ValueError(f"width={width!r}: expected one of {list(WIDTHS)}")
    d = WIDTHS[width]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=tuple(c // d for c in (320, 640, 1280, 1280)),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=tuple(c // d for c in (128, 256, 512, 512)),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, vocab_size=49408,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(tmp), EOS))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                              set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def write_sd15_model(out_dir: Path, width: str = "half", seed: int = 0) -> Path:
    from kiln.artifacts import write_folder_atomically

    pipe = build_sd15_pipeline(width, seed)
    with write_folder_atomically(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_clip_tokenizer(tmp / "tokenizer", EOS)
    return Path(out_dir)
