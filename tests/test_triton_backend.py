"""The triton backend end to end: under the interpreter on the CPU, and on a CUDA GPU.

Judged against a float64 run of the reference: fastres's relative error on the logits is at most
twice eager PyTorch's own error in the same dtype (eager runs fp16 on the CPU too).
"""

import pytest
import torch
from e2e import assert_parity, calibrated, parity

import fastres
from fastres.specs import MODEL_SPECS
from fastres.testing import random_images

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]


@pytest.mark.interpreter
@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_triton_backend_matches_reference(name, dtype):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = calibrated(name, 10)
    engine = fastres.optimize(model, device=device, dtype=dtype, backend="triton")
    assert engine.backend_name == "triton"
    assert_parity(engine, model, random_images(2, 64, 64, seed=3), dtype, device=device)


@pytest.mark.interpreter
@pytest.mark.parametrize("size", [pytest.param((37, 29), id="37x29"), pytest.param((1, 1), id="1x1")])
def test_triton_backend_odd_image_and_batch(size):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = calibrated("resnet18", 7)
    engine = fastres.optimize(model, device=device, dtype=torch.float32, backend="triton")
    assert_parity(engine, model, random_images(3, *size, seed=4), torch.float32, device=device)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_triton_stem_reads_float_input_in_place(dtype, channels_last):
    """The stem kernel reads the caller's tensor by its strides: no NCHW->NHWC copy, same parity."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = calibrated("resnet18", 7)
    engine = fastres.optimize(model, device=device, dtype=dtype, backend="triton")
    x = random_images(2, 32, 32, seed=8)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert_parity(engine, model, x, dtype, device=device)
    workspace = engine.backend.make_workspace(2, 32, 32)
    assert "input" not in workspace.values, "the network input must not be copied into the workspace"


@pytest.mark.interpreter
def test_triton_layer_errors_cover_every_op():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    engine = fastres.optimize(calibrated("resnet18", 7), device=device, dtype=torch.float32, backend="triton")
    report = engine.layer_errors(random_images(1, 32, 32, seed=5))
    assert [r.op for r in report] == [op.name for op in engine.plan.ops]
    assert max(r.relative_error for r in report) < 1e-4


def _top1_agreement(logits: torch.Tensor, ref: torch.Tensor) -> float:
    return (logits.double().cpu().argmax(1) == ref.argmax(1)).double().mean().item()


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(MODEL_SPECS))
def test_all_models_fp16_at_224_on_gpu(name):
    model = calibrated(name, 1000)
    engine = fastres.optimize(model, device="cuda", dtype=torch.float16)
    x = random_images(8, 224, 224, seed=6)
    ours, eager = parity(engine, model, x, torch.float16, device="cuda")
    assert ours <= 2 * eager, f"fastres {ours:.3e} vs eager fp16 {eager:.3e}"
    with torch.inference_mode():
        ref = model.to("cuda", torch.float64)(x.cuda().double()).cpu()
        eager_logits = model.to("cuda", torch.float16)(x.cuda().half())
        model.float().cpu()
    assert _top1_agreement(engine(x), ref) >= _top1_agreement(eager_logits, ref)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float32, id="fp32")]
)
@pytest.mark.parametrize("name", ["resnet50", "resnext50_32x4d"])
def test_bf16_and_fp32_on_gpu(name, dtype):
    model = calibrated(name, 1000)
    engine = fastres.optimize(model, device="cuda", dtype=dtype)
    assert_parity(engine, model, random_images(4, 224, 224, seed=7), dtype, device="cuda")


@pytest.mark.interpreter
def test_weights_are_packed_once_at_load(monkeypatch):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    engine = fastres.optimize(calibrated("resnet18", 7), device=device, dtype=torch.float32, backend="triton")
    packed = {
        name: layer.weight_packed.data_ptr()
        for name, layer in engine.backend.layers.items()
        if hasattr(layer, "weight_packed")
    }
    built = []
    monkeypatch.setattr(fastres.kernels.ConvLayer, "__init__", lambda *a, **k: built.append(a))
    for seed in (1, 2):
        engine(random_images(2, 32, 32, seed=seed))
    assert not built, "a forward pass built (and so re-packed) a conv layer"
    assert packed and all(
        engine.backend.layers[name].weight_packed.data_ptr() == ptr for name, ptr in packed.items()
    )
