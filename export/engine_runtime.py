"""What a TensorRT engine is tied to (the TensorRT version, the GPU and its compute capability), found
where engines are built (TensorRT's Python module) and where they are served (NVIDIA's Triton
container, which has TensorRT's library but not necessarily its Python module), and the decision
whether engines built on one runtime may run on another.

Imports nothing beyond the standard library and Kiln's errors: the BLS pipeline model runs the check
at load in the slim NGC image (deploy/Dockerfile, Kiln's core only).
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass

from kiln.errors import ExportError

# libnvinfer's sonames, newest first: the library Triton's tensorrt_plan backend loads
LIBRARIES = ("libnvinfer.so.10", "libnvinfer.so.9", "libnvinfer.so.8", "libnvinfer.so")
# TensorRT's engines refuse another major.minor.patch; getInferLibVersion reports no build number,
# so the build number a manifest may record (10.3.0.26) is not compared
COMPARED_PARTS = 3
REBUILD = ("rebuild the engines on this GPU with this TensorRT: kiln export trt ONNX_DIR ENGINE_DIR (in an image "
           "whose TensorRT is the serving container's), then kiln repo build ONNX_DIR REPO --target ngc --backend "
           "tensorrt --engines ENGINE_DIR; or let the cluster build them at first start: kiln cluster render OUT "
           "--engines build --repository pvc:CLAIM")


@dataclass(frozen=True)
class Runtime:
    tensorrt: str
    gpu: str
    compute_capability: str

    @classmethod
    def detect(cls) -> "Runtime":
        """Where engines are built: TensorRT's Python module (the builder) and the first CUDA GPU."""
        try:
            import tensorrt as trt
        except ImportError as exc:
            raise ExportError("TensorRT is not installed", hint="pip install tensorrt (on a machine with an NVIDIA GPU), "
                              "or serve ONNX Runtime: kiln repo build ... --target ngc --backend onnxruntime") from exc
        return cls(trt.__version__, *_gpu(0))

    @classmethod
    def serving(cls, device: int = 0) -> "Runtime":
        """Where engines are served: the TensorRT library the container has, and CUDA GPU `device`."""
        return cls(tensorrt_version(), *_gpu(device))


def _gpu(device: int) -> tuple[str, str]:
    import torch

    if not torch.cuda.is_available():
        raise ExportError("no CUDA GPU is visible: TensorRT engines are built on the GPU that will run them")
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"{major}.{minor}"


def version_from_int(number: int) -> str:
    """getInferLibVersion's integer as major.minor.patch: TensorRT 10 encodes major*10000 + minor*100 +
    patch (NvInferVersion.h's NV_TENSORRT_VERSION_INT), TensorRT 8 and 9 major*1000 + minor*100 + patch."""
    if number <= 0:
        raise ExportError(f"getInferLibVersion returned {number}, not a TensorRT version")
    if number >= 100000:
        return f"{number // 10000}.{number // 100 % 100}.{number % 100}"
    return f"{number // 1000}.{number // 100 % 10}.{number % 100}"


def parse_version(text: str) -> tuple[int, ...]:
    """`10.3.0.26` -> (10, 3, 0, 26); anything else is an error naming the text."""
    if not re.fullmatch(r"\d+(\.\d+)*", str(text).strip()):
        raise ExportError(f"TensorRT version {text!r} is not a version (expected MAJOR.MINOR.PATCH[.BUILD])")
    return tuple(int(part) for part in str(text).strip().split("."))


def tensorrt_version(libraries: tuple[str, ...] = LIBRARIES) -> str:
    """The TensorRT library's own version (libnvinfer's getInferLibVersion through ctypes), else the
    Python module's; an ExportError naming both places when neither is there."""
    for name in libraries:
        try:
            library = ctypes.CDLL(name)
        except OSError:
            continue
        library.getInferLibVersion.restype = ctypes.c_int32
        return version_from_int(library.getInferLibVersion())
    try:
        import tensorrt as trt
    except ImportError:
        raise ExportError(f"no TensorRT here: none of {list(libraries)} loads and the tensorrt module is not installed",
                          hint="serve TensorRT engines in NVIDIA's Triton container (deploy/Dockerfile)") from None
    return trt.__version__


def mismatches(built: Runtime, running: Runtime) -> list[tuple[str, str, str]]:
    """(field, built, running) for each way the engines' runtime differs from this one: the TensorRT
    version on major.minor.patch, the GPU's name and its compute capability exactly."""
    out = []
    if parse_version(built.tensorrt)[:COMPARED_PARTS] != parse_version(running.tensorrt)[:COMPARED_PARTS]:
        out.append(("tensorrt", built.tensorrt, running.tensorrt))
    for name in ("gpu", "compute_capability"):
        if getattr(built, name) != getattr(running, name):
            out.append((name, getattr(built, name), getattr(running, name)))
    return out


def mismatch_text(built: Runtime, running: Runtime, here: str = "this machine") -> str | None:
    """The mismatches in words (`built with tensorrt '10.3.0', this machine has '10.5.0'; ...`), or None."""
    found = mismatches(built, running)
    return "; ".join(f"built with {name} {then!r}, {here} has {now!r}" for name, then, now in found) or None


def check_runtime(built: Runtime, running: Runtime, where: str, here: str = "this machine",
                  hint: str = REBUILD) -> None:
    """Refuse engines built by another TensorRT or for another GPU, naming both sides and the fix."""
    found = mismatch_text(built, running, here)
    if found:
        raise ExportError(f"stale engines {where}: {found}", hint=hint)


def check_served_engines(recorded: dict, device: str | None, model: str, detect=Runtime.serving) -> Runtime:
    """The BLS pipeline's check at load on the ngc target: the runtime its repository's engines were
    built on (recorded by `kiln repo build`) against this container's (`detect(device index)`). The
    fix is in the message itself: Triton's log shows an initialize error's text only."""
    index = int(device.partition(":")[2] or 0) if device and device.startswith("cuda") else 0
    running = detect(index)
    try:
        check_runtime(Runtime(**recorded), running, f"for model {model}", here="this container")
    except ExportError as exc:
        raise ExportError(f"{exc}. Fix: {exc.hint}", hint=exc.hint) from None
    return running


if __name__ == "__main__":  # `python3 -m kiln.export.engine_runtime`: the TensorRT version here (deploy/Dockerfile)
    import sys

    try:
        print(tensorrt_version())
    except ExportError as exc:
        sys.exit(f"error: {exc}")
