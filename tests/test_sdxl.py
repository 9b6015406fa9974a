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
    wide = np.zeros((64, 128, 3), np.uint8)
    wide[16:48, 40:90] = (30, 30, 220)
    with client(sdxl_triton(), "grpc") as c:  # no height or width: the image keeps its own size, as diffusers'
        kept = c.generate("a blue bar", NEGATIVE, seed=3, steps=4, image=_png(wide), strength=0.7, scheduler="euler_a")
        with pytest.raises(ClientError, match=r"init_image='<8x8 pixels>' is invalid: expected sides from 64"):
            c.generate("a dot", steps=2, image=_png(np.zeros((8, 8, 3), np.uint8)))
        with pytest.raises(ClientError, match="strength=0.5 is invalid: expected nothing without init_image"):
            c.generate("a dot", steps=2, strength=0.5)
    expected = diffusers_image(pipes(), "euler_a", "a blue bar", NEGATIVE, 3, 4, 7.5, None, None,
                               image=Image.fromarray(wide), strength=0.7)
    assert kept.images.shape == expected.shape == (1, 64, 128, 3)
    assert np.abs(kept.images.astype(int) - expected).max() <= MAX_DIFF


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


@pytest.mark.triton
@pytest.mark.slow  # starts a Triton server of its own
def test_one_repository_serves_sd_and_sdxl_side_by_side(onnx_dir, sdxl_onnx, pipes, reference_image, tiny_model,
                                                        tmp_path):
    """Each family keeps its own ensemble, tokenizer (one or two), pipeline and native size."""
    from kiln.model_repository import configs
    from kiln.model_repository.builder import build_models_repository
    from kiln.pipeline.reference import diffusers_image
    from kiln.serving import server

    repo = build_models_repository({"sd": onnx_dir("epsilon"), "xl": sdxl_onnx()}, tmp_path / "repo")
    ngc = build_models_repository({"sd": onnx_dir("epsilon"), "xl": sdxl_onnx()}, tmp_path / "ngc", target="ngc",
                                  tuning=configs.Tuning(ort_accelerator="tensorrt"))
    caches = [configs.parse_pbtxt(p.read_text()).optimization.execution_accelerators.gpu_execution_accelerator[0]
              .parameters["trt_engine_cache_path"] for p in ngc.glob("unet_*/config.pbtxt")]
    assert len(caches) == len(set(caches)) == 2  # each UNet its own TensorRT engine cache
    summary = json.loads((repo / "manifest.json").read_text())["ensembles"]
    assert summary["sd"]["model"]["family"] == "sd1" and summary["xl"]["model"]["family"] == "sdxl"
    assert summary["sd"]["tokenizer"] != summary["xl"]["tokenizer"]
    assert summary["sd"]["limits"]["max_size"] == summary["xl"]["limits"]["max_size"] == 1024  # both tiny: native 64
    with server.running_server(repo) as info:
        with KilnClient(info.grpc_url, "grpc", model="xl") as c:
            xl = c.generate(PROMPT, NEGATIVE, seed=2, steps=3, scheduler="euler_a", height=64, width=96)
        with KilnClient(info.http_url, "http", model="sd") as c:
            sd = c.generate(PROMPT, NEGATIVE, seed=2, steps=3, scheduler="euler_a")
            with pytest.raises(ClientError, match="only SDXL models take size conditioning"):
                c.generate(PROMPT, steps=1, target_size=(64, 64))
        with KilnClient(info.http_url, "http") as c:  # no model named: the one-model endpoint is absent here
            with pytest.raises(ClientError, match="unknown model") as err:
                c.generate(PROMPT, steps=1)
            assert "--model NAME" in err.value.hint
    assert np.abs(xl.images.astype(int) - diffusers_image(pipes(), "euler_a", PROMPT, NEGATIVE, 2, 3, 7.5, 64, 96)).max() <= MAX_DIFF
    expected = reference_image(tiny_model("epsilon"), "euler_a", PROMPT, NEGATIVE, 2, 3, 7.5, 64, 64)
    assert np.abs(sd.images.astype(int) - expected).max() <= MAX_DIFF


def test_ngc_target_and_tensorrt_profiles_cover_sdxl(sdxl_onnx, tmp_path):
    """The NGC repository serves every SDXL component on the native backends with its spec's tensors,
    and the TensorRT plan profiles each at 1024x1024 with the guided batch doubled."""
    from kiln.export.specs import SDXL
    from kiln.export.tensorrt import plan_engines
    from kiln.model_repository import configs
    from kiln.model_repository.builder import build_repository

    repo = build_repository(sdxl_onnx(), tmp_path / "repo", target="ngc",
                            tuning=configs.Tuning(ort_accelerator="tensorrt"))
    for spec in SDXL.specs:
        config = configs.parse_pbtxt((repo / spec.name / "config.pbtxt").read_text())
        assert config.platform == "onnxruntime_onnx"
        assert [i.name for i in config.input] == spec.input_names and [o.name for o in config.output] == spec.output_names
        mode = config.optimization.execution_accelerators.gpu_execution_accelerator[0].parameters["precision_mode"]
        assert mode == ("FP32" if spec.name.startswith("vae") else "FP16")  # SDXL's VAE overflows in fp16
    unet_inputs = {i.name: list(i.dims) for i in configs.parse_pbtxt((repo / "unet" / "config.pbtxt").read_text()).input}
    assert unet_inputs["text_embeds"] == [40] and unet_inputs["time_ids"] == [6] and unet_inputs["encoder_hidden_states"] == [-1, 80]
    tokenizer = configs.parse_pbtxt((repo / "tokenizer" / "config.pbtxt").read_text())
    assert [o.name for o in tokenizer.output] == ["prompt_ids", "prompt_weights", "prompt_ids_2", "prompt_weights_2",
                                                  "negative_prompt_ids", "negative_prompt_weights",
                                                  "negative_prompt_ids_2", "negative_prompt_weights_2"]
    plan = plan_engines(sdxl_onnx(), "fp16", ["1x1024:1x1024:2x1024"])
    shapes = {c.component: c.profiles[0] for c in plan.components}
    assert sorted(shapes) == sorted(SDXL.components)
    assert shapes["unet"]["sample"] == [[2, 4, 128, 128]] * 2 + [[4, 4, 128, 128]]
    assert shapes["unet"]["time_ids"][2] == [4, 6] and shapes["unet"]["text_embeds"][2] == [4, 40]
    assert shapes["vae_decoder"]["latent_sample"][2] == [2, 4, 128, 128]
    assert {c.component: c.precision for c in plan.components}["vae_decoder"] == "fp32"


def test_each_model_gets_its_own_size_limit_unless_the_deployment_sets_one():
    from kiln.pipeline.request import Limits, limits_for, size_limit

    assert (size_limit(64), size_limit(512), size_limit(768), size_limit(1024)) == (1024, 1024, 1536, 2048)
    assert limits_for(Limits(), 1024).max_size == 2048  # SDXL's 1536x640 buckets fit
    assert limits_for(Limits(max_size=768), 1024).max_size == 768  # an operator's bound is kept
    assert limits_for(Limits(), 32).min_size == 32 and limits_for(Limits(), 512).min_size == 64  # a native size is servable


@pytest.mark.slow  # starts a Triton server of its own
@pytest.mark.triton
def test_make_deploy_serves_an_sdxl_model_and_kiln_generate_draws_over_both_protocols(sdxl_model, tmp_path):
    """`make deploy MODEL=...` runs `kiln deploy --model`: export, repository, background server, smoke
    image; then the CLI draws through it with SDXL's size conditioning. The model is given as a
    single-file checkpoint, which deploy imports to a folder first: the folder path runs after it."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from kiln.models.single_file import MANIFEST, export_single_file
    from kiln.serving import server

    single = export_single_file(sdxl_model(), tmp_path / "xl.safetensors")
    kiln = [sys.executable, "-m", "kiln.cli"]
    ports = server.free_ports()
    port_flags = ["--http-port", str(ports.http), "--grpc-port", str(ports.grpc), "--metrics-port", str(ports.metrics)]
    try:
        done = subprocess.run([*kiln, "deploy", "--model", str(single), "--artifacts", str(tmp_path), *port_flags],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert (tmp_path / "smoke.png").is_file() and "smoke image" in done.stderr + done.stdout
        imported = tmp_path / "models" / "xl"
        assert json.loads((imported / MANIFEST).read_text())["max_abs_diff"] == 0.0
        assert (tmp_path / "onnx" / "xl-fp32").is_dir()
        for protocol, port in (("http", ports.http), ("grpc", ports.grpc)):
            out = tmp_path / f"{protocol}.png"
            drawn = subprocess.run([*kiln, "generate", "a (red:1.2) digit 7", "-o", str(out), "--protocol", protocol,
                                    "--url", f"127.0.0.1:{port}", "--seed", "5", "--steps", "3",
                                    "--original-size", "1024x768", "--crop", "0,32"],
                                   capture_output=True, text=True, timeout=120)
            assert drawn.returncode == 0, drawn.stderr
        http, grpc = (np.asarray(Image.open(tmp_path / f"{p}.png")) for p in ("http", "grpc"))
        assert http.shape == (64, 64, 3) and np.array_equal(http, grpc)
        bad = subprocess.run([*kiln, "generate", "x", "-o", str(tmp_path / "x.png"), "--url", f"127.0.0.1:{ports.http}",
                              "--target-size", "1024"], capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and "expected HEIGHTxWIDTH" in bad.stderr
    finally:
        subprocess.run([*kiln, "stop", "--http-port", str(ports.http)], capture_output=True, timeout=120)
    assert Path(tmp_path / "onnx").is_dir()


@pytest.mark.parametrize("scheduler", ["default", "ddpm", "pndm", "heun", "dpmpp_2m_karras", "unipc",
                                       "LMSDiscreteScheduler"])
def test_every_other_scheduler_matches_diffusers_in_process(sdxl_onnx, pipes, scheduler):
    """The served schedulers above, and the rest Kiln takes, through Kiln's core in-process."""
    from kiln.pipeline.onnx_pipeline import OnnxPipeline
    from kiln.pipeline.reference import diffusers_image
    from kiln.pipeline.request import GenerationRequest
    from kiln.pipeline.schedulers import canonical_name

    name = canonical_name(scheduler)
    image = OnnxPipeline(sdxl_onnx())(GenerationRequest(PROMPT, NEGATIVE, 11, 4, 7.5, 64, 64, name))
    expected = diffusers_image(pipes(), name, PROMPT, NEGATIVE, 11, 4, 7.5, 64, 64)
    assert np.abs(image.astype(int) - expected).max() <= MAX_DIFF, scheduler


def test_damaged_or_refiner_configs_are_refused_naming_the_keys(sdxl_model, tmp_path):
    import shutil

    def edited(name, folder, change):
        copy = tmp_path / name
        shutil.copytree(sdxl_model(), copy)
        path = copy / folder / ("config.json" if folder != "." else "model_index.json")
        config = json.loads(path.read_text())
        change(config)
        path.write_text(json.dumps(config))
        return copy

    zero = edited("zero", "unet", lambda c: c.update(addition_time_embed_dim=0))
    with pytest.raises(ModelError, match="addition_time_embed_dim=0 is invalid: expected a positive integer"):
        inspect_model(zero)
    unprojected = edited("unprojected", "text_encoder_2", lambda c: c.pop("projection_dim"))
    with pytest.raises(ModelError, match=r"projection_dim=<absent: 512> disagree"):
        inspect_model(unprojected)
    refiner = edited("refiner", ".", lambda c: c.update(_class_name="StableDiffusionXLImg2ImgPipeline"))
    shutil.rmtree(refiner / "text_encoder")
    shutil.rmtree(refiner / "tokenizer")
    with pytest.raises(ModelError, match="is an SDXL refiner") as err:
        inspect_model(refiner)
    assert "SDXL base" in err.value.hint


def test_repo_build_says_each_models_family_size_and_limit(onnx_dir, sdxl_onnx, tmp_path):
    from typer.testing import CliRunner

    from kiln.cli import app

    shown = CliRunner().invoke(app, ["repo", "build", str(sdxl_onnx()), str(tmp_path / "repo"), "--name", "xl",
                                     "--also", f"sd={onnx_dir('epsilon')}"], env={"COLUMNS": "300", "NO_COLOR": "1"})
    assert shown.exit_code == 0, shown.output
    assert "sd (sd1, 64 px, up to 1024), xl (sdxl, 64 px, up to 1024)" in " ".join(shown.output.split())
