"""End-to-end parity measure shared by engine tests: judged against float64, relative to eager's own error."""

import threading

import pytest
import torch

from fastres.graph import normalize
from fastres.numerics import PARITY_FACTOR, PARITY_FLOOR, relative_error
from fastres.testing import make_calibrated_model

_MODELS: dict = {}

# The ten models, each with a class count that exercises the head; the four largest are slow on 2 cores.
FAMILY = [
    pytest.param("resnet18", 1000, id="resnet18-1000"),
    pytest.param("resnet34", 10, id="resnet34-10"),
    pytest.param("resnet50", 1000, id="resnet50-1000"),
    pytest.param("resnet101", 3, id="resnet101-3"),
    pytest.param("resnet152", 1000, id="resnet152-1000", marks=pytest.mark.slow),
    pytest.param("resnext50_32x4d", 17, id="resnext50_32x4d-17"),
    pytest.param("resnext101_32x8d", 1000, id="resnext101_32x8d-1000", marks=pytest.mark.slow),
    pytest.param("resnext101_64x4d", 5, id="resnext101_64x4d-5", marks=pytest.mark.slow),
    pytest.param("wide_resnet50_2", 1, id="wide_resnet50_2-1"),
    pytest.param("wide_resnet101_2", 100, id="wide_resnet101_2-100", marks=pytest.mark.slow),
]


def calibrated(name: str, num_classes: int = 1000, seed: int = 0):
    """Cached calibrated reference model (eval mode, float32, CPU); callers must not modify it."""
    key = (name, num_classes, seed)
    if key not in _MODELS:
        _MODELS[key] = make_calibrated_model(name, num_classes, seed=seed)
    return _MODELS[key]


def parity(engine, model, x: torch.Tensor, dtype: torch.dtype, device="cpu") -> tuple[float, float]:
    """(fastres error, eager error) of the logits vs a float64 run of the reference, both relative.

    uint8 pixels (NCHW, or NHWC) go to fastres as they are; the reference and eager PyTorch get them
    normalised with the engine's mean/std (in float64, then cast), as a user would have to.
    """
    pixels = x
    if x.dtype == torch.uint8:
        nchw = x if x.shape[1] == 3 else x.permute(0, 3, 1, 2)
        x = normalize(nchw, engine.mean, engine.std)
    # Eager runs in the layout the backend uses: oneDNN's and cuDNN's channels-last kernels round
    # differently from their NCHW ones, and fastres is held to PyTorch's error with the same kernels.
    layout = getattr(engine.backend, "memory_format", torch.contiguous_format)
    with torch.inference_mode():
        # float64 on the test's device: a GPU runs deep nets at 224x224 in float64 far faster than the CPU.
        ref = model.to(device, torch.float64)(x.to(device, torch.float64)).cpu()
        eager = model.to(device, dtype, memory_format=layout)(
            x.to(device, dtype).contiguous(memory_format=layout)
        )
        model.float().cpu().to(memory_format=torch.contiguous_format)
    ours = engine(pixels)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    return relative_error(ours, ref), relative_error(eager, ref)


def assert_parity(engine, model, x, dtype, device="cpu", floor: float = PARITY_FLOOR) -> None:
    ours, eager = parity(engine, model, x, dtype, device)
    bound = max(PARITY_FACTOR * eager, floor)
    assert ours <= bound, f"fastres relative error {ours:.3e} > {bound:.3e} (eager {dtype}: {eager:.3e})"


def assert_same_results_from_threads(engine, inputs: list[torch.Tensor], repeats: int = 3) -> None:
    """One thread per input, each calling the engine `repeats` times: results equal the serial ones."""
    expected = [engine(x) for x in inputs]
    results: list = [None] * len(inputs)

    def work(i):
        for _ in range(repeats):
            results[i] = engine(inputs[i])

    # Daemon threads with a bounded join: a deadlock fails the test instead of hanging pytest.
    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread is stuck (a deadlock?)"
    for got, want in zip(results, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
