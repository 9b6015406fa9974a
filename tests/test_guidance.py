"""Guidance cutoff: classifier-free guidance stops after a fraction of the schedule and the UNet runs
at batch 1 from there, as diffusers' SDCFGCutoffCallback / SDXLCFGCutoffCallback do: the image equals
diffusers' with that callback, in process, through Triton, and as a deployment's default."""

from dataclasses import replace

import numpy as np
import pytest

from kiln.clients.client import KilnClient
from kiln.errors import ClientError, RepositoryError, RequestError
from kiln.pipeline.onnx_pipeline import OnnxPipeline
from kiln.pipeline.request import Defaults, GenerationRequest, Limits, parse_request

MAX_DIFF = 2  # on the 0-255 scale
PROMPT, NEGATIVE = "a red digit 7", "blurry"


def request(cutoff: float, scheduler: str = "euler", steps: int = 6) -> GenerationRequest:
    return GenerationRequest(PROMPT, NEGATIVE, 11, steps, 7.5, 64, 64, scheduler, guidance_cutoff=cutoff)


def worst(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.fixture(scope="module")
def loud(tiny_model, tmp_path_factory):
    """The tiny model with its cross-attention outputs 30 times louder, so that the prompt (and so
    guidance, and where it stops) moves the image far beyond the parity bound: (folder, export)."""
    import shutil

    import torch
    from diffusers import UNet2DConditionModel

    from kiln.export.onnx_export import export_onnx

    folder = tmp_path_factory.mktemp("loud") / "model"
    shutil.copytree(tiny_model(), folder)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn2.to_out.0"):
                module.weight.mul_(30)
                module.bias.mul_(30)
    unet.save_pretrained(folder / "unet")
    return folder, export_onnx(folder, folder.parent / "onnx").out_dir


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m", "ddim"])
@pytest.mark.parametrize("cutoff", [0.0, 0.2, 0.5])
def test_cutoff_equals_diffusers_callback(loud, reference_image, scheduler, cutoff):
    folder, onnx = loud
    image = OnnxPipeline(onnx)(request(cutoff, scheduler))
    expected = reference_image(folder, scheduler, PROMPT, NEGATIVE, 11, 6, 7.5, 64, 64, guidance_cutoff=cutoff)
    assert worst(image, expected) <= MAX_DIFF


def test_cutoff_moves_the_image_and_runs_the_unet_at_batch_one_where_diffusers_does(loud):
    """The guard: a parity test alone would pass if neither side cut guidance off; and the steps run
    guided are diffusers' own, counted on both sides."""
    import torch

    from kiln.pipeline.engines import Engines, OnnxRuntimeRunner
    from kiln.pipeline.reference import diffusers_image, load_diffusers_pipeline

    folder, onnx = loud
    pipe = OnnxPipeline(onnx)
    full = pipe(request(1.0))
    assert np.array_equal(full, pipe(replace(request(0.5), guidance_cutoff=1.0)))
    assert worst(pipe(request(0.0)), full) > 3 * MAX_DIFF
    assert worst(pipe(request(0.0)), pipe(request(0.2))) > MAX_DIFF  # one more guided step shows
    rows, theirs = [], []
    runner = OnnxRuntimeRunner(onnx)

    def counted(spec, feeds, outputs):
        if spec.name == "unet":
            rows.append(len(feeds["sample"]))
        return runner(spec, feeds, outputs)

    counted.device = runner.device
    pipe.engines = Engines(counted, runner.components, runner.family)
    pipe(request(0.5, steps=10))
    reference = load_diffusers_pipeline(folder)
    forward = reference.unet.forward

    def recorded(sample, *args, **kwargs):
        theirs.append(sample.shape[0])
        return forward(sample, *args, **kwargs)

    reference.unet.forward = recorded
    with torch.no_grad():
        diffusers_image(reference, "euler", PROMPT, NEGATIVE, 11, 10, 7.5, 64, 64, guidance_cutoff=0.5)
    assert rows == theirs == [2] * 6 + [1] * 4  # the callback acts at the end of step int(10 x 0.5)


def test_sdxl_cutoff_equals_diffusers_callback(sdxl_onnx, sdxl_model):
    from kiln.pipeline.reference import diffusers_image, load_diffusers_pipeline

    image = OnnxPipeline(sdxl_onnx())(request(0.5))
    expected = diffusers_image(load_diffusers_pipeline(sdxl_model()), "euler", PROMPT, NEGATIVE, 11, 6, 7.5, 64, 64,
                               guidance_cutoff=0.5)
    assert worst(image, expected) <= MAX_DIFF


def test_cutoff_is_checked_by_name():
    def raw(value):
        return {"prompt": np.array([b"a cat"]), "guidance_cutoff": np.array([value], np.float32)}

    for value in (-0.1, 1.5, float("nan"), float("inf")):
        with pytest.raises(RequestError, match=r"guidance_cutoff=.*\[0, 1\]"):
            parse_request(raw(value), Defaults(height=64, width=64), Limits(max_size=1024), 8)
    parsed = parse_request({"prompt": np.array([b"a cat"])}, Defaults(height=64, width=64, guidance_cutoff=0.7),
                           Limits(max_size=1024), 8)
    assert parsed.guidance_cutoff == pytest.approx(0.7)


def test_served_cutoff_equals_the_in_process_image_and_bad_values_are_400s(triton, onnx_dir):
    info = triton()
    expected = OnnxPipeline(onnx_dir())(request(0.5))
    for protocol, url in (("http", info.http_url), ("grpc", info.grpc_url)):
        client = KilnClient(url, protocol)
        served = client.generate(PROMPT, negative_prompt=NEGATIVE, seed=11, steps=6, guidance_scale=7.5,
                                 scheduler="euler", guidance_cutoff=0.5)
        assert worst(served.images, expected) <= MAX_DIFF
        with pytest.raises(ClientError, match=r"guidance_cutoff=1.5 is invalid") as caught:
            client.generate(PROMPT, steps=2, guidance_cutoff=1.5)
        assert caught.value.rejected


def test_a_deployment_default_cutoff(onnx_dir, tmp_path):
    import json

    from kiln.model_repository.builder import build_repository, check_defaults
    from kiln.model_repository.configs import parse_pbtxt

    with pytest.raises(RepositoryError, match=r"--default-guidance-cutoff 2.0 is out of range 0..1"):
        check_defaults({"guidance_cutoff": 2.0}, Limits())
    repo = build_repository(onnx_dir(), tmp_path / "repo", defaults={"guidance_cutoff": 0.5})
    settings = json.loads(parse_pbtxt((repo / "pipeline" / "config.pbtxt").read_text())
                          .parameters["kiln_settings"].string_value)
    assert settings["defaults"]["guidance_cutoff"] == 0.5


def interval(start: float, end: float, scheduler: str = "euler", steps: int = 6) -> GenerationRequest:
    return replace(request(1.0, scheduler, steps), guidance_start=start, guidance_end=end)


def test_guided_steps_follow_the_cutoff_and_the_interval():
    from kiln.pipeline.denoise import guided_steps

    assert guided_steps(10) == [True] * 10
    assert guided_steps(10, cutoff=0.5) == [True] * 6 + [False] * 4
    assert guided_steps(10, interval=(0.2, 0.7)) == [False] * 2 + [True] * 5 + [False] * 3
    assert guided_steps(10, cutoff=0.5, interval=(0.2, 0.7)) == [False] * 2 + [True] * 4 + [False] * 4
    assert guided_steps(3, interval=(0.5, 1.0)) == [False, False, True]  # 1/3 < 0.5 <= 2/3


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m"])
@pytest.mark.parametrize("window", [(0.0, 0.5), (0.34, 1.0), (0.2, 0.7)])
def test_interval_equals_diffusers_with_the_interval_callback(loud, reference_image, scheduler, window):
    folder, onnx = loud
    image = OnnxPipeline(onnx)(interval(*window, scheduler))
    expected = reference_image(folder, scheduler, PROMPT, NEGATIVE, 11, 6, 7.5, 64, 64, guidance_interval=window)
    assert worst(image, expected) <= MAX_DIFF


def test_interval_moves_the_image_and_batches_the_unet_as_diffusers_does(loud):
    """Guards the parity test: the interval changes the image, and both sides run the UNet at batch 2
    exactly inside it (diffusers' side switched by the callback, Kiln's by guided_steps)."""
    import torch

    from kiln.pipeline.engines import Engines, OnnxRuntimeRunner
    from kiln.pipeline.reference import diffusers_image, load_diffusers_pipeline

    folder, onnx = loud
    pipe = OnnxPipeline(onnx)
    full = pipe(interval(0.0, 1.0))
    assert np.array_equal(full, pipe(request(1.0)))
    assert worst(pipe(interval(0.34, 1.0)), full) > 3 * MAX_DIFF
    assert worst(pipe(interval(0.2, 0.7)), pipe(interval(0.34, 0.7))) > MAX_DIFF  # one step fewer shows
    rows, theirs = [], []
    runner = OnnxRuntimeRunner(onnx)

    def counted(spec, feeds, outputs):
        if spec.name == "unet":
            rows.append(len(feeds["sample"]))
        return runner(spec, feeds, outputs)

    counted.device = runner.device
    pipe.engines = Engines(counted, runner.components, runner.family)
    pipe(interval(0.2, 0.7, steps=10))
    reference = load_diffusers_pipeline(folder)
    forward = reference.unet.forward

    def recorded(sample, *args, **kwargs):
        theirs.append(sample.shape[0])
        return forward(sample, *args, **kwargs)

    reference.unet.forward = recorded
    with torch.no_grad():
        diffusers_image(reference, "euler", PROMPT, NEGATIVE, 11, 10, 7.5, 64, 64, guidance_interval=(0.2, 0.7))
    assert rows == theirs == [1] * 2 + [2] * 5 + [1] * 3


def test_sdxl_interval_equals_diffusers_with_the_interval_callback(sdxl_onnx, sdxl_model):
    from kiln.pipeline.reference import diffusers_image, load_diffusers_pipeline

    pipe = load_diffusers_pipeline(sdxl_model())
    for negative in (NEGATIVE, ""):  # an empty negative prompt is zeros on SDXL, on both sides
        image = OnnxPipeline(sdxl_onnx())(replace(interval(0.34, 0.84), negative_prompt=negative))
        expected = diffusers_image(pipe, "euler", PROMPT, negative, 11, 6, 7.5, 64, 64, guidance_interval=(0.34, 0.84))
        assert worst(image, expected) <= MAX_DIFF


def test_interval_is_checked_by_name():
    def raw(**values):
        return {"prompt": np.array([b"a cat"]), **{k: np.array([v], np.float32) for k, v in values.items()}}

    def parse(body, defaults=Defaults(height=64, width=64)):
        return parse_request(body, defaults, Limits(max_size=1024), 8)

    for field in ("guidance_start", "guidance_end"):
        for value in (-0.1, 1.5, float("nan"), float("inf")):
            with pytest.raises(RequestError, match=rf"{field}=.*\[0, 1\]"):
                parse(raw(**{field: value}))
    with pytest.raises(RequestError, match=r"guidance_start=0.6 .*below guidance_end .*guidance_scale 1"):
        parse(raw(guidance_start=0.6, guidance_end=0.3))
    with pytest.raises(RequestError, match=r"guidance_end=0.2 .*below guidance_end"):
        parse(raw(guidance_end=0.2), Defaults(height=64, width=64, guidance_start=0.5))
    parsed = parse({"prompt": np.array([b"a cat"])}, Defaults(height=64, width=64, guidance_start=0.1, guidance_end=0.8))
    assert (parsed.guidance_start, parsed.guidance_end) == (pytest.approx(0.1), pytest.approx(0.8))


def test_served_interval_and_its_deployment_default(triton, onnx_dir, tmp_path):
    import json

    from kiln.model_repository.builder import build_repository, check_defaults
    from kiln.model_repository.configs import parse_pbtxt

    info = triton()
    expected = OnnxPipeline(onnx_dir())(interval(0.2, 0.7))
    for protocol, url in (("http", info.http_url), ("grpc", info.grpc_url)):
        client = KilnClient(url, protocol)
        served = client.generate(PROMPT, negative_prompt=NEGATIVE, seed=11, steps=6, guidance_scale=7.5,
                                 scheduler="euler", guidance_start=0.2, guidance_end=0.7)
        assert worst(served.images, expected) <= MAX_DIFF
        with pytest.raises(ClientError, match=r"guidance_start=0.9 is invalid") as caught:
            client.generate(PROMPT, steps=2, guidance_start=0.9, guidance_end=0.5)
        assert caught.value.rejected
    with pytest.raises(RepositoryError, match=r"--default-guidance-start 0.5 and --default-guidance-end 0.5"):
        check_defaults({"guidance_start": 0.5, "guidance_end": 0.5}, Limits())
    repo = build_repository(onnx_dir(), tmp_path / "repo", defaults={"guidance_start": 0.25, "guidance_end": 0.75})
    settings = json.loads(parse_pbtxt((repo / "pipeline" / "config.pbtxt").read_text())
                          .parameters["kiln_settings"].string_value)
    assert settings["defaults"]["guidance_start"] == 0.25
