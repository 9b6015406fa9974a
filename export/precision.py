"""Reduced-precision variants of an exported fp32 ONNX model: fp16 weights or dynamic int8 MatMuls."""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from kiln.errors import ExportError

PRECISIONS = ("fp32", "fp16", "int8")
EXTERNAL_DATA_THRESHOLD = 1 << 30  # protobuf cannot serialise a model of 2 GB or more in one piece
EXTERNAL_DATA_NAME = "model.onnx_data"  # optimum's name for it


def save_model(model: onnx.ModelProto, path: Path, large: bool) -> None:
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=large,
        all_tensors_to_one_file=True,
        location=EXTERNAL_DATA_NAME,
    )
    if large:  # onnx writes external data owner-only (0600): a Triton running as another user could not read it
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(Path(path).parent / EXTERNAL_DATA_NAME, 0o666 & ~umask)


def is_large(path: Path) -> bool:
    return sum(f.stat().st_size for f in path.parent.iterdir() if f.is_file()) >= EXTERNAL_DATA_THRESHOLD


def convert(fp32_path: Path, out_path: Path, precision: str) -> None:
    """Write `precision`'s variant of the fp32 model at `fp32_path` to `out_path`.

    fp16 keeps float32 inputs and outputs (casts inside), so clients and configs do not change.
    int8 quantises MatMul weights only: quantising convolutions too is slower on CPU and loses
    more accuracy (measured: rel-L2 8e-2 vs 1e-2 on the full SD 1.5 UNet).
    """
    large = is_large(fp32_path)
    if precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = onnx.load(str(fp32_path))
        model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=large)
        save_model(model, out_path, large)
    elif precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(
            model_input=str(fp32_path),
            model_output=str(out_path),
            op_types_to_quantize=["MatMul"],
            weight_type=QuantType.QUInt8,
            use_external_data_format=large,
        )
    else:
        raise ExportError(f"precision={precision!r} is not one of {PRECISIONS}")
