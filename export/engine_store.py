"""`kiln export trt ONNX_DIR STORE --reuse`: a folder of engines shared by every pod of a cluster (a
volume claim), one subfolder per runtime (`10.5.0-sm90-nvidia-h100-80gb-hbm3`), so pods on different
GPUs never overwrite each other's engines. Engines that fit this TensorRT, GPU, export and plan are
reused (a restart builds nothing); otherwise they are built into a scratch folder and swapped in
with one rename, so two pods building at once leave one complete folder."""

from __future__ import annotations

import json
import logging
import re
import shutil
import uuid
from pathlib import Path

from kiln.artifacts import read_manifest
from kiln.errors import ExportError
from kiln.export.engine_runtime import Runtime, mismatch_text
from kiln.export.tensorrt import ENGINE_FORMAT, ENGINE_NAME, EnginePlan

log = logging.getLogger("kiln.export")


def runtime_folder(runtime: Runtime) -> str:
    """The store's subfolder for one runtime: TensorRT version, compute capability and GPU, as a path name."""
    gpu = re.sub(r"[^a-z0-9]+", "-", runtime.gpu.lower()).strip("-") or "gpu"
    return f"{runtime.tensorrt}-sm{runtime.compute_capability.replace('.', '')}-{gpu}"


def stale_reason(manifest: dict, runtime: Runtime, plan: EnginePlan, components: list[str]) -> str | None:
    """Why a store folder's engines cannot be reused here (None: they can): no manifest, another engine
    format, TensorRT, GPU, export or plan (precision, profiles), or an engine file missing."""
    if not manifest:
        return "no engines yet"
    if manifest.get("format") != ENGINE_FORMAT:
        return f"engine format {manifest.get('format')}, this Kiln writes {ENGINE_FORMAT}"
    try:
        found = mismatch_text(Runtime(**manifest["runtime"]), runtime)
    except (TypeError, KeyError, ExportError) as exc:
        return f"unreadable runtime in the manifest ({exc})"
    if found:
        return found
    if manifest.get("plan", {}).get("export_key") != plan.export_key:
        return "built from another ONNX export"
    if manifest["plan"] != json.loads(json.dumps(plan.to_json())):  # as written: tuples read back as lists
        return "built to another plan (precision, profiles or components)"
    missing = [c for c in components if c not in manifest.get("parity", {})]
    return f"no engine for {missing}" if missing else None


def ensure_engines(onnx_dir: Path, store: Path, plan: EnginePlan, build, runtime: Runtime | None = None) -> tuple[Path, bool]:
    """This runtime's folder of `store`, with engines that fit: reused as they are, or built by
    `build(onnx_dir, out_dir, plan)` (export_engines) and swapped in. Returns the folder and whether
    anything was built."""
    runtime = runtime or Runtime.detect()
    folder = Path(store) / runtime_folder(runtime)
    components = [c.component for c in plan.components]
    reason = _reason(folder, runtime, plan, components)
    if reason is None:
        log.info("engines in %s fit TensorRT %s on %s: nothing to build", folder, runtime.tensorrt, runtime.gpu)
        return folder, False
    log.info("building engines into %s (%s)", folder, reason)
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}")  # pods share PIDs: a random name
    try:
        build(onnx_dir, scratch, plan)
        if _reason(folder, runtime, plan, components) is None:  # another pod finished first: keep its engines
            log.info("another builder filled %s meanwhile; its engines are kept", folder)
            return folder, True
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old.{uuid.uuid4().hex[:8]}")
            folder.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        scratch.rename(folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    problem = _reason(folder, runtime, plan, components)
    if problem is not None:
        raise ExportError(f"the engines just built into {folder} do not pass their own check: {problem}")
    return folder, True


def _reason(folder: Path, runtime: Runtime, plan: EnginePlan, components: list[str]) -> str | None:
    reason = stale_reason(read_manifest(folder), runtime, plan, components)
    if reason is None and not all((folder / c / ENGINE_NAME).is_file() for c in components):
        return "an engine file is missing"
    return reason
