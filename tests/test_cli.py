"""The `kiln` command: choices listed from the library's own tuples and wrong ones refused before any
work, every key=value argument read by the one typed loader, defaults that are the library's."""

from __future__ import annotations

import importlib
import inspect
import re
import subprocess
import sys
from enum import Enum
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from kiln.cli import _base_settings, app
from kiln.cli_choices import scheduler_name
from kiln.errors import ConfigError, KilnError

ENV = {"COLUMNS": "250", "NO_COLOR": "1"}


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env=ENV)


def flat(text: str) -> str:
    """Help text without Rich's box borders and line wrapping."""
    return re.sub(r"[\s│]+", " ", text)


def defaults(*command: str) -> dict:
    """Each parameter of `kiln COMMAND` -> its default (an enum's as its value)."""
    node = typer.main.get_command(app)
    for name in command:
        node = node.commands[name]
    return {p.name: p.default.value if isinstance(p.default, Enum) else p.default for p in node.params}


@pytest.mark.parametrize("command, module, name", [
    ("repo build", "kiln.model_repository.builder", "TARGETS"),
    ("generate", "kiln.clients.client", "PROTOCOLS"),
    ("health", "kiln.clients.client", "PROTOCOLS"),
    ("loadtest", "kiln.clients.client", "PROTOCOLS"),
    ("deploy", "kiln.export.precision", "PRECISIONS"),
    ("model tiny", "kiln.models.tiny", "PREDICTION_TYPES"),
    ("model sd15", "kiln.models.benchmark", "WIDTHS"),
    ("export qdq", "kiln.export.quantize", "METHODS"),
    ("data prepare", "kiln.dataset.control", "CONTROLS"),
    ("repo build", "kiln.pipeline.engines", "TORCH_DEVICES"),
    ("repo build", "kiln.pipeline.engines", "TORCH_DTYPES"),
])
def test_help_lists_the_library_choices(command, module, name):
    choices = list(getattr(importlib.import_module(module), name))
    shown = invoke(*command.split(), "--help")
    assert shown.exit_code == 0, shown.output
    assert "|".join(choices) in flat(shown.output)


def test_help_lists_backends_methods_and_schedulers():
    from kiln.model_repository.builder import BACKENDS
    from kiln.pipeline.schedulers import DEFAULT, SCHEDULERS
    from kiln.training.config import METHODS

    backends = list(dict.fromkeys(b for per_target in BACKENDS.values() for b in per_target))
    assert "|".join(backends) in flat(invoke("repo", "build", "--help").output)
    assert "|".join([*METHODS, "base"]) in flat(invoke("train", "--help").output)
    names = ", ".join([DEFAULT, *SCHEDULERS])
    assert names in flat(invoke("generate", "--help").output)
    assert names in flat(invoke("repo", "build", "--help").output)


@pytest.mark.parametrize("args, expected", [
    (["repo", "build", "onnx", "repo", "--target", "cloud"], "embedded"),
    (["repo", "build", "onnx", "repo", "--backend", "tflite"], "openvino"),
    (["repo", "build", "onnx", "repo", "--ort-accelerator", "rocm"], "cuda"),
    (["generate", "a cat", "--protocol", "smtp"], "grpc"),
    (["generate", "a cat", "--scheduler", "warp"], "euler_a"),
    (["deploy", "--precision", "fp8"], "int8"),
    (["data", "prepare", "src", "out", "--crop", "circle"], "center"),
    (["loadtest", "--protocols", "http,smtp"], "grpc"),
    (["train", "qlora"], "textual-inversion"),
])
def test_a_wrong_choice_is_refused_before_any_work(args, expected):
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    shown = flat(result.output)
    assert "Invalid value" in shown and repr(args[-1]) in shown and expected in shown


def test_the_kiln_command_prints_a_usage_error_without_a_traceback():
    run = subprocess.run([sys.executable, "-m", "kiln.cli", "repo", "build", "onnx", "repo", "--target", "cloud"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "--target" in run.stderr and "'cloud'" in run.stderr and "Traceback" not in run.stderr


def test_a_scheduler_is_any_name_the_server_accepts():
    assert scheduler_name("EULER_A") == "euler_a"
    assert scheduler_name("EulerDiscreteScheduler") == "euler"  # a diffusers class Kiln has a short name for
    assert scheduler_name("lmsdiscretescheduler") == "lms"
    assert scheduler_name("DPM++ 2M Karras") == "dpmpp_2m_karras"  # A1111's menu name
    assert scheduler_name("DEISMultistepScheduler") == "DEISMultistepScheduler"  # a class without a short name
    with pytest.raises(typer.BadParameter, match="'warp'"):
        scheduler_name("warp")


def test_the_crop_choices_are_the_ones_prepare_takes(tmp_path):
    """dataset/prepare.py checks --crop inline: each choice the CLI offers gets past that check."""
    from kiln.cli_choices import Crop
    from kiln.dataset.prepare import PrepareOptions, prepare

    for crop in Crop:
        with pytest.raises(KilnError) as error:
            prepare(tmp_path / "missing", tmp_path / "out", PrepareOptions(crop=crop.value))
        assert "--crop" not in str(error.value)


def test_base_settings_are_typed_by_the_training_loader():
    from kiln.training.base import BaseSpec

    spec, vae_data = _base_settings(["unet_steps=3", "vae_learning_rate=2e-3", "vae_data=glyphs/vae"])
    assert spec == BaseSpec(unet_steps=3, vae_learning_rate=2e-3)
    assert vae_data == Path("glyphs/vae")
    assert _base_settings([]) == (BaseSpec(), None)


@pytest.mark.parametrize("setting, named", [
    ("unet_stepz=10", ["unet_stepz", "unet_steps", "vae_data"]),  # the unknown key, then the known ones
    ("unet_steps=many", ["unet_steps", "'many'"]),
    ("unet_steps", ["'unet_steps'", "key=value"]),
])
def test_a_bad_base_setting_names_the_key(tmp_path, setting, named):
    result = invoke("train", "base", str(tmp_path / "data"), str(tmp_path / "out"), setting)
    assert isinstance(result.exception, ConfigError), result.output
    assert all(word in str(result.exception) for word in named), str(result.exception)
    assert not (tmp_path / "out").exists()


def test_a_bad_training_override_names_the_field_the_value_and_the_known_ones(tmp_path):
    result = invoke("train", "lora", f"model={tmp_path}", f"output_dir={tmp_path / 'out'}", f"data.path={tmp_path}",
                    "optim.lr=0.1")
    assert isinstance(result.exception, ConfigError), result.output
    message = str(result.exception)
    assert "optim.lr" in message and "0.1" in message and "learning_rate" in message


def test_an_override_too_large_to_read_names_the_key(tmp_path):
    """An integer of 5,000 digits is more than Python converts: an error naming the key, shortened."""
    result = invoke("train", "lora", f"model={tmp_path}", f"output_dir={tmp_path / 'out'}", f"data.path={tmp_path}",
                    "lora.rank=" + "9" * 5000)
    assert isinstance(result.exception, ConfigError), result.output
    message = str(result.exception)
    assert "lora.rank=99" in message and "5000 characters" in message and len(message) < 400


@pytest.mark.parametrize("args, named", [
    (["repo", "build", "onnx", "repo", "--also", "tuned=a", "--also", "tuned=b"], ["'tuned'", "twice"]),
    (["repo", "build", "onnx", "repo", "--also", "tuned"], ["--also", "'tuned'", "key=value"]),
    (["repo", "build", "onnx", "repo", "--also", "tuned="], ["--also", "tuned", "''"]),
    (["eval", "--endpoint", "reference", "--classifier", "c", "--real", "r"], ["--endpoint", "'reference'"]),
])
def test_named_arguments_go_through_the_same_loader(args, named):
    result = invoke(*args)
    assert isinstance(result.exception, ConfigError), result.output
    assert all(word in str(result.exception) for word in named), str(result.exception)


def test_option_defaults_are_the_library_defaults():
    from kiln.benchmarks.latency import BenchSpec
    from kiln.benchmarks.loadtest import run as loadtest
    from kiln.clients.client import DEFAULT_URLS, PUBLIC_MODEL
    from kiln.dataset.glyphs import write_glyphs
    from kiln.dataset.prepare import PrepareOptions
    from kiln.deploy import deploy
    from kiln.evaluation.report import EvalSpec
    from kiln.export.onnx_export import DEFAULT_OPSET
    from kiln.export.quantize import Calibration
    from kiln.model_repository.builder import build_models_repository
    from kiln.model_repository.configs import Tuning
    from kiln.models.benchmark import write_sd15_model
    from kiln.models.tiny import write_tiny_model
    from kiln.pipeline.request import Limits
    from kiln.serving.kubernetes import ClusterSpec
    from kiln.serving.server import Ports

    def parameters(function) -> dict:
        return {name: p.default for name, p in inspect.signature(function).parameters.items()}

    def check(command: tuple, expected: dict) -> None:
        chosen = defaults(*command)
        assert {name: chosen[name] for name in expected} == expected, command

    limits, tuning, calibration, ports = Limits(), Tuning(), Calibration(), Ports()
    build = parameters(build_models_repository)
    check(("repo", "build"), {"max_steps": limits.max_steps, "max_size": limits.max_size,
                              "max_batch_size": tuning.max_batch_size, "pipeline_instances": tuning.pipeline_instances,
                              "max_queue": tuning.max_queue, "onnx_threads": tuning.onnx_threads,
                              "ort_accelerator": tuning.ort_accelerator, "target": build["target"], "backend": build["backend"]})
    check(("export", "qdq"), {"holdout": calibration.holdout, "steps": calibration.steps, "guidance": calibration.guidance,
                              "method": calibration.method})
    check(("export", "onnx"), {"opset": DEFAULT_OPSET})
    from kiln.benchmarks.loadgen import LoadGenSpec

    spec = LoadGenSpec()
    check(("loadgen",), {"scenario": spec.scenario, "protocol": spec.protocol, "samples": spec.samples,
                         "min_duration": spec.min_duration_s, "min_queries": spec.min_queries, "target_qps": spec.target_qps,
                         "target_latency_ms": spec.target_latency_ms, "workers": spec.workers})
    bench = BenchSpec()
    check(("bench",), {"steps": bench.steps, "runs": bench.runs, "pipeline_instances": tuning.pipeline_instances,
                       "onnx_threads": tuning.onnx_threads, "peers": ",".join(bench.peers),
                       "guidance": bench.guidance_scale})
    evaluation = EvalSpec()
    # kiln eval's sampler options default per mode: the glyph models' EvalSpec, or the server's own for --prompts
    check(("eval",), {"seeds": None, "steps": None, "guidance": None})
    help_text = flat(invoke("eval", "--help").output)
    for option, value in (("seeds", evaluation.seeds), ("steps", evaluation.steps), ("guidance", evaluation.guidance_scale)):
        assert f"--{option}" in help_text and f"glyphs: {value};" in help_text, option
    cluster = ClusterSpec()
    check(("cluster", "render"), {name: getattr(cluster, name) for name in
                                  ("image", "repository", "namespace", "min_replicas", "max_replicas", "gpus_per_pod",
                                   "queue_target_ms", "engines", "builder_image", "engine_precision")})
    options = PrepareOptions()
    check(("data", "prepare"), {name: getattr(options, name) for name in
                                ("resolution", "min_size", "dedup_distance", "crop", "min_clip_score", "min_aesthetic")})
    check(("data", "glyphs"), {name: parameters(write_glyphs)[name] for name in ("count", "seed", "size")})
    check(("model", "tiny"), {name: parameters(write_tiny_model)[name] for name in ("prediction_type", "seed")})
    check(("model", "sd15"), {name: parameters(write_sd15_model)[name] for name in ("width", "seed")})
    check(("deploy",), {"precision": parameters(deploy)["precision"], "http_port": ports.http, "grpc_port": ports.grpc,
                        "metrics_port": ports.metrics})
    check(("serve",), {"http_port": ports.http, "grpc_port": ports.grpc, "metrics_port": ports.metrics})
    check(("generate",), {"model": PUBLIC_MODEL})
    check(("loadtest",), {"http_url": DEFAULT_URLS["http"], "grpc_url": DEFAULT_URLS["grpc"],
                          "protocols": parameters(loadtest)["protocols"], "steps": parameters(loadtest)["steps"]})


def test_the_cli_loads_without_the_stage_libraries():
    """Every `kiln` call, `kiln --help` included, stays quick: the CLI reads choices and defaults from
    the stages' source and imports a stage (and torch with it) only when its command runs."""
    code = "import sys, kiln.cli; print(' '.join(m for m in ('torch', 'onnx', 'diffusers') if m in sys.modules))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert run.stdout.strip() == ""
