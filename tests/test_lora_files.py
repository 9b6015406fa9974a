"""LoRA files in kohya's layout (what A1111 and ComfyUI load): written from Kiln's LoRAs, read back
by diffusers to the same fused weights, merged module for module, and foreign keys refused by name."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kiln.errors import MergeError, ModelError
from kiln.merge.fuse import LoraInput, merge
from kiln.models.lora_files import KOHYA_NAME, scan, to_kohya
from kiln.models.single_file import load_pipeline
from kiln.models.tiny import write_tiny_model
from kiln.training.config import LoraConfig
from kiln.training.lora import add_lora, save_lora

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
LOCON = ATTENTION + ("conv1", "conv2", "proj_in")


def _weights(pipe) -> dict:
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None
            for k, v in getattr(pipe, c).state_dict().items()}


def _lora(base: Path, family: str, out: Path, targets=ATTENTION, seed: int = 0) -> Path:
    """A Kiln-format LoRA (UNet and first text encoder, rank 4, alpha 8) with random up weights, so it
    changes what it touches (a freshly initialised LoRA is the identity)."""
    pipe = load_pipeline(base, family)
    spec = LoraConfig(rank=4, alpha=8, text_encoder=True, target_modules=targets)
    add_lora(SimpleNamespace(unet=pipe.unet, text_encoder=pipe.text_encoder), spec)
    path = save_lora(SimpleNamespace(unet=pipe.unet, text_encoder=pipe.text_encoder), out, spec)
    with safe_open(str(path), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    g = torch.Generator().manual_seed(seed)
    up = (".up.", "lora_B")
    save_file({k: torch.randn(v.shape, generator=g) * 0.1 if any(u in k for u in up) else v for k, v in tensors.items()},
              str(path), metadata=metadata)
    return path


def _fused(base: Path, family: str, lora: Path) -> dict:
    pipe = load_pipeline(base, family)
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="x")
    pipe.fuse_lora(adapter_names=["x"], lora_scale=1.0)
    pipe.unload_lora_weights()
    return _weights(pipe)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_kohya_file_reads_back_to_the_same_fused_weights(tmp_path, family):
    base = write_tiny_model(tmp_path / "base", family="sdxl" if family == "sdxl" else "sd")
    lora = _lora(base, family, tmp_path / "lora")
    kohya = to_kohya(lora, base, tmp_path / KOHYA_NAME)
    with safe_open(str(kohya), "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    te = "lora_te1_text_model_" if family == "sdxl" else "lora_te_text_model_"
    unet = "lora_unet_input_blocks_4_1_" if family == "sdxl" else "lora_unet_down_blocks_1_attentions_0_"
    assert any(k.startswith(te) for k in keys) and any(k.startswith(unet) for k in keys), sorted(keys)[:5]
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    assert {float(load_file(str(kohya))[k]) for k in keys if k.endswith(".alpha")} == {8.0}
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "8.0"
    assert scan(kohya).modules == scan(lora).modules
    a, b = _fused(base, family, lora), _fused(base, family, kohya)
    plain = _weights(load_pipeline(base, family))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    changed = [k for k in a if not torch.equal(a[k], plain[k])]
    assert any(k.startswith("text_encoder.") for k in changed) and any(k.startswith("unet.") for k in changed)


def test_merge_applies_every_module_of_a_locon_lora(tmp_path):
    """Each module fused as W + alpha/rank * up @ down, computed here from the file itself; diffusers
    alone drops the attention modules of such a diffusers-format file."""
    base = write_tiny_model(tmp_path / "base")
    lora = _lora(base, "sd1", tmp_path / "lora", targets=LOCON)
    assert scan(lora).convolutions > 0
    merged = merge(base, tmp_path / "merged", [LoraInput(lora, 0.5)])
    after, before = _weights(load_pipeline(merged, "sd1")), _weights(load_pipeline(base, "sd1"))
    state = load_file(str(lora))
    worst, modules = 0.0, 0
    for key in state:
        if ".lora_A." not in key and ".lora.down." not in key and ".lora_linear_layer.down." not in key:
            continue
        for down_name, up_name in ((".lora_A.", ".lora_B."), (".lora.down.", ".lora.up."),
                                   (".lora_linear_layer.down.", ".lora_linear_layer.up.")):
            if down_name in key:
                module = key.split(down_name)[0]
                down, up = state[key], state[key.replace(down_name, up_name)]
        delta = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:]) * (8 / 4) * 0.5
        weight = module + ".weight"
        if weight.startswith("text_encoder.") and weight not in before:
            weight = "text_encoder.text_model." + weight.removeprefix("text_encoder.")
        worst = max(worst, float((after[weight] - before[weight] - delta).abs().max()))
        modules += 1
    assert modules == sum(scan(lora).modules.values()) and worst < 1e-5, (modules, worst)


def test_foreign_lora_keys_are_refused_by_name(tmp_path):
    base = write_tiny_model(tmp_path / "base")
    loha = save_file({"lora_unet_down_blocks_1_attentions_0_proj_in.hada_w1_a": torch.zeros(4, 4)},
                     str(tmp_path / "loha.safetensors")) or tmp_path / "loha.safetensors"
    with pytest.raises(MergeError, match="LoHa .*hada_w1_a"):
        merge(base, tmp_path / "m", [LoraInput(loha)])
    odd = tmp_path / "odd.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 4), "something_else": torch.zeros(1)}, str(odd))
    with pytest.raises(ModelError, match="something_else"):
        scan(odd)
    assert not (tmp_path / "m").exists()
    # LoRAs and embeddings of another family: one line naming both, nothing written
    xl = write_tiny_model(tmp_path / "xl", family="sdxl")
    xl_diffusers = _lora(xl, "sdxl", tmp_path / "xl_lora")
    xl_lora = to_kohya(xl_diffusers, xl, tmp_path / "xl_kohya.safetensors")
    sd_lora = to_kohya(_lora(base, "sd1", tmp_path / "sd_lora"), base, tmp_path / "sd_kohya.safetensors")
    for lora, target, words in ((xl_lora, base, "is an SDXL LoRA"), (sd_lora, xl, "is an SD 1.x/2.x LoRA"),
                                (xl_diffusers, base, "does not fit")):
        with pytest.raises(MergeError, match=words) as caught:
            merge(target, tmp_path / "m", [LoraInput(lora)])
        assert len(str(caught.value)) < 400 and not (tmp_path / "m").exists()
    with pytest.raises(ModelError, match="does not fit"):  # converting against the wrong base
        to_kohya(_lora(base, "sd1", tmp_path / "sd_again"), xl, tmp_path / "wrong.safetensors")
    assert not (tmp_path / "wrong.safetensors").exists()
    embedding = tmp_path / "xl_ti.safetensors"
    save_file({"clip_l": torch.zeros(1, 32), "clip_g": torch.zeros(1, 48)}, str(embedding))
    with pytest.raises(MergeError, match="is an SDXL embedding"):
        merge(base, tmp_path / "m", textual_inversions=[embedding])
    # a whole checkpoint given as a LoRA
    from kiln.models.single_file import export_single_file

    with pytest.raises(ModelError, match="whole checkpoint"):
        scan(export_single_file(base, tmp_path / "checkpoint.safetensors"))


def test_training_writes_the_kohya_file(trained, tiny_model, tmp_path):
    """`lora.format=kohya`: the trained LoRA in both layouts, fusing to the same weights."""
    lora_dir, _ = trained("lora")
    base = tiny_model("epsilon")
    a = _fused(base, "sd1", lora_dir / "pytorch_lora_weights.safetensors")
    b = _fused(base, "sd1", lora_dir / KOHYA_NAME)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    plain = _weights(load_pipeline(base, "sd1"))
    assert any(not torch.equal(a[k], plain[k]) for k in a)


def test_cli_lora_convert_and_info(tmp_path):
    from typer.testing import CliRunner

    from kiln.cli import app

    base = write_tiny_model(tmp_path / "base")
    lora = _lora(base, "sd1", tmp_path / "lora")
    result = CliRunner().invoke(app, ["lora", "convert", str(lora), str(tmp_path / "k.safetensors"), "--base", str(base)])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["lora", "info", str(tmp_path / "k.safetensors")])
    assert result.exit_code == 0 and "layout: kohya" in result.output and "'unet': 48" in result.output, result.output


def test_kohya_alphas_incomplete_or_broken_files_and_unsafe_outputs(tmp_path):
    """Modules without an alpha (or with 0) read as alpha = rank, as kohya's loader does, even when
    others have one; non-finite values, orphan modules and rank mismatches are named; a merge never
    overwrites what it reads, nor a file Kiln did not write."""
    base = write_tiny_model(tmp_path / "base")
    lora = _lora(base, "sd1", tmp_path / "lora", targets=LOCON)
    kohya = to_kohya(lora, base, tmp_path / "k.safetensors")
    state = load_file(str(kohya))
    mixed = {k: (torch.tensor(2.0) if k.endswith(".alpha") else v) for k, v in state.items()
             if not (k.endswith(".alpha") and "conv" in k)}
    save_file(mixed, str(tmp_path / "mixed.safetensors"))
    merged = merge(base, tmp_path / "m", [LoraInput(tmp_path / "mixed.safetensors")])
    after, before = _weights(load_pipeline(merged, "sd1")), _weights(load_pipeline(base, "sd1"))
    checked = {"with alpha": 0, "without": 0}
    for key, down in load_file(str(lora)).items():
        if not key.startswith("unet.") or ".lora.down." not in key and ".lora_A." not in key:
            continue
        module = key.split(".lora")[0]
        up = load_file(str(lora))[key.replace("lora.down", "lora.up").replace("lora_A", "lora_B")]
        has_alpha = "lora_unet_" + module.removeprefix("unet.").replace(".", "_") + ".alpha" in mixed
        scale = 2.0 / down.shape[0] if has_alpha else 1.0
        delta = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:]) * scale
        assert float((after[module + ".weight"] - before[module + ".weight"] - delta).abs().max()) < 1e-6, module
        checked["with alpha" if has_alpha else "without"] += 1
    assert checked["with alpha"] > 0 and checked["without"] > 0, checked
    broken = {
        "nan": {**state, next(k for k in state if k.endswith(".lora_up.weight")): torch.full_like(
            state[next(k for k in state if k.endswith(".lora_up.weight"))], float("nan"))},
        "orphan": {k: v for k, v in state.items() if k != next(k for k in state if k.endswith(".lora_up.weight"))},
        "rank": {**state, next(k for k in state if k.endswith(".lora_up.weight")): torch.zeros(8, 2)},
    }
    for name, words in (("nan", "NaN or infinite"), ("orphan", "has no up weight"), ("rank", "rank")):
        save_file(broken[name], str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(MergeError, match=words):
            merge(base, tmp_path / f"out-{name}", [LoraInput(tmp_path / f"{name}.safetensors")])
        assert not (tmp_path / f"out-{name}").exists()
    from kiln.merge.fuse import parse_lora

    with pytest.raises(MergeError, match="not a finite number"):
        parse_lora(f"{kohya}:nan")
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(base, copy)
    with pytest.raises(MergeError, match="overwrite what it reads"):
        merge(copy, copy, [LoraInput(kohya)])
    with pytest.raises(ModelError, match="one of the files being read"):
        merge(base, tmp_path / "m2", [LoraInput(kohya)], single_file=kohya)
    (tmp_path / "victim.safetensors").write_text("mine")
    with pytest.raises(ModelError, match="not a single file Kiln wrote"):
        merge(base, tmp_path / "m3", [LoraInput(kohya)], single_file=tmp_path / "victim.safetensors")
    assert (tmp_path / "victim.safetensors").read_text() == "mine" and load_file(str(kohya)).keys() == state.keys()
