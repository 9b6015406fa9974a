"""ControlNet through the spine: tiny ControlNets of the tiny model exported beside a UNet that takes
their residuals (each checked against PyTorch), Kiln's pipeline drawing with them compared with
diffusers' ControlNet pipelines (one ControlNet and MultiControlNet, start/end fractions, img2img,
SDXL), then the same requests through a real Triton over HTTP and gRPC, and what a careless or hostile
client sends refused by name with the server still up."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kiln.clients.client import KilnClient
from kiln.errors import ClientError, ExportError, RequestError
from kiln.export.onnx_export import export_onnx
from kiln.model_repository.builder import build_repository
from kiln.models.controlnet import check_controlnets, write_tiny_controlnet
from kiln.pipeline.onnx_pipeline import OnnxPipeline
from kiln.pipeline.request import Defaults, Limits, parse_request
from kiln.serving import server

MAX_DIFF = 2  # on the 0-255 scale, as every parity test of the served image
PROMPT = "a red digit 7 on a white background"


def png(height: int, width: int, seed: int) -> bytes:
    pixels = (np.random.default_rng(seed).uniform(0, 1, (height, width, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def square(offset: int) -> bytes:
    """A white 24-pixel square on black, at (offset, offset): a control image with a place."""
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[offset:offset + 24, offset:offset + 24] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def pil(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


# one control image at the generated size, one of another size and aspect (resized, as diffusers does)
CONTROLS = (png(64, 64, 1), png(48, 80, 2))


@pytest.fixture(scope="module")
def controlnets(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnets")
    return {"edge": write_tiny_controlnet(tiny_model(), root / "edge", seed=1),
            "pose": write_tiny_controlnet(tiny_model(), root / "pose", seed=2)}


@pytest.fixture(scope="module")
def controlled_onnx(tiny_model, controlnets, tmp_path_factory):
    return export_onnx(tiny_model(), tmp_path_factory.mktemp("controlled") / "onnx", controlnets=controlnets).out_dir


@pytest.fixture(scope="module")
def diffusers_draw(tiny_model, controlnets):
    """diffusers' ControlNet pipelines on the same folders: controls are (name, image bytes, scale, start, end)."""
    from diffusers import ControlNetModel

    from kiln.pipeline.reference import diffusers_image, load_diffusers_pipeline

    pipe = load_diffusers_pipeline(tiny_model())
    nets = {name: ControlNetModel.from_pretrained(folder) for name, folder in controlnets.items()}

    def draw(scheduler, controls, seed=3, steps=6, num_images=1, image=None, strength=0.8):
        return diffusers_image(pipe, scheduler, PROMPT, "", seed, steps, 7.5, 64, 64, num_images=num_images,
                               image=None if image is None else pil(image), strength=strength,
                               controls=[(nets[n], pil(data), scale, start, end) for n, data, scale, start, end in controls])

    return draw


def raw_request(**fields) -> dict:
    out = {"prompt": np.array([PROMPT.encode()], dtype=object), "steps": np.array([6], np.int32),
           "seed": np.array([3], np.int64)}
    for name, value in fields.items():
        values = value if isinstance(value, list) else [value]
        kind = object if isinstance(values[0], (bytes, str)) else np.int32 if isinstance(values[0], int) else np.float32
        out[name] = np.array([v.encode() if isinstance(v, str) else v for v in values], dtype=kind)
    return out


def request(controlnets=("edge", "pose"), **fields):
    return parse_request(raw_request(**fields), Defaults(height=64, width=64), Limits(max_size=1024), 8,
                         controlnets=controlnets)


def worst(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_export_holds_each_controlnet_checked_against_pytorch(controlled_onnx):
    manifest = json.loads((controlled_onnx / "manifest.json").read_text())
    assert {"controlnet_edge", "controlnet_pose", "unet"} <= set(manifest["components"])
    for name in ("controlnet_edge", "controlnet_pose", "unet"):
        entry = manifest["components"][name]
        assert len(entry["parity"]) == 2  # two shapes
        assert max(t["max_abs"] for r in entry["parity"] for t in r["tensors"]) < 1e-4
    unet_inputs = [t["name"] for t in manifest["components"]["unet"]["inputs"]]
    residuals = [t["name"] for t in manifest["components"]["controlnet_edge"]["outputs"]]
    assert unet_inputs[3:] == residuals and residuals[-1] == "mid_block_res"
    assert [t["optional"] for t in manifest["components"]["unet"]["inputs"]] == [False] * 3 + [True] * len(residuals)


def test_kiln_draws_what_diffusers_draws_with_controlnets(controlled_onnx, diffusers_draw):
    pipe = OnnxPipeline(controlled_onnx)
    one = pipe(request(controlnet="edge", control_image=CONTROLS[0], scheduler="euler"))
    assert worst(one, diffusers_draw("euler", [("edge", CONTROLS[0], 1.0, 0.0, 1.0)])) <= MAX_DIFF
    # both at once (diffusers' MultiControlNet), scales and schedule fractions of their own
    both = pipe(request(control_image=list(CONTROLS), control_scale=[0.7, 1.3], control_start=[0.0, 0.2],
                        control_end=[0.8, 1.0], scheduler="ddim"))
    expected = diffusers_draw("ddim", [("edge", CONTROLS[0], 0.7, 0.0, 0.8), ("pose", CONTROLS[1], 1.3, 0.2, 1.0)])
    assert worst(both, expected) <= MAX_DIFF
    late = pipe(request(controlnet="pose", control_image=CONTROLS[1], control_scale=1.5, control_end=0.5,
                        scheduler="dpmpp_2m", num_images=2))
    assert worst(late, diffusers_draw("dpmpp_2m", [("pose", CONTROLS[1], 1.5, 0.0, 0.5)], num_images=2)) <= MAX_DIFF


def test_img2img_with_a_controlnet_matches_diffusers(controlled_onnx, diffusers_draw):
    init = png(64, 64, 9)
    ours = OnnxPipeline(controlled_onnx)(request(controlnet="edge", control_image=CONTROLS[0], init_image=init,
                                                 strength=0.6, scheduler="euler"))
    assert worst(ours, diffusers_draw("euler", [("edge", CONTROLS[0], 1.0, 0.0, 1.0)], image=init, strength=0.6)) <= MAX_DIFF


def test_control_moves_the_image_and_leaving_it_out_is_the_plain_model(controlled_onnx, onnx_dir):
    """The guard: a parity test alone would pass if neither side applied control."""
    controlled, plain = OnnxPipeline(controlled_onnx), OnnxPipeline(onnx_dir())
    without = controlled(request())
    assert np.array_equal(without, plain(request(controlnets=())))  # zero residuals: the base UNet exactly
    left, right = (controlled(request(controlnet="edge", control_image=square(offset))) for offset in (4, 36))
    assert np.abs(left.astype(float) - without).mean() > 2.0  # control moves the image...
    assert np.abs(left.astype(float) - right).mean() > 2.0  # ...and another control image moves it elsewhere
    zero = controlled(request(controlnet="edge", control_image=square(4), control_scale=0.0))
    assert np.array_equal(zero, without)  # a scale of 0 adds nothing


def test_sdxl_controlnet_matches_diffusers(sdxl_model, tmp_path):
    from diffusers import ControlNetModel

    from kiln.pipeline.reference import diffusers_image, load_diffusers_pipeline

    folder = write_tiny_controlnet(sdxl_model(), tmp_path / "depth")
    onnx = export_onnx(sdxl_model(), tmp_path / "onnx", controlnets={"depth": folder}).out_dir
    raw = raw_request(control_image=CONTROLS[0], control_scale=0.8, scheduler="euler")
    ours = OnnxPipeline(onnx)(parse_request(raw, Defaults(height=64, width=64), Limits(max_size=1024), 8,
                                            conditioned=True, controlnets=("depth",)))
    theirs = diffusers_image(load_diffusers_pipeline(sdxl_model()), "euler", PROMPT, "", 3, 6, 7.5, 64, 64,
                             controls=[(ControlNetModel.from_pretrained(folder), pil(CONTROLS[0]), 0.8, 0.0, 1.0)])
    assert worst(ours, theirs) <= MAX_DIFF


def test_a_controlnet_for_another_base_or_no_controlnet_at_all_is_refused_before_export(tiny_model, controlnets, sdxl_model,
                                                                                          tmp_path):
    with pytest.raises(ExportError, match=r"ControlNet name 'Edge!' is invalid"):
        check_controlnets({"Edge!": controlnets["edge"]}, tiny_model())
    with pytest.raises(ExportError, match="is not a folder"):
        check_controlnets({"edge": tmp_path / "missing"}, tiny_model())
    with pytest.raises(ExportError, match="holds a UNet2DConditionModel, not a ControlNet"):
        check_controlnets({"edge": tiny_model() / "unet"}, tiny_model())
    xl = write_tiny_controlnet(sdxl_model(), tmp_path / "xl")
    with pytest.raises(ExportError, match=r"was built for another base: its (cross_attention_dim|addition_embed_type)"):
        check_controlnets({"xl": xl}, tiny_model())
    wide = tmp_path / "wide"
    shutil.copytree(controlnets["edge"], wide)
    config = json.loads((wide / "config.json").read_text())
    config["block_out_channels"] = [32, 128]
    (wide / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match=r"its block_out_channels is \[32, 128\], the UNet's .* is \[32, 64\]"):
        export_onnx(tiny_model(), tmp_path / "never", controlnets={"wide": wide})
    pooled = tmp_path / "pooled"
    shutil.copytree(controlnets["edge"], pooled)
    config = json.loads((pooled / "config.json").read_text())
    (pooled / "config.json").write_text(json.dumps({**config, "global_pool_conditions": True}))
    with pytest.raises(ExportError, match="global_pool_conditions=true"):
        export_onnx(tiny_model(), tmp_path / "never", controlnets={"pooled": pooled})
    weights = pooled / "diffusion_pytorch_model.safetensors"
    (pooled / "config.json").write_text(json.dumps(config))
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ExportError, match=r"pooled: .*diffusion_pytorch_model.safetensors cannot be read"):
        export_onnx(tiny_model(), tmp_path / "never", controlnets={"pooled": pooled})
    weights.unlink()
    with pytest.raises(ExportError, match=r"has no weights: expected diffusion_pytorch_model.safetensors"):
        export_onnx(tiny_model(), tmp_path / "never", controlnets={"pooled": pooled})
    assert not (tmp_path / "never" / "unet").exists()  # each refused before any export work


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (its pixels are never there): what a decompression bomb
    looks like before decoding."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_control_images_are_bounded_before_decoding():
    from kiln.pipeline.denoise import load_pixels

    for side in (5000, 30000):  # above the bound; above PIL's own bomb limit too
        with pytest.raises(RequestError, match=r"control_image=.*at most 16.8 megapixels"):
            load_pixels(huge_png_header(side, side), 64, 64, field="control_image")


def test_request_fields_are_checked_by_name():
    with pytest.raises(RequestError, match=r"control_image.*this model serves no ControlNet.*--controlnet NAME=DIR"):
        request(controlnets=(), control_image=CONTROLS[0])
    with pytest.raises(RequestError, match=r"one image per ControlNet: 2 for \['edge', 'pose'\]"):
        request(control_image=CONTROLS[0])
    with pytest.raises(RequestError, match=r"controlnet='edge,edge'.*each ControlNet once"):
        request(controlnet="edge,edge", control_image=list(CONTROLS))
    with pytest.raises(RequestError, match=r"control_image=None.*one encoded PNG or JPEG per ControlNet \(edge, pose\)"):
        request(control_scale=1.0)
    with pytest.raises(RequestError, match=r"control_image=None.*per ControlNet \(pose\) when controlnet is given"):
        request(controlnet="pose")
    for scale in (2.5, -0.1, float("nan"), float("inf")):
        with pytest.raises(RequestError, match=r"control_scale=.*\[0, 2\]"):
            request(controlnet="edge", control_image=CONTROLS[0], control_scale=scale)
    with pytest.raises(RequestError, match=r"control_scale='<3 values>'.*one value for every ControlNet, or one each"):
        request(control_image=list(CONTROLS), control_scale=[1.0, 1.0, 1.0])
    with pytest.raises(RequestError, match=r"control_start=0.6.*below control_end"):
        request(controlnet="edge", control_image=CONTROLS[0], control_start=0.6, control_end=0.6)


@pytest.fixture(scope="module")
def controlled_server(controlled_onnx, tmp_path_factory):
    repo = build_repository(controlled_onnx, tmp_path_factory.mktemp("controlled-repo") / "repo")
    with contextlib.ExitStack() as stack:
        yield stack.enter_context(server.running_server(repo))


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_controlnets_match_diffusers(controlled_server, diffusers_draw, protocol):
    info = controlled_server
    client = KilnClient(info.http_url if protocol == "http" else info.grpc_url, protocol)
    both = client.generate(PROMPT, seed=3, steps=6, scheduler="ddim", control_image=list(CONTROLS),
                           control_scale=[0.7, 1.3], control_start=[0.0, 0.2], control_end=[0.8, 1.0])
    expected = diffusers_draw("ddim", [("edge", CONTROLS[0], 0.7, 0.0, 0.8), ("pose", CONTROLS[1], 1.3, 0.2, 1.0)])
    assert worst(both.images, expected) <= MAX_DIFF
    pose = client.generate(PROMPT, seed=3, steps=6, scheduler="euler", controlnet=["pose"], control_image=CONTROLS[1],
                           num_images=2)
    assert worst(pose.images, diffusers_draw("euler", [("pose", CONTROLS[1], 1.0, 0.0, 1.0)], num_images=2)) <= MAX_DIFF


def test_bad_control_requests_get_400s_naming_the_field_and_the_server_stays_up(controlled_server):
    import tritonclient.http as http

    info = controlled_server
    client = KilnClient(info.http_url, "http")
    bad = [
        (dict(controlnet="edge", control_image=b"not an image"), r"control_image='<12 bytes>'.*a PNG or JPEG file"),
        (dict(controlnet="edge", control_image=b"\x89PNG\r\n\x1a\n" + b"0" * 64), r"control_image=.*a PNG or JPEG file"),
        (dict(controlnet="nope", control_image=CONTROLS[0]), r"controlnet='nope'.*names from \['edge', 'pose'\]"),
        (dict(control_image=list(CONTROLS), control_scale=3.0), r"control_scale=3.0.*\[0, 2\]"),
        (dict(control_image=[CONTROLS[0]]), r"one image per ControlNet: 2"),
    ]
    for fields, message in bad:
        with pytest.raises(ClientError, match=message) as caught:
            client.generate(PROMPT, steps=2, **fields)
        assert caught.value.rejected, fields
    with pytest.raises(ClientError, match=r"control_image=\[\] cannot be sent"):
        client.generate(PROMPT, steps=2, control_image=[])
    # the components themselves are reachable: inputs that disagree in size are refused by name
    raw = http.InferenceServerClient(info.http_url.split("//")[-1])

    def call(model, **feeds):
        tensors = []
        for name, value in feeds.items():
            tensor = http.InferInput(name, list(value.shape), "FP32")
            tensor.set_data_from_numpy(value)
            tensors.append(tensor)
        return raw.infer(model, tensors)

    base = dict(sample=np.zeros((1, 4, 8, 8), np.float32), timestep=np.array([[10]], np.float32),
                encoder_hidden_states=np.zeros((1, 77, 32), np.float32))
    residuals = {f"down_block_res_{i}": np.zeros((1, c, 8 // f, 8 // f), np.float32)
                 for i, (c, f) in enumerate([(32, 1), (32, 1), (32, 1), (32, 2), (64, 2), (64, 2)])}
    call("unet", **base, **residuals, mid_block_res=np.zeros((1, 64, 4, 4), np.float32))  # all of them, or none
    with pytest.raises(Exception, match=r"come all together or not at all: 1 of 7 given \(down_block_res_0 missing\)"):
        call("unet", **base, mid_block_res=np.zeros((1, 64, 4, 4), np.float32))
    with pytest.raises(Exception, match=r"mid_block_res's latent_height/2 is 3: sample makes latent_height 8, so it must be 4"):
        call("unet", **base, **residuals, mid_block_res=np.zeros((1, 64, 3, 3), np.float32))
    with pytest.raises(Exception, match=r"controlnet_cond's height is 32: sample makes latent_height 8, so it must be 64"):
        call("controlnet_edge", **base, controlnet_cond=np.zeros((1, 3, 32, 64), np.float32),
             conditioning_scale=np.ones((1, 1), np.float32))
    with pytest.raises(Exception, match=r"controlnet_cond=.*pixel values in \[0, 1\]"):
        call("controlnet_edge", **base, controlnet_cond=np.full((1, 3, 64, 64), np.nan, np.float32),
             conditioning_scale=np.ones((1, 1), np.float32))
    assert client.health() == {"live": True, "ready": True}
    assert client.generate(PROMPT, steps=2, controlnet="edge", control_image=CONTROLS[0]).images.shape == (1, 64, 64, 3)


def test_tensorrt_profiles_size_residuals_and_control_images_from_the_latents(controlled_onnx):
    """No GPU needed to plan the engines: each ControlNet's and the UNet's profiles derive from the specs."""
    from kiln.export.tensorrt import plan_engines

    plans = {c.component: c.profiles[0] for c in plan_engines(controlled_onnx).components}
    assert {"controlnet_edge", "controlnet_pose"} <= set(plans)
    latent_sides = [shape[2:] for shape in plans["unet"]["sample"]]
    assert [shape[2:] for shape in plans["unet"]["mid_block_res"]] == [[h // 2, w // 2] for h, w in latent_sides]
    assert [shape[2:] for shape in plans["controlnet_edge"]["controlnet_cond"]] == [[h * 8, w * 8] for h, w in latent_sides]
    assert [shape[1] for shape in plans["controlnet_edge"]["controlnet_cond"]] == [3, 3, 3]


# --- training: control images made from the data, a ControlNet trained, resumed, exported ---


@pytest.fixture(scope="module")
def control_data(tmp_path_factory):
    from images import write_folder

    from kiln.dataset.prepare import PrepareOptions, prepare

    root = tmp_path_factory.mktemp("control-data")
    prepare(write_folder(root / "src", 8), root / "mask", PrepareOptions(resolution=64, control="mask"))
    return root / "mask"


def test_prepare_makes_control_images_that_line_up_with_the_images(control_data, tmp_path):
    from images import shape_image, write_folder

    from kiln.dataset.control import foreground, iou
    from kiln.dataset.prepare import PrepareOptions, prepare

    rows = [json.loads(line) for line in (control_data / "metadata.jsonl").read_text().splitlines()]
    assert all(r["conditioning_file_name"] == f"conditioning/{i:06d}.png" for i, r in enumerate(rows))
    for row in rows:
        image = Image.open(control_data / row["file_name"])
        control = np.asarray(Image.open(control_data / row["conditioning_file_name"]).convert("L")) > 127
        assert control.shape == (64, 64) and 0.05 < control.mean() < 0.6  # a shape, not the whole frame
        assert iou(control, foreground(image)) == 1.0
    # the mask of a known shape is that shape (a filled square drawn at a known place)
    square, _ = shape_image(0, 96)
    truth = np.zeros((96, 96), bool)
    truth[10:10 + 49, 8:8 + 49] = True
    assert iou(foreground(square), truth) > 0.95
    canny = tmp_path / "canny"
    prepare(write_folder(tmp_path / "src", 4), canny, PrepareOptions(resolution=64, control="canny"))
    edges = np.asarray(Image.open(canny / "conditioning" / "000000.png").convert("L")) > 127
    filled = foreground(Image.open(canny / "images" / "000000.png"))
    inner = filled & np.roll(filled, 2, 0) & np.roll(filled, -2, 0) & np.roll(filled, 2, 1) & np.roll(filled, -2, 1)
    assert edges.sum() > 20 and not (edges & inner).any()  # edges on the outline, none inside the shape


def test_a_trained_controlnet_learns_resumes_exactly_and_exports_beside_its_base(tiny_model, control_data, tmp_path):
    from safetensors.torch import load_file

    from kiln.training.run import run_training
    from kiln.training.run_log import read_losses

    from training_runs import train_settings

    common = ["max_train_steps=6", "checkpointing_steps=3", "optim.learning_rate=1e-3", "data.caption_dropout=0.2"]
    whole = tmp_path / "whole"
    summary = run_training("controlnet", None, train_settings(tiny_model(), control_data, whole, *common))
    assert summary["fixed_batch_loss"]["end"] < summary["fixed_batch_loss"]["start"], summary["fixed_batch_loss"]
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(whole / "checkpoints" / "checkpoint-3", resumed / "checkpoints" / "checkpoint-3")
    shutil.copytree(whole / "logs", resumed / "logs")
    run_training("controlnet", None, train_settings(tiny_model(), control_data, resumed, *common), resume="latest")
    expected, got = read_losses(whole / "logs" / "train_log.csv"), read_losses(resumed / "logs" / "train_log.csv")
    assert [got[s] for s in (4, 5, 6)] == [expected[s] for s in (4, 5, 6)]
    first = load_file(str(whole / "controlnet" / "diffusion_pytorch_model.safetensors"))
    again = load_file(str(resumed / "controlnet" / "diffusion_pytorch_model.safetensors"))
    assert all(np.array_equal(first[k].numpy(), again[k].numpy()) for k in first)
    assert check_controlnets({"shape": whole / "controlnet"}, tiny_model()) == {"shape": whole / "controlnet"}


def test_controlnet_training_without_control_images_is_refused_before_training(tiny_model, training_data, control_data,
                                                                                tmp_path):
    from kiln.errors import ConfigError, TrainingError
    from kiln.training.config import load_config
    from kiln.training.run import run_training

    from training_runs import train_settings

    with pytest.raises(TrainingError, match=r"8 of 8 training images have no control image") as caught:
        run_training("controlnet", None, train_settings(tiny_model(), training_data, tmp_path / "out", "max_train_steps=1"))
    assert "kiln data prepare SRC OUT --control canny" in caught.value.hint
    assert not (tmp_path / "out" / "checkpoints").exists()
    with pytest.raises(ConfigError, match=r"conditioning_embedding_out_channels=\[8, 16\] has 2 widths; this model's "
                                          r"VAE has 4 levels"):
        run_training("controlnet", None, train_settings(tiny_model(), training_data, tmp_path / "out",
                                                        "controlnet.conditioning_embedding_out_channels=[8, 16]"))
    with pytest.raises(ConfigError, match=r"controlnet.controlnet: .* holds a UNet2DConditionModel, not a ControlNet"):
        run_training("controlnet", None, train_settings(tiny_model(), training_data, tmp_path / "out",
                                                        f"controlnet.controlnet={tiny_model() / 'unet'}"))
    broken = tmp_path / "broken"
    shutil.copytree(control_data, broken)
    (broken / "conditioning" / "000007.png").write_bytes(b"junk")
    with pytest.raises(TrainingError, match=r"control image .*000007.png .* cannot be read"):
        run_training("controlnet", None, train_settings(tiny_model(), broken, tmp_path / "broken-run", "max_train_steps=2"))
    assert not (tmp_path / "broken-run" / "logs" / "train_log.csv").exists()  # before any step
    config = load_config("controlnet", Path(__file__).resolve().parents[1] / "training" / "configs" / "controlnet.yaml", [])
    assert config.controlnet.controlnet is None and config.data.augment.enabled


def test_glyph_control_images_are_the_drawn_digits_silhouettes(tmp_path):
    from kiln.dataset.control import foreground, iou
    from kiln.dataset.glyphs import write_glyphs

    out = write_glyphs(tmp_path / "glyphs", count=12, size=32, control=True)
    for row in map(json.loads, (out / "metadata.jsonl").read_text().splitlines()):
        control = np.asarray(Image.open(out / row["conditioning_file_name"]).convert("L")) > 127
        assert iou(control, foreground(Image.open(out / row["file_name"]))) > 0.8, row


def test_the_demo_control_set_and_its_bars(controlled_server, tmp_path):
    """The control prompts are reproducible held-out silhouettes of each prompt's own digit; the
    control-following measurement runs through a served ControlNet and its bars read its numbers."""
    from kiln.demo import CONTROL_COLOUR_BAR, CONTROL_GAIN_BAR, CONTROL_IOU_BAR, control_bars
    from kiln.evaluation.classifier import load_classifier, train_classifier
    from kiln.evaluation.report import EvalSpec, control_set, evaluate_control

    spec = EvalSpec(seeds=1, steps=2)
    first, again = control_set(spec), control_set(spec)
    assert first.images == again.images and [g.digit for g in first.glyphs] == list(range(10))
    assert {g.colour for g in first.glyphs} == {"red", "green", "blue", "yellow", "purple"}
    assert all(0.02 < m.mean() < 0.5 for m in first.masks)
    train_classifier(tmp_path / "classifier", samples=200, steps=5)
    result = evaluate_control(controlled_server.http_url, "http", "edge", load_classifier(tmp_path / "classifier"), spec,
                              tmp_path)
    assert result["prompts"] == 10 and Path(result["grid"]).is_file()
    for label in ("controlled", "uncontrolled"):
        assert 0.0 <= result[label]["iou_p10"] <= result[label]["iou"] <= 1.0
    bars = control_bars({**result, "controlled": {**result["controlled"], "iou": CONTROL_IOU_BAR,
                                                  "colour": CONTROL_COLOUR_BAR},
                         "uncontrolled": {**result["uncontrolled"], "iou": CONTROL_IOU_BAR - CONTROL_GAIN_BAR - 0.01}})
    assert [b["passed"] for b in bars] == [True, True, True]
    assert not control_bars({**result, "controlled": {**result["controlled"], "iou": 0.1}})[0]["passed"]


def test_fp16_export_holds_fp16_controlnets_that_draw_what_fp32_draws(tiny_model, controlnets, controlled_onnx, tmp_path):
    onnx = export_onnx(tiny_model(), tmp_path / "fp16", precision="fp16", controlnets={"edge": controlnets["edge"]}).out_dir
    manifest = json.loads((onnx / "manifest.json").read_text())
    assert manifest["components"]["controlnet_edge"]["precision"] == "fp16"
    assert manifest["components"]["unet"]["precision"] == "fp16"
    fields = dict(controlnet="edge", control_image=square(4), scheduler="euler")
    half, full = OnnxPipeline(onnx)(request(**fields)), OnnxPipeline(controlled_onnx)(request(**fields))
    assert np.abs(half.astype(float) - full).mean() < 1.0  # fp16 rounding, far below what control moves (> 2)


def test_a1111s_controlnet_extension_api_draws_what_triton_draws(controlled_server):
    """The gateway speaks the sd-webui-controlnet extension's API: its units become Kiln's control
    fields, the PNG equals Triton's image for the same request, and what it cannot draw is refused by name."""
    import base64
    import urllib.error
    import urllib.request

    from gateway_server import running_gateway

    pytest.importorskip("fastapi", reason="the gateway extra (pip install 'kiln[gateway]') is not installed")

    def call(path, body=None):
        request = urllib.request.Request(base + path, data=json.dumps(body).encode() if body else None,
                                         headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    with running_gateway(controlled_server) as base:
        assert call("/controlnet/model_list") == (200, {"model_list": ["edge", "pose"]})
        unit = {"image": base64.b64encode(CONTROLS[1]).decode(), "model": "pose [0123abcd]", "weight": 0.9,
                "guidance_start": 0.1, "guidance_end": 0.9, "resize_mode": "Just Resize"}
        status, answer = call("/sdapi/v1/txt2img", {"prompt": PROMPT, "seed": 5, "steps": 4, "sampler_name": "Euler",
                                                    "alwayson_scripts": {"controlnet": {"args": [unit]}}})
        assert status == 200, answer
        drawn = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))))
        direct = KilnClient(controlled_server.http_url, "http").generate(
            PROMPT, seed=5, steps=4, scheduler="euler", controlnet="pose", control_image=CONTROLS[1], control_scale=0.9,
            control_start=0.1, control_end=0.9).images[0]
        assert np.array_equal(drawn, direct)
        assert 'ControlNet 0: "Module: none, Model: pose, Weight: 0.9' in json.loads(answer["info"])["infotexts"][0]
        # the extension's default Crop and Resize: the 48x80 control image is cut to the square first
        cropped = call("/sdapi/v1/txt2img", {"prompt": PROMPT, "seed": 5, "steps": 4, "sampler_name": "Euler",
                                             "alwayson_scripts": {"controlnet": {"args": [{**unit, "resize_mode": 1}]}}})
        assert cropped[0] == 200 and not np.array_equal(
            np.asarray(Image.open(io.BytesIO(base64.b64decode(cropped[1]["images"][0])))), drawn)
        refused = [
            ({**unit, "module": "canny"}, "module", 422),
            ({**unit, "model": "depth"}, "model", 404),
            ({**unit, "control_mode": "ControlNet is more important"}, "control_mode", 422),
            ({**unit, "weight": 5}, "weight", 422),
            ({**unit, "image": "not base64!"}, "image", 422),
            ({**unit, "resize_mode": "Resize and Fill"}, "resize_mode", 422),
        ]
        for bad, field, code in refused:
            status, answer = call("/sdapi/v1/txt2img", {"prompt": PROMPT, "steps": 2,
                                                        "alwayson_scripts": {"controlnet": {"args": [bad]}}})
            assert status == code and field in json.dumps(answer), (bad, status, answer)
        status, answer = call("/sdapi/v1/txt2img", {"prompt": PROMPT, "steps": 2,
                                                    "alwayson_scripts": {"ADetailer": {"args": []}}})
        assert status == 422 and "alwayson_scripts" in json.dumps(answer)
        for units, message in (([unit, unit], "is in an earlier unit too"), ([unit] * 1000, "1000 enabled units"),
                               ([{**unit, "mask": unit["image"]}], "does not take ControlNet masks")):
            status, answer = call("/sdapi/v1/txt2img", {"prompt": PROMPT, "steps": 2,
                                                        "alwayson_scripts": {"controlnet": {"args": units}}})
            assert status == 422 and message in json.dumps(answer), (message, answer)
        # img2img: a unit without an image takes the init image, as the extension does
        init = base64.b64encode(square(36)).decode()
        without = {k: v for k, v in unit.items() if k != "image"}
        status, answer = call("/sdapi/v1/img2img", {"prompt": PROMPT, "seed": 2, "steps": 4, "init_images": [init],
                                                    "alwayson_scripts": {"controlnet": {"args": [without]}}})
        assert status == 200, answer
        direct = KilnClient(controlled_server.http_url, "http").generate(
            PROMPT, seed=2, steps=4, image=square(36), strength=0.75, controlnet="pose", control_image=square(36),
            control_scale=0.9, control_start=0.1, control_end=0.9).images[0]
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["images"][0])))), direct)


def test_the_web_pages_control_fields_reach_the_controlnet(controlled_server, tmp_path):
    from kiln.serving.ui import generate_images

    path = tmp_path / "control.png"
    path.write_bytes(square(36))
    args = (controlled_server.http_url, "txt2img", PROMPT, "", 3, 4, 7.5, "Euler", 64, 64, 1, None, None, "")
    page = generate_images(*args, str(path), "edge", 1.2)[0][0]
    direct = KilnClient(controlled_server.http_url, "http").generate(PROMPT, seed=3, steps=4, scheduler="euler",
                                                                     controlnet="edge", control_image=path, control_scale=1.2)
    assert np.array_equal(page, direct.images[0])
    assert not np.array_equal(page, generate_images(*args)[0][0])  # without the control image: another image


def test_the_ngc_target_serves_controlnets_on_native_backends(controlled_onnx, tmp_path):
    """NVIDIA's container: each ControlNet is an onnxruntime_onnx model on the GPU beside the UNet, whose
    residual inputs are required there (the BLS loop sends zeros: a native backend feeds every graph input)."""
    from kiln.model_repository.builder import build_models_repository
    from kiln.model_repository.configs import parse_pbtxt

    repo = build_models_repository({"txt2img": controlled_onnx}, tmp_path / "ngc", target="ngc")
    for name in ("controlnet_edge", "controlnet_pose"):
        config = parse_pbtxt((repo / name / "config.pbtxt").read_text())
        assert config.platform == "onnxruntime_onnx" and config.instance_group[0].kind == config.instance_group[0].KIND_GPU
        assert [t.name for t in config.output][-1] == "mid_block_res"
        assert (repo / name / "1" / "model.onnx").is_file()
    unet = parse_pbtxt((repo / "unet" / "config.pbtxt").read_text())
    residuals = [t for t in unet.input if t.name.endswith("_res") or "_res_" in t.name]
    assert residuals and not any(t.optional for t in residuals)
    pipeline = parse_pbtxt((repo / "pipeline" / "config.pbtxt").read_text())
    settings = json.loads(pipeline.parameters["kiln_settings"].string_value)
    assert settings["controlnets"] == ["controlnet_edge", "controlnet_pose"] and settings["dims"]["control"]
    manifest = json.loads((repo / "manifest.json").read_text())
    assert manifest["ensembles"]["txt2img"]["controlnets"] == ["edge", "pose"]
