"""What every stage writes and how it is keyed: content hashes, atomic writes (an interruption leaves
the previous artifact or none, never half of one), and the manifests that key an artifact by what
produced it, so a stale one is rebuilt, never reused. The ONNX export's manifest is a typed model
read by every later stage (repository, TensorRT, quantisation, benchmarks)."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from kiln.errors import ModelError
from kiln.models.folder import ModelDims, ModelInfo

MANIFEST_NAME = "manifest.json"
LIBRARIES = ("torch", "onnx", "onnxruntime", "diffusers", "transformers")


# ---------------------------------------------------------------- identity


def fingerprint(payload: Any) -> str:
    """sha256 of a JSON-able payload (keys sorted): the key of whatever it describes."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tree_sha256(path: Path) -> str:
    """sha256 over every file under `path` (relative names and contents), in a stable order: the
    identity of a model folder, a component's weights, an adapter."""
    path = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode())
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def library_versions(names=LIBRARIES) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


# ---------------------------------------------------------------- atomic writes


def write_json_atomically(path: Path, payload: Any) -> None:
    """JSON (pydantic models as their JSON form) written beside `path`, then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(payload, BaseModel):
        payload = payload.model_dump(mode="json", exclude_none=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    make_readable(tmp)
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    os.replace(tmp, path)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def make_readable(path: Path) -> None:
    """The mode a plain open() would have given (mkstemp and mkdtemp give 0600/0700, which hides
    the result from other users and containers)."""
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~_umask())


def save_safetensors_atomically(tensors: dict, path: Path, metadata: dict | None = None) -> Path:
    """A .safetensors file written beside `path`, then renamed over it, readable as open() makes files."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        make_readable(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@contextlib.contextmanager
def write_folder_atomically(out_dir: Path, replaces: tuple[str, ...] = ()):
    """Yield a temporary folder beside `out_dir`; on success it replaces `out_dir` in one rename.

    `replaces`: file names of which an existing, non-empty `out_dir` must hold one to be replaced
    (say, model_index.json: a model folder), so a user's own folder given by mistake is refused
    rather than deleted."""
    out_dir = check_output_folder(out_dir, replaces)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    make_readable(tmp)
    try:
        yield tmp
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old.{os.getpid()}")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_folder(out_dir: Path, replaces: tuple[str, ...] = ()) -> Path:
    """The absolute output folder, or a KilnError when it is a file, the current folder (or above
    it), or (with `replaces`) a non-empty folder holding none of those names."""
    from kiln.errors import KilnError

    out_dir = Path(os.path.abspath(out_dir))
    if out_dir.exists() and not out_dir.is_dir():
        raise KilnError(f"{out_dir} is a file: the output is a folder", hint="give a folder path that does not exist yet")
    if out_dir == Path.cwd() or out_dir in Path.cwd().parents:
        raise KilnError(f"{out_dir} is the current folder (or holds it): it cannot be replaced",
                        hint="give a new folder, e.g. ./out")
    if replaces and out_dir.is_dir() and any(out_dir.iterdir()) and not any((out_dir / n).exists() for n in replaces):
        example = sorted(p.name for p in out_dir.iterdir())[:3]
        raise KilnError(f"{out_dir} already holds files Kiln did not write ({', '.join(example)}): refusing to replace it",
                        hint=f"give a new or empty folder (one Kiln wrote holds {' or '.join(replaces)})")
    return out_dir


def read_manifest(folder: Path) -> dict:
    """A folder's manifest.json as written, or {} when there is none or it is damaged (a damaged
    manifest proves nothing: everything it would have vouched for is rebuilt)."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


# ---------------------------------------------------------------- the ONNX export's manifest


class ComponentEntry(BaseModel):
    """One exported component: its file, what produced it (`key`) and how it compared with its source."""

    model_config = ConfigDict(extra="allow")  # an int8 export adds source_sha256_fp32

    key: str
    file: str
    sha256: str
    precision: str
    source_sha256: str
    inputs: list[dict]
    outputs: list[dict]
    parity: list[dict] | dict  # per parity shape; an int8 Q/DQ UNet's held-out report
    seconds: float = 0.0


class ExportManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kiln_version: str
    format: int
    source: dict[str, Any]  # path, and the sha256 of each source folder
    model: ModelInfo
    dims: ModelDims
    opset: int
    precision: str  # fp32 | fp16 | int8 | int8-qdq (the UNet calibrated by `kiln export qdq`)
    libraries: dict[str, str]
    components: dict[str, ComponentEntry]
    quantization: dict[str, Any] | None = None

    @field_validator("precision")
    @classmethod
    def _known_precision(cls, value: str) -> str:
        from kiln.export.specs import EXPORT_PRECISIONS, QDQ_PRECISION

        if value not in (*EXPORT_PRECISIONS, QDQ_PRECISION):
            raise ValueError(f"precision {value!r} is not one of {[*EXPORT_PRECISIONS, QDQ_PRECISION]}")
        return value

    @field_validator("dims")
    @classmethod
    def _positive_dims(cls, dims: ModelDims) -> ModelDims:
        optional = ("hidden_size_2", "pooled_size", "cross_attention_dim")  # SDXL's; 0 for other families
        bad = {k: v for k, v in vars(dims).items() if k != "control" and v < (0 if k in optional else 1)}
        bad.update({"control": dims.control} if any(v < 1 for pair in dims.control for v in pair) else {})
        if bad:
            raise ValueError(f"model dimensions must be positive, not {bad}")
        return dims

    @property
    def key(self) -> str:
        """The identity of the exported files, which engines and repositories record."""
        return fingerprint({name: entry.model_dump(mode="json", exclude_none=True)
                            for name, entry in self.components.items()})

    @field_validator("model")
    @classmethod
    def _known_family(cls, model: ModelInfo) -> ModelInfo:
        from kiln.models.folder import FAMILIES

        if model.family not in FAMILIES:
            raise ValueError(f"model family {model.family!r} is not one of {list(FAMILIES)}")
        return model

    @property
    def family(self):
        """The component layout of the exported model's family (kiln.export.specs.Family), with the
        ControlNets it holds."""
        from kiln.export.specs import CONTROLNET_PREFIX, family

        return family(self.model.family).controlled(self.dims, [n for n in self.components if n.startswith(CONTROLNET_PREFIX)])

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE factor times the UNet's down-sampling."""
        return self.dims.vae_scale_factor * self.dims.unet_factor


def onnx_file(onnx_dir: Path, component: str) -> Path:
    """Where an export keeps a component's ONNX model (optimum's layout: unet/model.onnx)."""
    return Path(onnx_dir) / component / "model.onnx"


def exported_components(onnx_dir: Path, family) -> list[str]:
    """The components of `family` (kiln.export.specs.Family) an export folder holds, in their declared order."""
    return [name for name in family.components if onnx_file(onnx_dir, name).is_file()]


def read_export(onnx_dir: Path) -> ExportManifest:
    """The manifest of a Kiln ONNX export, checked to describe a complete export."""
    onnx_dir = Path(onnx_dir)
    raw = read_manifest(onnx_dir)
    if not raw:
        state = "a damaged manifest.json" if (onnx_dir / MANIFEST_NAME).is_file() else "no manifest.json"
        raise ModelError(f"{onnx_dir} has {state}: it is not a Kiln ONNX export Kiln can read",
                         hint=f"kiln export onnx MODEL_DIR {onnx_dir}")
    try:
        manifest = ExportManifest.model_validate(raw)
    except ValidationError as exc:
        raise ModelError(f"{onnx_dir / MANIFEST_NAME} is not a manifest this Kiln reads: {exc.errors()[0]['loc']} "
                         f"{exc.errors()[0]['msg']}", hint=f"re-export: kiln export onnx MODEL_DIR {onnx_dir}") from None
    try:
        layout = manifest.family
    except KeyError as exc:
        raise ModelError(f"{onnx_dir / MANIFEST_NAME}: {exc.args[0]}", hint=f"re-export: kiln export onnx MODEL_DIR {onnx_dir}") from None
    present = exported_components(onnx_dir, layout)
    missing = [name for name, spec in layout.components.items() if spec.required and name not in present]
    unrecorded = [name for name in present if name not in manifest.components]
    if missing or unrecorded:
        what = f"lacks {missing}" if missing else f"has {unrecorded} that its manifest does not record"
        raise ModelError(f"{onnx_dir} {what}", hint=f"kiln export onnx MODEL_DIR {onnx_dir}")
    return manifest
