"""Single-file checkpoints in the original layout (the one A1111 and ComfyUI load), in and out.

In: `import_single_file` decides the family and prediction type from the file's keys and metadata,
converts through diffusers' own `from_single_file` with configs Kiln writes locally (nothing is
fetched), then checks the result against the file: every tensor the folder holds, written back in
the original layout, must be in the file with the same shape and value.

Out: `original_state_dict` renames a diffusers pipeline's weights to the original layout, derived
from each component's config (so tiny test models and real ones go through the same code), and
`write_single_file` saves it with the modelspec metadata kohya's tools write and the `v_pred` key
ComfyUI reads.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import ModelError

log = logging.getLogger("kiln.models.single_file")

UNET = "model.diffusion_model."
VAE = "first_stage_model."
TEXT = {  # family -> [(component, prefix, layout)]
    "sd1": [("text_encoder", "cond_stage_model.transformer.", "clip")],
    "sd2": [("text_encoder", "cond_stage_model.model.", "openclip")],
    "sdxl": [("text_encoder", "conditioner.embedders.0.transformer.", "clip"),
             ("text_encoder_2", "conditioner.embedders.1.model.", "openclip")],
}
FAMILY_CHOICES = ("sd15", "sd2", "sd2-v", "sdxl")  # `kiln model import --family`
FAMILY_FLAGS = dict(zip(FAMILY_CHOICES, (("sd1", None), ("sd2", "epsilon"), ("sd2", "v_prediction"), ("sdxl", None))))
PREDICTION_TYPES = ("epsilon", "v_prediction")
ARCHITECTURES = {  # (family, prediction type) -> modelspec.architecture, as kohya's tools name them
    ("sd1", "epsilon"): "stable-diffusion-v1", ("sd1", "v_prediction"): "stable-diffusion-v1",
    ("sd2", "epsilon"): "stable-diffusion-v2-512", ("sd2", "v_prediction"): "stable-diffusion-v2-768-v",
    ("sdxl", "epsilon"): "stable-diffusion-xl-v1-base", ("sdxl", "v_prediction"): "stable-diffusion-xl-v1-base",
}
V_PRED_KEY = "v_pred"  # ComfyUI marks v-prediction checkpoints with this (empty) tensor
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
MANIFEST = "import_manifest.json"
CONFIGS_KEY = "kiln.diffusers_configs"  # metadata: the architecture of a file Kiln wrote

# ---------------------------------------------------------------------------------------------
# diffusers -> original names, derived from each component's config
# ---------------------------------------------------------------------------------------------

UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
CLIP_TO_OPENCLIP = [("embeddings.token_embedding.weight", "token_embedding.weight"),
                    ("embeddings.position_embedding.weight", "positional_embedding"),
                    ("final_layer_norm.", "ln_final."), ("encoder.layers.", "transformer.resblocks.")]
OPENCLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                  "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def _unet_prefixes(config) -> list[tuple[str, str, dict]]:
    """(diffusers prefix, original prefix, inner renames) for an LDM UNet of this config's shape."""
    levels, per_block = len(config["block_out_channels"]), config["layers_per_block"]
    down_attention = ["CrossAttn" in t for t in config["down_block_types"]]
    up_attention = ["CrossAttn" in t for t in config["up_block_types"]]
    table = [("time_embedding.linear_1.", "time_embed.0.", {}), ("time_embedding.linear_2.", "time_embed.2.", {}),
             ("add_embedding.linear_1.", "label_emb.0.0.", {}), ("add_embedding.linear_2.", "label_emb.0.2.", {}),
             ("conv_in.", "input_blocks.0.0.", {}), ("conv_norm_out.", "out.0.", {}), ("conv_out.", "out.2.", {}),
             ("mid_block.resnets.0.", "middle_block.0.", UNET_RESNET), ("mid_block.attentions.0.", "middle_block.1.", {}),
             ("mid_block.resnets.1.", "middle_block.2.", UNET_RESNET)]
    block = 1
    for i in range(levels):
        for j in range(per_block):
            table.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{block}.0.", UNET_RESNET))
            if down_attention[i]:
                table.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{block}.1.", {}))
            block += 1
        if i < levels - 1:
            table.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{block}.0.op.", {}))
            block += 1
    block = 0
    for i in range(levels):
        for j in range(per_block + 1):
            table.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{block}.0.", UNET_RESNET))
            if up_attention[i]:
                table.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{block}.1.", {}))
            if j == per_block and i < levels - 1:
                table.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{block}.{2 if up_attention[i] else 1}.", {}))
            block += 1
    return table


def _vae_prefixes(config) -> list[tuple[str, str, dict]]:
    levels, per_block = len(config["block_out_channels"]), config["layers_per_block"]
    table = []
    for part in ("encoder", "decoder"):
        table += [(f"{part}.conv_norm_out.", f"{part}.norm_out.", {}),
                  (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", VAE_ATTENTION)]
        table += [(f"{part}.mid_block.resnets.{i}.", f"{part}.mid.block_{i + 1}.", VAE_RESNET) for i in range(2)]
    for i in range(levels):
        table += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", VAE_RESNET)
                  for j in range(per_block)]
        table += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{levels - 1 - i}.block.{j}.", VAE_RESNET)
                  for j in range(per_block + 1)]
        if i < levels - 1:
            table.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.", {}))
            table.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{levels - 1 - i}.upsample.", {}))
    return table


def _rename(key: str, table, component: str) -> str:
    for hf, original, inner in table:
        if key.startswith(hf):
            rest = key[len(hf):]
            for a, b in inner.items():
                if rest.startswith(a + "."):
                    rest = b + rest[len(a):]
                    break
            return original + rest
    if "." in key and key.split(".")[0] in ("conv_in", "conv_out", "quant_conv", "post_quant_conv", "encoder", "decoder"):
        return key  # the VAE's names that the original layout shares
    raise ModelError(f"{component} weight {key!r} has no place in the original single-file layout",
                     hint="Kiln writes SD 1.x, 2.x and SDXL base architectures; this folder's differs")


def unet_to_original(state: dict, config) -> dict:
    table = sorted(_unet_prefixes(config), key=lambda row: -len(row[0]))
    return {UNET + _rename(k, table, "unet"): v for k, v in state.items()}


def vae_to_original(state: dict, config) -> dict:
    table = sorted(_vae_prefixes(config), key=lambda row: -len(row[0]))
    out = {}
    for k, v in state.items():
        name = _rename(k, table, "vae")
        if ".mid.attn_1." in name and name.endswith(".weight") and v.ndim == 2:
            v = v.reshape(*v.shape, 1, 1)  # the original layout's attention projections are 1x1 convolutions
        out[VAE + name] = v
    return out


def _text_model_keys(state: dict) -> dict:
    """transformers' CLIP weights as `text_model.*` whichever way this transformers release nests them."""
    out = {}
    for k, v in state.items():
        if k.endswith("position_ids"):
            continue
        out[k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k] = v
    return out


def clip_to_original(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in _text_model_keys(state).items()}


def openclip_to_original(state: dict, prefix: str) -> dict:
    import torch

    out, qkv = {}, {}
    for key, value in _text_model_keys(state).items():
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
            continue
        name = key.removeprefix("text_model.")
        for a, b in CLIP_TO_OPENCLIP:
            if name.startswith(a):
                name = b + name[len(a):]
                break
        else:
            raise ModelError(f"text encoder weight {key!r} has no place in the OpenCLIP layout")
        if name.startswith("transformer.resblocks."):
            head, _, rest = name.partition(".resblocks.")
            layer, _, rest = rest.partition(".")
            projection = rest.split(".")
            if projection[0] == "self_attn" and projection[1] in ("q_proj", "k_proj", "v_proj"):
                qkv.setdefault((layer, projection[2]), {})[projection[1][0]] = value
                continue
            for a, b in OPENCLIP_LAYER.items():
                if rest.startswith(a + "."):
                    rest = b + rest[len(a):]
                    break
            name = f"transformer.resblocks.{layer}.{rest}"
        out[prefix + name] = value
    for (layer, kind), parts in qkv.items():
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts[c] for c in "qkv"])
    return out


def original_state_dict(pipe, family: str) -> dict:
    """Every weight of `pipe` under its original single-file name."""
    state = {}
    state.update(unet_to_original(pipe.unet.state_dict(), pipe.unet.config))
    state.update(vae_to_original(pipe.vae.state_dict(), pipe.vae.config))
    for component, prefix, layout in TEXT[family]:
        weights = getattr(pipe, component).state_dict()
        state.update((clip_to_original if layout == "clip" else openclip_to_original)(weights, prefix))
    return {k: v.detach().contiguous() for k, v in state.items()}


def modelspec(family: str, prediction_type: str, title: str) -> dict[str, str]:
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": ARCHITECTURES[(family, prediction_type)],
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if family == "sdxl"
        else "diffusers",
        "modelspec.title": title,
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
    }


def check_single_file_target(out: Path, inputs=(), folders=()) -> None:
    """Where a single file may be written: not a folder, not one of the files being read, not inside
    a model folder being read or written, and not over a file Kiln did not write (its metadata
    names kiln.version)."""
    from safetensors import safe_open

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ModelError(f"{out}: single files are written as .safetensors", hint=f"name it {out.with_suffix('.safetensors')}")
    if out.is_dir():
        raise ModelError(f"{out} is a folder: the single file is written at that path",
                         hint=f"give a file path, e.g. {out / 'model.safetensors'}")
    target = out.resolve()
    if any(target == Path(p).resolve() for p in inputs):
        raise ModelError(f"{out} is one of the files being read", hint="give a new file path")
    if any(Path(f).resolve() in target.parents for f in folders):
        raise ModelError(f"{out} lies inside a model folder being read or written", hint="write it beside the folder")
    if out.exists():
        try:
            with safe_open(str(out), framework="pt") as f:
                ours = "kiln.version" in (f.metadata() or {}) and any(k.startswith(UNET) for k in f.keys())
        except Exception:
            ours = False
        if not ours:
            raise ModelError(f"{out} exists and is not a single file Kiln wrote: refusing to replace it",
                             hint="give a new file path, or remove the file first")


def write_single_file(pipe, family: str, prediction_type: str, out: Path, fp16: bool = False,
                      title: str | None = None) -> Path:
    """Save `pipe` as one original-layout .safetensors file (atomically: a rename at the end)."""
    import torch

    from kiln import __version__
    from kiln.artifacts import save_safetensors_atomically

    out = Path(out)
    check_single_file_target(out)
    state = original_state_dict(pipe, family)
    if fp16:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    if prediction_type == "v_prediction":
        state[V_PRED_KEY] = torch.tensor([])
    metadata = {**modelspec(family, prediction_type, title or out.stem), "kiln.version": __version__,
                "kiln.dtype": "float16" if fp16 else "float32", CONFIGS_KEY: configs_metadata(pipe)}
    save_safetensors_atomically(state, out, metadata)
    log.info("wrote %d tensors (%s, %s) to %s", len(state), family, "fp16" if fp16 else "fp32", out)
    return out


def load_pipeline(model_dir: Path, family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if family == "sdxl":
        return StableDiffusionXLPipeline.from_pretrained(str(model_dir))
    return StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None, requires_safety_checker=False)


def export_single_file(model_dir: Path, out: Path, fp16: bool = False) -> Path:
    """`kiln model export-single-file`: a diffusers folder as one file A1111 and ComfyUI load."""
    from kiln.models.folder import inspect_model

    info = inspect_model(model_dir)
    check_single_file_target(Path(out), folders=[Path(model_dir)])
    return write_single_file(load_pipeline(model_dir, info.family), info.family, info.prediction_type, out, fp16,
                             title=Path(model_dir).resolve().name)


# ---------------------------------------------------------------------------------------------
# original -> diffusers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Detected:
    family: str
    prediction_type: str
    decided_by: str  # how the prediction type was decided
    unet_in_channels: int = 4


class _Reader:
    """Keys, shapes, metadata and tensors of a safetensors file, with errors that name it."""

    def __init__(self, path: Path, shown: Path | None = None):
        from safetensors import safe_open

        self.path = shown or path  # what messages name: the user's file, not a converted copy
        try:
            self._file = safe_open(str(path), framework="pt")
            self.keys = set(self._file.keys())
            self.metadata = self._file.metadata() or {}
        except Exception as e:  # safetensors raises its own error types and OSError
            raise ModelError(f"{self.path} is not a readable .safetensors file (truncated or corrupted?): {e}",
                             hint="download it again and compare its size and hash with the source's") from None

    def shape(self, key: str) -> list[int]:
        return list(self._file.get_slice(key).get_shape())

    def tensor(self, key: str):
        try:
            return self._file.get_tensor(key)
        except Exception as e:
            raise ModelError(f"{self.path}: tensor {key!r} cannot be read (truncated or corrupted?): {e}",
                             hint="download the file again") from None


def _what_else(keys: set[str]) -> str:
    sample = sorted(keys)[:3]
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_down." in k or ".lora_A." in k for k in keys):
        return "a LoRA (lora_* keys), not a checkpoint: apply it with kiln merge BASE OUT --lora FILE"
    if any(k.startswith(("encoder.down.", "decoder.up.", "encoder.down_blocks.", "decoder.up_blocks.")) for k in keys):
        return "a VAE alone, not a checkpoint: Kiln imports whole checkpoints (UNet, VAE and text encoders)"
    if any(k.startswith(("control_model.", "controlnet_cond_embedding.")) for k in keys):
        return "a ControlNet, not a checkpoint"
    if any(k.startswith(("emb_params", "string_to_param", "clip_l", "clip_g")) for k in keys):
        return "a Textual Inversion embedding, not a checkpoint: apply it with kiln merge BASE OUT --textual-inversion FILE"
    if any(k.startswith(("down_blocks.", "conv_in.", "text_model.")) for k in keys):
        return "one component in the diffusers layout, not a single-file checkpoint"
    return f"an unknown layout (first keys: {sample})"


def detect(reader: _Reader, family_flag: str | None = None, prediction_flag: str | None = None) -> Detected:
    """The family and prediction type of a single-file checkpoint, or a ModelError naming what to pass."""
    keys, path = reader.keys, reader.path
    if not keys:
        raise ModelError(f"{path} holds no tensors")
    if not any(k.startswith(UNET) for k in keys):
        raise ModelError(f"{path} is {_what_else(keys)}", hint="give a Stable Diffusion checkpoint (model.diffusion_model.* keys)")
    conv_in = UNET + "input_blocks.0.0.weight"
    channels = reader.shape(conv_in)[1] if conv_in in keys else 0
    if channels == 9:
        raise ModelError(f"{path} is an inpainting checkpoint (its UNet takes 9 input channels: latents, mask and "
                         "masked image)", hint="Kiln serves text-to-image and img2img models; use the non-inpainting model")
    if channels != 4:
        raise ModelError(f"{path}: the UNet takes {channels} input channels where text-to-image Stable Diffusion takes 4 "
                         "(instruct-pix2pix takes 8)", hint="use a text-to-image checkpoint")
    if any(k.startswith("conditioner.embedders.1.model.") for k in keys):
        family = "sdxl"
    elif any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        raise ModelError(f"{path} is an SDXL refiner (one OpenCLIP text encoder, aesthetic-score conditioning)",
                         hint="the refiner is not supported; use an SDXL base checkpoint")
    elif any(k.startswith("cond_stage_model.model.") for k in keys):
        family = "sd2"
    elif any(k.startswith("cond_stage_model.transformer.") for k in keys):
        family = "sd1"
    else:
        raise ModelError(f"{path} has a UNet but no text encoder Kiln knows (cond_stage_model.* or conditioner.embedders.*)",
                         hint="Kiln imports SD 1.x, SD 2.x and SDXL base checkpoints")
    if not any(k.startswith(VAE) for k in keys):
        raise ModelError(f"{path} lacks the VAE (no first_stage_model.* keys)",
                         hint="import a checkpoint that includes its VAE (most shared ones do)")
    implied = None
    if family_flag is not None:
        if family_flag not in FAMILY_FLAGS:
            raise ModelError(f"--family {family_flag!r} is not one Kiln knows", hint=f"one of {', '.join(FAMILY_FLAGS)}")
        wanted, implied = FAMILY_FLAGS[family_flag]
        if wanted != family:
            raise ModelError(f"--family {family_flag} but {path} has the keys of {family}",
                             hint="leave --family out: Kiln reads the family from the keys")
    if prediction_flag is not None and prediction_flag not in PREDICTION_TYPES:
        raise ModelError(f"--prediction-type {prediction_flag!r} is not one Kiln knows", hint=f"one of {PREDICTION_TYPES}")
    if prediction_flag is not None and implied is not None and prediction_flag != implied:
        raise ModelError(f"--family {family_flag} means {implied} but --prediction-type says {prediction_flag}",
                         hint="pass one of them")
    recorded, source = _recorded_prediction(reader)
    if prediction_flag is not None:
        overriding = f" over {source}'s {recorded}" if recorded and recorded != prediction_flag else ""
        return Detected(family, prediction_flag, f"--prediction-type{overriding}", channels)
    if implied is not None:
        if recorded is not None and recorded != implied:
            raise ModelError(f"--family {family_flag} means {implied}, but {path} says {recorded} ({source})",
                             hint=f"leave --family out, or pass --prediction-type {implied} to override the file")
        return Detected(family, implied, f"--family {family_flag}", channels)
    if recorded is not None:
        return Detected(family, recorded, source, channels)
    if family == "sd2":
        raise ModelError(f"{path} is an SD 2.x checkpoint whose prediction type the file does not record "
                         "(SD 2.x 768 models predict v, the 512 base models predict noise)",
                         hint="pass --family sd2-v (768 px, v_prediction) or --family sd2 (512 px, epsilon)")
    return Detected(family, "epsilon", f"the default for {family} (the file names no v-prediction; pass "
                    "--prediction-type v_prediction for a v-prediction fine-tune)", channels)


def _recorded_prediction(reader: _Reader) -> tuple[str | None, str | None]:
    """The prediction type the file itself records, and where: ComfyUI's `v_pred` key, kohya's
    modelspec metadata (prediction_type, or an architecture ending in -v / -512)."""
    spec = reader.metadata.get("modelspec.prediction_type")
    architecture = reader.metadata.get("modelspec.architecture", "")
    if V_PRED_KEY in reader.keys:
        return "v_prediction", "the v_pred key"
    if spec is not None:
        known = {"v": "v_prediction", "v_prediction": "v_prediction", "epsilon": "epsilon", "eps": "epsilon"}
        if spec.lower() not in known:
            raise ModelError(f"{reader.path}: its metadata modelspec.prediction_type={spec!r} is neither epsilon nor v",
                             hint="pass --prediction-type epsilon or v_prediction")
        return known[spec.lower()], "the file's modelspec metadata"
    if architecture.endswith("-v"):
        return "v_prediction", "the file's modelspec metadata"
    if architecture.endswith("-512"):
        return "epsilon", "the file's modelspec metadata"
    return None, None


def save_configs(pipe, out_dir: Path) -> Path:
    """A pipeline's configs as a diffusers folder without weights (tokenizers written in full), which
    is what `from_single_file(config=...)` reads the architecture from."""
    from kiln.models.tokenizer import write_clip_tokenizer

    out_dir = Path(out_dir)
    pipe.save_config(str(out_dir))
    for name, component in pipe.components.items():
        if component is None:
            continue
        if name.startswith("tokenizer"):
            write_clip_tokenizer(out_dir / name, component.pad_token)
        elif name.startswith("text_encoder"):
            component.config.save_pretrained(str(out_dir / name))
        else:
            component.save_config(str(out_dir / name))
    return out_dir


def configs_metadata(pipe) -> str:
    """The configs (not the tokenizer vocabularies) as one JSON string for the file's metadata, so a
    file Kiln wrote carries its own architecture, whatever its size."""
    with tempfile.TemporaryDirectory() as tmp:
        root = save_configs(pipe, Path(tmp))
        files = {str(p.relative_to(root)): json.loads(p.read_text()) for p in sorted(root.rglob("*.json"))
                 if p.name != "vocab.json"}
    return json.dumps(files, sort_keys=True)


CONFIG_FILES = ({"model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "vae/config.json"}
                | {f"{c}/config.json" for c in ("text_encoder", "text_encoder_2")}
                | {f"{t}/{n}" for t in ("tokenizer", "tokenizer_2") for n in ("special_tokens_map.json", "tokenizer_config.json")})


def write_configs_from_metadata(text: str, out_dir: Path, family: str) -> Path:
    """The configs a Kiln-written file carries, written out after checking them: only the files
    `configs_metadata` writes, each a JSON object, every one a family needs present, and the result a
    folder `inspect_model` reads as the family the keys say."""
    from kiln.models.folder import inspect_model

    def damaged(why: str):
        return ModelError(f"the file's {CONFIGS_KEY} metadata is damaged: {why}",
                          hint="pass --config DIR: a diffusers folder of the checkpoint's architecture")

    try:
        files = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise damaged(f"not readable JSON ({type(e).__name__})") from None
    if not isinstance(files, dict):
        raise damaged(f"a JSON {type(files).__name__}, not an object of files")
    needed = {"model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "vae/config.json",
              "text_encoder/config.json", "tokenizer/special_tokens_map.json"}
    if family == "sdxl":
        needed |= {"text_encoder_2/config.json", "tokenizer_2/special_tokens_map.json"}
    unknown = sorted(set(files) - CONFIG_FILES)
    if unknown:
        raise damaged(f"it names {unknown[:3]}, which are not config files Kiln writes")
    missing = sorted(needed - set(files))
    if missing:
        raise damaged(f"it lacks {missing}")
    try:
        _write_config_files(files, Path(out_dir), damaged)
    except RecursionError:
        raise damaged("a config nests too deep") from None
    try:
        found = inspect_model(out_dir).family
    except (ModelError, KeyError, TypeError, ValueError, IndexError, AttributeError, RecursionError) as e:
        raise damaged(f"the configs do not describe a model ({type(e).__name__}: {str(e)[:200]})") from None
    if found != family:
        raise damaged(f"its configs describe {found} but the file's keys are {family}")
    return Path(out_dir)


def _write_config_files(files: dict, out_dir: Path, damaged) -> None:
    from kiln.models.tokenizer import write_clip_tokenizer

    for relative, content in files.items():
        if not isinstance(content, dict):
            raise damaged(f"{relative} is a JSON {type(content).__name__}, not an object")
        target = Path(out_dir) / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(content))
        if target.name == "special_tokens_map.json":
            pad = content.get("pad_token")
            if not isinstance(pad, str):
                raise damaged(f"{relative}: pad_token={pad!r} is not a token")
            write_clip_tokenizer(target.parent, pad)


def write_family_config(family: str, prediction_type: str, out_dir: Path) -> Path:
    """The configs of a family's real architecture (the modules' parameters are built on the meta
    device, so no weights are allocated)."""
    from accelerate import init_empty_weights

    from kiln.models.benchmark import build_sd15_pipeline, build_sd2_pipeline, build_sdxl_pipeline

    with init_empty_weights():  # parameters on the meta device; the schedulers' tables stay real
        if family == "sdxl":
            pipe = build_sdxl_pipeline("full")
        elif family == "sd2":
            pipe = build_sd2_pipeline("full", prediction_type=prediction_type)
        else:
            pipe = build_sd15_pipeline("full")
    return save_configs(pipe, out_dir)


def _read_pickle(path: Path, tmp_dir: Path) -> Path:
    """A trusted pickle checkpoint rewritten as safetensors (loading it runs the code it holds)."""
    import torch
    from safetensors.torch import save_file

    try:
        data = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as e:
        raise ModelError(f"{path} could not be loaded as a pickle checkpoint: {e}") from None
    state = data.get("state_dict", data) if isinstance(data, dict) else None
    if not isinstance(state, dict):
        raise ModelError(f"{path} holds {type(data).__name__}, not a state dict")
    tensors = {k: v.contiguous() for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    out = tmp_dir / (path.stem + ".safetensors")
    save_file(tensors, str(out))
    return out


def import_single_file(path: Path, out: Path, family: str | None = None, prediction_type: str | None = None,
                       config: Path | None = None, allow_pickle: bool = False) -> Path:
    """`kiln model import`: a single-file checkpoint -> a diffusers folder (atomically), checked tensor
    by tensor against the file. An existing OUT is replaced only if it is a model folder (or empty)."""
    from kiln.artifacts import check_output_folder, file_sha256, write_json_atomically
    from kiln.models.folder import inspect_model
    from kiln.models.tiny import save_pipeline

    path, out = Path(path), Path(out)
    if path.is_dir():
        raise ModelError(f"{path} is a folder, not a checkpoint file",
                         hint="a diffusers folder needs no import: make deploy MODEL=" + str(path))
    if not path.is_file():
        raise ModelError(f"{path} does not exist", hint="give a .safetensors checkpoint")
    check_output_folder(out, replaces=("model_index.json",))
    suffix = path.suffix.lower()
    with tempfile.TemporaryDirectory(prefix="kiln-import-") as tmp:
        tmp = Path(tmp)
        source = path
        if suffix in PICKLE_SUFFIXES:
            if not allow_pickle:
                raise ModelError(f"{path} is a pickle file: loading it runs whatever code it holds",
                                 hint="use the .safetensors version of the model, or pass --allow-pickle for a file you trust")
            source = _read_pickle(path, tmp)
        elif suffix != ".safetensors":
            raise ModelError(f"{path}: expected a .safetensors checkpoint (or a trusted .ckpt with --allow-pickle)")
        elif path.suffix != ".safetensors":  # diffusers reads safetensors by the lower-case suffix alone
            source = tmp / (path.stem + ".safetensors")
            source.symlink_to(path.resolve())
        reader = _Reader(source, shown=path)
        found = detect(reader, family, prediction_type)
        if config is not None:
            config_info = inspect_model(config)
            if config_info.family != found.family:
                raise ModelError(f"--config {config} is a {config_info.family} folder but {path} is {found.family}",
                                 hint="give a folder of the checkpoint's architecture, or leave --config out")
            config_dir, described = Path(config), str(config)
        elif CONFIGS_KEY in reader.metadata:
            config_dir = write_configs_from_metadata(reader.metadata[CONFIGS_KEY], tmp / "config", found.family)
            described = "the file's own configs (written by Kiln)"
        else:
            config_dir = write_family_config(found.family, found.prediction_type, tmp / "config")
            described = f"Kiln's {found.family} configs"
        log.info("%s: %s, %s (%s)", path, found.family, found.prediction_type, found.decided_by)
        pipe = _from_single_file(source, found, config_dir, path)
        report = verify(pipe, found.family, reader)
        manifest = {"source": {"path": str(path.resolve()), "sha256": file_sha256(path),
                               "title": reader.metadata.get("modelspec.title")},
                    "family": found.family, "prediction_type": found.prediction_type, "decided_by": found.decided_by,
                    "config": described, **report}

        def finish(folder: Path) -> None:
            write_json_atomically(folder / MANIFEST, manifest)
            try:
                inspect_model(folder)  # before it takes OUT's place: a folder Kiln cannot read never lands
            except ModelError as e:
                raise ModelError(f"importing {path} gave a folder Kiln cannot read: {e}", hint=e.hint) from None

        save_pipeline(pipe, out, finish)
    return out


def _from_single_file(source: Path, found: Detected, config_dir: Path, shown: Path):
    import diffusers
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import logging as diffusers_logging

    cls = StableDiffusionXLPipeline if found.family == "sdxl" else StableDiffusionPipeline
    scheduler_config = json.loads((config_dir / "scheduler" / "scheduler_config.json").read_text())
    scheduler_config["prediction_type"] = found.prediction_type
    name = scheduler_config.get("_class_name")
    scheduler_cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(scheduler_cls, type) and issubclass(scheduler_cls, diffusers.SchedulerMixin)):
        raise ModelError(f"{shown}: the scheduler config names {name!r}, which is not a diffusers scheduler",
                         hint="pass --config DIR: a diffusers folder of the checkpoint's architecture")
    scheduler = scheduler_cls.from_config(scheduler_config)
    kwargs = {} if found.family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return cls.from_single_file(str(source), config=str(config_dir), local_files_only=True, scheduler=scheduler,
                                    torch_dtype=torch.float32, **kwargs)
    except Exception as e:  # diffusers and transformers raise many kinds on a file that does not fit
        first = (str(e).splitlines() or [type(e).__name__])[0][:400]
        raise ModelError(f"{shown} does not fit the {found.family} architecture ({type(e).__name__}: {first})",
                         hint="a checkpoint of a non-standard architecture needs --config DIR: a diffusers folder of its shape") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)


def verify(pipe, family: str, reader: _Reader) -> dict:
    """Every weight of the imported pipeline, renamed back, against the file: same keys, shapes and
    values (checkpoints in fp16 or bf16 compare exactly after the lossless cast to fp32)."""
    produced = original_state_dict(pipe, family)
    missing = sorted(k for k in produced if k not in reader.keys)
    if missing:
        raise ModelError(f"{reader.path} lacks {len(missing)} tensor(s) the {family} architecture needs, e.g. {missing[:3]}",
                         hint="the file is partial or of another architecture (pass --config DIR for a non-standard one)")
    worst, worst_key = 0.0, None
    for key, value in produced.items():
        stored = reader.tensor(key)
        if list(stored.shape) != list(value.shape):
            raise ModelError(f"{reader.path}: {key} has shape {list(stored.shape)} where the {family} configs give "
                             f"{list(value.shape)}", hint="pass --config DIR: a diffusers folder of the checkpoint's architecture")
        diff = float((stored.float() - value.float()).abs().max()) if value.numel() else 0.0
        if diff > worst:
            worst, worst_key = diff, key
    if worst > 0:
        raise ModelError(f"importing {reader.path} changed {worst_key} by {worst:.3g}: the conversion is not faithful")
    unused = sorted(k for k in reader.keys if k not in produced and k != V_PRED_KEY)
    if unused:
        log.info("%d tensor(s) of %s are not part of the model and were left out, e.g. %s", len(unused), reader.path,
                 unused[:3])
    return {"tensors": len(produced), "max_abs_diff": worst, "unused_keys": len(unused), "unused_examples": unused[:10]}
