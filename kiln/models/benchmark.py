"""Real architectures with random weights, for measuring costs at the size users run: SD 1.5 (`full`
is SD 1.5 exactly, UNet 860M parameters; `half` halves the UNet and VAE widths) and SDXL base
(`full`: UNet 2.6B parameters, CLIP ViT-L and OpenCLIP ViT-bigG text encoders; `half` halves every
width, text encoders included). SD 2.x's is here too: its configs are what `kiln model import` reads
single-file SD 2.x checkpoints with."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from kiln.models.tokenizer import EOS, write_clip_tokenizer

WIDTHS = {"full": 1, "half": 2}


def _vae(divisor: int, sample_size: int, **extra):
    """The KL VAE every Stable Diffusion family shares (SDXL's differs only in scaling and upcasting)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=sample_size,
        block_out_channels=tuple(c // divisor for c in (128, 256, 512, 512)),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, **extra,
    )


def build_sd15_pipeline(width: str = "half", seed: int = 0):
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
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
    vae = _vae(d, 512)
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
    from kiln.models.tiny import save_pipeline

    return save_pipeline(build_sd15_pipeline(width, seed), out_dir)


def build_sd2_pipeline(width: str = "full", seed: int = 0, prediction_type: str = "v_prediction"):
    """SD 2.x's architecture (stabilityai/stable-diffusion-2-1's configs: OpenCLIP ViT-H text encoder,
    23 of its 24 layers as diffusers keeps them, linear attention projections) with random weights;
    `v_prediction` is the 768 px model, `epsilon` the 512 px base."""
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if width not in WIDTHS:
        raise ValueError(f"width={width!r}: expected one of {list(WIDTHS)}")
    d = WIDTHS[width]
    torch.manual_seed(seed)
    v = prediction_type == "v_prediction"
    unet = UNet2DConditionModel(
        sample_size=96 if v else 64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=tuple(c // d for c in (320, 640, 1280, 1280)),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
    )
    vae = _vae(d, 768 if v else 512)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23, vocab_size=49408,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=512,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=0,
    ))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(tmp), "!"))
    schedule = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                    set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    scheduler = DDIMScheduler(clip_sample=False, **schedule) if v else PNDMScheduler(skip_prk_steps=True, **schedule)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def build_sdxl_pipeline(width: str = "half", seed: int = 0):
    """SDXL base's architecture (stabilityai/stable-diffusion-xl-base-1.0's configs) with random weights."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if width not in WIDTHS:
        raise ValueError(f"width={width!r}: expected one of {list(WIDTHS)}")
    d = WIDTHS[width]
    torch.manual_seed(seed)
    hidden, hidden_2 = 768 // d, 1280 // d
    unet = UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=tuple(c // d for c in (320, 640, 1280)),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
        cross_attention_dim=hidden + hidden_2, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=6 * 256 + hidden_2,
    )
    vae = _vae(d, 1024, scaling_factor=0.13025, force_upcast=True)
    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=hidden, intermediate_size=4 * hidden, num_attention_heads=12, num_hidden_layers=12,
        hidden_act="quick_gelu", projection_dim=768, pad_token_id=49407, **common))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=hidden_2, intermediate_size=4 * hidden_2, num_attention_heads=20, num_hidden_layers=32,
        hidden_act="gelu", projection_dim=hidden_2, pad_token_id=0, **common))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(tmp) / "1", EOS))
        tokenizer_2 = CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(tmp) / "2", "!"))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading",
                                       interpolation_type="linear", prediction_type="epsilon")
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)


def write_sdxl_model(out_dir: Path, width: str = "half", seed: int = 0) -> Path:
    from kiln.models.tiny import save_pipeline

    return save_pipeline(build_sdxl_pipeline(width, seed), out_dir)
