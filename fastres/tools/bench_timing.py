"""`fastres bench`'s measurement: statistics of samples, and candidates timed interleaved round-robin.

Timing: on CUDA each call is bracketed by CUDA events on the current stream; on the CPU by
`time.perf_counter` (bench.py's docstring says why, and how the statistics are taken).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .bench_candidates import one_line


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics."""
    if not samples:
        raise ValueError("percentile of no samples")
    ordered = sorted(samples)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class Stats:
    median_ms: float
    p90_ms: float
    min_ms: float
    samples: int


def summarize(seconds: Sequence[float]) -> Stats:
    ms = [s * 1e3 for s in seconds]
    return Stats(percentile(ms, 50), percentile(ms, 90), min(ms), len(ms))


def interleaved_order(names: Sequence[str], repeats: int) -> list[str]:
    """Round-robin schedule: every repeat runs each candidate once, repeat r starting at candidate r mod k."""
    k = len(names)
    return [names[(r + i) % k] for r in range(repeats) for i in range(k)]


def cpu_timer(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class CudaEventTimer:
    """Seconds one call takes on the GPU, from CUDA events recorded on the current stream."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)

    def __call__(self, fn: Callable[[], Any]) -> float:
        self.start.record()
        fn()
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end) / 1e3


class TimingInterrupted(KeyboardInterrupt):
    """A KeyboardInterrupt (a time limit's SIGINT) in the middle of the timing, with what it had."""

    def __init__(self, samples: dict[str, list[float]], errors: dict[str, str]):
        super().__init__()
        self.samples, self.errors = samples, errors


def measure_interleaved(
    calls: dict[str, Callable[[], Any]],
    repeats: int,
    timer: Callable[[Callable[[], Any]], float] = cpu_timer,
    on_step: Callable[[], None] | None = None,
) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Time `repeats` calls of each candidate, interleaved; one that raises is dropped and reported.
    Interrupted, it raises TimingInterrupted with the samples taken so far (fewer per candidate)."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    errors: dict[str, str] = {}
    try:
        for name in interleaved_order(list(calls), repeats):
            if name not in errors:
                try:
                    samples[name].append(timer(calls[name]))
                except Exception as exc:  # an anchor that fails mid-run is a row with its error
                    errors[name] = one_line(exc)
            if on_step is not None:
                on_step()
    except KeyboardInterrupt:
        raise TimingInterrupted(samples, errors) from None
    return samples, errors
