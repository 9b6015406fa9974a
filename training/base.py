"""`kiln train base`: a small Stable-Diffusion-architecture model trained from scratch on glyphs.

Same component classes as SD (AutoencoderKL, UNet2DConditionModel, CLIPTextModel with CLIP's
tokenizer), reduced widths: 32x32 images, a 4x VAE (8x8x4 latents). No pretrained CLIP exists
here, so the small text encoder trains with the UNet. The VAE is trained first (reconstruction +
a small KL term, on its own image set), its latent scale measured, then the UNet and text encoder
through Kiln's own training loop (method `full`).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from kiln.artifacts import write_folder_atomically
from kiln.models.tokenizer import EOS, write_clip_tokenizer

log = logging.getLogger("kiln.training")


@dataclass(frozen=True)
class BaseSpec:
    resolution: int = 32
    vae_steps: int = 800
    vae_learning_rate: float = 2e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 2500
    unet_learning_rate: float = 1e-3
    batch_size: int = 64
    text_hidden_size: int = 64
    seed: int = 0


def untrained_pipeline(spec: BaseSpec):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(spec.seed)
    vae = AutoencoderKL(block_out_channels=(16, 32, 32), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        layers_per_block=1, norm_num_groups=16, sample_size=spec.resolution)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=spec.resolution // 4,
                                in_channels=4, out_channels=4, cross_attention_dim=spec.text_hidden_size,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                attention_head_dim=8, norm_num_groups=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=spec.text_hidden_size, intermediate_size=4 * spec.text_hidden_size,
                                                num_attention_heads=4, num_hidden_layers=2, vocab_size=49408,
                                                max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                                                pad_token_id=49407, projection_dim=spec.text_hidden_size))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(tmp), EOS))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, prediction_type="epsilon",
                                       timestep_spacing="trailing")
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def train_vae(vae, data_dir: Path, spec: BaseSpec) -> float:
    """Fit the autoencoder; returns the latent scaling factor (1 / std of the latents, as SD's 0.18215)."""
    from tqdm import tqdm

    from kiln.dataset.augment import Augmentations
    from kiln.training.data import ImageBatches, read_examples

    data = ImageBatches(read_examples(data_dir), spec.resolution, Augmentations(enabled=False), spec.seed,
                        spec.batch_size, 1, 0)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=spec.vae_learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=spec.vae_learning_rate, total_steps=spec.vae_steps,
                                                   pct_start=0.1)
    vae.train()
    progress = tqdm(range(spec.vae_steps), desc="train base vae", unit="step")
    for step in progress:
        torch.manual_seed(spec.seed * 7919 + step)
        pixels, _ = data.load(data.indices(step), augment=False)  # (B, 3, R, R) in [-1, 1]
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(reconstruction, pixels) + spec.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        progress.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        pixels, _ = data.load(list(range(min(512, len(data.examples)))), augment=False)
        latents = vae.encode(pixels).latent_dist.mode()
    return float(1.0 / latents.std())


def train_base(data_dir: Path, out_dir: Path, spec: BaseSpec = BaseSpec(), vae_data_dir: Path | None = None) -> Path:
    """glyph folder -> trained diffusers folder at `out_dir/model` (VAE, then UNet and text encoder).

    `vae_data_dir` (default: `data_dir`) is what the autoencoder learns to reconstruct. Like SD's VAE,
    which was trained on far broader images than any fine-tune's subject, it may hold what the UNet
    never sees: an autoencoder that cannot reconstruct a colour leaves no fine-tune able to draw it."""
    from kiln.training import full
    from kiln.training.config import build_config
    from kiln.training.loop import train

    from kiln.training.checkpoints import list_checkpoints

    out_dir = Path(out_dir)
    start = out_dir / "untrained-unet"
    if (start / "model_index.json").is_file():  # an interrupted build: the VAE is done, the UNet resumes
        log.info("reusing the trained VAE in %s", start)
    else:
        pipe = untrained_pipeline(spec)
        scaling = train_vae(pipe.vae, vae_data_dir or data_dir, spec)
        pipe.vae.register_to_config(scaling_factor=scaling)
        log.info("VAE trained; latent scaling factor %.4f", scaling)
        with write_folder_atomically(start) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
            write_clip_tokenizer(tmp / "tokenizer", EOS)
    config = build_config("full", {
        "model": start, "output_dir": out_dir, "seed": spec.seed,
        "data": {"path": data_dir, "resolution": spec.resolution, "augment": {"enabled": False}, "caption_dropout": 0.1},
        "max_train_steps": spec.unet_steps, "train_batch_size": spec.batch_size,
        "optim": {"learning_rate": spec.unet_learning_rate, "lr_scheduler": "cosine", "lr_warmup_steps": 100,
                  "adam_weight_decay": 0.0},
        "snr_gamma": 5.0, "full": {"ema_decay": 0.995, "train_text_encoder": True},
        "checkpointing_steps": max(1, spec.unet_steps // 4), "checkpoints_total_limit": 1, "tensorboard": False,
    })
    train(config, full.build, "latest" if list_checkpoints(out_dir) else None)  # exact: the loop reseeds per step
    (out_dir / full.MODEL_FOLDER / "kiln_base.json").write_text(json.dumps(asdict(spec), indent=2))
    return out_dir / full.MODEL_FOLDER
