"""SDXL through the same spine as SD 1.x: a tiny SDXL folder (two text encoders of different widths,
a UNet with text_time conditioning) exported, checked against PyTorch, served by the embedded Triton
and compared with diffusers' StableDiffusionXLPipeline drawing in-process."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from kiln.clients.client import KilnClient
from kiln.errors import ClientError, ModelError
from kiln.models.folder import inspect_model, model_dims
from kiln.pipeline.request import SizeConditioning

MAX_DIFF = 2  # on the 0-255 scale
PROMPT, NEGATIVE = "a red digit 7 on a white background", "blurry, low quality"


def client(info, protocol):
    return KilnClient(info.http_url if protocol == "http" else info.grpc_url, protocol)


@pytest.fixture(scope="module")
def pipes(sdxl_model):
    from kiln.pipeline.reference import load_diffusers_pipeline

    cache = {}

    def get(kind="epsilon"):
        if kind not in cache:
            cache[kind] = load_diffusers_pipeline(sdxl_model(kind))
        return cache[kind]

    return get


def test_the_folder_is_read_as_sdxl(sdxl_model, tmp_path):
    info = inspect_model(sdxl_model("v_prediction"))
    assert (info.family, info.prediction_type, info.zero_empty_negative) == ("sdxl", "v_prediction", True)
    assert info.scaling_factor == pytest.approx(0.13025)
    dims = model_dims(sdxl_model())
    assert (dims.hidden_size, dims.hidden_size_2, dims.pooled_size, dims.cross_attention_dim) == (32, 48, 40, 80)
    # a refiner-style UNet (aesthetic score: 5 size values) is refused with the reason
    import shutil

    copy = tmp_path / "refiner"
    shutil.copytree(sdxl_model(), copy)
    config = json.loads((copy / "unet" / "config.json").read_text())
    config["projection_class_embeddings_input_dim"] = 5 * config["addition_time_embed_dim"] + 40
    (copy / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="refiner"):
        inspect_model(copy)
    shutil.rmtree(copy / "text_encoder_2")
    with pytest.raises(ModelError, match=r"lacks \['text_encoder_2'\]"):
        inspect_model(copy)


def test_export_holds_every_sdxl_component_checked_at_two_shapes(sdxl_onnx):
    manifest = json.loads((sdxl_onnx() / "manifest.json").read_text())
    assert manifest["model"]["family"] == "sdxl"
    assert sorted(manifest["components"]) == ["text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"]
    for name, entry in manifest["components"].items():
        assert len(entry["parity"]) == 2, name
        for report in entry["parity"]:
            bound = report["tolerance"]
            for t in report["tensors"]:
                assert t["max_abs"] <= bound["atol"] + bound["rtol"] * t["ref_max_abs"], (name, t)
    assert [t["name"] for t in manifest["components"]["unet"]["inputs"]] == [
        "sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert [t["name"] for t in manifest["components"]["text_encoder_2"]["outputs"]] == ["hidden_states", "text_embeds"]
    assert (sdxl_onnx() / "tokenizer_2" / "vocab.json").is_file()


def test_fp16_export_keeps_the_vae_fp32(sdxl_model, tmp_path):
    from kiln.export.onnx_export import export_onnx

    result = export_onnx(sdxl_model(), tmp_path / "fp16", precision="fp16",
                         components=("text_encoder_2", "vae_decoder"))
    precisions = {c.name: c.precision for c in result.components}
    assert precisions == {"text_encoder_2": "fp16", "vae_decoder": "fp32"}  # SDXL's VAE overflows in fp16


def test_in_process_pipeline_equals_diffusers_and_every_input_moves_the_image(sdxl_onnx, pipes):
    """Kiln's core over ONNX Runtime against StableDiffusionXLPipeline; the guard: changing any one
    input (prompt, negative, seed, steps, guidance, size and each size-conditioning value) moves the
    image beyond the bound, so agreement is not an accident of insensitive inputs."""
    from kiln.pipeline.onnx_pipeline import OnnxPipeline
    from kiln.pipeline.reference import diffusers_image
    from kiln.pipeline.request import GenerationRequest

    kiln = OnnxPipeline(sdxl_onnx())
    base = dict(prompt=PROMPT, negative_prompt=NEGATIVE, seed=3, steps=4, guidance_scale=7.5, height=64, width=64,
                scheduler="euler", sizes=SizeConditioning((96, 128), (8, 4), (64, 64)))

    def kiln_image(**change):
        return kiln(GenerationRequest(**{**base, **change}))

    def diffusers(**change):
        r = {**base, **change}
        return diffusers_image(pipes(), r["scheduler"], r["prompt"], r["negative_prompt"], r["seed"], r["steps"],
                               r["guidance_scale"], r["height"], r["width"], sizes=r["sizes"])

    reference = kiln_image()
    assert np.abs(reference.astype(int) - diffusers()).max() <= MAX_DIFF
    changes = {"prompt": dict(prompt="a blue digit 3"), "negative": dict(negative_prompt="sharp"),
               "empty negative": dict(negative_prompt=""), "seed": dict(seed=4), "steps": dict(steps=5),
               "guidance": dict(guidance_scale=3.0), "size": dict(height=80),
               "original size": dict(sizes=SizeConditioning((512, 128), (8, 4), (64, 64))),
               "crop": dict(sizes=SizeConditioning((96, 128), (0, 0), (64, 64))),
               "target size": dict(sizes=SizeConditioning((96, 128), (8, 4), (1024, 64)))}
    for what, change in changes.items():
        moved = kiln_image(**change)
        if moved.shape == reference.shape:
            assert np.abs(moved.astype(int) - reference).max() > MAX_DIFF, f"{what} did not move the image"
        assert np.abs(moved.astype(int) - diffusers(**change)).max() <= MAX_DIFF, what


PARITY_CASES = [
    # (kind, scheduler, protocol, negative, size conditioning)
    ("epsilon", "euler", "http", NEGATIVE, None),
    ("epsilon", "euler_a", "grpc", "", None),  # ancestral; empty negative: zeros, as diffusers
    ("epsilon", "dpmpp_2m", "http", NEGATIVE, ((512, 384), (16, 0), (64, 64))),
    ("epsilon", "ddim", "grpc", NEGATIVE, None),
    ("v_prediction", "euler", "grpc", NEGATIVE, ((128, 128), (0, 8), None)),
    ("v_prediction", "euler_a", "http", "", None),
    ("v_prediction", "dpmpp_2m", "grpc", NEGATIVE, None),
    ("v_prediction", "ddim", "http", NEGATIVE, None),
]


@pytest.mark.triton
@pytest.mark.parametrize("kind, scheduler, protocol, negative, sizes", PARITY_CASES)
def test_served_sdxl_image_equals_diffusers(sdxl_triton, pipes, kind, scheduler, protocol, negative, sizes):
    from kiln.pipeline.reference import diffusers_image

    original, crop, target = sizes or (None, None, None)
    with client(sdxl_triton(kind), protocol) as c:
        result = c.generate(PROMPT, negative, seed=21, steps=4, guidance_scale=6.0, height=64, width=80,
                            scheduler=scheduler, original_size=original, crop_top_left=crop, target_size=target)
    expected = diffusers_image(pipes(kind), scheduler, PROMPT, negative, 21, 4, 6.0, 64, 80,
                               sizes=SizeConditioning(original, crop or (0, 0), target))
    assert result.images.shape == expected.shape == (1, 64, 80, 3)
    diff = np.abs(result.images.astype(int) - expected).max()
    assert diff <= MAX_DIFF, f"{kind}/{scheduler}/{protocol}: max |Triton - diffusers| = {diff}"


@pytest.mark.triton
def test_weighted_long_prompts_and_several_images_match_diffusers_from_the_same_embeddings(sdxl_triton, pipes):
    from kiln.pipeline.reference import diffusers_image

    prompt = "a (red:1.5) digit [7] on a ((white)) background BREAK " + ", ".join(["sharp lines"] * 30)
    with client(sdxl_triton(), "grpc") as c:
        served = c.generate(prompt, "(blurry:1.2)", seed=6, steps=3, scheduler="euler_a", num_images=2)
    expected = diffusers_image(pipes(), "euler_a", prompt, "(blurry:1.2)", 6, 3, 7.5, 64, 64, num_images=2,
                               weighted=True)
    assert served.images.shape == (2, 64, 64, 3) and served.seeds == [6, 7]
    assert np.abs(served.images.astype(int) - expected).max() <= MAX_DIFF


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.triton
def test_img2img_equals_diffusers_sdxl_img2img(sdxl_triton, pipes):
    from kiln.pipeline.reference import diffusers_image

    source = np.zeros((64, 64, 3), np.uint8)
    source[16:48, 16:48] = (220, 30, 30)
    with client(sdxl_triton(), "http") as c:
        served = c.generate("a red square", NEGATIVE, seed=8, steps=5, image=_png(source), strength=0.6,
                            scheduler="euler")
    expected = diffusers_image(pipes(), "euler", "a red square", NEGATIVE, 8, 5, 7.5, 64, 64,
                               image=Image.fromarray(source), strength=0.6)
    assert np.abs(served.images.astype(int) - expected).max() <= MAX_DIFF


@pytest.mark.triton
def test_size_conditioning_is_checked_and_refused_by_other_families(sdxl_triton, triton):
    with client(sdxl_triton(), "http") as c:
        with pytest.raises(ClientError, match=r"crop_top=-1 is invalid: expected an integer in \[0, 8192\]"):
            c.generate(PROMPT, steps=1, crop_top_left=(-1, 0))
        with pytest.raises(ClientError, match="original_width=None is invalid"):
            _infer_raw(c, original_height=64)  # the client sends pairs; a raw request may not
        assert c.generate(PROMPT, steps=1).images.shape == (1, 64, 64, 3)
    with client(triton("epsilon"), "grpc") as c:
        with pytest.raises(ClientError, match="only SDXL models take size conditioning"):
            c.generate(PROMPT, steps=1, original_size=(512, 512))


def _infer_raw(c, **fields):
    inputs = c.request_inputs(prompt=PROMPT, steps=1, **fields)
    return c._call("generate", c._client.infer, c.model, inputs)
