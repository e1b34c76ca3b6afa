"""Engine and torch backend on the CPU: parity for the whole family, input validation, ownership, threads."""

import warnings

import pytest
import torch
from e2e import FAMILY, assert_parity, assert_same_results_from_threads, calibrated

import fastres
from fastres.engine import validate_images
from fastres.numerics import parity_bound
from fastres.testing import random_images


@pytest.mark.parametrize("name, num_classes", FAMILY)
def test_torch_backend_matches_reference_on_odd_sizes(name, num_classes):
    model = calibrated(name, num_classes)
    engine = fastres.optimize(model, device="cpu", backend="torch")
    assert engine.num_classes == num_classes and engine.architecture.spec.name == name
    assert_parity(engine, model, random_images(3, 67, 93, seed=5), torch.float32)


@pytest.mark.parametrize(
    "size",
    [pytest.param((1, 1), id="1x1"), pytest.param((7, 3), id="7x3"), pytest.param((33, 34), id="33x34")],
)
def test_tiny_and_odd_images(size):
    model = calibrated("resnet18", 10)
    engine = fastres.optimize(model, device="cpu", backend="torch")
    assert_parity(engine, model, random_images(2, *size, seed=6), torch.float32)


def test_load_by_name_with_checkpoint_file_and_optimize_agree(tmp_path):
    model = calibrated("resnet50", 10)
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, path)
    x = random_images(2, 64, 64, seed=7)
    by_name = fastres.load("resnet50", weights=path, device="cpu", backend="torch")
    by_path = fastres.load(path, device="cpu", backend="torch")
    live = fastres.optimize(model, device="cpu", backend="torch")
    assert torch.equal(by_name(x), by_path(x)) and torch.equal(by_name(x), live(x))


def test_optimize_a_finetuned_module_with_a_new_head():
    model = calibrated("resnet18", 1000, seed=1)
    finetuned = fastres.reference.build_resnet("resnet18", 1000)
    finetuned.load_state_dict(model.state_dict())
    finetuned.fc = torch.nn.Linear(finetuned.fc.in_features, 10)
    finetuned.eval()
    engine = fastres.optimize(finetuned, device="cpu", backend="torch")
    assert engine.num_classes == 10
    assert_parity(engine, finetuned, random_images(3, 40, 40, seed=8), torch.float32)


def test_load_without_weights_warns_untrained():
    with pytest.warns(UserWarning, match="untrained"):
        engine = fastres.load("resnet18", device="cpu", backend="torch", num_classes=4)
    assert engine(random_images(1, 32, 32)).shape == (1, 4)


def test_reference_backend_and_engine_reference_match_the_module():
    model = calibrated("resnet18", 10)
    x = random_images(2, 48, 48, seed=9)
    with torch.inference_mode():
        expected = model(x)
    engine = fastres.optimize(model, device="cpu", backend="reference")
    torch.testing.assert_close(engine(x), expected, rtol=0, atol=0)
    with torch.inference_mode():
        torch.testing.assert_close(engine.reference()(x), expected, rtol=0, atol=0)


def test_check_reports_errors_and_agreement():
    model = calibrated("resnet18", 10)
    result = fastres.optimize(model, device="cpu", backend="torch").check(random_images(4, 48, 48, seed=10))
    assert result.relative_error <= parity_bound(result.eager_relative_error)
    assert result.top1_agreement == 1.0 and result.top5_agreement == 1.0
    assert "top-1 agreement" in str(result)


BAD_INPUTS = [
    pytest.param([[1.0]], "torch.Tensor", id="not-a-tensor"),
    pytest.param(torch.randn(3, 32, 32), "unsqueeze", id="3d"),
    pytest.param(torch.randn(2, 32, 32, 3), "permute", id="nhwc"),
    pytest.param(torch.randn(2, 4, 32, 32), "3 \\(RGB\\) channels", id="4-channels"),
    pytest.param(torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.int64), "uint8", id="int64"),
    pytest.param(torch.ones(2, 3, 32, 32, dtype=torch.bool), "normalise", id="bool"),
    pytest.param(torch.randint(0, 255, (2, 3, 32, 3), dtype=torch.uint8), "ambiguous", id="uint8-ambiguous"),
    pytest.param(torch.randint(0, 255, (2, 4, 32, 4), dtype=torch.uint8), "N x H x W x 3", id="uint8-rgba"),
    pytest.param(torch.randn(2, 3, 0, 32), "at least 1x1", id="zero-height"),
]


@pytest.mark.parametrize("x, message", BAD_INPUTS)
def test_bad_inputs_raise_input_error(x, message):
    engine = fastres.optimize(calibrated("resnet18", 10), device="cpu", backend="torch")
    with pytest.raises(fastres.InputError, match=message):
        engine(x)
    with pytest.raises(ValueError):  # InputError is a ValueError for callers who catch broadly
        validate_images(x)


def test_empty_batch_gives_empty_logits():
    engine = fastres.optimize(calibrated("resnet18", 10), device="cpu", backend="torch")
    out = engine(torch.randn(0, 3, 32, 32))
    assert out.shape == (0, 10) and out.dtype == torch.float32


def test_any_float_dtype_and_memory_format_is_accepted():
    model = calibrated("resnet18", 10)
    engine = fastres.optimize(model, device="cpu", backend="torch")
    x = random_images(2, 40, 40, seed=12)
    expected = engine(x)
    torch.testing.assert_close(engine(x.double()), expected)
    torch.testing.assert_close(engine(x.contiguous(memory_format=torch.channels_last)), expected)
    assert engine(x.half()).dtype == torch.float32


def test_results_never_alias_later_calls():
    model = calibrated("resnet18", 10)
    engine = fastres.optimize(model, device="cpu", backend="torch")
    a, b = random_images(2, 40, 40, seed=13), random_images(2, 40, 40, seed=14)
    first = engine(a)
    snapshot = first.clone()
    second = engine(b)
    assert torch.equal(first, snapshot) and not torch.equal(first, second)
    assert first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()


def test_large_batches_run_in_chunks_and_shapes_are_bounded():
    model = calibrated("resnet18", 10)
    whole = fastres.optimize(model, device="cpu", backend="torch")
    chunked = fastres.optimize(model, device="cpu", backend="torch", max_batch=2, max_cached_shapes=2)
    x = random_images(5, 32, 32, seed=15)
    torch.testing.assert_close(chunked(x), whole(x), rtol=1e-5, atol=1e-6)
    for size in (16, 24, 40):
        chunked(random_images(1, size, size))
    assert len(chunked._runners) == 2


def test_concurrent_calls_from_threads():
    model = calibrated("resnet18", 10)
    engine = fastres.optimize(model, device="cpu", backend="torch")
    inputs = [random_images(2, 36, 36, seed=100 + i) for i in range(8)]
    assert_same_results_from_threads(engine, inputs)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(fastres.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        fastres.optimize(calibrated("resnet18", 10), device="cpu", backend="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(fastres.BackendUnavailableError, match="no CUDA GPU"):
        fastres.optimize(calibrated("resnet18", 10), device="cuda")


def test_bad_options_are_clear_errors():
    model = calibrated("resnet18", 10)
    with pytest.raises(ValueError, match="unknown backend"):
        fastres.optimize(model, device="cpu", backend="tensorrt")
    with pytest.raises(ValueError, match="unsupported dtype"):
        fastres.optimize(model, device="cpu", backend="torch", dtype="int4")
    with pytest.raises(ValueError, match=r"int8 runs on the openvino backend.*fastres\[openvino\]"):
        fastres.optimize(model, device="cpu", backend="torch", dtype="int8")
    with pytest.raises(TypeError, match="nn.Module"):
        fastres.optimize({"not": "a module"})


def test_default_device_dtype_and_backend_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("defaults differ on a CUDA machine")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = fastres.load("resnet18", num_classes=3)
    from fastres.backends.openvino_backend import default_precision, openvino_available

    if openvino_available():  # OpenVINO's own default precision (bf16 on CPUs with bf16 instructions)
        expected = ("cpu", default_precision(), "openvino")
    else:
        expected = ("cpu", torch.float32, "torch")
    assert (engine.device.type, engine.dtype, engine.backend_name) == expected


def test_tf32_is_opt_in_and_never_left_switched():
    model = calibrated("resnet18", 10)
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    engine = fastres.optimize(model, device="cpu", backend="torch", allow_tf32=True)
    engine(random_images(1, 32, 32))
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before
    with pytest.raises(ValueError, match="allow_tf32"):
        fastres.optimize(model, device="cpu", backend="torch", dtype="fp16", allow_tf32=True)


def test_a_cuda_device_without_an_index_is_pinned_to_the_current_one(monkeypatch):
    """Weights land on the current device at load; a later torch.cuda.set_device must not move the
    engine's streams and workspaces away from them."""
    from fastres import api

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    device, _, _ = api._resolve_device_dtype_backend("cuda", "fp16", "torch")
    assert device == torch.device("cuda", 3)
    device, _, _ = api._resolve_device_dtype_backend("cuda:1", "fp16", "torch")
    assert device == torch.device("cuda", 1)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_dropped_engine_is_freed_without_the_cycle_collector(backend):
    """Nothing of an engine refers back to it: dropped, its weights (and on a GPU its buffers and
    graphs) go at once, not at the next cycle collection, which large tensors never prompt (a test
    suite or a server that reloads models grew by GBs)."""
    import gc
    import weakref

    model = calibrated("resnet18", 10)
    gc.collect()
    gc.disable()
    try:
        engine = fastres.optimize(model, device="cpu", backend=backend, tune=False, self_check=False)
        if backend == "torch":  # the interpreter would take long: the triton engine is only built
            engine(random_images(2, 32, 32, seed=1))
            engine.embed(random_images(2, 32, 32, seed=2))
        refs = [weakref.ref(engine), weakref.ref(engine.backend), weakref.ref(engine._runners)]
        del engine
        assert [r() is None for r in refs] == [True] * 3
    finally:
        gc.enable()
