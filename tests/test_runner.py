"""The graph runner on the CPU, with capture replaced by a plain recorded call."""

import threading

import torch

from fastres.runner import Runner, RunnerCache


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
