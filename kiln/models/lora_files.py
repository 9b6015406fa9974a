"""LoRA files in the layouts people share: diffusers' (what Kiln trains) and kohya's (what A1111 and
ComfyUI users publish and load: `lora_unet_*` / `lora_te*_*` module names, `lora_down`/`lora_up`
and a per-module `alpha`).

`to_kohya` rewrites a diffusers-format file in kohya's layout: SD 1.x and 2.x modules under their
diffusers names, SDXL's under the original (sgm) names kohya's SDXL scripts write, text encoders as
`lora_te_` (SD) or `lora_te1_`/`lora_te2_` (SDXL). `scan` names what a file holds and refuses
the key types Kiln cannot apply (LyCORIS LoHa/LoKr, DoRA, full-weight differences), so nothing is
silently dropped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import ModelError

KOHYA_NAME = "lora_kohya.safetensors"
_DIFFUSERS_KEY = re.compile(r"^(unet|text_encoder_2|text_encoder)\.(.+?)\.(lora_A|lora_B|lora\.down|lora\.up|"
                            r"lora_linear_layer\.down|lora_linear_layer\.up)\.weight$")
_KOHYA_KEY = re.compile(r"^(lora_unet|lora_te1|lora_te2|lora_te)_(.+?)\.(lora_down\.weight|lora_up\.weight|alpha)$")
UNSUPPORTED = {  # key pattern -> what it is
    r"\.hada_w": "LoHa (LyCORIS)", r"\.lokr_w": "LoKr (LyCORIS)", r"\.dora_scale$": "DoRA",
    r"\.diff(_b)?$": "full-weight difference", r"\.lora_mid\.": "CP-decomposed LoCon (LyCORIS)",
    r"\.[ab][12]\.weight$": "GLoRA (LyCORIS)", r"\.oft_": "OFT", r"\.w_norm$": "weight-norm (LyCORIS)",
}
TEXT_PREFIXES = {("sd", "text_encoder"): "lora_te", ("sdxl", "text_encoder"): "lora_te1",
                 ("sdxl", "text_encoder_2"): "lora_te2"}
BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


@dataclass(frozen=True)
class LoraSummary:
    layout: str  # diffusers | kohya
    modules: dict[str, int]  # component (unet, text_encoder, text_encoder_2) -> LoRA modules in the file
    convolutions: int  # modules whose weights are convolutions (LoCon)


def _read(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception as e:
        raise ModelError(f"{path} is not a readable .safetensors LoRA (truncated or corrupted?): {e}") from None


def scan(path: Path) -> LoraSummary:
    """What a LoRA file holds; a ModelError naming any key Kiln would otherwise ignore."""
    state, _ = _read(path)
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in state):
        raise ModelError(f"{path} is a whole checkpoint, not a LoRA", hint="import it with: kiln model import FILE OUT")
    for pattern, what in UNSUPPORTED.items():
        found = [k for k in state if re.search(pattern, k)]
        if found:
            raise ModelError(f"{path} holds {what} weights ({found[0]!r} and {len(found) - 1} more), which Kiln does not apply",
                             hint="convert it to a plain LoRA (lora_down/lora_up) or merge it with the tool that trained it")
    diffusers = {k: _DIFFUSERS_KEY.match(k) for k in state}
    kohya = {k: _KOHYA_KEY.match(k) for k in state}
    layout = "kohya" if any(kohya.values()) else "diffusers"
    matches = kohya if layout == "kohya" else diffusers
    unknown = [k for k, m in matches.items() if m is None]
    if unknown or not state:
        raise ModelError(f"{path}: {len(unknown)} key(s) are not LoRA weights Kiln knows, e.g. {unknown[:3]}"
                         if state else f"{path} holds no tensors",
                         hint="Kiln applies LoRA files in diffusers' or kohya's layout (lora_A/lora_B or lora_down/lora_up)")
    component = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}
    modules: dict[str, set] = {}
    parts: dict[tuple, dict] = {}
    convolutions = set()
    for key, m in matches.items():
        name = component[m.group(1)] if layout == "kohya" else m.group(1)
        modules.setdefault(name, set()).add(m.group(2))
        kind = m.group(3)
        role = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha", "lora_A": "down",
                "lora_B": "up"}.get(kind) or kind.split(".")[-1]  # lora.down, lora_linear_layer.up, ...
        parts.setdefault((m.group(1), m.group(2)), {})[role] = state[key]
        if state[key].ndim == 4:
            convolutions.add((name, m.group(2)))
    for (prefix, module), found in parts.items():
        where = f"{path}: module {prefix}_{module}" if layout == "kohya" else f"{path}: module {prefix}.{module}"
        if "down" not in found or "up" not in found:
            missing = "up" if "down" in found else "down"
            raise ModelError(f"{where} has no {missing} weight (a LoRA module needs both down and up)",
                             hint="the file is incomplete: get it again from its source")
        if found["down"].shape[0] != found["up"].shape[1]:
            raise ModelError(f"{where}: the down weight has rank {found['down'].shape[0]}, the up weight "
                             f"{found['up'].shape[1]}", hint="the file is damaged: get it again from its source")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        raise ModelError(f"{path}: {bad[0]} holds NaN or infinite values ({len(bad)} tensor(s) do)",
                         hint="the file is damaged or the training diverged: it would break every image")
    return LoraSummary(layout, {k: len(v) for k, v in sorted(modules.items())}, len(convolutions))


def with_kohya_alphas(path: Path, out: Path) -> Path:
    """A kohya file whose modules all carry an alpha: a module without one, or with 0, gets its rank,
    as kohya's own loader reads it (diffusers gives such a module another module's alpha when some
    have one). Returns `path` itself when nothing needs filling, else the filled copy at `out`."""
    import torch
    from safetensors.torch import save_file

    state, metadata = _read(path)
    missing = {}
    for key, value in state.items():
        if key.endswith(".lora_down.weight"):
            alpha = key.removesuffix(".lora_down.weight") + ".alpha"
            if alpha not in state or float(state[alpha].reshape(-1)[0]) == 0.0:
                missing[alpha] = torch.tensor(float(value.shape[0]))
    if not missing:
        return Path(path)
    save_file(state | missing, str(out), metadata=metadata)
    return Path(out)


def _alpha(metadata: dict, component: str, module: str, rank: int) -> float:
    """The alpha peft trained `module` with: its alpha_pattern entry, else the adapter's lora_alpha
    (a file without metadata scales by 1: alpha = rank)."""
    entries = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    for pattern, value in (entries.get(f"{component}.alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            return float(value)
    alpha = entries.get(f"{component}.lora_alpha")
    return float(alpha) if alpha is not None else float(rank)


def to_kohya(lora_file: Path, base_dir: Path, out: Path) -> Path:
    """A diffusers-format LoRA trained on `base_dir` rewritten in kohya's layout (atomically)."""
    import torch

    from kiln.artifacts import save_safetensors_atomically
    from kiln.models.folder import _read_json, inspect_model
    from kiln.models.single_file import _rename, _unet_prefixes

    lora_file, out = Path(lora_file), Path(out)
    summary = scan(lora_file)
    if summary.layout != "diffusers":
        raise ModelError(f"{lora_file} is already in kohya's layout")
    check_fits(lora_file, base_dir, summary.layout)
    info = inspect_model(base_dir)
    family = "sdxl" if info.family == "sdxl" else "sd"
    unet_table = sorted(_unet_prefixes(_read_json(Path(base_dir) / "unet" / "config.json")), key=lambda r: -len(r[0]))
    state, metadata = _read(lora_file)
    kohya, ranks, alphas = {}, set(), set()
    for key, value in state.items():
        component, module, kind = _DIFFUSERS_KEY.match(key).groups()
        if component == "unet":
            path = _rename(module, unet_table, "unet LoRA") if family == "sdxl" else module
            name = "lora_unet_" + path.replace(".", "_")
        else:
            if component == "text_encoder_2" and family != "sdxl":
                raise ModelError(f"{lora_file} has text_encoder_2 weights but {base_dir} is {info.family}")
            path = module if module.startswith("text_model.") else "text_model." + module
            name = f"{TEXT_PREFIXES[(family, component)]}_" + path.replace(".", "_")
        down = kind in ("lora_A", "lora.down", "lora_linear_layer.down")
        kohya[f"{name}.lora_{'down' if down else 'up'}.weight"] = value.contiguous()
        if down:
            rank = value.shape[0]
            alpha = _alpha(metadata, component, module, rank)
            kohya[f"{name}.alpha"] = torch.tensor(alpha)
            ranks.add(rank)
            alphas.add(alpha)
    architecture = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2", "sdxl": "stable-diffusion-xl-v1-base"}
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(max(ranks)), "ss_network_alpha": str(max(alphas)),
            "ss_base_model_version": BASE_VERSION[info.family], "ss_v2": str(info.family == "sd2"),
            "ss_v_parameterization": str(info.prediction_type == "v_prediction"),
            "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": f"{architecture[info.family]}/lora",
            "modelspec.title": out.stem}
    return save_safetensors_atomically(kohya, out, meta)


def _weight_shapes(folder: Path) -> dict[str, list[int]]:
    """Every weight's shape in a component folder's safetensors files, read from their headers."""
    from safetensors import safe_open

    shapes = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                shapes[key] = list(f.get_slice(key).get_shape())
    return shapes


def sdxl_only(summary_keys) -> bool:
    return any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in summary_keys)


def check_fits(lora_file: Path, base_dir: Path, layout: str) -> None:
    """A ModelError naming the mismatch when a LoRA does not fit `base_dir`: another family's text
    encoders, or (diffusers' layout) modules the base lacks or holds at other shapes. `layout`: the
    file's, from the scan every caller has already made."""
    from kiln.models.folder import inspect_model

    lora_file, base_dir = Path(lora_file), Path(base_dir)
    family = inspect_model(base_dir).family
    state, _ = _read(lora_file)
    if family != "sdxl" and sdxl_only(state):
        raise ModelError(f"{lora_file} is an SDXL LoRA (lora_te1_/lora_te2_/text_encoder_2 keys) but {base_dir} is {family}",
                         hint="apply it to the SDXL model it was trained on")
    if family == "sdxl" and any(k.startswith("lora_te_") for k in state):
        raise ModelError(f"{lora_file} is an SD 1.x/2.x LoRA (lora_te_ keys) but {base_dir} is SDXL",
                         hint="apply it to the SD 1.x/2.x model it was trained on")
    if layout != "diffusers":
        return
    shapes = {c: _weight_shapes(base_dir / c) for c in ("unet", "text_encoder", "text_encoder_2") if (base_dir / c).is_dir()}
    problems, modules = [], 0
    for key, value in state.items():
        component, module, kind = _DIFFUSERS_KEY.match(key).groups()
        if kind not in ("lora_A", "lora.down", "lora_linear_layer.down"):
            continue
        modules += 1
        weights = shapes.get(component, {})
        name = next((n for n in (f"{module}.weight", f"text_model.{module}.weight", f"{module.removeprefix('text_model.')}.weight")
                     if n in weights), None)
        if name is None:
            problems.append(f"{component}.{module} is not in the model")
        elif weights[name][1] != value.shape[1]:
            problems.append(f"{component}.{module} takes {weights[name][1]} inputs, the LoRA {value.shape[1]}")
    if problems:
        raise ModelError(f"{lora_file} does not fit {base_dir} ({family}): {len(problems)} of {modules} modules do not, "
                         f"e.g. {problems[0]}", hint="it was trained on another model: give the one it was trained on")


def injected_modules(pipe, adapter: str) -> dict[str, int]:
    """How many modules of each component carry `adapter` after load_lora_weights."""
    counts = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, component, None)
        if model is None:
            continue
        n = sum(1 for _, m in model.named_modules() if adapter in getattr(m, "lora_A", {}))
        if n:
            counts[component] = n
    return counts
