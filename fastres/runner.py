"""Per-shape runners: a backend's static workspace and, on CUDA, a captured graph; and their LRU cache.

A runner's body (static-tensor allocation, warm-up, capture, replay) always runs in inference mode,
so tensors created by a first call inside `torch.inference_mode()` can be updated by a later call
outside it, and the reverse. Results handed back are ordinary tensors in the caller's mode.

On CUDA every runner-owned tensor is allocated and used on the runner's own stream (captures too,
so two engines never share torch's process-wide capture stream); the caller's input gets
record_stream, and an evicted runner is synchronised before it is dropped, so the caching allocator
cannot hand its memory to another stream while a replay still reads it.

A capture excludes all other fastres GPU work on its device, process-wide (`device_lock`): entering
torch.cuda.graph synchronises the whole device and empties the allocator's cache, which breaks a
capture under way in another thread (another engine, an embedder, the tuner), and torch hands out
its streams from a pool of 32 per device, so two runners' streams can be the same CUDA stream, and
work queued on a capturing stream would be recorded into the other's graph instead of running.

Capture is injectable: CPU tests pass a plain recorded call in place of torch.cuda.graph.

GPU and Triton's interpreter differ in the last bits (the head's mean compiles to div.full.f32 and
its GEMV is FMA-contracted): deterministic, but no test may expect bit equality between the two.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Any, Protocol

import torch
from torch import Tensor

from .backends import Backend


class SharedExclusiveLock:
    """Any number of holders at once (`shared`) or one alone (`exclusive`); a waiting exclusive holder
    goes before new shared ones. `shared` is re-entrant per thread (a timed call replays a runner)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._exclusive_waiting = 0
        self._local = threading.local()

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            with self._cond:
                while self._exclusive or self._exclusive_waiting:
                    self._cond.wait()
                self._shared += 1
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth
            if depth == 0:
                with self._cond:
                    self._shared -= 1
                    if self._shared == 0:
                        self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        if getattr(self._local, "depth", 0):
            raise RuntimeError("exclusive inside shared on one thread would wait for itself")
        with self._cond:
            self._exclusive_waiting += 1
            try:
                while self._exclusive or self._shared:
                    self._cond.wait()
            finally:
                self._exclusive_waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


_device_locks: dict[str, SharedExclusiveLock] = {}
_device_locks_guard = threading.Lock()


def device_lock(device: torch.device | str) -> SharedExclusiveLock:
    """The process-wide lock of one device: CUDA-graph captures hold it exclusively; launches on
    runner streams and device-wide synchronisations hold it shared."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with _device_locks_guard:
        return _device_locks.setdefault(str(device), SharedExclusiveLock())


class Replayable(Protocol):
    def replay(self) -> None: ...


# capture(forward, stream) -> (graph, static output): records forward() once for later replays.
Capture = Callable[[Callable[[], Any], "torch.cuda.Stream | None"], tuple[Replayable, Any]]


def cuda_graph_capture(forward: Callable[[], Tensor], stream) -> tuple[Replayable, Tensor]:
    graph = torch.cuda.CUDAGraph()
    # thread_local: other threads may keep replaying their graphs while this one captures.
    with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
        output = forward()
    return graph, output


class Runner:
    """Static state for one input shape, dtype and layout. Used by one thread at a time (`lock`)."""

    def __init__(
        self, backend: Backend, sample: Tensor, use_cuda_graph: bool, capture: Capture = cuda_graph_capture
    ):
        """sample: an input of the shape, dtype and layout this runner serves (its values are unused)."""
        self.backend = backend
        self.device = backend.device
        self.lock = threading.Lock()
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.device_lock = device_lock(self.device)
        self.graph: Replayable | None = None
        self.released = False
        with torch.inference_mode():
            with self.device_lock.shared(), self._on_own_stream():
                shape = tuple(sample.shape)
                self.workspace = backend.make_workspace(shape[0], shape[2], shape[3])
                if use_cuda_graph:
                    self._warm_up(sample)
            if use_cuda_graph:
                with self.device_lock.exclusive(), self._on_own_stream():
                    self.graph, self.static_output = capture(
                        lambda: self.backend.run(self.static_input, self.workspace), self.stream
                    )

    @contextlib.contextmanager
    def _on_own_stream(self, x: Tensor | None = None) -> Iterator[None]:
        """Run the block on the runner's stream, ordered after the caller's work and before its next."""
        if self.stream is None:
            yield
            return
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)
        if x is not None and x.device.type == "cuda":
            x.record_stream(self.stream)  # read on our stream: the allocator must not reuse it before
        # Triton launches on the current device: make it the engine's (e.g. cuda:1) for the block.
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            yield
        caller.wait_stream(self.stream)

    def _warm_up(self, sample: Tensor) -> None:
        # Same shape, dtype and strides as the calls it serves (kernels read the input by its strides).
        self.static_input = torch.empty_like(sample, memory_format=torch.preserve_format)
        if sample.dtype == torch.uint8:
            self.static_input.random_(0, 256)
        else:
            self.static_input.normal_()
        for _ in range(2):  # compile kernels and settle allocations outside the capture
            self.backend.run(self.static_input, self.workspace)
        if self.stream is not None:
            self.stream.synchronize()

    def __call__(self, x: Tensor) -> Tensor:
        with self.device_lock.shared():
            return self._call(x)

    def _call(self, x: Tensor) -> Tensor:
        if self.graph is None and self.workspace is None:  # stateless: the caller's mode is fine
            with self._on_own_stream(x):
                out = self.backend.run(x, None)
        else:
            with self._on_own_stream(x):
                with torch.inference_mode():
                    if self.graph is not None:
                        self.static_input.copy_(x)
                        self.graph.replay()
                        out = self.static_output
                    else:
                        out = self.backend.run(x, self.workspace)
                # Fresh tensors in the caller's mode, never views of static buffers. Cloned on our
                # stream, so the next replay (after whichever caller) cannot overwrite them first.
                static = out is getattr(self, "static_output", None)
                out = _map(out, lambda t: self._fresh(t, static))
        if self.stream is not None:
            for t in _tensors(out):  # used on the caller's stream now
                t.record_stream(torch.cuda.current_stream(self.device))
            if self.released:  # evicted while a thread still held it: drain before its memory goes
                self.stream.synchronize()
        return out

    def _fresh(self, t: Tensor, static: bool) -> Tensor:
        if static or _may_alias(t, self.workspace):
            return t.clone()  # preserve_format: channels-last features stay channels-last
        if t.is_inference() and not torch.is_inference_mode_enabled():
            return t.clone()
        return t

    def release(self) -> None:
        """Called on eviction: wait for a call in progress and for the stream's queued work, so the
        memory freed when the last reference goes is idle (a thread still holding it drains again)."""
        with self.lock, self.device_lock.shared():
            if self.stream is not None:
                self.stream.synchronize()
            self.released = True


def _tensors(out: Tensor | dict[str, Tensor]) -> list[Tensor]:
    """A backend returns logits (one tensor) or, for a plan with outputs, a dict name -> tensor."""
    return list(out.values()) if isinstance(out, dict) else [out]


def _map(out: Tensor | dict[str, Tensor], fn: Callable[[Tensor], Tensor]) -> Tensor | dict[str, Tensor]:
    return {name: fn(t) for name, t in out.items()} if isinstance(out, dict) else fn(out)


def _may_alias(out: Tensor, workspace: Any) -> bool:
    return any(
        out.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        for b in getattr(workspace, "buffers", ())
    )


class RunnerCache:
    """A bounded LRU of runners by key. Builds run one at a time: captures must not race each other."""

    def __init__(self, max_size: int, build: Callable[[Tensor], Runner]):
        self.max_size, self.build = max_size, build
        self._entries: OrderedDict[Hashable, Runner] = OrderedDict()
        self._lock = threading.Lock()
        self._build_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Hashable]:
        return iter(list(self._entries))

    def values(self) -> list[Runner]:
        return list(self._entries.values())

    def get(self, key: Hashable, sample: Tensor) -> Runner:
        with self._lock:
            runner = self._entries.get(key)
            if runner is not None:
                self._entries.move_to_end(key)
                return runner
        # Calls for keys that are already built go on meanwhile (they only take _lock).
        with self._build_lock:
            with self._lock:
                runner = self._entries.get(key)
            if runner is None:
                runner = self.build(sample)
            evicted = []
            with self._lock:
                self._entries[key] = runner
                self._entries.move_to_end(key)
                while len(self._entries) > self.max_size:
                    evicted.append(self._entries.popitem(last=False)[1])
        for old in evicted:  # outside _lock: releasing waits for a call that may be using it
            old.release()
        return runner
