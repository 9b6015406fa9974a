"""Loss and learning rate per step, to CSV (always) and TensorBoard (through accelerate's tracker)."""

from __future__ import annotations

import csv
from pathlib import Path

FIELDS = ("step", "loss", "lr", "seconds")


class CsvLog:
    """Append-only; on resume, rows after the resumed step are dropped so the file reads as one run."""

    def __init__(self, path: Path, resume_step: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        if resume_step and self.path.is_file():
            with open(self.path) as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        self.elapsed = float(rows[-1]["seconds"]) if rows else 0.0  # training seconds up to the resumed step

    def write(self, step: int, loss: float, lr: float, seconds: float) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, FIELDS).writerow({"step": step, "loss": repr(loss), "lr": repr(lr), "seconds": f"{seconds:.3f}"})


def read_losses(path: Path) -> dict[int, float]:
    with open(path) as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}
