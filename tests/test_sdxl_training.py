"""Fine-tuning SDXL: LoRA on the UNet and both text encoders with size conditioning from the data,
an exact resume, Textual Inversion with one embedding per encoder, full fine-tuning and DreamBooth,
then merge -> export -> Triton, equal to diffusers drawing the merged folder."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open

from kiln.merge.fuse import LoraInput, merge
from kiln.models.folder import inspect_model
from kiln.models.lora_files import KOHYA_NAME, scan
from kiln.training.data import _size_conditioning
from kiln.training.run import run_training
from training_runs import train_settings

LORA = ["optim.learning_rate=3e-2", "lora.rank=4", "lora.alpha=8", "lora.text_encoder=true",
        "lora.text_encoder_2=true", "lora.format=kohya"]


def _losses(path):
    with open(path) as f:
        return {int(row["step"]): float(row["loss"]) for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def sdxl_lora_run(sdxl_model, training_data, tmp_path_factory):
    """An SDXL LoRA run of 6 steps checkpointed at 3, and the same run resumed from step 3."""
    root = tmp_path_factory.mktemp("sdxl-lora")
    common = ["max_train_steps=6", "checkpointing_steps=3", "optim.lr_scheduler=cosine", "optim.lr_warmup_steps=2",
              "data.caption_dropout=0.2", *LORA]
    whole = root / "whole"
    summary = run_training("lora", None, train_settings(sdxl_model(), training_data, whole, *common))
    resumed = root / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(whole / "checkpoints" / "checkpoint-3", resumed / "checkpoints" / "checkpoint-3")
    shutil.copytree(whole / "logs", resumed / "logs")
    run_training("lora", None, train_settings(sdxl_model(), training_data, resumed, *common), resume="latest")
    return whole, resumed, summary


def test_sdxl_lora_trains_both_encoders_and_resumes_exactly(sdxl_lora_run):
    whole, resumed, summary = sdxl_lora_run
    expected, got = _losses(whole / "logs" / "train_log.csv"), _losses(resumed / "logs" / "train_log.csv")
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    assert max(abs(got[s] - expected[s]) for s in (4, 5, 6)) == 0.0
    assert summary["fixed_batch_loss"]["end"] != summary["fixed_batch_loss"]["start"]  # the adapters moved
    lora = whole / "pytorch_lora_weights.safetensors"
    assert scan(lora).modules.keys() == {"unet", "text_encoder", "text_encoder_2"}
    kohya = scan(whole / KOHYA_NAME)
    assert kohya.layout == "kohya" and kohya.modules == scan(lora).modules
    with safe_open(str(whole / KOHYA_NAME), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("lora_te2_") for k in keys) and any(k.startswith("lora_unet_input_blocks_") for k in keys)


def test_size_conditioning_comes_from_the_data():
    # a 300x200 image resized to 64 on its short side (96x64), centre-cropped: 16 px off the left
    assert _size_conditioning(300, 200, 64) == (200, 300, 0, 16)
    assert _size_conditioning(64, 128, 64) == (128, 64, 32, 0)


def test_size_conditioning_reaches_the_unet(sdxl_model, training_data):
    """The same batch with other sizes gives another loss: the time ids are not ignored."""
    from kiln.training.config import TrainConfig
    from kiln.training.loop import compute_loss, load_models

    models = load_models(sdxl_model())
    config = TrainConfig(method="lora", model=sdxl_model(), data={"path": training_data, "resolution": 64},
                         output_dir="unused")
    pixels = torch.zeros(1, 3, 64, 64)
    sizes = torch.tensor([[64.0, 64, 0, 0, 64, 64]])

    def loss(s):
        torch.manual_seed(0)
        return float(compute_loss(models, pixels, ["a red square"], config, sizes=s))

    assert loss(sizes) == loss(sizes)
    assert loss(sizes) != loss(torch.tensor([[1024.0, 768, 32, 0, 64, 64]]))


@pytest.mark.triton
@pytest.mark.slow  # starts a Triton server of its own
def test_sdxl_lora_merges_exports_and_serves_as_diffusers_draws_it(sdxl_lora_run, sdxl_model, tmp_path, reference_image):
    from kiln.clients.client import KilnClient
    from kiln.export.onnx_export import export_onnx
    from kiln.model_repository.builder import build_repository
    from kiln.serving import server

    whole, _, _ = sdxl_lora_run
    merged = merge(sdxl_model(), tmp_path / "merged", [LoraInput(whole / "pytorch_lora_weights.safetensors", 0.8)])
    assert inspect_model(merged).family == "sdxl"
    manifest = json.loads((merged / "merge_manifest.json").read_text())
    assert manifest["adapters"][0]["scale"] == 0.8
    # the kohya file merges to the same weights
    again = merge(sdxl_model(), tmp_path / "again", [LoraInput(whole / KOHYA_NAME, 0.8)])
    from safetensors.torch import load_file

    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder_2/model.safetensors"):
        a, b = load_file(str(merged / part)), load_file(str(again / part))
        assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6, part
    onnx = export_onnx(merged, tmp_path / "onnx").out_dir
    repo = build_repository(onnx, tmp_path / "repo")
    prompt = "a red square"
    with server.running_server(repo) as info, KilnClient(info.http_url, "http") as client:
        served = client.generate(prompt, "blurry", seed=3, steps=3, guidance_scale=6.0, height=64, width=64,
                                 scheduler="euler").images[0]
    expected = reference_image(merged, "euler", prompt, "blurry", 3, 3, 6.0, 64, 64)[0]
    base = reference_image(sdxl_model(), "euler", prompt, "blurry", 3, 3, 6.0, 64, 64)[0]
    assert np.abs(served.astype(int) - expected).max() <= 2
    assert np.abs(base.astype(int) - expected).max() > 2  # the LoRA changed what is drawn


def test_sdxl_textual_inversion_full_and_dreambooth(sdxl_model, training_data, tmp_path):
    ti = run_training("textual-inversion", None, train_settings(
        sdxl_model(), training_data, tmp_path / "ti", "max_train_steps=2", "optim.learning_rate=1e-2",
        "textual_inversion.placeholder_token=<shape-style>", "textual_inversion.initializer_token=style",
        "textual_inversion.num_vectors=2"))
    embedding = tmp_path / "ti" / "learned_embeds.safetensors"
    with safe_open(str(embedding), "pt") as f:
        shapes = {k: tuple(f.get_tensor(k).shape) for k in f.keys()}
    assert shapes == {"clip_l": (2, 32), "clip_g": (2, 48)}, shapes
    assert ti["fixed_batch_loss"]["end"] != ti["fixed_batch_loss"]["start"]
    merged = merge(sdxl_model(), tmp_path / "with-token", textual_inversions=[embedding])
    tokens = json.loads((merged / "merge_manifest.json").read_text())["adapters"][0]["tokens"]
    assert tokens == ["<shape-style>", "<shape-style>_1"]
    for name in ("tokenizer", "tokenizer_2"):
        added = json.loads((merged / name / "added_tokens.json").read_text())
        assert set(added) == set(tokens), name

    run_training("full", None, train_settings(sdxl_model(), training_data, tmp_path / "full", "max_train_steps=2",
                                              "optim.learning_rate=1e-3", "full.ema_decay=0.5", "validation_steps=2",
                                              "validation_inference_steps=2", 'validation_prompts=["a red square"]'))
    assert inspect_model(tmp_path / "full" / "model").family == "sdxl"
    assert (tmp_path / "full" / "validation" / "step-000002" / "00.png").is_file()  # drawn by the SDXL pipeline

    out = tmp_path / "db"
    run_training("dreambooth", None, train_settings(
        sdxl_model(), training_data, out, "max_train_steps=2", "dreambooth.instance_prompt=a photo of sks shape",
        "dreambooth.class_prompt=a photo of a shape", "dreambooth.num_class_images=2",
        "dreambooth.class_generation_steps=2", f"dreambooth.class_data_dir={out / 'class'}"))
    assert len(list((out / "class").glob("*.png"))) == 2 and (out / "pytorch_lora_weights.safetensors").is_file()


def test_cached_latents_and_text_equal_encoding_and_a_cached_run_resumes_exactly(sdxl_model, training_data, tmp_path):
    """cache_latents / cache_text_embeddings: the cached posterior and text conditioning equal what
    encoding the batch gives (to float rounding: a cached item is encoded alone), and a cached run
    resumed from a checkpoint (its cache rebuilt) logs exactly the uninterrupted run's losses."""
    from kiln.training.loop import EncodingCache, encode_captions, load_models

    models = load_models(sdxl_model())
    pixels = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    sizes = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 3)
    captions = ["a red square", "", "a blue circle"]
    cache = EncodingCache(True, True)
    with torch.no_grad():
        encoded = models.vae.encode(pixels).latent_dist.parameters
        hidden, added = encode_captions(models, captions, "cpu", sizes)
    assert float((cache.posterior(models, pixels, [0, 1, 2]).parameters - encoded).abs().max()) < 1e-5
    cached_hidden, cached_added = cache.conditioning(models, captions, "cpu", sizes)
    assert float((cached_hidden - hidden).abs().max()) < 1e-5
    assert float((cached_added["text_embeds"] - added["text_embeds"]).abs().max()) < 1e-5
    assert torch.equal(cached_added["time_ids"], added["time_ids"])

    cached = ["max_train_steps=4", "checkpointing_steps=2", "data.augment.enabled=false", "data.caption_dropout=0.3",
              "optim.learning_rate=3e-2", "lora.rank=4", "cache_latents=true", "cache_text_embeddings=true"]
    summary = run_training("lora", None, train_settings(sdxl_model(), training_data, tmp_path / "cached", *cached))
    assert summary["fixed_batch_loss"]["end"] != summary["fixed_batch_loss"]["start"]
    fast = _losses(tmp_path / "cached" / "logs" / "train_log.csv")
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "cached" / "checkpoints" / "checkpoint-2", resumed / "checkpoints" / "checkpoint-2")
    shutil.copytree(tmp_path / "cached" / "logs", resumed / "logs")
    run_training("lora", None, train_settings(sdxl_model(), training_data, resumed, *cached), resume="latest")
    again = _losses(resumed / "logs" / "train_log.csv")
    assert [again[s] for s in (3, 4)] == [fast[s] for s in (3, 4)]


def test_cache_settings_that_cannot_hold_are_refused(sdxl_model, training_data, tmp_path):
    from kiln.errors import ConfigError

    with pytest.raises(ConfigError, match="data.augment.enabled=false"):
        run_training("lora", None, train_settings(sdxl_model(), training_data, tmp_path, "cache_latents=true"))
    with pytest.raises(ConfigError, match="frozen text encoders"):
        run_training("lora", None, train_settings(sdxl_model(), training_data, tmp_path, "cache_text_embeddings=true",
                                                  "lora.text_encoder_2=true"))
    with pytest.raises(ConfigError, match="text_encoder_2=true needs an SDXL"):
        run_training("lora", None, train_settings(tmp_path_model(tmp_path), training_data, tmp_path / "o",
                                                  "lora.text_encoder_2=true"))


def tmp_path_model(tmp_path):
    from kiln.models.tiny import write_tiny_model

    return write_tiny_model(tmp_path / "sd1")


@pytest.mark.slow  # training runs in subprocesses
def test_sdxl_lora_in_two_processes_through_accelerate(sdxl_model, training_data, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from kiln.models.single_file import load_pipeline
    from kiln.serving.server import free_port

    repo = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(repo / "training" / "accelerate" / "cpu-2proc.yaml"), "--main_process_port", str(free_port()),
               "-m", "kiln.cli", "train", "lora",
               *train_settings(sdxl_model(), training_data, tmp_path, "max_train_steps=2", "checkpointing_steps=2", *LORA)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((tmp_path / "training_summary.json").read_text())["num_processes"] == 2
    pipe = load_pipeline(sdxl_model(), "sdxl")
    pipe.load_lora_weights(str(tmp_path), weight_name="pytorch_lora_weights.safetensors")
    assert scan(tmp_path / KOHYA_NAME).modules.keys() == {"unet", "text_encoder", "text_encoder_2"}
