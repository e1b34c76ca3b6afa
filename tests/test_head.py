"""HeadLayer (kernels/head.py): global average pool + linear against float64 mean + matmul."""

from __future__ import annotations

import pytest
import torch
from fastres.kernels import head
from fastres.kernels.head import HeadLayer
from helpers import LAYER_RTOL, assert_close, poison_

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]

CASES = [
    pytest.param((2, 7, 7, 256), 1000, True, id="resnet_like_7x7_to1000"),
    pytest.param((3, 1, 1, 40), 10, True, id="1x1image_batch3_c40"),
    pytest.param((1, 3, 5, 72), 130, False, id="odd_3x5_nobias"),
    pytest.param((17, 2, 2, 24), 16, True, id="batch17"),
]


def _check(shape, num_classes, with_bias, dtype):
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(num_classes, shape[3], generator=gen) / shape[3] ** 0.5).to(DEVICE)
    bias = torch.randn(num_classes, generator=gen).to(DEVICE) if with_bias else None
    layer = HeadLayer(weight, bias, dtype=dtype)
    x = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    out = poison_(torch.empty(shape[0], num_classes, dtype=torch.float32, device=DEVICE))
    assert layer(x, out=out) is out
    ref = x.double().cpu().mean(dim=(1, 2)) @ weight.to(dtype).double().cpu().T
    if bias is not None:
        ref = ref + bias.double().cpu()
    # fp32 accumulation and fp32 logits whatever the input dtype: the fp32 bound applies.
    assert_close(out, ref, LAYER_RTOL[torch.float32], what=f"head {shape} -> {num_classes}")


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, num_classes, with_bias", CASES)
def test_head_matches_reference(shape, num_classes, with_bias, dtype):
    _check(shape, num_classes, with_bias, dtype)


@pytest.mark.interpreter
def test_gpu_config_under_interpreter(monkeypatch):
    """The shipped GPU config, run under the interpreter (which otherwise uses wider channel slices)."""
    monkeypatch.setattr(head, "HEAD_INTERP_CONFIG", head.HEAD_CONFIG)
    _check((3, 3, 3, 200), 300, True, torch.float16)


@pytest.mark.interpreter
def test_allocates_fp32_output():
    layer = HeadLayer(torch.randn(10, 16, device=DEVICE), None, dtype=torch.float16)
    out = layer(torch.randn(2, 3, 3, 16, device=DEVICE, dtype=torch.float16))
    assert out.shape == (2, 10) and out.dtype == torch.float32


@pytest.mark.interpreter
def test_rejects_bad_inputs():
    layer = HeadLayer(torch.randn(10, 16, device=DEVICE), torch.randn(10, device=DEVICE), dtype=torch.float32)
    x = torch.randn(2, 3, 3, 16, device=DEVICE)
    with pytest.raises(TypeError, match="expected x dtype torch.float32"):
        layer(x.half())
    with pytest.raises(ValueError, match=r"expected NHWC \(N, H, W, 16\)"):
        layer(torch.randn(2, 3, 3, 15, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        layer(x.permute(0, 2, 1, 3))
    with pytest.raises(TypeError, match="out must be a float32"):
        layer(x, out=torch.empty(2, 10, device=DEVICE, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"contiguous \(2, 10\)"):
        layer(x, out=torch.empty(3, 10, device=DEVICE))
    with pytest.raises(ValueError, match="bias must have shape"):
        HeadLayer(torch.randn(10, 16), torch.randn(9), dtype=torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 8, 64])
@pytest.mark.parametrize("dtype", DTYPES + [pytest.param(torch.bfloat16, id="bf16")])
def test_resnet50_head_gpu(batch, dtype):
    _check((batch, 7, 7, 2048), 1000, True, dtype)
