"""Engine on a CUDA GPU: torch backend parity, CUDA-graph replay across shapes, ownership, threads."""

import pytest
import torch
from e2e import assert_parity, assert_same_results_from_threads, calibrated

import fastres
from fastres.testing import random_images

pytestmark = pytest.mark.gpu

BACKENDS = [pytest.param("torch", id="torch"), pytest.param("triton", id="triton")]


@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.float16, id="fp16"), pytest.param(torch.float32, id="fp32")]
)
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_torch_backend_parity_on_cuda(name, dtype):
    model = calibrated(name, 1000)
    engine = fastres.optimize(model, device="cuda", dtype=dtype, backend="torch")
    assert_parity(engine, model, random_images(4, 224, 224, seed=1), dtype, device="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_replay_matches_eager_execution_across_shapes(backend):
    model = calibrated("resnet18", 10)
    graphed = fastres.optimize(model, device="cuda", backend=backend, cuda_graphs=True, max_cached_shapes=2)
    plain = fastres.optimize(model, device="cuda", backend=backend, cuda_graphs=False)
    shapes = [(1, 224, 224), (8, 224, 224), (3, 67, 93), (1, 224, 224), (3, 67, 93), (8, 224, 224)]
    for i, (n, h, w) in enumerate(shapes):
        x = random_images(n, h, w, seed=20 + i).cuda()
        torch.testing.assert_close(graphed(x), plain(x), rtol=2e-3, atol=2e-3)
    assert len(graphed._runners) == 2
    assert all(r.graph is not None for r in graphed._runners.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_results_are_owned_by_the_caller_on_cuda(backend):
    engine = fastres.optimize(calibrated("resnet18", 10), device="cuda", backend=backend)
    a = engine(random_images(2, 64, 64, seed=1).cuda())
    snapshot = a.clone()
    b = engine(random_images(2, 64, 64, seed=2).cuda())
    torch.cuda.synchronize()
    assert torch.equal(a, snapshot) and not torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eight_threads_on_cuda(backend):
    engine = fastres.optimize(calibrated("resnet18", 10), device="cuda", backend=backend)
    inputs = [random_images(2, 96, 96, seed=40 + i).cuda() for i in range(8)]
    assert_same_results_from_threads(engine, inputs, repeats=5)


def test_defaults_on_cuda():
    engine = fastres.optimize(calibrated("resnet18", 10))
    assert (engine.device.type, engine.dtype, engine.backend_name, engine.cuda_graphs) == (
        "cuda",
        torch.float16,
        "triton",
        True,
    )


def test_warmup_captures_requested_shapes():
    engine = fastres.optimize(calibrated("resnet18", 10), device="cuda")
    engine.warmup(batch_sizes=(1, 4), image_size=64)
    # Runners are keyed by (shape, dtype, stride); warm-up input is contiguous in the engine's dtype.
    assert set(engine._runners) == {
        ((n, 3, 64, 64), torch.float16, (3 * 64 * 64, 64 * 64, 64, 1)) for n in (1, 4)
    }


@pytest.mark.parametrize("first_inside", [True, False], ids=["inference-first", "grad-first"])
def test_runner_serves_both_autograd_modes_on_cuda(first_inside):
    engine = fastres.optimize(calibrated("resnet18", 10), device="cuda")
    x = random_images(2, 64, 64, seed=5).cuda()
    with torch.inference_mode(first_inside):
        first = engine(x)
    with torch.inference_mode(not first_inside):
        second = engine(x)  # the captured runner's static input, updated in the other mode
    assert torch.equal(first, second)


def test_two_engines_capture_concurrently_on_their_own_streams():
    import threading

    devices = [torch.device("cuda", i % torch.cuda.device_count()) for i in range(2)]
    engines = [fastres.optimize(calibrated("resnet18", 10), device=d) for d in devices]
    inputs = [random_images(3, 48 + 16 * i, 64, seed=6 + i).to(d) for i, d in enumerate(devices)]
    barrier, results, errors = threading.Barrier(2), [None, None], []

    def work(i):
        try:
            barrier.wait()
            with torch.cuda.device(devices[i]), torch.cuda.stream(torch.cuda.Stream(devices[i])):
                results[i] = engines[i](inputs[i])
                torch.cuda.current_stream().synchronize()
        except Exception as exc:  # collected: the assertion below names it
            errors.append(exc)

    # Daemon threads with a bounded join: a deadlocked capture fails the test instead of hanging pytest.
    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a thread is stuck (a capture deadlock?)"
    assert not errors, errors
    for engine, x, got in zip(engines, inputs, results):
        assert torch.equal(engine(x), got)


def test_split_k_counters_are_rearmed_after_every_replay():
    model = calibrated("resnet50", 1000)
    graphed = fastres.optimize(model, device="cuda", dtype=torch.float16)
    plain = fastres.optimize(model, device="cuda", dtype=torch.float16, cuda_graphs=False)
    x = random_images(1, 224, 224, seed=8).cuda()
    first = graphed(x)
    assert all(torch.equal(first, graphed(x)) for _ in range(50))
    assert torch.equal(first, plain(x))
    for runner in graphed._runners.values():
        assert int((runner.workspace.split_scratch[1] != 0).sum()) == 0
