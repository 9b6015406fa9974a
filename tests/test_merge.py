"""Merge: the fused folder draws what base-plus-adapter draws, community LoRA files load, and the
merged folder goes through export and the repository builder unchanged."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, safe_open, save_file

from kiln.errors import MergeError
from kiln.merge.fuse import LoraInput, merge, parse_lora
from kiln.pipeline.reference import load_diffusers_pipeline

MERGE_TOLERANCE = 1e-4  # max |difference| of images in [0, 1]


def draw(pipe, prompt):
    return pipe(prompt, num_inference_steps=3, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(11)).images


def test_parse_lora_argument():
    assert parse_lora("a/b.safetensors:0.7") == LoraInput(Path("a/b.safetensors"), 0.7)
    assert parse_lora("a/b.safetensors").scale == 1.0
    assert parse_lora("c:/x.safetensors").path.name == "x.safetensors"


def test_merged_model_equals_base_plus_adapters(trained, tiny_model, tmp_path):
    lora_dir, _ = trained("lora")
    ti_dir, _ = trained("textual-inversion")
    lora_file, ti_file = lora_dir / "pytorch_lora_weights.safetensors", ti_dir / "learned_embeds.safetensors"
    out = merge(tiny_model("epsilon"), tmp_path / "merged", [LoraInput(lora_file, 0.7)], [ti_file])
    prompt = "a red square, in the style of <shape-style>"
    reference = load_diffusers_pipeline(tiny_model("epsilon"))
    reference.load_lora_weights(str(lora_dir), weight_name=lora_file.name, adapter_name="a")
    reference.set_adapters(["a"], adapter_weights=[0.7])
    reference.load_textual_inversion(str(ti_dir), weight_name=ti_file.name)
    merged = load_diffusers_pipeline(out)
    difference = np.abs(draw(merged, prompt) - draw(reference, prompt)).max()
    assert difference <= MERGE_TOLERANCE, difference
    base = draw(load_diffusers_pipeline(tiny_model("epsilon")), "a red square")
    assert np.abs(draw(merged, "a red square") - base).max() > 100 * MERGE_TOLERANCE  # the adapter did something
    manifest = json.loads((out / "merge_manifest.json").read_text())
    assert [a["kind"] for a in manifest["adapters"]] == ["lora", "textual_inversion"]
    assert manifest["adapters"][0]["scale"] == 0.7 and len(manifest["base"]["sha256"]) == 64
    assert manifest["adapters"][1]["tokens"] == ["<shape-style>", "<shape-style>_1"]
    assert (out / "tokenizer" / "vocab.json").is_file() and (out / "tokenizer" / "merges.txt").is_file()


def _to_kohya(lora_file, target):
    """Rewrite a diffusers-format LoRA in the kohya layout community tools publish."""
    state = load_file(str(lora_file))
    with safe_open(str(lora_file), "pt") as f:
        alpha = json.loads(f.metadata()["lora_adapter_metadata"])["unet.lora_alpha"]
    kohya = {}
    for key, value in state.items():
        module, _, kind = key.removeprefix("unet.").rpartition(".lora.")
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.lora_{kind.split('.')[0]}.weight"] = value
        kohya[f"{name}.alpha"] = torch.tensor(float(alpha))
    save_file(kohya, str(target))
    return target


def test_community_lora_format_merges_the_same(trained, tiny_model, tmp_path):
    lora_dir, _ = trained("lora")
    lora_file = lora_dir / "pytorch_lora_weights.safetensors"
    kohya = _to_kohya(lora_file, tmp_path / "kohya_style.safetensors")
    assert all(k.startswith("lora_unet_") for k in load_file(str(kohya)))
    a = merge(tiny_model("epsilon"), tmp_path / "a", [LoraInput(lora_file)])
    b = merge(tiny_model("epsilon"), tmp_path / "b", [LoraInput(kohya)])
    weights_a = load_file(str(a / "unet" / "diffusion_pytorch_model.safetensors"))
    weights_b = load_file(str(b / "unet" / "diffusion_pytorch_model.safetensors"))
    assert max(float((weights_a[k] - weights_b[k]).abs().max()) for k in weights_a) < 1e-6


def test_merge_errors(tiny_model, tmp_path):
    with pytest.raises(MergeError, match="nothing to merge"):
        merge(tiny_model("epsilon"), tmp_path / "m")
    with pytest.raises(MergeError, match="--lora .*missing.safetensors does not exist"):
        merge(tiny_model("epsilon"), tmp_path / "m", [LoraInput(tmp_path / "missing.safetensors")])
    assert not (tmp_path / "m").exists()


def test_merged_folder_exports_and_serves_unchanged(trained, tiny_model, tmp_path, reference_image):
    """Fine-tune -> merge -> export -> repository, with the learned token in the prompt."""
    from kiln.export.onnx_export import export_onnx
    from kiln.model_repository.builder import build_repository
    from kiln.pipeline.onnx_pipeline import OnnxPipeline
    from kiln.pipeline.request import GenerationRequest

    lora_dir, _ = trained("lora")
    ti_dir, _ = trained("textual-inversion")
    merged = merge(tiny_model("epsilon"), tmp_path / "merged",
                   [LoraInput(lora_dir / "pytorch_lora_weights.safetensors")], [ti_dir / "learned_embeds.safetensors"])
    export_onnx(merged, tmp_path / "onnx")
    repo = build_repository(tmp_path / "onnx", tmp_path / "repo")
    assert (repo / "txt2img" / "config.pbtxt").is_file()
    prompt = "a red square, in the style of <shape-style>"
    image = OnnxPipeline(tmp_path / "onnx")(GenerationRequest(prompt, "", 3, 3, 7.5, 64, 64, "euler"))
    expected = reference_image(merged, "euler", prompt, "", 3, 3, 7.5, 64, 64)
    assert np.abs(image.astype(int) - expected).max() <= 2


def test_several_loras_fuse_additively(trained, tiny_model, tmp_path):
    lora = (trained("lora")[0] / "pytorch_lora_weights.safetensors", 0.7)
    dreambooth = (trained("dreambooth")[0] / "pytorch_lora_weights.safetensors", 0.5)
    weights = "unet/diffusion_pytorch_model.safetensors"
    base = load_file(str(tiny_model("epsilon") / weights))
    merged = {}
    for name, inputs in {"a": [lora], "b": [dreambooth], "ab": [lora, dreambooth]}.items():
        out = merge(tiny_model("epsilon"), tmp_path / name, [LoraInput(path, scale) for path, scale in inputs])
        merged[name] = load_file(str(out / weights))
    delta = lambda name, key: merged[name][key] - base[key]  # noqa: E731
    error = max(float((delta("ab", k) - delta("a", k) - delta("b", k)).abs().max()) for k in base)
    assert error < 1e-6
    assert max(float(delta("b", k).abs().max()) for k in base) > 1e-4  # both adapters really contribute


def test_text_encoder_lora_trains_and_merges(tiny_model, training_data, tmp_path):
    """lora.text_encoder: the text encoder's attention gets adapters too; they are saved beside the
    UNet's, and the merged folder equals diffusers loading the file."""
    from kiln.training.run import run_training
    from training_runs import METHOD_SETTINGS, train_settings

    out = tmp_path / "run"
    run_training("lora", None, train_settings(tiny_model("epsilon"), training_data, out, "max_train_steps=6",
                                              "checkpointing_steps=100", "data.augment.enabled=false",
                                              "lora.text_encoder=true", *METHOD_SETTINGS["lora"]))
    lora_file = out / "pytorch_lora_weights.safetensors"
    keys = load_file(str(lora_file)).keys()
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("unet.") for k in keys)
    merged = merge(tiny_model("epsilon"), tmp_path / "merged", [LoraInput(lora_file, 1.0)])
    base = load_diffusers_pipeline(tiny_model("epsilon"))
    fused = load_diffusers_pipeline(merged)
    pairs = zip(fused.text_encoder.parameters(), base.text_encoder.parameters(), strict=True)
    moved = max((a - b).abs().max().item() for a, b in pairs)
    assert moved > 1e-4  # the text encoder's adapters were trained and fused
    reference = load_diffusers_pipeline(tiny_model("epsilon"))
    reference.load_lora_weights(str(out), weight_name=lora_file.name, adapter_name="a")
    prompt = "a red square"
    assert np.abs(draw(fused, prompt) - draw(reference, prompt)).max() <= MERGE_TOLERANCE
