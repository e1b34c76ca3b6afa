"""The graph runner on the CPU, with capture replaced by a plain recorded call."""

import threading
import time

import pytest
import torch

from fastres.runner import Runner, RunnerCache, SharedExclusiveLock, device_lock


class DoublingBackend:
    """A backend with a static workspace: run() writes 2 * x into it and returns it."""

    device = torch.device("cpu")

    def make_workspace(self, batch, height, width):
        return None  # replaced per call below

    def run(self, x, workspace):
        return x * 2


class WorkspaceBackend(DoublingBackend):
    def make_workspace(self, batch, height, width):
        buffer = torch.empty(batch, 3, height, width)
        return type("Workspace", (), {"buffers": [buffer], "out": buffer})()

    def run(self, x, workspace):
        return workspace.out.copy_(x * 2)


class Recorded:
    def __init__(self, forward):
        self.forward = forward

    def replay(self):
        self.forward()


def recorded_capture(forward, stream):
    return Recorded(forward), forward()


def test_runner_built_in_inference_mode_runs_outside_it_and_the_reverse():
    for first_inference in (True, False):
        x = torch.randn(2, 3, 4, 5)
        mode = torch.inference_mode if first_inference else torch.no_grad
        with mode():
            runner = Runner(WorkspaceBackend(), x, use_cuda_graph=True, capture=recorded_capture)
            first = runner(x)
        later_mode = torch.no_grad if first_inference else torch.inference_mode
        with later_mode():
            later = runner(x + 1)
            later.add_(0)  # a tensor of the caller's mode: in-place updates work there
        assert torch.equal(first, x * 2) and torch.equal(later, (x + 1) * 2)
        assert later.data_ptr() != runner.static_output.data_ptr()


def test_eviction_releases_the_least_recently_used_runner_only():
    built = []

    def build(sample):
        built.append(Runner(WorkspaceBackend(), sample, use_cuda_graph=True, capture=recorded_capture))
        return built[-1]

    cache = RunnerCache(2, build)
    inputs = {n: torch.randn(n, 3, 2, 2) for n in (1, 2, 3)}
    for n in (1, 2, 1, 3):
        assert torch.equal(cache.get(n, inputs[n])(inputs[n]), inputs[n] * 2)
    assert list(cache) == [1, 3] and len(built) == 3
    assert [r.released for r in built] == [False, True, False]


def test_eviction_waits_for_a_call_in_progress():
    runner = Runner(WorkspaceBackend(), torch.randn(1, 3, 2, 2), use_cuda_graph=False)
    runner.lock.acquire()
    released = threading.Thread(target=runner.release)
    released.start()
    released.join(0.2)
    assert released.is_alive() and not runner.released
    runner.lock.release()
    released.join(5)
    assert runner.released


def _wait_until(predicate, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_shared_holders_overlap_and_an_exclusive_one_is_alone():
    lock = SharedExclusiveLock()
    inside, most_shared, events = [0], [0], []
    release_shared = threading.Event()

    def shared_holder():
        with lock.shared():
            inside[0] += 1
            most_shared[0] = max(most_shared[0], inside[0])
            assert release_shared.wait(10)
            inside[0] -= 1

    def exclusive_holder():
        with lock.exclusive():
            events.append(("exclusive", inside[0]))

    readers = [threading.Thread(target=shared_holder, daemon=True) for _ in range(3)]
    for t in readers:
        t.start()
    _wait_until(lambda: inside[0] == 3)
    writer = threading.Thread(target=exclusive_holder, daemon=True)
    writer.start()
    _wait_until(lambda: lock._exclusive_waiting == 1)
    late = threading.Thread(target=shared_holder, daemon=True)  # arrives while the exclusive one waits
    late.start()
    time.sleep(0.05)
    assert events == [] and inside[0] == 3  # the exclusive holder waits, and the late reader behind it
    release_shared.set()
    for t in (*readers, writer, late):
        t.join(10)
        assert not t.is_alive()
    assert most_shared[0] == 3 and events == [("exclusive", 0)]


def test_shared_is_reentrant_and_exclusive_inside_it_is_refused():
    lock = SharedExclusiveLock()
    waiting = threading.Thread(target=lambda: lock.exclusive().__enter__(), daemon=True)
    with lock.shared():
        waiting.start()
        _wait_until(lambda: lock._exclusive_waiting == 1)
        with lock.shared():  # a waiting exclusive holder must not block this thread's own nesting
            pass
        with pytest.raises(RuntimeError, match="wait for itself"):
            with lock.exclusive():
                pass
    waiting.join(10)
    assert not waiting.is_alive()


def test_a_capture_excludes_every_other_runner_on_its_device():
    """Entering torch.cuda.graph synchronises the device, and runners' pooled streams may coincide:
    no other runner may launch while one captures."""
    capturing, may_finish = threading.Event(), threading.Event()

    def blocking_capture(forward, stream):
        capturing.set()
        assert may_finish.wait(10)
        return Recorded(forward), forward()

    x = torch.randn(2, 3, 4, 5)
    warm = Runner(WorkspaceBackend(), x, use_cuda_graph=True, capture=recorded_capture)
    builder = threading.Thread(
        target=lambda: Runner(WorkspaceBackend(), x, use_cuda_graph=True, capture=blocking_capture),
        daemon=True,
    )
    builder.start()
    assert capturing.wait(10)
    results = []
    caller = threading.Thread(target=lambda: results.append(warm(x)), daemon=True)
    caller.start()
    time.sleep(0.05)
    assert results == []  # waits for the capture
    may_finish.set()
    for t in (builder, caller):
        t.join(10)
        assert not t.is_alive()
    assert torch.equal(results[0], x * 2)


def test_device_lock_is_one_per_device():
    assert device_lock("cpu") is device_lock(torch.device("cpu"))
    assert device_lock("cpu") is not device_lock("meta")
