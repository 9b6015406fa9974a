"""The embedded target's `torch` backend: each component model runs its PyTorch module (the wrapper the
export traced, kiln.export.wrappers) instead of ONNX Runtime, so a GPU host without TensorRT serves
on the GPU (CUDA, fp16, SDPA attention) and a CPU host in fp32.

The modules load from the diffusers folder the ONNX export was made from (its manifest records the
path and each subfolder's SHA-256). The builder checks that folder still holds what was exported
(a moved or changed folder is refused, never silently served) and hard-links each component's
subfolder into the repository (a copy across file systems), so the repository is self-contained and
costs no extra disk on one file system. Each placed file's size, modification time and SHA-256 are
recorded: a weight file changed afterwards (in place, through the hard link) is refused when the
model loads.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from kiln.artifacts import file_sha256, tree_sha256, write_json_atomically
from kiln.errors import ModelError, RepositoryError

log = logging.getLogger("kiln.model_repository")

BACKEND = "torch"
WEIGHTS_FOLDER = "weights"  # in a component's version folder: its diffusers subfolder


@dataclass(frozen=True)
class TorchOptions:
    """Where the modules run, chosen when the model loads: `auto` is CUDA in fp16 when torch sees a
    GPU, else the CPU in fp32 (kiln.pipeline.engines.torch_placement). `compile`: torch.compile."""

    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False

    def check(self) -> None:
        """Refuse what no host could run, before any work (the GPU itself is only known at load)."""
        from kiln.pipeline.engines import TORCH_DEVICES, TORCH_DTYPES

        if self.device not in TORCH_DEVICES and not (self.device.startswith("cuda:") and self.device[5:].isdigit()):
            raise RepositoryError(f"--torch-device {self.device!r} is not one of {TORCH_DEVICES} or cuda:N")
        if self.dtype not in TORCH_DTYPES:
            raise RepositoryError(f"--torch-dtype {self.dtype!r} is not one of {TORCH_DTYPES}")
        if self.device == "cpu" and self.dtype == "float16":
            raise RepositoryError("--torch-dtype float16 with --torch-device cpu: PyTorch's CPU kernels are slow or "
                                  "missing in fp16", hint="--torch-dtype float32 or bfloat16 on the CPU")


def check_export(onnx_dir: Path, manifest, adapted: list[str]) -> None:
    """Refuse an export whose options only ONNX Runtime serves: the PyTorch modules load the source
    weights in fp32 (or --torch-dtype), and take no per-request LoRA inputs."""
    if manifest.precision != "fp32":
        flag = {"fp16": "--fp16", "int8": "--int8"}.get(manifest.precision, "kiln export qdq")
        raise RepositoryError(f"--backend torch cannot serve {onnx_dir}: it was exported with {flag} "
                              f"(precision {manifest.precision}), which only the ONNX models carry; the PyTorch "
                              "modules load the source weights", hint="build from an fp32 export (kiln export onnx "
                              "MODEL_DIR ONNX_DIR) and choose --torch-dtype, or use --backend onnxruntime")
    if adapted:
        raise RepositoryError(f"--backend torch cannot serve {onnx_dir}: it was exported with --lora-inputs "
                              f"({', '.join(adapted)}), which only ONNX Runtime serves",
                              hint="export without --lora-inputs, or use --backend onnxruntime")


def component_sources(onnx_dir: Path, manifest, components: list[str], verified: dict[Path, str]) -> dict[str, tuple[Path, str]]:
    """Each component -> (its diffusers folder, that folder's SHA-256), checked against what the export
    recorded. `verified` caches folders already hashed (the VAE feeds two components)."""
    source, layout = manifest.source, manifest.family
    model_dir = Path(source["path"])
    controlnets = source.get("controlnets", {})  # ControlNets come from folders of their own
    out = {}
    for name in components:
        key = name if name in layout.controlnets else layout.spec(name).source  # how the export keyed the folder
        if name in layout.controlnets:
            if key not in controlnets:
                raise RepositoryError(f"{onnx_dir}'s manifest does not record where ControlNet {key} came from "
                                      "(an export made before Kiln recorded it)",
                                      hint=f"re-export: kiln export onnx MODEL_DIR {onnx_dir} --controlnet NAME=DIR")
            folder = Path(controlnets[key])
        else:
            folder = model_dir / key
        recorded = source.get("sha256", {}).get(key)
        if recorded is None:
            raise RepositoryError(f"{onnx_dir}'s manifest records no SHA-256 of {key}, which {name} loads from",
                                  hint=f"re-export: kiln export onnx {model_dir} {onnx_dir}")
        if not folder.is_dir():
            raise RepositoryError(f"--backend torch loads {name} from {folder}, which {onnx_dir} was exported from, "
                                  "but it is gone (moved or deleted)",
                                  hint=f"re-export from where the model is now: kiln export onnx MODEL_DIR {onnx_dir}")
        if folder not in verified:
            verified[folder] = tree_sha256(folder)
        if verified[folder] != recorded:
            raise RepositoryError(f"--backend torch loads {name} from {folder}, which changed since {onnx_dir} was "
                                  f"exported from it (SHA-256 {verified[folder][:12]}, exported {str(recorded)[:12]})",
                                  hint=f"re-export so the export and the served weights agree: kiln export onnx {model_dir} {onnx_dir}")
        out[name] = (folder, verified[folder])
    return out


def weight_files(folder: Path) -> dict[str, Path]:
    """Every file of a diffusers subfolder, by its path under the version folder."""
    return {f"{WEIGHTS_FOLDER}/{f.relative_to(folder).as_posix()}": f for f in sorted(folder.rglob("*")) if f.is_file()}


STAMPS_NAME = "weights.json"  # beside the weights folder: each placed file's size, modification time, SHA-256


def _files(version_dir: Path) -> dict[str, Path]:
    return {f.relative_to(version_dir).as_posix(): f for f in sorted((version_dir / WEIGHTS_FOLDER).rglob("*")) if f.is_file()}


def stamp(version_dir: Path) -> None:
    """Record the placed weight files, as placed, for the check at load (check_stamps)."""
    stamps = {}
    for name, f in _files(version_dir).items():
        stat = f.stat()
        stamps[name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": file_sha256(f)}
    write_json_atomically(version_dir / STAMPS_NAME, stamps)


def check_stamps(version_dir: Path) -> None:
    """Refuse weights that changed after the repository was built (a hard link shares its file with the
    model folder, so a fine-tune saved over that folder would otherwise be served unannounced). A file
    whose size and time are as recorded is taken as is; any other is hashed (a copied repository)."""
    try:
        recorded = json.loads((version_dir / STAMPS_NAME).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        raise ModelError(f"{version_dir / STAMPS_NAME} is missing or damaged: the weights cannot be vouched for",
                         hint="rebuild the repository: kiln repo build ONNX_DIR REPO_DIR --backend torch") from None
    found = _files(version_dir)
    changed = sorted(set(recorded) ^ set(found))
    for name in set(recorded) & set(found):
        stat, entry = found[name].stat(), recorded[name]
        if (stat.st_size, stat.st_mtime_ns) != (entry["size"], entry["mtime_ns"]) and file_sha256(found[name]) != entry["sha256"]:
            changed.append(name)
    if changed:
        raise ModelError(f"{version_dir}: {', '.join(sorted(changed))} changed since the repository was built",
                         hint="rebuild it (kiln repo build ONNX_DIR REPO_DIR --backend torch), re-exporting first if "
                         "the model folder changed")


def load_component(spec, version_dir: Path, settings: dict):
    """The component's PyTorch module as a session (kiln.pipeline.engines.TorchSession), placed as
    `settings["torch"]` asks; logs what was chosen."""
    from kiln.pipeline.engines import TorchComponent, TorchSession, attention_kind, torch_placement

    check_stamps(version_dir)
    options = TorchOptions(**settings.get("torch", {}))
    device, dtype = torch_placement(options.device, options.dtype)
    module = spec.load_torch(version_dir, version_dir / WEIGHTS_FOLDER)
    component = TorchComponent(spec, module, device, dtype, compile=options.compile)
    description = (f"{spec.name}: PyTorch on {device} in {str(component.dtype).removeprefix('torch.')}, attention "
                   f"{attention_kind(module)}{', torch.compile' if options.compile else ''}")
    log.info("%s", description)
    return TorchSession(component, description)
