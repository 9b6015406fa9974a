"""`kiln eval --prompts` on any model: CLIP from either weights layout, FID with a local TorchScript
Inception, weighted LPIPS, PSNR, and the gate against a reference model through real Triton servers."""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import json
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from kiln.errors import ConfigError
from kiln.evaluation import metrics
from kiln.evaluation.prompts import PromptRow, Window, parse_endpoint, read_prompts
from kiln.models.clip import ClipError, load_clip

TINY_CLIP = dict(embed_dim=16, vision_cfg=dict(image_size=32, layers=2, width=32, patch_size=8, head_width=16),
                 text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2))


def _open_clip_model_module():
    """open_clip's own CLIP class, the reference for Kiln's mapping. open_clip's package imports
    torchvision, which does not load beside the CPU torch; its model module needs only torchvision's
    FrozenBatchNorm2d name (for ResNet towers, unused here), so the package is imported bare."""
    importlib.import_module("transformers")  # imported before torchvision's stand-in exists

    spec = importlib.util.find_spec("open_clip")
    names = ("open_clip", "torchvision", "torchvision.ops", "torchvision.ops.misc")
    saved = {name: sys.modules.get(name) for name in names}
    modules = {name: types.ModuleType(name) for name in names}
    for name, module in modules.items():
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    modules["open_clip"].__path__ = list(spec.submodule_search_locations)
    modules["torchvision.ops.misc"].FrozenBatchNorm2d = torch.nn.BatchNorm2d
    sys.modules.update(modules)
    try:
        return importlib.import_module("open_clip.model")
    finally:
        for name in [n for n in sys.modules if n.startswith(("open_clip", "torchvision"))]:
            del sys.modules[name]
        sys.modules.update({k: v for k, v in saved.items() if v is not None})


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_open_clip_folder_embeds_as_open_clip_does(tmp_path, quick_gelu):
    from kiln.dataset.filters import ClipScorer

    module = _open_clip_model_module()
    torch.manual_seed(0)
    config = {**TINY_CLIP, "quick_gelu": quick_gelu}
    model = module.CLIP(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    torch.save(model.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.25] * 3}}))
    scorer = ClipScorer(tmp_path)
    assert scorer.layout == "open_clip" and scorer.mean.tolist() == [0.5] * 3
    image = Image.fromarray((np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8))
    with torch.no_grad():
        expected_image = model.encode_image(scorer.pixels(image), normalize=True)
        caption = "a purple kettle on a wooden table"
        ids = scorer.tokenizer([caption]).input_ids[0]
        padded = torch.zeros(1, 77, dtype=torch.long)  # open_clip pads with 0 and pools at the end token
        padded[0, : len(ids)] = torch.tensor(ids)
        expected_text = model.encode_text(padded, normalize=True)
    assert torch.allclose(scorer.image_embedding(image), expected_image, atol=1e-5)
    assert torch.allclose(scorer.text_embedding(caption), expected_text, atol=1e-5)
    expected = max(0.0, 100 * float((expected_image * expected_text).sum()))
    assert scorer.score(image, caption) == pytest.approx(expected, abs=1e-3)


def test_clip_folders_that_cannot_load_say_what_is_expected(tmp_path):
    with pytest.raises(ClipError) as err:
        load_clip(tmp_path)
    assert "config.json" in str(err.value) and "open_clip_config.json" in err.value.hint
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    with pytest.raises(ClipError, match="no weights"):
        load_clip(tmp_path)
    resnet = {**TINY_CLIP, "vision_cfg": {**TINY_CLIP["vision_cfg"], "layers": [3, 4, 6, 3]}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": resnet}))
    torch.save({"visual.stem.weight": torch.zeros(1)}, tmp_path / "open_clip_pytorch_model.bin")
    with pytest.raises(ClipError, match="not a vision-transformer CLIP"):
        load_clip(tmp_path)
    pooled = {**TINY_CLIP, "vision_cfg": {**TINY_CLIP["vision_cfg"], "attentional_pool": True}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": pooled}))
    with pytest.raises(ClipError, match="attentional_pool"):
        load_clip(tmp_path)


def _alexnet_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return {f"features.{k}": v.normal_(0, 0.05) for k, v in metrics._alexnet_features().state_dict().items()} | {
        "classifier.1.weight": torch.zeros(2, 2)}  # torchvision's file holds the classifier too


def test_lpips_equals_torchmetrics_lpips_on_the_same_backbone(tmp_path, monkeypatch):
    from torchmetrics.functional.image import lpips as tm

    state = _alexnet_state()
    torch.save(state, tmp_path / "alexnet.pth")
    ours = metrics.Lpips(tmp_path / "alexnet.pth")

    def torchvision_features(net, pretrained=False):  # what torchvision.models.alexnet(...).features would hold
        features = metrics._alexnet_features()
        features.load_state_dict({k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")})
        return features

    monkeypatch.setattr(tm, "_get_tv_model_features", torchvision_features)
    theirs = tm._LPIPS(pretrained=True, net="alex")
    rng = np.random.default_rng(1)
    a, b = (rng.random((3, 64, 64, 3)) * 255).astype(np.uint8), (rng.random((3, 64, 64, 3)) * 255).astype(np.uint8)
    got = metrics.lpips(a, b, ours)
    signed = [torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1 for x in (a, b)]
    with torch.no_grad():
        expected = theirs(*signed).flatten().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert got.min() > 0 and metrics.lpips(a, a, ours).max() == 0.0
    with pytest.raises(metrics.MetricError, match="not torchvision's AlexNet"):
        torch.save({"features.0.weight": torch.zeros(3)}, tmp_path / "bad.pth")
        metrics.Lpips(tmp_path / "bad.pth")


class _Detector(torch.nn.Module):
    """The call signature of NVIDIA's TorchScript FID Inception: uint8 NCHW in, features out."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 24, 5, stride=3)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = torch.nn.functional.interpolate(x.float() / 255.0, size=(64, 64), mode="bilinear", align_corners=False)
        return torch.tanh(self.conv(x)).mean(dim=(2, 3))


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(ca @ cb).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * root))


def test_fid_with_a_torchscript_inception_is_the_frechet_distance_of_its_features(tmp_path):
    torch.manual_seed(0)
    torch.jit.script(_Detector()).save(str(tmp_path / "inception.pt"))
    extractor = metrics.inception(tmp_path / "inception.pt")
    rng = np.random.default_rng(0)
    real = (rng.random((120, 32, 32, 3)) * 255).astype(np.uint8)
    fake = np.clip(real.astype(int) + rng.integers(-60, 60, real.shape), 0, 255).astype(np.uint8)
    with torch.no_grad():
        features = [extractor(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).double().numpy() for x in (real, fake)]
    assert metrics.fid(real, fake, extractor, batch=7) == pytest.approx(_frechet(*features), rel=1e-3)
    assert abs(metrics.fid(real, real, extractor)) < 1e-3
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(tmp_path / "linear.pt"))
    with pytest.raises(metrics.MetricError, match="not an FID Inception"):
        metrics.inception(tmp_path / "linear.pt")


def test_prompt_files_and_options_are_checked_before_any_image(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("# a comment\na red kettle\n\n  a blue bicycle  \n")
    assert [r.prompt for r in read_prompts(text)] == ["a red kettle", "a blue bicycle"]
    rows = tmp_path / "prompts.jsonl"
    rows.write_text('{"prompt": "a cat", "seed": 7, "negative_prompt": "blurry"}\n{"prompt": "a dog"}\n')
    assert [(r.prompt, r.seed, r.negative_prompt) for r in read_prompts(rows)] == [("a cat", 7, "blurry"), ("a dog", None, None)]
    for line, needle in (('{"prompt": "a", "sed": 1}', "unknown keys ['sed']"), ('{"prompt": "a", "seed": -1}', "seed=-1"),
                         ('{"prompt": "a", "seed": 1.5}', "seed=1.5"), ('{"prompt": ""}', "prompt=''"),
                         ('["a"]', "expected an object"), ('{"prompt": "a"', "not JSON"),
                         (json.dumps({"prompt": "x" * 10_001}), "10001 characters")):
        rows.write_text('{"prompt": "fine"}\n' + line + "\n")
        with pytest.raises(ConfigError, match="line 2") as err:
            read_prompts(rows)
        assert needle in str(err.value)
    text.write_text("# only a comment\n\n")
    with pytest.raises(ConfigError, match="holds no prompt"):
        read_prompts(text)
    assert Window.parse(["fid=0.1", "psnr=30", "clip_score=off"]) == Window(clip_score=None, fid=0.1, lpips=None, psnr=30.0)
    for item in ("fid=2", "fid=nan", "psnr=-1", "ssim=0.9", "lpips=abc"):
        with pytest.raises(ConfigError, match="--gate"):
            Window.parse([item])
    assert parse_endpoint("a", "localhost:8000/sd15-int8").model == "sd15-int8"
    assert parse_endpoint("a", "sd15", default_url="localhost:9000") == parse_endpoint("a", "localhost:9000/sd15")
    for label, value, needle in (("a", "sd15", "HOST:PORT"), ("a", "localhost:abc", "port in"), ("a", "localhost:99999", "port in"),
                                 ("a", "localhost:", "port in"), ("a", "http://localhost:8000", "without a scheme"),
                                 ("../../evil", "localhost:8000", "label"), ("a/b", "localhost:8000", "label"),
                                 ("", "localhost:8000", "label"), ("a|b", "localhost:8000", "label")):
        with pytest.raises(ConfigError, match=needle):
            parse_endpoint(label, value)
    with pytest.raises(ConfigError, match="given twice"):
        Window.parse(["psnr=10", "psnr=off"])
    marked = tmp_path / "marked.JSONL"  # the suffix in any case; a byte-order mark and U+2028 inside a prompt
    marked.write_text('\ufeff{"prompt": "a cat\u2028on a mat", "seed": 3}\r\n', encoding="utf-8")
    assert read_prompts(marked) == [PromptRow("a cat\u2028on a mat", None, 3)]
    text.write_text("\ufeffa cat\x0con a mat\n", encoding="utf-8")
    assert read_prompts(text) == [PromptRow("a cat\x0con a mat")]


def test_reference_images_are_checked_up_front_and_16_bit_ones_scaled(tmp_path):
    from kiln.evaluation.prompts import Measures, reference_files, reference_images

    real = tmp_path / "real"
    real.mkdir()
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(real / "grey16.png")  # 16-bit mid grey
    (real / "._grey16.png").write_bytes(b"resource fork")  # a hidden sidecar: skipped
    with pytest.raises(ConfigError, match="holds 1 images"):
        reference_files(real, 100)
    Image.fromarray(np.zeros((8, 8, 4), np.uint8)).save(real / "rgba.png")
    files = reference_files(real, 100)
    assert [f.name for f in files] == ["grey16.png", "rgba.png"]
    assert reference_images(files, (4, 4))[0].tolist() == [[[128] * 3] * 4] * 4
    (real / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ConfigError, match="broken.png is not a readable image"):
        reference_files(real, 100)
    torch.save(_alexnet_state(), tmp_path / "alexnet.pth")
    for measures, window, images, needle in (
            (Measures(real=real, inception=tmp_path / "inception.pt"), None, 1, "at least 2 drawn images"),
            (Measures(lpips=tmp_path / "alexnet.pth"), None, 4, "name it with --against"),
            (Measures(clip=tmp_path / "alexnet.pth"), None, 4, "is a file: expected a folder")):
        torch.jit.script(_Detector()).save(str(tmp_path / "inception.pt"))
        with pytest.raises(ConfigError, match=needle):
            measures.check(window, images)


def _tiny_transformers_clip(folder):
    from transformers import CLIPConfig, CLIPModel

    from kiln.models.tokenizer import write_clip_tokenizer

    torch.manual_seed(0)
    config = CLIPConfig(projection_dim=16, text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                            num_attention_heads=2, vocab_size=49408),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                           image_size=32, patch_size=8))
    CLIPModel(config).save_pretrained(folder)
    write_clip_tokenizer(folder)
    return folder


def _refuse(constant: str):
    raise ValueError(f"{constant} is not JSON")


def _kiln_eval(*args, cwd):
    return subprocess.run([sys.executable, "-m", "kiln.cli", "eval", *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


@pytest.mark.triton
@pytest.mark.timeout(900)
def test_eval_gates_a_served_model_against_a_reference(triton, sdxl_triton, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a red kettle"}\n{"prompt": "a blue bicycle", "seed": 5}\n')
    clip = _tiny_transformers_clip(tmp_path / "clip")
    torch.jit.script(_Detector()).save(str(tmp_path / "inception.pt"))
    torch.save(_alexnet_state(), tmp_path / "alexnet.pth")
    real = tmp_path / "real"
    real.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray((rng.random((48 + 8 * i, 40, 3)) * 255).astype(np.uint8)).save(real / f"{i}.png")
    sd, sdxl = triton().http_url, sdxl_triton().http_url
    common = ["--prompts", prompts, "--seeds", 2, "--steps", 2, "--width", 64, "--height", 64, "--clip-model", clip,
              "--real", real, "--inception-weights", tmp_path / "inception.pt", "--lpips-weights", tmp_path / "alexnet.pth"]

    same = _kiln_eval("--endpoint", f"again={sd}", "--against", f"ref={sd}/txt2img", "--gate", "psnr=60", *common,
                      "--out", tmp_path / "same", cwd=tmp_path)
    assert same.returncode == 0, same.stdout + same.stderr
    report = json.loads((tmp_path / "same" / "report.json").read_text())
    ref, again = report["results"]
    assert (ref["label"], again["label"], report["reference"]) == ("ref", "again", "ref")
    assert ref["images"] == again["images"] == 4 and len(list((tmp_path / "same" / "images" / "again").glob("*.png"))) == 4
    assert again["versus"]["identical"] and again["versus"]["lpips"] == 0.0  # same model, prompts and seeds
    assert again["clip_score"] == pytest.approx(ref["clip_score"]) and again["fid"] == pytest.approx(ref["fid"])
    assert report["measures"]["fid_reference_images"] == 6 and {b["bar"].split(": ")[1] for b in report["bars"]} == {
        "CLIP score", "FID", "PSNR to reference (dB)"}
    assert all(b["passed"] for b in report["bars"])

    other = _kiln_eval("--endpoint", f"xl={sdxl}", "--against", f"ref={sd}", "--gate", "psnr=60", "--gate", "lpips=0.0001",
                       *common, "--out", tmp_path / "same", cwd=tmp_path)  # the same --out: the last run's files go
    assert other.returncode == 3 and "quality bars missed" in other.stdout + other.stderr  # 3: the gate, not a failure
    assert not (tmp_path / "same" / "images" / "again").exists() and not (tmp_path / "same" / "grid-again.png").exists()
    report = json.loads((tmp_path / "same" / "report.json").read_text(), parse_constant=_refuse)  # strict JSON
    failed = {b["bar"] for b in report["bars"] if not b["passed"]}
    assert {"xl: PSNR to reference (dB)", "xl: LPIPS to reference"} <= failed
    assert report["results"][1]["versus"]["lpips"] > 0 and "| FAIL |" in (tmp_path / "same" / "report.md").read_text()

    nothing = _kiln_eval("--endpoint", f"a={sd}", "--against", "txt2img", "--prompts", prompts, "--gate", "clip_score=off",
                         "--out", tmp_path / "nothing", cwd=tmp_path)
    assert nothing.returncode != 0 and "gates nothing" in nothing.stdout + nothing.stderr
    assert not (tmp_path / "nothing" / "images").exists()  # refused before any image was drawn
    for args, needle in ((("--endpoint", "a=localhost"), "HOST:PORT[/MODEL]"),  # a hint with brackets is printed as is
                         (("--endpoint", f"a={sd}/nosuch", "--against", f"ref={sd}"), "serves no ready model 'nosuch'")):
        refused = _kiln_eval(*args, "--prompts", prompts, "--gate", "psnr=10", "--out", tmp_path / "refused", cwd=tmp_path)
        assert refused.returncode == 1 and needle in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
        assert not (tmp_path / "refused" / "images").exists()
