"""Each method trains a few steps on the tiny model: its loss falls on a fixed batch, its artifacts
load back; resume equals an uninterrupted run; two processes run through accelerate."""

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kiln.errors import ConfigError, TrainingError
from kiln.serving.server import free_port
from kiln.training.config import load_config
from kiln.training.run import run_training
from kiln.training.run_log import read_losses

from training_runs import METHOD_SETTINGS, train_settings as settings

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("method", list(METHOD_SETTINGS))
def test_loss_falls_on_a_fixed_batch(trained, method):
    _, summary = trained(method)
    loss = summary["fixed_batch_loss"]
    assert loss["end"] < loss["start"], loss
    assert summary["steps"] == 15 and summary["prediction_type"] == "epsilon"


def _pipeline(model_dir):
    from kiln.pipeline.reference import load_diffusers_pipeline

    return load_diffusers_pipeline(model_dir)


def _draw(pipe, prompt="a red square"):
    return pipe(prompt, num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def test_lora_and_dreambooth_weights_load_back(trained, tiny_model):
    base = _draw(_pipeline(tiny_model("epsilon")))
    for method in ("lora", "dreambooth"):
        out, summary = trained(method)
        pipe = _pipeline(tiny_model("epsilon"))
        pipe.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
        assert np.abs(_draw(pipe) - base).max() > 1e-3, method
    assert len(list((trained("dreambooth")[0] / "class").glob("*.png"))) == 2  # drawn by the base model


def test_textual_inversion_embeddings_load_back(trained, tiny_model):
    from safetensors.torch import load_file

    out, _ = trained("textual-inversion")
    learned = load_file(str(out / "learned_embeds.safetensors"))
    assert list(learned) == ["<shape-style>"] and learned["<shape-style>"].shape == (2, 32)
    pipe = _pipeline(tiny_model("epsilon"))
    initial = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("style")]
    assert (learned["<shape-style>"] - initial).abs().max() > 1e-3  # it moved from the initializer
    pipe.load_textual_inversion(str(out), weight_name="learned_embeds.safetensors")
    assert pipe.tokenizer.convert_tokens_to_ids("<shape-style>_1") == 49409


def test_full_fine_tune_is_a_plain_diffusers_folder(trained):
    out, summary = trained("full")
    assert summary["artifacts"] == [str(out / "model")]
    assert _draw(_pipeline(out / "model")).shape == (1, 64, 64, 3)
    assert (out / "model" / "tokenizer" / "vocab.json").is_file()


@pytest.mark.parametrize("method, extra", [
    ("lora", ["optim.learning_rate=1e-2", "gradient_accumulation_steps=2"]),
    ("full", ["optim.learning_rate=1e-4", "full.ema_decay=0.9", "snr_gamma=5", "noise_offset=0.05"]),
])
def test_resume_continues_exactly(tiny_model, training_data, tmp_path, method, extra):
    """A run resumed from its step-3 checkpoint logs the same losses as one that never stopped."""
    common = ["max_train_steps=6", "checkpointing_steps=3", "optim.lr_scheduler=cosine", "optim.lr_warmup_steps=2",
              "data.caption_dropout=0.2", *extra]
    whole = tmp_path / "whole"
    run_training(method, None, settings(tiny_model("epsilon"), training_data, whole, *common))
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(whole / "checkpoints" / "checkpoint-3", resumed / "checkpoints" / "checkpoint-3")
    shutil.copytree(whole / "logs", resumed / "logs")
    run_training(method, None, settings(tiny_model("epsilon"), training_data, resumed, *common), resume="latest")
    expected, got = read_losses(whole / "logs" / "train_log.csv"), read_losses(resumed / "logs" / "train_log.csv")
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    assert [got[s] for s in (4, 5, 6)] == [expected[s] for s in (4, 5, 6)]


def test_resume_latest_without_checkpoints_is_a_clear_error(tiny_model, training_data, tmp_path):
    with pytest.raises(TrainingError, match="no checkpoint"):
        run_training("lora", None, settings(tiny_model("epsilon"), training_data, tmp_path, "max_train_steps=1"),
                     resume="latest")


def test_checkpoints_rotate_to_the_limit(tiny_model, training_data, tmp_path):
    run_training("lora", None, settings(tiny_model("epsilon"), training_data, tmp_path, "max_train_steps=4",
                                        "checkpointing_steps=1", "checkpoints_total_limit=2"))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-4"]


def test_v_prediction_model_trains_on_velocity(tiny_model, training_data, tmp_path):
    summary = run_training("lora", None, settings(tiny_model("v_prediction"), training_data, tmp_path,
                                                  "max_train_steps=2", "optim.learning_rate=1e-2"))
    assert summary["prediction_type"] == "v_prediction"


def test_validation_images_are_written(tiny_model, training_data, tmp_path):
    run_training("lora", None, settings(tiny_model("epsilon"), training_data, tmp_path, "max_train_steps=2",
                                        "validation_steps=2", "validation_inference_steps=2",
                                        'validation_prompts=["a red square", "a blue circle"]', "tensorboard=true"))
    assert sorted(p.name for p in (tmp_path / "validation" / "step-000002").iterdir()) == ["00.png", "01.png"]
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*"))


@pytest.mark.slow  # training runs in subprocesses
def test_two_processes_through_accelerate(tiny_model, training_data, tmp_path):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "training" / "accelerate" / "cpu-2proc.yaml"), "--main_process_port", str(free_port()),
               "-m", "kiln.cli", "train", "lora",
               *settings(tiny_model("epsilon"), training_data, tmp_path, "max_train_steps=3", "checkpointing_steps=3")]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    import json

    summary = json.loads((tmp_path / "training_summary.json").read_text())
    assert summary["num_processes"] == 2
    assert {p.name for p in (tmp_path / "checkpoints" / "checkpoint-3").iterdir()} >= {"random_states_0.pkl",
                                                                                       "random_states_1.pkl"}
    pipe = _pipeline(tiny_model("epsilon"))
    pipe.load_lora_weights(str(tmp_path), weight_name="pytorch_lora_weights.safetensors")


def test_config_errors_name_field_value_and_fix(tmp_path):
    base = ["model=/m", "data.path=/d", "output_dir=/o"]
    with pytest.raises(ConfigError, match=r"optim.lr: Extra inputs are not permitted"):
        load_config("lora", None, base + ["optim.lr=1"])
    with pytest.raises(ConfigError, match=r"max_train_steps: .*greater than or equal to 1 \(got 0\)"):
        load_config("lora", None, base + ["max_train_steps=0"])
    with pytest.raises(ConfigError, match="needs a `textual_inversion:` section"):
        load_config("textual-inversion", None, base)
    with pytest.raises(ConfigError, match="is not key=value"):
        load_config("lora", None, base + ["optim.learning_rate"])
    config_file = tmp_path / "run.yaml"
    config_file.write_text("method: full\nmodel: /m\n")
    with pytest.raises(ConfigError, match="the config says method: full"):
        load_config("lora", config_file, [])
    config_file.write_text("model: /m\ndata: {path: /d, resolution: 64}\noutput_dir: /o\nlora: {rank: 8}\n")
    config = load_config("lora", config_file, ["lora.alpha=16"])
    assert (config.lora.rank, config.lora.alpha, config.data.resolution) == (8, 16, 64)


@pytest.mark.parametrize("method, name, resolution", [("lora", "lora", 512), ("dreambooth", "dreambooth", 512),
                                                      ("textual-inversion", "textual-inversion", 512), ("full", "full", 512),
                                                      ("lora", "lora-sdxl", 1024)])
def test_shipped_example_configs_validate(method, name, resolution):
    config = load_config(method, REPO / "training" / "configs" / f"{name}.yaml", [])
    assert config.method == method and config.data.resolution == resolution


def _lora_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "pytorch_lora_weights.safetensors"))


@pytest.mark.slow  # training runs in subprocesses
def test_same_seed_same_adapter_and_a_killed_run_resumes_exactly(tiny_model, training_data, tmp_path):
    """Two runs of one config are identical (adapter initialisation comes from the seed too), and a run
    killed by SIGKILL mid-training and relaunched with --resume latest logs exactly the losses of an
    uninterrupted run and ends with the same weights."""
    import os
    import signal
    import time

    common = settings(tiny_model("epsilon"), training_data, tmp_path / "OUT", "max_train_steps=8", "checkpointing_steps=2",
                      "optim.learning_rate=1e-2", "lora.dropout=0.1", "data.caption_dropout=0.2")
    kiln = [sys.executable, "-m", "kiln.cli", "train", "lora"]

    def args(out):
        return [a.replace(str(tmp_path / "OUT"), str(out)) for a in common]

    for name in ("first", "second"):
        done = subprocess.run([*kiln, *args(tmp_path / name)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    first, second = _lora_weights(tmp_path / "first"), _lora_weights(tmp_path / "second")
    assert all(torch.equal(first[k], second[k]) for k in first)
    killed = tmp_path / "killed"
    run = subprocess.Popen([*kiln, *args(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (killed / "checkpoints" / "checkpoint-4" / "kiln_step.txt").is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(run.pid, signal.SIGKILL)  # somewhere in steps 5-8, before the run could finish
    run.wait(timeout=30)
    assert not (killed / "pytorch_lora_weights.safetensors").exists(), "the run finished before it was killed"
    resumed = subprocess.run([*kiln, *args(killed), "--resume", "latest"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = read_losses(tmp_path / "first" / "logs" / "train_log.csv"), read_losses(killed / "logs" / "train_log.csv")
    assert got == expected and sorted(got) == list(range(1, 9))
    with open(killed / "logs" / "train_log.csv") as f:
        seconds = [float(row["seconds"]) for row in csv.DictReader(f)]
    assert seconds == sorted(seconds), f"the clock restarted on resume: {seconds}"
    final = _lora_weights(killed)
    assert all(torch.equal(first[k], final[k]) for k in first)
