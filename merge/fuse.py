"""`kiln merge`: LoRA adapters fused and Textual Inversion tokens added into a plain diffusers
folder, with a manifest of what went in. Export only ever sees such folders."""

from __future__ import annotations

import importlib.metadata
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from kiln import __version__
from kiln.artifacts import check_output_folder, file_sha256, tree_sha256, write_folder_atomically, write_json_atomically
from kiln.errors import MergeError
from kiln.models.folder import inspect_model

log = logging.getLogger("kiln.merge")
MANIFEST = "merge_manifest.json"


@dataclass(frozen=True)
class LoraInput:
    path: Path
    scale: float = 1.0


def parse_lora(argument: str) -> LoraInput:
    """`FILE` or `FILE:SCALE` (a trailing number after the last colon is the scale)."""
    path, _, scale = argument.rpartition(":")
    if path:
        try:
            value = float(scale)
        except ValueError:
            return LoraInput(Path(argument))
        if not math.isfinite(value):
            raise MergeError(f"--lora {argument}: the scale {scale} is not a finite number", hint="for example FILE:0.8")
        return LoraInput(Path(path), value)
    return LoraInput(Path(argument))


def _require(path: Path, flag: str) -> None:
    if not Path(path).is_file():
        raise MergeError(f"{flag} {path} does not exist", hint="give the .safetensors file training wrote")


def merge(base: Path, out: Path, loras: list[LoraInput] = (), textual_inversions: list[Path] = (),
          single_file: Path | None = None) -> Path:
    """Fuse every adapter into `base` and write the result to `out` (atomically); with `single_file`,
    also as one original-layout .safetensors file."""
    from kiln.models.single_file import load_pipeline

    family = inspect_model(base).family
    out_dir = check_output_folder(Path(out), replaces=("model_index.json",))
    base_dir = Path(base).resolve()
    if out_dir.resolve() == base_dir or base_dir in out_dir.resolve().parents or out_dir.resolve() in base_dir.parents:
        raise MergeError(f"OUT {out} is the base model's folder (or holds it, or lies in it): the merge would overwrite "
                         "what it reads", hint="give a new folder for the merged model")
    for lora in loras:
        if not math.isfinite(lora.scale):
            raise MergeError(f"--lora {lora.path}:{lora.scale}: the scale is not a finite number", hint="for example FILE:0.8")
    if single_file is not None:
        from kiln.models.single_file import check_single_file_target

        inputs = [lora.path for lora in loras] + list(textual_inversions)
        check_single_file_target(Path(single_file), inputs=inputs, folders=[base_dir, out_dir])
    if not loras and not textual_inversions:
        raise MergeError("nothing to merge", hint="pass --lora FILE[:SCALE] and/or --textual-inversion FILE")
    if single_file is not None and textual_inversions:
        raise MergeError("--single-file cannot carry Textual Inversion tokens: A1111 and ComfyUI read single files with "
                         "CLIP's own 49408-token vocabulary", hint="merge the LoRAs into the single file and ship the "
                         "embedding file beside it (both tools load it as is)")
    for lora in loras:
        _require(lora.path, "--lora")
    for ti in textual_inversions:
        _require(ti, "--textual-inversion")
    pipe = load_pipeline(Path(base), family)
    names = [f"lora_{i}" for i in range(len(loras))]
    try:
        for name, lora in zip(names, loras):
            _load_every_module(pipe, lora.path, name, Path(base))
        if names:
            pipe.set_adapters(names, adapter_weights=[lora.scale for lora in loras])
            pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
            pipe.unload_lora_weights()
        tokens = []
        for ti in textual_inversions:
            before = len(pipe.tokenizer)
            _load_textual_inversion(pipe, ti, family)
            tokens.append(pipe.tokenizer.convert_ids_to_tokens(list(range(before, len(pipe.tokenizer)))))
    except (ValueError, KeyError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise MergeError(f"could not apply the adapters to {base}: {first[:300]}{' ...' if len(first) > 300 else ''}",
                         hint="check that each adapter was trained on this base model's family") from None
    with write_folder_atomically(Path(out), replaces=("model_index.json",)) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for name in ("tokenizer", "tokenizer_2"):
            if getattr(pipe, name, None) is not None:
                _write_tokenizer(getattr(pipe, name), Path(base) / name, tmp / name)
        write_json_atomically(
            tmp / MANIFEST,
            {
                "kiln_version": __version__,
                "base": {"path": str(Path(base).resolve()), "sha256": tree_sha256(base)},
                "adapters": [
                    {"kind": "lora", "path": str(l.path.resolve()), "sha256": file_sha256(l.path), "scale": l.scale}
                    for l in loras
                ]
                + [
                    {"kind": "textual_inversion", "path": str(t.resolve()), "sha256": file_sha256(t), "tokens": tok}
                    for t, tok in zip(textual_inversions, tokens)
                ],
                "libraries": {n: importlib.metadata.version(n) for n in ("diffusers", "peft", "transformers", "torch")},
            },
        )
    log.info("merged %d LoRA and %d Textual Inversion file(s) into %s", len(loras), len(textual_inversions), out)
    if single_file is not None:
        from kiln.models.single_file import write_single_file

        info = inspect_model(out)
        write_single_file(pipe, info.family, info.prediction_type, Path(single_file), title=Path(out).name)
    return Path(out)


def _load_textual_inversion(pipe, path: Path, family: str) -> None:
    """SD: diffusers' own layout ({token: rows}) or A1111's; SDXL: one set of rows per text encoder
    (clip_l, clip_g), the layout Kiln trains and A1111 shares, under the token Kiln recorded (else the
    file's name, as A1111 names it)."""
    from safetensors import safe_open

    if family != "sdxl":
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                if {"clip_l", "clip_g"} & set(f.keys()):
                    raise MergeError(f"{path} is an SDXL embedding (clip_l/clip_g) but the base is {family}",
                                     hint="apply it to an SDXL model")
        pipe.load_textual_inversion(str(path.parent), weight_name=path.name)
        return
    with safe_open(str(path), "pt") as f:
        keys, metadata = set(f.keys()), f.metadata() or {}
        if not {"clip_l", "clip_g"} <= keys:
            raise MergeError(f"{path} is not an SDXL embedding: it holds {sorted(keys)[:4]}, not clip_l and clip_g",
                             hint="train it on an SDXL model (kiln train textual-inversion)")
        rows = {k: f.get_tensor(k) for k in ("clip_l", "clip_g")}
    token = metadata.get("kiln.placeholder_token", path.stem)
    pipe.load_textual_inversion(rows["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(rows["clip_g"], token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)


def _load_every_module(pipe, path: Path, adapter: str, base: Path) -> None:
    """Load one LoRA file and check that every module it holds was applied: diffusers' loader drops
    modules silently in some layouts (the attention modules of a diffusers-format file that also
    holds convolution LoRAs), so such a file is loaded through its kohya rewrite, which keeps them."""
    import tempfile
    import warnings

    from kiln.errors import ModelError
    from kiln.models.lora_files import check_fits, injected_modules, scan, to_kohya, with_kohya_alphas

    try:
        summary = scan(path)
        check_fits(path, base, summary.layout)
    except ModelError as e:
        raise MergeError(str(e), hint=e.hint) from None
    with tempfile.TemporaryDirectory() as tmp:
        source = with_kohya_alphas(path, Path(tmp) / "lora.safetensors") if summary.layout == "kohya" else path
        if source != path:
            log.info("%s: modules without an alpha (or with 0) read with alpha = rank, as kohya's loader does", path)
        with warnings.catch_warnings():  # peft warns when it drops modules; the count below says which way
            warnings.filterwarnings("ignore", message=".*inconsistency was discovered between the PEFT config",
                                    category=RuntimeWarning)
            pipe.load_lora_weights(str(source.parent), weight_name=source.name, adapter_name=adapter)
    applied = injected_modules(pipe, adapter)
    if applied != summary.modules and summary.layout == "diffusers":
        log.info("%s: diffusers applied %s of the modules %s; loading its kohya rewrite", path, applied, summary.modules)
        pipe.delete_adapters(adapter)
        with tempfile.TemporaryDirectory() as tmp:
            rewritten = to_kohya(path, base, Path(tmp) / "lora.safetensors")
            pipe.load_lora_weights(tmp, weight_name=rewritten.name, adapter_name=adapter)
        applied = injected_modules(pipe, adapter)
    if applied != summary.modules:
        raise MergeError(f"{path}: the model took {applied} of the LoRA modules the file holds ({summary.modules}); "
                         "the rest name layers this model does not have", hint="check that the LoRA was trained on this base "
                         "model's family (SD 1.x, SD 2.x or SDXL)")


def _write_tokenizer(tokenizer, base_tokenizer: Path, target: Path) -> None:
    """Keep the files other tools need (vocab.json, merges.txt; transformers 5 saves neither) beside
    what save_pretrained wrote, and record added tokens in added_tokens.json."""
    import json

    for name in ("vocab.json", "merges.txt"):
        if (base_tokenizer / name).is_file() and not (target / name).is_file():
            shutil.copy2(base_tokenizer / name, target / name)
    added = {token: index for token, index in tokenizer.get_added_vocab().items() if index >= 49408}
    if added:
        (target / "added_tokens.json").write_text(json.dumps(added, indent=2))
