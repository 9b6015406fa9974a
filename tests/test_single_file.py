"""Single-file checkpoints (the original layout A1111 and ComfyUI load), in and out: round trips with
identical weights, diffusers' own reader drawing the same image as the folder, and the files a
careless or hostile user brings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kiln.errors import ModelError
from kiln.models.folder import inspect_model
from kiln.models.single_file import (
    CONFIGS_KEY,
    MANIFEST,
    export_single_file,
    import_single_file,
    load_pipeline,
    write_family_config,
)
from kiln.models.tiny import write_tiny_model

CASES = {  # name -> (tiny family, prediction type, Kiln family, keys the original layout has)
    "sd1": ("sd", "epsilon", "sd1", ["cond_stage_model.transformer.text_model.final_layer_norm.weight",
                                     "model.diffusion_model.output_blocks.2.2.conv.weight"]),
    "sd2-v": ("sd", "v_prediction", "sd2", ["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight",
                                            "cond_stage_model.model.ln_final.weight", "v_pred"]),
    "sdxl": ("sdxl", "epsilon", "sdxl", ["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                                         "conditioner.embedders.1.model.text_projection",
                                         "model.diffusion_model.label_emb.0.0.weight"]),
}
COMMON_KEYS = ["model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.middle_block.1.proj_in.weight",
               "model.diffusion_model.out.2.weight", "first_stage_model.decoder.up.0.block.0.conv1.weight",
               "first_stage_model.encoder.mid.attn_1.q.weight", "first_stage_model.quant_conv.weight"]


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    tiny_family, prediction, family, keys = CASES[request.param]
    root = tmp_path_factory.mktemp(f"single-{request.param}")
    folder = write_tiny_model(root / "folder", prediction, 0, tiny_family)
    single = export_single_file(folder, root / "model.safetensors")
    return dict(name=request.param, root=root, folder=folder, file=single, family=family, prediction=prediction, keys=keys)


def _weights(folder: Path, family: str) -> dict:
    pipe = load_pipeline(folder, family)
    return {f"{name}.{k}": v for name in ("unet", "vae", "text_encoder", "text_encoder_2")
            if getattr(pipe, name, None) is not None for k, v in getattr(pipe, name).state_dict().items()}


def test_round_trip_gives_identical_weights(case):
    with safe_open(str(case["file"]), "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert set(case["keys"] + COMMON_KEYS) <= keys, sorted(set(case["keys"] + COMMON_KEYS) - keys)
    assert not any(k.startswith(("down_blocks.", "unet.", "text_model.")) for k in keys)  # no diffusers names left
    assert metadata["modelspec.prediction_type"] == ("v" if case["prediction"] == "v_prediction" else "epsilon")

    out = import_single_file(case["file"], case["root"] / "imported")
    info = inspect_model(out)
    assert (info.family, info.prediction_type) == (case["family"], case["prediction"])
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["max_abs_diff"] == 0.0 and manifest["unused_keys"] == 0
    before, after = _weights(case["folder"], case["family"]), _weights(out, case["family"])
    assert before.keys() == after.keys()
    worst = max(float((before[k] - after[k]).abs().max()) for k in before)
    assert worst == 0.0, worst
    for name in ("tokenizer", "tokenizer_2"):
        if (case["folder"] / name).is_dir():
            original = json.loads((case["folder"] / name / "special_tokens_map.json").read_text())
            assert json.loads((out / name / "special_tokens_map.json").read_text())["pad_token"] == original["pad_token"]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_diffusers_reads_the_file_and_draws_the_folders_image(tmp_path, family):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    folder = write_tiny_model(tmp_path / "folder", "epsilon", 1, "sdxl" if family == "sdxl" else "sd")
    single = export_single_file(folder, tmp_path / "model.safetensors")
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    extra = {} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    from_file = cls.from_single_file(str(single), config=str(folder), local_files_only=True, **extra)
    from_folder = load_pipeline(folder, family)

    def draw(pipe):
        out = pipe("a red digit 7", negative_prompt="blurry", num_inference_steps=3, guidance_scale=5.0, height=64,
                   width=64, generator=torch.Generator().manual_seed(0), output_type="np")
        return out.images[0]

    for component in ("unet", "vae", "text_encoder", *(("text_encoder_2",) if family == "sdxl" else ())):
        mine, theirs = getattr(from_folder, component).state_dict(), getattr(from_file, component).state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), component
    a, b = draw(from_folder), draw(from_file)
    # identical weights; the images agree to float rounding (0.0 on one CPU, 1.8e-6 on an AMD EPYC host,
    # where kernels differ with the tensors' addresses)
    assert np.abs(a - b).max() <= 1e-5
    assert a.std() > 0.01  # a real image, not a constant


def test_fp16_file_is_half_the_size_and_imports_to_the_rounded_weights(tmp_path):
    folder = write_tiny_model(tmp_path / "folder")
    full = export_single_file(folder, tmp_path / "full.safetensors")
    half = export_single_file(folder, tmp_path / "half.safetensors", fp16=True)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    out = import_single_file(half, tmp_path / "imported")
    before, after = _weights(folder, "sd1"), _weights(out, "sd1")
    assert all(torch.equal(before[k].half().float(), after[k]) for k in before)
    assert max(float((before[k] - after[k]).abs().max()) for k in before) > 0  # fp16 did round something


@pytest.mark.parametrize("family,prediction,size", [("sd1", "epsilon", 512), ("sd2", "epsilon", 512),
                                                    ("sd2", "v_prediction", 768), ("sdxl", "epsilon", 1024)])
def test_shipped_family_configs_describe_the_real_architectures(tmp_path, family, prediction, size):
    folder = write_family_config(family, prediction, tmp_path / family)
    info = inspect_model(folder)
    assert (info.family, info.prediction_type, info.default_size) == (family, prediction, size)
    assert not list(folder.rglob("*.safetensors"))  # configs only
    unet = json.loads((folder / "unet" / "config.json").read_text())
    assert unet["cross_attention_dim"] == {"sd1": 768, "sd2": 1024, "sdxl": 2048}[family]


# --- what users bring -------------------------------------------------------------------------


def _fake(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def _expect(path: Path, out: Path, match: str, **kwargs):
    import re

    with pytest.raises(ModelError) as caught:
        import_single_file(path, out, **kwargs)
    assert re.search(match, f"{caught.value} {caught.value.hint}"), (str(caught.value), caught.value.hint)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))  # nothing half-written


SD1_KEYS = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
            "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(8),
            "first_stage_model.decoder.conv_out.weight": torch.zeros(3, 8, 3, 3)}


def test_damaged_and_foreign_files_are_named(tmp_path, case):
    out = tmp_path / "out"
    truncated = tmp_path / "truncated.safetensors"
    data = case["file"].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    _expect(truncated, out, "truncated or corrupted")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 1000)
    _expect(garbage, out, "not a readable .safetensors")
    _expect(_fake(tmp_path / "lora.safetensors", {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight":
                                                  torch.zeros(4, 8)}), out, "a LoRA")
    _expect(_fake(tmp_path / "vae.safetensors", {"encoder.down.0.block.0.conv1.weight": torch.zeros(8, 3, 3, 3)}),
            out, "a VAE alone")
    _expect(_fake(tmp_path / "inpaint.safetensors", {**SD1_KEYS, "model.diffusion_model.input_blocks.0.0.weight":
                                                     torch.zeros(8, 9, 3, 3)}), out, "inpainting")
    no_vae = {k: v for k, v in SD1_KEYS.items() if not k.startswith("first_stage")}
    _expect(_fake(tmp_path / "novae.safetensors", no_vae), out, "lacks the VAE")
    _expect(_fake(tmp_path / "empty.safetensors", {"x": torch.zeros(1)}), out, "unknown layout")
    # the real layout with a tensor of the wrong shape: diffusers or the check names it, nothing written
    with safe_open(str(case["file"]), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    key = "model.diffusion_model.out.2.weight"
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 1, 3, 3)
    _expect(_fake(tmp_path / "shape.safetensors", tensors, metadata), out, "does not fit|shape")
    # a tensor missing
    with safe_open(str(case["file"]), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != key}
    _expect(_fake(tmp_path / "partial.safetensors", tensors, metadata), out, "does not fit|lacks")


def test_a_users_own_folder_or_file_is_never_replaced(tmp_path, monkeypatch):
    from kiln.errors import KilnError

    single = export_single_file(write_tiny_model(tmp_path / "folder"), tmp_path / "m.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(KilnError, match="holds files Kiln did not write"):
        import_single_file(single, out)
    assert (out / "keep.txt").read_text() == "mine"
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(KilnError, match="is a file"):
        import_single_file(single, tmp_path / "afile")
    assert (tmp_path / "afile").read_text() == "mine" and not list(tmp_path.glob(".afile*"))
    monkeypatch.chdir(out)
    with pytest.raises(KilnError, match="current folder"):
        import_single_file(single, Path("."))
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(ModelError, match="is a folder"):
        export_single_file(tmp_path / "folder", tmp_path / "d.safetensors")
    with pytest.raises(ModelError, match="is a folder, not a checkpoint"):
        import_single_file(tmp_path / "folder", tmp_path / "new")
    # a model folder Kiln wrote is replaced (a re-import), and the file is readable by others
    made = import_single_file(single, tmp_path / "model")
    assert import_single_file(single, made) == made
    assert single.stat().st_mode & 0o044 and made.stat().st_mode & 0o055


def test_damaged_configs_metadata_is_named_and_nothing_lands(tmp_path):
    single = export_single_file(write_tiny_model(tmp_path / "folder"), tmp_path / "m.safetensors")
    with safe_open(str(single), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    configs = json.loads(metadata[CONFIGS_KEY])

    def variant(name, change):
        damaged = json.loads(json.dumps(configs))
        change(damaged)
        return _fake(tmp_path / f"{name}.safetensors", tensors, {**metadata, CONFIGS_KEY: json.dumps(damaged)})

    cases = {
        "string-config": lambda c: c.__setitem__("unet/config.json", "x"),
        "list-config": lambda c: c.__setitem__("unet/config.json", [1]),
        "odd-scheduler": lambda c: c["scheduler/scheduler_config.json"].__setitem__("_class_name", "__class__"),
        "vae-as-scheduler": lambda c: c["scheduler/scheduler_config.json"].__setitem__("_class_name", "AutoencoderKL"),
        "no-scheduler": lambda c: c.pop("scheduler/scheduler_config.json"),
        "folder-name": lambda c: c.__setitem__("unet", {}),
        "traversal": lambda c: c.__setitem__("../../x.json", {}),
        "wrong-family": lambda c: c["unet/config.json"].update(addition_embed_type="text_time"),
    }
    for name, change in cases.items():
        _expect(variant(name, change), tmp_path / f"out-{name}", "metadata is damaged|not a diffusers scheduler")
    deep = _fake(tmp_path / "deep.safetensors", tensors, {**metadata, CONFIGS_KEY: "[" * 100000 + "]" * 100000})
    _expect(deep, tmp_path / "out-deep", "metadata is damaged")


def test_prediction_type_conflicts_are_named(tmp_path):
    single = export_single_file(write_tiny_model(tmp_path / "sd2", "v_prediction"), tmp_path / "sd2.safetensors")
    _expect(single, tmp_path / "a", "--family sd2 means epsilon, but .* says v_prediction", family="sd2")
    _expect(single, tmp_path / "b", "means v_prediction but --prediction-type says epsilon", family="sd2-v",
            prediction_type="epsilon")
    made = import_single_file(single, tmp_path / "c", family="sd2", prediction_type="epsilon")  # an explicit override
    assert "over the v_pred key" in json.loads((made / MANIFEST).read_text())["decided_by"]
    with safe_open(str(single), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys() if k != "v_pred"}, f.metadata()
    odd = _fake(tmp_path / "odd.safetensors", tensors, {**metadata, "modelspec.prediction_type": "banana"})
    _expect(odd, tmp_path / "d", "banana")


def test_upper_case_suffix_and_pickle_messages_name_the_users_file(tmp_path):
    folder = write_tiny_model(tmp_path / "folder")
    single = export_single_file(folder, tmp_path / "m.safetensors")
    upper = tmp_path / "M.SAFETENSORS"
    upper.write_bytes(single.read_bytes())
    assert inspect_model(import_single_file(upper, tmp_path / "upper")).family == "sd1"
    with safe_open(str(single), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "first_stage_model.quant_conv.weight"}
    ckpt = tmp_path / "partial.ckpt"
    torch.save({"state_dict": tensors}, ckpt)
    with pytest.raises(ModelError) as caught:
        import_single_file(ckpt, tmp_path / "p", allow_pickle=True, config=folder)
    assert str(ckpt) in str(caught.value) and "kiln-import-" not in str(caught.value)


def test_prediction_type_is_read_or_asked_for(tmp_path):
    folder = write_tiny_model(tmp_path / "sd2", "v_prediction")
    single = export_single_file(folder, tmp_path / "sd2.safetensors")
    with safe_open(str(single), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    # as most SD 2.x files are shared: no v_pred key, no modelspec
    bare = _fake(tmp_path / "bare.safetensors", {k: v for k, v in tensors.items() if k != "v_pred"},
                 {CONFIGS_KEY: metadata[CONFIGS_KEY]})
    _expect(bare, tmp_path / "a", "--family sd2-v")
    assert inspect_model(import_single_file(bare, tmp_path / "v", family="sd2-v")).prediction_type == "v_prediction"
    assert inspect_model(import_single_file(bare, tmp_path / "e", family="sd2")).prediction_type == "epsilon"
    assert inspect_model(import_single_file(bare, tmp_path / "p", prediction_type="v_prediction")).prediction_type == \
        "v_prediction"
    _expect(bare, tmp_path / "b", "has the keys of sd2", family="sdxl")
    # SD 1.x: epsilon unless told (v-prediction SD 1.x fine-tunes exist)
    sd1 = export_single_file(write_tiny_model(tmp_path / "sd1"), tmp_path / "sd1.safetensors")
    made = import_single_file(sd1, tmp_path / "sd1v", prediction_type="v_prediction")
    assert inspect_model(made).prediction_type == "v_prediction"
    assert json.loads((made / MANIFEST).read_text())["decided_by"].startswith("--prediction-type")


def test_pickles_are_refused_unless_allowed(tmp_path):
    folder = write_tiny_model(tmp_path / "folder")
    single = export_single_file(folder, tmp_path / "model.safetensors")
    with safe_open(str(single), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": tensors, "global_step": 1}, ckpt)
    _expect(ckpt, tmp_path / "out", "pickle file")
    out = import_single_file(ckpt, tmp_path / "out", allow_pickle=True, config=folder)
    assert json.loads((out / MANIFEST).read_text())["max_abs_diff"] == 0.0


def test_config_of_another_family_is_refused(tmp_path):
    sd1 = export_single_file(write_tiny_model(tmp_path / "sd1"), tmp_path / "sd1.safetensors")
    sdxl = write_tiny_model(tmp_path / "sdxl", family="sdxl")
    _expect(sd1, tmp_path / "out", "is a sdxl folder", config=sdxl)


def test_cli_import_and_export(tmp_path):
    from typer.testing import CliRunner

    from kiln.cli import app

    folder = write_tiny_model(tmp_path / "folder", family="sdxl")
    runner = CliRunner()
    result = runner.invoke(app, ["model", "export-single-file", str(folder), str(tmp_path / "m.safetensors"), "--fp16"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["model", "import", str(tmp_path / "m.safetensors"), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "sdxl" in result.output and "max |diff| 0.0" in result.output
    result = runner.invoke(app, ["model", "import", str(tmp_path / "m.safetensors"), str(tmp_path / "x"),
                                 "--family", "sd15"])
    assert isinstance(result.exception, ModelError) and "--family sd15 but" in str(result.exception)
    assert not (tmp_path / "x").exists()


def test_deploy_imports_a_single_file_once(tmp_path):
    from kiln.deploy import imported_model

    single = export_single_file(write_tiny_model(tmp_path / "folder"), tmp_path / "shared-model.safetensors")
    first = imported_model(single, tmp_path / "artifacts")
    assert first == tmp_path / "artifacts" / "models" / "shared-model" and inspect_model(first).family == "sd1"
    stamp = (first / MANIFEST).stat().st_mtime_ns
    assert imported_model(single, tmp_path / "artifacts") == first and (first / MANIFEST).stat().st_mtime_ns == stamp
    export_single_file(write_tiny_model(tmp_path / "other", seed=3), single)  # the file changed: imported again
    assert imported_model(single, tmp_path / "artifacts") == first and (first / MANIFEST).stat().st_mtime_ns != stamp
