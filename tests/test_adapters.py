"""LoRA adapters at run time (kiln.pipeline.adapters): an export with LoRA inputs, a registry beside the
served model, per-request adapter sets. Served images are compared with diffusers' load_lora_weights +
fuse_lora on the same base; no adapter is the plain export exactly; A -> B -> A, four concurrent
clients and removal in flight; bad input refused by name with the server unchanged."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from kiln.cli import app
from kiln.clients.client import ClientError, KilnClient
from kiln.errors import ModelError, RequestError
from kiln.export.onnx_export import export_onnx
from kiln.export.specs import dummy_inputs, family, parity_points
from kiln.model_repository.builder import build_repository
from kiln.models.folder import model_dims
from kiln.models.tiny import write_random_lora
from kiln.pipeline import adapters
from kiln.pipeline.adapters import (AdapterStore, Registry, adapter_feeds, normalise, parse_selection, read_layers,
                                    served_registry)
from kiln.pipeline.onnx_session import ComponentSession
from kiln.pipeline.reference import diffusers_image, load_diffusers_pipeline
from kiln.serving import server

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
BOUND = 2  # on the 0-255 scale, as the issue states
DRAW = dict(seed=11, steps=4, height=64, width=64, scheduler="ddim", guidance_scale=7.5)
PROMPT = "a red square on a blue background"


@pytest.fixture(scope="module")
def adapted(tiny_model, tmp_path_factory):
    """The tiny model exported with LoRA inputs, its repository, and LoRA files for it."""
    root = tmp_path_factory.mktemp("adapted")
    onnx_dir = export_onnx(tiny_model("epsilon"), root / "onnx", lora_inputs=True).out_dir
    repo = build_repository(onnx_dir, root / "repo")
    _, _, layers = served_registry(repo)
    files = {
        # kohya layout, every adaptable layer (UNet transformer linears and 1x1 proj_in/out, text encoder)
        "everything": write_random_lora(layers, root / "everything.safetensors", rank=4, alpha=2, seed=1),
        # diffusers' layout, attention only, rank 8, no alpha (scale 1)
        "attention": write_random_lora(layers, root / "attention.safetensors", rank=8, seed=2, layout="diffusers",
                                       only=ATTENTION),
        "text": write_random_lora([x for x in layers if x.component == "text_encoder"], root / "text.safetensors",
                                  rank=4, seed=3, std=0.3),
    }
    return {"onnx": onnx_dir, "repo": repo, "layers": layers, "files": files, "root": root}


@pytest.fixture(scope="module")
def lora_triton(adapted, trained):
    """A server on the adapted repository with three adapters registered before it starts (the
    Kiln-trained kohya LoRA among them) and more added while it runs."""
    _, registry, layers = served_registry(adapted["repo"])
    lora_dir, _ = trained("lora")
    registry.add("trained", lora_dir / "lora_kohya.safetensors", layers)
    registry.add("everything", adapted["files"]["everything"], layers)
    with server.running_server(adapted["repo"]) as info:
        yield info


def _draw(info, protocol="http", prompt=PROMPT, **kwargs):
    with KilnClient(info.http_url if protocol == "http" else info.grpc_url, protocol) as client:
        return client.generate(prompt, **{**DRAW, **kwargs}).images[0]


def _reference(model_dir, loras: list[tuple], prompt=PROMPT):
    """diffusers with each (file, scale) loaded and fused, as its users apply LoRAs."""
    pipe = load_diffusers_pipeline(model_dir)
    if loras:
        names = []
        for i, (path, _) in enumerate(loras):
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=f"a{i}")
            names.append(f"a{i}")
        if len(loras) == 1:
            pipe.fuse_lora(lora_scale=loras[0][1])
        else:
            pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])
            pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    return diffusers_image(pipe, DRAW["scheduler"], prompt, "", DRAW["seed"], DRAW["steps"], DRAW["guidance_scale"],
                           DRAW["height"], DRAW["width"])[0]


def _cache_hits(info) -> float:
    from kiln.serving.metrics import scrape, total

    return total(scrape(info.metrics_url), "kiln_embedding_cache_hits", model="text_encoder")


def _diff(a, b) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


# --- the export ------------------------------------------------------------------------------------

def test_no_adapter_is_the_plain_export_exactly(adapted, onnx_dir, tiny_model):
    """The adapted graph without adapters (rank-1 zeros) gives the plain export's outputs bit for bit."""
    dims = model_dims(tiny_model("epsilon"))
    for name in ("unet", "text_encoder"):
        spec = family("sd").spec(name)
        plain = ComponentSession(spec, onnx_dir("epsilon") / name / "model.onnx")
        lora = ComponentSession(spec, adapted["onnx"] / name / "model.onnx")
        assert plain.layers is None and len(lora.layers) > 0
        feeds = dummy_inputs(spec, parity_points(dims)[1], dims, seed=5)
        expected, actual = plain.run(feeds), lora.run(feeds)
        assert all(np.array_equal(expected[k], actual[k]) for k in expected), name


def test_declared_layers_are_kohyas_standard_targets(adapted):
    layers = adapted["layers"]
    unet = [x for x in layers if x.component == "unet"]
    text = [x for x in layers if x.component == "text_encoder"]
    assert {x.module.rsplit(".", 1)[-1] for x in text} == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
    assert all(".attentions." in f".{x.module}" for x in unet)
    assert any(x.conv for x in unet if x.module.endswith("proj_in"))  # SD 1.x: 1x1 convolutions
    assert all(x.kohya.startswith("lora_unet_") for x in unet) and all(x.kohya.startswith("lora_te_") for x in text)


def test_feeds_concatenate_adapters_with_their_scales(adapted):
    layers = adapted["layers"]
    a, _ = normalise(adapted["files"]["everything"], layers)
    b, _ = normalise(adapted["files"]["attention"], layers)
    feeds = adapter_feeds(layers, [(a, 0.5), (b, -1.0)])
    q = next(x for x in layers if x.module.endswith("attn1.to_q"))
    ff = next(x for x in layers if x.module.endswith("ff.net.2"))
    key = f"{q.component}.{q.module}"
    fa, fb = (feeds[n] for n in q.inputs)
    assert fa.shape == (4 + 8, q.in_features) and fb.shape == (q.out_features, 4 + 8)
    expected = 0.5 * a[f"B.{key}"] @ a[f"A.{key}"] - b[f"B.{key}"] @ b[f"A.{key}"]
    np.testing.assert_allclose(fb @ fa, expected, rtol=1e-5, atol=1e-6)
    assert feeds[ff.inputs[0]].shape == (4, ff.in_features)  # only the first adapter has feed-forward layers
    alone = adapter_feeds(layers, [])
    assert alone[ff.inputs[0]].shape == (1, ff.in_features) and not alone[ff.inputs[1]].any()


# --- request syntax and refused files --------------------------------------------------------------

@pytest.mark.parametrize("text, problem", [
    ("a:\uff11", "not a number"), ("a:1_0", "not a number"), (",", "letters, digits"), ("a:nan", "not a number"), ("a:inf", "not a number"), ("a:1e309", "finite scale"), ("a:4.5", "finite scale"), ("a:x", "not a number"),
    ("a,a:0.5", "given twice"), ("../etc/passwd", "letters, digits"), ("a b", "letters, digits"), (":1", "letters"),
    (",".join(f"n{i}" for i in range(adapters.MAX_ADAPTERS + 1)), "at most"),
])
def test_bad_selections_are_refused_by_name(text, problem):
    with pytest.raises(RequestError, match=problem) as caught:
        parse_selection(text)
    assert caught.value.field == "loras"


def test_selection_syntax():
    assert parse_selection(" a : 0.5 , b ") == (("a", 0.5), ("b", 1.0))
    assert parse_selection("") == ()
    assert adapters.format_selection([("b", 1.0), ("a", 0.5)]) == adapters.format_selection([("a", 0.5), ("b", 1.0)])


def test_files_that_do_not_fit_are_refused(adapted, tmp_path):
    layers = adapted["layers"]
    unet = [x for x in adapted["layers"] if x.component == "unet"]
    wider = [type(x)(x.component, x.module, x.in_features * 2, x.out_features, x.kohya, x.conv) for x in unet]
    with pytest.raises(ModelError, match="does not fit this base"):
        normalise(write_random_lora(wider, tmp_path / "other-base.safetensors"), layers)
    state = load_file(str(adapted["files"]["everything"]))
    save_file({**state, "lora_unet_time_embedding_linear_1.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_time_embedding_linear_1.lora_up.weight": torch.zeros(128, 4)}, str(tmp_path / "time.safetensors"))
    with pytest.raises(ModelError, match="1 of its modules is not a layer .* e.g. lora_unet_time_embedding_linear_1") as caught:
        normalise(tmp_path / "time.safetensors", layers)
    assert "kiln merge" in caught.value.hint
    (tmp_path / "broken.safetensors").write_bytes(adapted["files"]["everything"].read_bytes()[:1000])
    with pytest.raises(ModelError, match="truncated or corrupted"):
        normalise(tmp_path / "broken.safetensors", layers)
    nan = {k: v.clone() for k, v in state.items()}
    first = next(k for k in nan if k.endswith("lora_up.weight"))
    nan[first][0, 0] = float("nan")
    save_file(nan, str(tmp_path / "nan.safetensors"))
    with pytest.raises(ModelError, match="NaN"):
        normalise(tmp_path / "nan.safetensors", layers)


def test_damaged_files_and_indexes_are_named(adapted, tmp_path):
    layers = adapted["layers"]
    state = load_file(str(adapted["files"]["everything"]))
    down = next(k for k in state if k.endswith("lora_down.weight"))
    for label, change, expected in [
        ("rank0", {down: state[down][:0], down.replace("down", "up"): state[down.replace("down", "up")][:, :0]}, "rank 0"),
        ("ints", {down: state[down].to(torch.int32)}, "not floating point"),
        ("alphas", {down.replace("lora_down.weight", "alpha"): torch.tensor([2.0, 3.0])}, "2 alpha values"),
        ("overflow", {down.replace("lora_down.weight", "alpha"): torch.tensor(3e38),
                      down.replace("down", "up"): state[down.replace("down", "up")] * 1e3}, "past float32"),
    ]:
        save_file({**state, **change}, str(tmp_path / f"{label}.safetensors"))
        with pytest.raises(ModelError, match=expected):
            normalise(tmp_path / f"{label}.safetensors", layers)
    registry = Registry(tmp_path / "loras")
    for text, expected in (('{"adapters": {"a": ', "not JSON"), ("{}", 'no "adapters"'),
                           ('{"adapters": {"q": "x"}}', "'q' is not an adapter entry")):
        registry.folder.mkdir(exist_ok=True)
        registry.index.write_text(text)
        with pytest.raises(ModelError, match=f"adapter index .*index.json is damaged: .*{expected}"):
            registry.entries()
    registry.index.unlink()
    registry.add("a", adapted["files"]["text"], layers)  # a registry without an index records its layers
    assert registry.read()["layers"] == adapters.layers_digest(layers)
    with pytest.raises(ModelError, match="other adapted layers"):
        registry.add("b", adapted["files"]["text"], layers[:-1])
    registry.add("a2", adapted["files"]["text"], layers)  # two names of one file: one adapter, scales added
    assert registry.resolve([("a", 0.5), ("a2", 0.25)]) == f"{registry.entries()['a']['id']}:0.75"


def test_registry_replace_remove_and_grace(adapted, tmp_path):
    layers = adapted["layers"]
    registry = Registry(tmp_path / "loras")
    first = registry.add("x", adapted["files"]["everything"], layers)
    with pytest.raises(ModelError, match="already registered"):
        registry.add("x", adapted["files"]["attention"], layers)
    second = registry.add("x", adapted["files"]["attention"], layers, replace=True)
    assert registry.entries()["x"]["id"] == second["id"] != first["id"]
    assert registry.file(first["id"]).is_file()  # a request that resolved the old one may still run
    registry.remove("x")
    assert "x" not in registry.entries() and registry.file(second["id"]).is_file()
    with pytest.raises(RequestError, match="registered: none"):
        registry.resolve([("x", 1.0)])
    index = registry.read()
    registry._sweep(index, now=time.time() + adapters.GRACE_S + 1)
    assert not registry.file(first["id"]).exists() and not registry.file(second["id"]).exists()
    with pytest.raises(RequestError, match="grace period"):
        AdapterStore([registry.folder]).get(second["id"])


# --- served -----------------------------------------------------------------------------------------

def test_served_adapters_equal_diffusers_fused_over_both_protocols(lora_triton, adapted, trained, tiny_model):
    base_dir = tiny_model("epsilon")
    lora_dir, _ = trained("lora")
    trained_file = lora_dir / "lora_kohya.safetensors"
    base = _draw(lora_triton)
    assert _diff(base, _reference(base_dir, [])) <= BOUND
    for protocol in ("http", "grpc"):
        image = _draw(lora_triton, protocol, loras="trained:0.7")
        assert _diff(image, _reference(base_dir, [(trained_file, 0.7)])) <= BOUND, protocol
    assert _diff(_draw(lora_triton, loras="trained:0.7"), base) > 10  # the adapter moves the image
    everything = _draw(lora_triton, loras="everything:0.8")
    assert _diff(everything, _reference(base_dir, [(adapted["files"]["everything"], 0.8)])) <= BOUND
    both = _draw(lora_triton, "grpc", loras="everything:0.8,trained:-0.5")
    assert _diff(both, _reference(base_dir, [(adapted["files"]["everything"], 0.8), (trained_file, -0.5)])) <= BOUND


def test_adapter_added_while_serving_and_text_encoder_adapters(lora_triton, adapted, tiny_model):
    """`kiln lora add` while the server runs: the next request uses it; an adapter of the text encoder
    alone moves the image as diffusers' does (and the embedding cache keeps it apart from the base)."""
    result = CliRunner().invoke(app, ["lora", "add", "text", str(adapted["files"]["text"]), "--repo", str(adapted["repo"])])
    assert result.exit_code == 0, result.output
    assert "text added to txt2img" in result.output
    base = _draw(lora_triton)
    text = _draw(lora_triton, loras="text:1.0")
    assert _diff(text, base) > 2
    assert _diff(text, _reference(tiny_model("epsilon"), [(adapted["files"]["text"], 1.0)])) <= BOUND
    assert np.array_equal(_draw(lora_triton), base)  # the base prompt's cached embedding is the base's
    # a UNet-only adapter leaves the text encoder as the base's: its rows come from the embedding cache
    prompt = f"a cached prompt {time.time()}"
    _draw(lora_triton, prompt=prompt)
    hits = _cache_hits(lora_triton)
    _draw(lora_triton, prompt=prompt, loras="trained:0.5")
    assert _cache_hits(lora_triton) - hits == 2  # prompt and negative prompt
    _draw(lora_triton, prompt=prompt, loras="text:0.5")
    assert _cache_hits(lora_triton) - hits == 2  # a text-encoder adapter computes its own rows
    listed = CliRunner().invoke(app, ["lora", "list", "--repo", str(adapted["repo"])])
    assert listed.exit_code == 0 and {"trained", "everything", "text"} <= {line.split("\t")[0] for line in listed.output.splitlines()}


def test_a_b_a_and_four_concurrent_clients(lora_triton, adapted):
    choices = ["", "trained:0.9", "everything:0.6", "everything:0.6,trained:0.9"]
    alone = [_draw(lora_triton, loras=c or None) for c in choices]
    assert len({a.tobytes() for a in alone}) == 4
    assert np.array_equal(_draw(lora_triton, loras="trained:0.9"), alone[1])  # A -> B -> A, after the others ran
    results: dict[int, np.ndarray] = {}
    errors = []

    def client(i):
        try:
            for _ in range(2):
                results.setdefault(i, []).append(_draw(lora_triton, "grpc" if i % 2 else "http", loras=choices[i] or None))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i in range(4):
        assert all(np.array_equal(image, alone[i]) for image in results[i]), choices[i]


def test_removing_an_adapter_in_use_finishes_the_request_and_refuses_later_ones(lora_triton, adapted):
    repo = adapted["repo"]
    _, registry, layers = served_registry(repo)
    registry.add("leaving", adapted["files"]["attention"], layers)
    expected = _draw(lora_triton, loras="leaving:0.7", steps=120)
    outcome = {}

    def long_request():
        try:
            outcome["image"] = _draw(lora_triton, loras="leaving:0.7", steps=120)
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=long_request)
    thread.start()
    time.sleep(0.3)
    removed = CliRunner().invoke(app, ["lora", "remove", "leaving", "--repo", str(repo)])
    assert removed.exit_code == 0, removed.output
    assert thread.is_alive()  # removed while the request was in flight
    thread.join(120)
    assert "error" not in outcome, outcome.get("error")
    assert np.array_equal(outcome["image"], expected)
    with pytest.raises(ClientError, match="loras='leaving' is invalid: expected an adapter registered with txt2img"):
        _draw(lora_triton, loras="leaving:0.7")


def test_bad_adapter_requests_leave_the_server_unchanged(lora_triton):
    base = _draw(lora_triton)
    for loras, expected in [("nobody:1", "an adapter registered"), ("trained:nan", "not a number"),
                            ("trained:9", "finite scale"), ("trained;0.5", "letters, digits"),
                            ("trained:1,trained:1", "given twice")]:
        with pytest.raises(ClientError, match=expected):
            _draw(lora_triton, loras=loras)
    # the internal UNet, called directly with an id no registry holds, or a path
    import tritonclient.http as http

    with http.InferenceServerClient(lora_triton.http_url) as raw:
        inputs = []
        for name, value in (("sample", np.zeros((1, 4, 8, 8), np.float32)), ("timestep", np.zeros((1, 1), np.float32)),
                            ("encoder_hidden_states", np.zeros((1, 77, 32), np.float32))):
            tensor = http.InferInput(name, list(value.shape), "FP32")
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        for bad, expected in (("0123456789abcdef:1.0", "whose file is in the registry"), ("../../x:1", "letters, digits"), ("leaving:1", "16 hex digits")):
            loras = http.InferInput("loras", [1, 1], "BYTES")
            loras.set_data_from_numpy(np.array([[bad.encode()]], dtype=np.object_))
            with pytest.raises(Exception, match=expected):
                raw.infer("unet", [*inputs, loras])
    assert np.array_equal(_draw(lora_triton), base)


def _refused(*args) -> str:
    """`kiln ARGS` failing with a KilnError (which `kiln`'s main prints with its hint): the message."""
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code != 0 and isinstance(result.exception, ModelError), result.output
    return f"{result.exception} {result.exception.hint}"


def test_cli_refuses_what_does_not_fit(adapted, repo_dir, tmp_path):
    message = _refused("lora", "add", "x", str(adapted["files"]["text"]), "--repo", str(repo_dir("epsilon")))
    assert "takes LoRA adapters" in message and "--lora-inputs" in message
    wrong = write_random_lora([type(x)(x.component, x.module, x.in_features + 32, x.out_features, x.kohya, x.conv)
                               for x in adapted["layers"]], tmp_path / "wrong.safetensors")
    assert "does not fit this base" in _refused("lora", "add", "wrong", str(wrong), "--repo", str(adapted["repo"]))
    assert "no adapter named nobody" in _refused("lora", "remove", "nobody", "--repo", str(adapted["repo"]))
    assert "invalid" in _refused("lora", "add", "bad/name", str(wrong), "--repo", str(adapted["repo"]))
    assert "not a Kiln model repository" in _refused("lora", "list", "--repo", str(tmp_path))


def test_a_rebuilt_repository_keeps_its_adapters(adapted, tmp_path):
    repo = tmp_path / "repo"
    build_repository(adapted["onnx"], repo)
    _, registry, layers = served_registry(repo)
    registry.add("kept", adapted["files"]["text"], layers)
    build_repository(adapted["onnx"], repo)
    assert "kept" in served_registry(repo)[1].entries()
    index = json.loads((repo / "pipeline" / "loras" / "index.json").read_text())
    assert registry.file(index["adapters"]["kept"]["id"]).is_file()
    assert read_layers(repo / "unet" / "1") == [x for x in layers if x.component == "unet"]


def test_gateway_doors_take_adapters(lora_triton):
    """A1111's `<lora:NAME:SCALE>` prompt tags, the OpenAI door's `loras` and the web page's LoRA field
    draw what Triton draws."""
    pytest.importorskip("fastapi", reason="the gateway extra (pip install 'kiln[gateway]') is not installed")
    import base64
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from kiln.serving.front_doors import lora_tags
    from kiln.serving.gateway import create_app

    assert lora_tags("a cat <lora:ink:0.5>, <lora:pixel-art>", "<lora:ink:0.5:0.2> blur") == \
        (["a cat", "blur"], "ink:0.5,pixel-art:1,ink:0.5")
    from kiln.serving.front_doors import DoorError

    with pytest.raises(DoorError, match="one adapter per tag"):
        lora_tags("x <lora:a:1,b:1>")

    def png(text):
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB"))

    expected = _draw(lora_triton, loras="trained:0.7")
    body = {"prompt": f"{PROMPT} <lora:trained:0.7>", "seed": DRAW["seed"], "steps": DRAW["steps"], "width": 64,
            "height": 64, "sampler_name": "DDIM", "cfg_scale": DRAW["guidance_scale"]}
    with TestClient(create_app(lora_triton.http_url)) as client:
        answer = client.post("/sdapi/v1/txt2img", json=body)
        assert answer.status_code == 200, answer.text
        assert np.array_equal(png(answer.json()["images"][0]), expected)
        assert "<lora:trained:0.7>" in json.loads(answer.json()["info"])["infotexts"][0]
        openai = client.post("/v1/images/generations", json={"prompt": PROMPT, "seed": DRAW["seed"], "steps": DRAW["steps"],
                                                             "size": "64x64", "scheduler": "ddim", "loras": "trained:0.7",
                                                             "guidance_scale": DRAW["guidance_scale"]})
        assert openai.status_code == 200, openai.text
        assert np.array_equal(png(openai.json()["data"][0]["b64_json"]), expected)
        unknown = client.post("/sdapi/v1/txt2img", json={**body, "prompt": "x <lora:nobody:1>"})
        assert unknown.status_code == 422 and "nobody" in unknown.text and "registered" in unknown.text
        other = client.post("/sdapi/v1/txt2img", json={**body, "prompt": "x <hypernet:anime:1>"})
        assert other.status_code == 422 and "hypernet" in other.text
    from kiln.serving.ui import generate_images  # the web page's request

    (image, _), = generate_images(lora_triton.http_url, "txt2img", PROMPT, "", DRAW["seed"], DRAW["steps"],
                                  DRAW["guidance_scale"], "ddim", 64, 64, 1, None, None, " trained:0.7 ")
    assert np.array_equal(image, expected)


def test_sdxl_kohya_names_reach_the_layers_diffusers_fuses(sdxl_model, tmp_path):
    """SDXL's kohya files name UNet layers by the original (sgm) layout and its encoders lora_te1_/lora_te2_:
    for every adapted layer of a tiny SDXL export, the update Kiln feeds (B x scale x alpha/r times A)
    equals what diffusers' load_lora_weights + fuse_lora adds to that layer's weight."""
    import torch

    onnx_dir = export_onnx(sdxl_model(), tmp_path / "onnx", components=("unet", "text_encoder", "text_encoder_2"),
                           lora_inputs=True).out_dir
    layers = [x for c in ("unet", "text_encoder", "text_encoder_2") for x in read_layers(onnx_dir / c)]
    assert {x.component for x in layers} == {"unet", "text_encoder", "text_encoder_2"}
    assert any(x.kohya.startswith("lora_unet_input_blocks_") for x in layers)
    path = write_random_lora(layers, tmp_path / "sdxl.safetensors", rank=4, alpha=2, seed=4)
    tensors, summary = normalise(path, layers)
    inert = [x for x in layers if x.inert]  # the encoders' last layers: SDXL reads the penultimate one
    assert inert and all(x.component.startswith("text_encoder") and ".layers.2." in x.module for x in inert)
    layers = [x for x in layers if not x.inert]
    assert summary["modules"] == {c: sum(x.component == c for x in layers) for c in ("unet", "text_encoder", "text_encoder_2")}
    pipe = load_diffusers_pipeline(sdxl_model())
    before = {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()}
              for c in ("unet", "text_encoder", "text_encoder_2")}
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="x")
    pipe.fuse_lora(lora_scale=0.6)
    pipe.unload_lora_weights()
    for layer in layers:
        after = getattr(pipe, layer.component).state_dict()
        name = next(n for n in (f"{layer.module}.weight", f"{layer.module.removeprefix('text_model.')}.weight") if n in after)
        key = f"{layer.component}.{layer.module}"
        update = 0.6 * torch.from_numpy(tensors[f"B.{key}"] @ tensors[f"A.{key}"])
        delta = (after[name] - before[layer.component][name]).reshape(update.shape)
        assert float((delta - update).abs().max()) <= 1e-5, key
