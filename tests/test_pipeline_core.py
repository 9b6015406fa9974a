"""Kiln's pipeline core (in-process, engines on ONNX Runtime) against diffusers' own pipeline."""

import math

import numpy as np
import torch
import pytest

from kiln.errors import RequestError
from kiln.pipeline.onnx_pipeline import OnnxPipeline
from kiln.pipeline.request import Defaults, GenerationRequest, Limits, parse_request
from kiln.pipeline.schedulers import SCHEDULERS, canonical_name, make_scheduler

MAX_DIFF = 2  # on the 0-255 scale


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("scheduler", ["default", "ddim", "euler", "euler_a", "dpmpp_2m", "pndm", "unipc",
                                       "LMSDiscreteScheduler", "KDPM2DiscreteScheduler", "DPM++ 2M SDE Karras",
                                       "dpm_2_ancestral"])
def test_onnx_pipeline_equals_diffusers(onnx_dir, tiny_model, reference_image, kind, scheduler):
    request = GenerationRequest("a red digit 7", "blurry", 1234, 3, 7.5, 64, 80, scheduler)
    image = OnnxPipeline(onnx_dir(kind))(request)
    expected = reference_image(tiny_model(kind), scheduler, "a red digit 7", "blurry", 1234, 3, 7.5, 64, 80)
    assert image.shape == expected.shape == (1, 64, 80, 3)
    assert np.abs(image.astype(int) - expected).max() <= MAX_DIFF


def test_the_comparison_can_fail(onnx_dir):
    """Seed, prompt and guidance each move the image well beyond the parity bound."""
    pipe = OnnxPipeline(onnx_dir("epsilon"))
    base = GenerationRequest("a red digit 7", "", 1, 3, 7.5, 64, 64, "euler")
    image = pipe(base)
    for changed in (
        GenerationRequest("a red digit 7", "", 2, 3, 7.5, 64, 64, "euler"),
        GenerationRequest("a blue digit 3", "", 1, 3, 7.5, 64, 64, "euler"),
        GenerationRequest("a red digit 7", "", 1, 3, 1.0, 64, 64, "euler"),
    ):
        assert np.abs(pipe(changed).astype(int) - image).max() > 3 * MAX_DIFF


def test_scheduler_names_and_class_names():
    assert canonical_name("Euler_A") == "euler_a"
    assert canonical_name("EulerAncestralDiscreteScheduler") == "euler_a"
    assert canonical_name("DPMSolverMultistepScheduler") == "dpmpp_2m"
    assert canonical_name("pndmscheduler") == "pndm"
    assert canonical_name("lmsdiscretescheduler") == canonical_name("LMSDiscreteScheduler") == "lms"
    assert canonical_name("DEISMultistepScheduler") == "DEISMultistepScheduler"
    with pytest.raises(RequestError, match="LMSDiscreteScheduler"):  # the refusal lists what is accepted
        canonical_name("EDMEulerScheduler")  # ignores the model's noise schedule: not for these models
    with pytest.raises(RequestError) as err:
        canonical_name("lcm-turbo")
    assert err.value.field == "scheduler" and "euler_a" in err.value.allowed


def test_the_sampler_names_people_type():
    """A1111's menu and ComfyUI's KSampler names (and A1111's k_ aliases) reach the same schedulers as
    Kiln's own names; what no diffusers scheduler draws is refused with its reason and the list."""
    from kiln.pipeline.schedulers import A1111_SAMPLERS, COMFYUI_SAMPLERS, with_schedule

    for name, short in (*A1111_SAMPLERS.items(), *COMFYUI_SAMPLERS.items()):
        assert canonical_name(name) == short and short in SCHEDULERS, name
    assert canonical_name("k_euler_a") == canonical_name(" euler-ancestral ") == "euler_a"
    assert canonical_name("DPM++ 2M SDE Karras") == "dpmpp_2m_sde_karras"
    assert make_scheduler("DPM++ 2M SDE Karras", {"_class_name": "PNDMScheduler"}).config.algorithm_type == "sde-dpmsolver++"
    assert with_schedule("DPM++ 2M", "Karras") == with_schedule("DPM++ 2M Karras", "automatic") == "dpmpp_2m_karras"
    for name, reason in (("DPM++ 2S a Karras", "singlestep ancestral"), ("dpm_fast", "adaptive-order"),
                         ("DPM++ SDE", "torchsde")):
        with pytest.raises(RequestError, match=reason) as err:
            canonical_name(name)
        assert "Euler a" in err.value.allowed and "euler_ancestral" in err.value.allowed
    with pytest.raises(RequestError, match="no Karras variant") as err:
        with_schedule("Euler a", "Karras", "scheduler_type")
    assert err.value.field == "scheduler_type"
    with pytest.raises(RequestError, match="Automatic or Karras"):
        with_schedule("Euler", "Exponential")


def test_schedulers_keep_the_models_objective(tiny_model):
    import json

    config = json.loads((tiny_model("v_prediction") / "scheduler" / "scheduler_config.json").read_text())
    for name in SCHEDULERS:
        scheduler = make_scheduler(name, config)
        assert scheduler.config.prediction_type == "v_prediction", name
    assert make_scheduler("dpmpp_2m_karras", config).config.use_karras_sigmas


def _raw(**values):
    return {k: None if v is None else np.array([v.encode() if isinstance(v, str) else v]) for k, v in values.items()}


def test_request_defaults_and_drawn_seed():
    request = parse_request(_raw(prompt="a cat"), Defaults(height=64, width=64), Limits(max_size=1024), 16)
    assert (request.steps, request.guidance_scale, request.height, request.scheduler) == (20, 7.5, 64, "default")
    assert 0 <= request.seed < 2**31


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("prompt", "   ", "non-empty"),
        ("steps", 0, "[1, 150]"),
        ("steps", 151, "[1, 150]"),
        ("guidance_scale", math.nan, "finite"),
        ("guidance_scale", 31.0, "[0, 30]"),
        ("num_images", 9, "[1, 4]"),
        ("strength", 0.0, "(0, 1]"),
        ("height", 72, "multiple of 16"),
        ("width", 2048, "[64, 1024]"),
        ("seed", -5, "[-1,"),
        ("scheduler", "nope", "euler_a"),
    ],
)
def test_request_errors_name_field_value_and_range(field, value, allowed):
    raw = _raw(prompt="a cat", init_image=b"\x89PNG" if field == "strength" else None)
    raw.update(_raw(**{field: value}))
    with pytest.raises(RequestError) as err:
        parse_request(raw, Defaults(height=64, width=64), Limits(max_size=1024), 16)
    assert err.value.field == field
    assert allowed in str(err.value)


def test_request_rejects_wrong_shape_and_type():
    with pytest.raises(RequestError, match="shape"):
        parse_request({"prompt": np.array([b"a", b"b"])}, Defaults(), Limits(max_size=1024), 8)
    with pytest.raises(RequestError, match="integer"):
        parse_request({"prompt": np.array([b"a"]), "steps": np.array([2.5])}, Defaults(), Limits(max_size=1024), 8)


class CheckingRunner:
    """A runner around another that checks the one contract runners rely on: feeds named and ordered
    as the spec declares, torch tensors on the runner's device. Counts calls per component."""

    def __init__(self, inner):
        self.inner, self.device, self.calls = inner, inner.device, {}

    def __call__(self, spec, feeds, outputs):
        import torch

        assert list(feeds) == spec.input_names
        assert all(isinstance(v, torch.Tensor) and v.device == self.device for v in feeds.values())
        self.calls[spec.name] = self.calls.get(spec.name, 0) + 1
        return self.inner(spec, feeds, outputs)


def _png(seed: int) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3)).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("scheduler", ["euler_a", "dpmpp_2m"])
def test_every_backend_runs_the_same_core(tiny_model, onnx_dir, scheduler):
    """One core over any runner: it hands ONNX Runtime and the PyTorch wrappers the same torch tensors,
    one text-encoder call, one UNet call per step (guidance batched), one decode; both backends draw the
    same images (to 1/255: fp32 kernels differ in rounding), txt2img and img2img."""
    from kiln.export.specs import COMPONENTS
    from kiln.pipeline.engines import Engines, TorchRunner

    pipe = OnnxPipeline(onnx_dir("epsilon"))
    requests = [GenerationRequest("a red digit 7", "blurry", 5, 4, 6.0, 64, 64, scheduler),
                GenerationRequest("a red digit 7", "blurry", 5, 4, 6.0, 64, 64, scheduler, num_images=2,
                                  image=_png(0), strength=0.6)]
    expected = [pipe(r) for r in requests]
    onnx = CheckingRunner(pipe.engines.run)
    pipe.engines = Engines(onnx, pipe.engines.components)
    assert np.array_equal(pipe(requests[0]), expected[0])
    assert onnx.calls == {"text_encoder": 1, "unet": 4, "vae_decoder": 1}
    pipe.engines = Engines(CheckingRunner(TorchRunner(tiny_model("epsilon"), components=COMPONENTS)))
    for request, image in zip(requests, expected, strict=True):
        assert np.abs(pipe(request).astype(int) - image).max() <= 1


def test_a_runner_without_a_component_refuses_what_needs_it(tiny_model):
    """Engines know what their runner runs: img2img on PyTorch modules loaded without the VAE encoder
    is refused by name, not with a KeyError from deep inside."""
    from kiln.errors import ModelError
    from kiln.pipeline.engines import Engines, TorchRunner

    engines = Engines(TorchRunner(tiny_model("epsilon")))  # the required components only
    assert "vae_encoder" not in engines.components
    with pytest.raises(ModelError, match="this export has no vae_encoder"):
        engines.encode_image(torch.zeros((1, 3, 64, 64)))
