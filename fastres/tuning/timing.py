"""How the tuner times a call: the median of repeats after warm-up, injectable for tests.

A timer is called as `timer(fn, what)` and returns seconds per call of `fn`; `what` names the layer and
tactic (or the whole network) so that a test can script the times it returns.

On a GPU (`CudaTimer`) each repeat is bracketed by CUDA events on the current stream. With `flush_l2`
a buffer twice the L2's size is written before each repeat, outside the events: at batch 1 a ResNet's
weights are read once per forward from DRAM (25 MB for ResNet-50 in fp16, about the H100's whole
L2 with activations beside them), so a layer timed with its weights L2-resident would look faster than
it runs in the network. At larger batches activations dominate the traffic and the flush is skipped.

A small layer runs for a few microseconds, less than the CPU takes to launch it from Python (tens of
microseconds for a Triton launch, more for split-K's two or the cuDNN tactic's four ops). Events around a
launch the GPU is waiting for would time the launch, not the kernel, and compress every difference the
tuner looks for. So before each repeat the GPU is given a spin (`torch.cuda._sleep`) longer than the
CPU needs to enqueue the start event, the call and the end event: they then run back to back, as the
kernels do in the engine's CUDA graph.

On the CPU (`WallTimer`) the kernels run under Triton's interpreter: its times say nothing about a GPU.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch

from ..runner import device_lock

# Cycles per second to size the spin with: at least the SM clock of any supported GPU (the H100's boost
# is 1.98 GHz), so a slower clock only lengthens the spin.
SPIN_HZ = 2.0e9
SPIN_MIN_S, SPIN_MAX_S = 50e-6, 20e-3


def spin_cycles(enqueue_s: float) -> int:
    """GPU spin cycles that outlast four times the CPU time one call took to enqueue."""
    return int(min(max(4 * enqueue_s + 20e-6, SPIN_MIN_S), SPIN_MAX_S) * SPIN_HZ)


class Timer(Protocol):
    def __call__(self, fn: Callable[[], Any], what: str) -> float: ...


class CudaTimer:
    """Median seconds of `repeats` calls after `warmup` calls, from CUDA events; optional L2 flush."""

    def __init__(self, device: torch.device, *, warmup: int = 3, repeats: int = 15, flush_l2: bool = False):
        self.device, self.warmup, self.repeats = device, warmup, repeats
        self.flush = None
        if flush_l2:
            l2 = torch.cuda.get_device_properties(device).L2_cache_size
            self.flush = torch.empty(max(2 * l2, 1 << 20), dtype=torch.uint8, device=device)

    def __call__(self, fn: Callable[[], Any], what: str) -> float:
        # Shared with other fastres work on the device: its closing device-wide sync must not fall
        # inside another thread's CUDA-graph capture.
        with device_lock(self.device).shared():
            return self._time(fn)

    def _time(self, fn: Callable[[], Any]) -> float:
        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize(self.device)
        begin = time.perf_counter()
        fn()
        cycles = spin_cycles(time.perf_counter() - begin)
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(self.repeats)
        ]
        for start, end in events:
            if self.flush is not None:
                self.flush.zero_()
            torch.cuda._sleep(cycles)  # the GPU waits while the CPU enqueues the next three
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(self.device)
        return statistics.median(start.elapsed_time(end) for start, end in events) / 1e3


class WallTimer:
    """Median wall-clock seconds (the CPU; under the interpreter these times mean nothing for a GPU)."""

    def __init__(self, *, warmup: int = 0, repeats: int = 1):
        self.warmup, self.repeats = warmup, repeats

    def __call__(self, fn: Callable[[], Any], what: str) -> float:
        for _ in range(self.warmup):
            fn()
        samples = []
        for _ in range(self.repeats):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)


def on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the engine's (e.g. cuda:1) for a block."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def default_timer(device: torch.device, batch: int) -> Timer:
    if device.type == "cuda":
        return CudaTimer(device, flush_l2=batch == 1)
    return WallTimer()
