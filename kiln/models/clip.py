"""CLIP from local weights, in either layout people keep them: a transformers `CLIPModel` folder
(config.json, model.safetensors or pytorch_model.bin, vocab.json, merges.txt) or an open_clip folder
(open_clip_config.json and open_clip_model.safetensors or open_clip_pytorch_model.bin, as LAION's
checkpoints ship). An open_clip vision-transformer CLIP is mapped onto transformers' `CLIPModel`
(one attention projection split into q/k/v, the projections transposed) and tokenised with CLIP's
own BPE (kiln.models.tokenizer), so both layouts run the same code. Nothing is downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from kiln.errors import ModelError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
TRANSFORMERS_FILES = ("config.json", "model.safetensors | pytorch_model.bin", "vocab.json", "merges.txt")
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# open_clip settings whose non-default values change the architecture beyond what CLIPModel has
_VISION_DEFAULTS = {"attentional_pool": False, "no_ln_pre": False, "final_ln_after_pool": False, "pool_type": "tok",
                    "output_tokens": False, "timm_model_name": None, "ls_init_value": None, "patch_dropout": 0.0,
                    "act_kwargs": None, "norm_kwargs": None, "layers_type": None}
_TEXT_DEFAULTS = {"hf_model_name": None, "embed_cls": False, "no_causal_mask": False, "pool_type": "argmax",
                  "proj_bias": False, "ls_init_value": None, "final_ln_after_pool": False, "pad_id": 0,
                  "act_kwargs": None, "norm_kwargs": None}


class ClipError(ModelError):
    """A CLIP folder is incomplete or holds an architecture Kiln cannot load; names what is expected."""


@dataclass
class Clip:
    """A CLIP model ready to embed: transformers' CLIPModel, its tokenizer and its image preprocessing."""

    model: object  # transformers.CLIPModel, in eval mode
    tokenizer: object  # transformers.CLIPTokenizer
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    layout: str  # "transformers" or "open_clip"


def load_clip(folder: Path, what: str = "--clip-model") -> Clip:
    """The CLIP in `folder`, either layout; a folder that is neither names both layouts' files, and one
    whose files do not load names the file's problem."""
    try:
        return _load_clip(Path(folder), what)
    except ClipError:
        raise
    except Exception as exc:  # noqa: BLE001 - JSON, pickle, safetensors, tokenizer files: each fails its own way
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ClipError(f"{what} {folder} does not load: {type(exc).__name__}: {detail}"[:500],
                        hint="a CLIP folder saved by transformers' save_pretrained, or open_clip's checkpoint with its "
                        "open_clip_config.json, unmodified") from None


def _load_clip(folder: Path, what: str) -> Clip:
    if (folder / OPEN_CLIP_CONFIG).is_file():
        return _load_open_clip(folder, what)
    missing = [name for name in ("config.json", "vocab.json", "merges.txt") if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in ("model.safetensors", "pytorch_model.bin")):
        missing.append("model.safetensors (or pytorch_model.bin)")
    if missing:
        raise ClipError(f"{what} {folder} lacks {missing}",
                        hint=f"give a local CLIP folder: transformers' layout ({', '.join(TRANSFORMERS_FILES)}; for example "
                        "openai/clip-vit-large-patch14 saved with save_pretrained) or open_clip's "
                        f"({OPEN_CLIP_CONFIG} and {' | '.join(OPEN_CLIP_WEIGHTS)})")
    from transformers import CLIPModel, CLIPTokenizer

    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    if model_type != "clip":
        raise ClipError(f"{what} {folder} holds a {model_type!r} model, not CLIP", hint="give a CLIPModel folder")
    model = CLIPModel.from_pretrained(str(folder)).eval()
    processor = folder / "preprocessor_config.json"
    mean, std = OPENAI_MEAN, OPENAI_STD
    if processor.is_file():
        settings = json.loads(processor.read_text())
        mean, std = tuple(settings.get("image_mean", mean)), tuple(settings.get("image_std", std))
    return Clip(model, CLIPTokenizer.from_pretrained(str(folder)), model.config.vision_config.image_size, mean, std,
                "transformers")


def _load_open_clip(folder: Path, what: str) -> Clip:
    weights = next((folder / name for name in OPEN_CLIP_WEIGHTS if (folder / name).is_file()), None)
    if weights is None:
        raise ClipError(f"{what} {folder} has {OPEN_CLIP_CONFIG} but no weights", hint=f"expected {' or '.join(OPEN_CLIP_WEIGHTS)}")
    settings = json.loads((folder / OPEN_CLIP_CONFIG).read_text())
    config = settings.get("model_cfg", settings) if isinstance(settings, dict) else None
    if not isinstance(config, dict) or not isinstance(config.get("embed_dim"), int):
        raise ClipError(f"{what} {folder / OPEN_CLIP_CONFIG} is not an open_clip model config",
                        hint='expected {"model_cfg": {"embed_dim": ..., "vision_cfg": {...}, "text_cfg": {...}}}')
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(weights))
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = open_clip_to_transformers(config, state, what=f"{what} {folder}")
    preprocess = settings.get("preprocess_cfg", {})
    from transformers import CLIPTokenizer

    from kiln.models.tokenizer import write_clip_tokenizer

    tokenizer_dir = folder if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file() else None
    if tokenizer_dir is None:  # open_clip tokenises with CLIP's BPE, which Kiln rebuilds from its vocabulary file
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(Path(tmp))))
    else:
        tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    return Clip(model, tokenizer, model.config.vision_config.image_size, tuple(preprocess.get("mean", OPENAI_MEAN)),
                tuple(preprocess.get("std", OPENAI_STD)), "open_clip")


def _refuse_options(section: dict, defaults: dict, where: str, what: str) -> None:
    odd = {k: section[k] for k, default in defaults.items() if k in section and section[k] != default}
    if odd:
        raise ClipError(f"{what}: open_clip {where} settings {odd} are not a plain CLIP vision transformer",
                        hint="Kiln loads open_clip's ViT CLIPs (ViT-B/32, ViT-L/14, ViT-H/14, ViT-bigG/14 ...); convert "
                        "others to a transformers CLIPModel folder")


def open_clip_to_transformers(config: dict, state: dict[str, torch.Tensor], what: str = "open_clip model"):
    """transformers' CLIPModel holding the weights of an open_clip ViT CLIP (`config`: its model_cfg)."""
    from transformers import CLIPConfig, CLIPModel

    vision, text = config.get("vision_cfg", {}), config.get("text_cfg", {})
    _refuse_options(vision, _VISION_DEFAULTS, "vision_cfg", what)
    _refuse_options(text, _TEXT_DEFAULTS, "text_cfg", what)
    if isinstance(vision.get("layers"), (list, tuple)) or "visual.conv1.weight" not in state:
        raise ClipError(f"{what} is not a vision-transformer CLIP (ResNet or timm towers are not loaded)",
                        hint="use a ViT CLIP, or a transformers CLIPModel folder")
    width, text_width = vision.get("width", 768), text.get("width", 512)
    mlp_ratio = vision.get("mlp_ratio", 4.0)
    act = "quick_gelu" if config.get("quick_gelu") else "gelu"
    clip_config = CLIPConfig(
        projection_dim=config["embed_dim"],
        vision_config=dict(hidden_size=width, intermediate_size=int(width * mlp_ratio), num_hidden_layers=vision.get("layers", 12),
                           num_attention_heads=width // vision.get("head_width", 64), image_size=vision.get("image_size", 224),
                           patch_size=vision.get("patch_size", 16), hidden_act=act, layer_norm_eps=1e-5),
        text_config=dict(hidden_size=text_width, intermediate_size=int(text_width * text.get("mlp_ratio", 4.0)),
                         num_hidden_layers=text.get("layers", 12), num_attention_heads=text.get("heads", 8),
                         max_position_embeddings=text.get("context_length", 77), vocab_size=text.get("vocab_size", 49408),
                         hidden_act=act, layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407, pad_token_id=1),
    )
    mapped: dict[str, torch.Tensor] = {}

    def take(key: str) -> torch.Tensor:
        if key not in state:
            raise ClipError(f"{what} lacks the tensor {key!r}", hint="the file does not match its open_clip_config.json")
        return state[key]

    def blocks(source: str, target: str, layers: int) -> None:
        for i in range(layers):
            s, t = f"{source}.{i}", f"{target}.{i}"
            for part in ("weight", "bias"):
                q, k, v = take(f"{s}.attn.in_proj_{part}").chunk(3)  # open_clip keeps q, k, v in one projection
                mapped.update({f"{t}.self_attn.q_proj.{part}": q, f"{t}.self_attn.k_proj.{part}": k,
                               f"{t}.self_attn.v_proj.{part}": v})
                for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                    mapped[f"{t}.{b}.{part}"] = take(f"{s}.{a}.{part}")

    mapped["vision_model.embeddings.patch_embedding.weight"] = take("visual.conv1.weight")
    mapped["vision_model.embeddings.class_embedding"] = take("visual.class_embedding")
    mapped["vision_model.embeddings.position_embedding.weight"] = take("visual.positional_embedding")
    for part in ("weight", "bias"):
        mapped[f"vision_model.pre_layrnorm.{part}"] = take(f"visual.ln_pre.{part}")
        mapped[f"vision_model.post_layernorm.{part}"] = take(f"visual.ln_post.{part}")
        mapped[f"text_model.final_layer_norm.{part}"] = take(f"ln_final.{part}")
    blocks("visual.transformer.resblocks", "vision_model.encoder.layers", clip_config.vision_config.num_hidden_layers)
    blocks("transformer.resblocks", "text_model.encoder.layers", clip_config.text_config.num_hidden_layers)
    mapped["visual_projection.weight"] = take("visual.proj").T.contiguous()
    mapped["text_projection.weight"] = take("text_projection").T.contiguous()
    mapped["text_model.embeddings.token_embedding.weight"] = take("token_embedding.weight")
    mapped["text_model.embeddings.position_embedding.weight"] = take("positional_embedding")
    mapped["logit_scale"] = take("logit_scale").reshape(())
    model = CLIPModel(clip_config)
    expected = {k for k in model.state_dict() if not k.endswith("position_ids")}
    missing, extra = expected - set(mapped), set(mapped) - expected
    if missing or extra:
        raise ClipError(f"{what}: the mapping to CLIPModel left {sorted(missing)[:4]} unset and {sorted(extra)[:4]} unused",
                        hint="convert this checkpoint to a transformers CLIPModel folder")
    try:
        model.load_state_dict(mapped, strict=False)
    except RuntimeError as exc:  # shapes that disagree with the config
        raise ClipError(f"{what}: its tensors do not fit its open_clip_config.json: {str(exc).splitlines()[-1].strip()}") from None
    return model.eval()
