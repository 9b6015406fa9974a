"""Compare an exported model's outputs with its source's, against a stated tolerance."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from kiln.errors import ParityError
from kiln.export.specs import Tolerance


@dataclass(frozen=True)
class TensorDiff:
    tensor: str
    shape: tuple[int, ...]
    max_abs: float
    where: tuple[int, ...]  # index of the largest difference
    ref_max_abs: float
    rel_l2: float

    def within(self, tol: Tolerance) -> bool:
        if not np.isfinite(self.max_abs):
            return False
        if self.max_abs > tol.atol + tol.rtol * self.ref_max_abs:
            return False
        return tol.max_rel_l2 is None or self.rel_l2 <= tol.max_rel_l2

    def describe(self) -> str:
        return (
            f"{self.tensor}{list(self.shape)}: max|diff|={self.max_abs:.3g} at {list(self.where)} "
            f"(max|ref|={self.ref_max_abs:.3g}), rel-L2={self.rel_l2:.3g}"
        )


def compare(name: str, actual: np.ndarray, reference: np.ndarray) -> TensorDiff:
    actual = np.asarray(actual, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if actual.shape != reference.shape:
        raise ParityError(f"{name}: shape {actual.shape} differs from the reference's {reference.shape}")
    diff = np.abs(actual - reference)
    diff = np.where(np.isnan(diff), np.inf, diff)
    where = np.unravel_index(int(np.argmax(diff)), diff.shape) if diff.size else ()
    ref_norm = float(np.linalg.norm(reference)) or 1.0
    return TensorDiff(
        tensor=name,
        shape=tuple(actual.shape),
        max_abs=float(diff.max()) if diff.size else 0.0,
        where=tuple(int(i) for i in where),
        ref_max_abs=float(np.abs(reference).max()) if reference.size else 0.0,
        rel_l2=float(np.linalg.norm(np.nan_to_num(actual - reference, nan=np.inf))) / ref_norm,
    )


def check(component: str, diffs: list[TensorDiff], tol: Tolerance) -> None:
    """Raise ParityError naming every tensor that is outside the tolerance, with its numbers."""
    bad = [d for d in diffs if not d.within(tol)]
    if bad:
        lines = "; ".join(d.describe() for d in bad)
        raise ParityError(
            f"{component} ONNX output differs from PyTorch beyond tolerance {asdict(tol)}: {lines}",
            hint="re-export with --opset 17 in fp32 to see whether the precision conversion is the cause",
        )
