"""The one way Kiln times code: warm-up calls, then timed runs, reported as the median, the 90th
percentile and the spread (these machines are noisy: a single run, or a mean, says little)."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable


@dataclass(frozen=True)
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    runs: int
    p90_ms: float = 0.0  # linear interpolation between the two nearest runs (with 3 runs: 80 % of the way to the max)

    @property
    def spread(self) -> float:
        """(max - min) / median: how far apart the runs were, relative to the typical one."""
        return (self.max_ms - self.min_ms) / self.median_ms if self.median_ms else 0.0

    def to_json(self) -> dict:
        return {**asdict(self), "spread": round(self.spread, 4)}


def timed(fn: Callable[[], object], runs: int = 5, warmup: int = 1, sync: Callable[[], None] | None = None) -> Timing:
    """Call `fn` `warmup` times untimed, then `runs` times timed. `sync` (e.g. torch.cuda.synchronize)
    runs before each clock read, so work queued on a device is counted."""
    if runs < 1:
        raise ValueError(f"runs={runs}: at least one timed run is needed")
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        if sync:
            sync()
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        samples.append(1000 * (time.perf_counter() - start))
    return Timing(statistics.median(samples), min(samples), max(samples), runs, percentile(samples, 0.9))


def percentile(samples: list[float], q: float) -> float:
    """The `q` quantile of `samples`, interpolated linearly between the nearest two (numpy's default)."""
    ordered = sorted(samples)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
