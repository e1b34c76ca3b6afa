"""max_pool2d_nhwc (kernels/pool.py) against float64 F.max_pool2d on the same inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fastres.kernels import pool
from fastres.kernels.pool import max_pool2d_nhwc, pool_output_shape

from fastres.numerics import assert_close, poison_

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]

SHAPES = [
    pytest.param((2, 16, 16, 64), id="resnet_like_2x16x16x64"),
    pytest.param((2, 33, 35, 24), id="odd_2x33x35x24"),
    pytest.param((3, 1, 1, 40), id="1x1image_batch3"),
    pytest.param((1, 2, 3, 130), id="2x3_c130"),
]

GEOMETRIES = [
    pytest.param((3, 2, 1), id="k3s2p1"),
    pytest.param((2, 2, 0), id="k2s2p0"),
    pytest.param((3, 1, 1), id="k3s1p1"),
]


def _reference(x, kernel_size, stride, padding):
    ref = F.max_pool2d(x.double().cpu().permute(0, 3, 1, 2), kernel_size, stride, padding)
    return ref.permute(0, 2, 3, 1)


def _check(shape, dtype, geometry):
    kernel_size, stride, padding = geometry
    if (shape[1] + 2 * padding - kernel_size) < 0 or (shape[2] + 2 * padding - kernel_size) < 0:
        pytest.skip(f"{shape} is smaller than a {kernel_size}x{kernel_size} window with padding {padding}")
    x = torch.randn(shape).to(DEVICE, dtype)
    out = poison_(torch.empty(pool_output_shape(shape, *geometry), dtype=dtype, device=DEVICE))
    result = max_pool2d_nhwc(x, kernel_size=kernel_size, stride=stride, padding=padding, out=out)
    assert result is out
    # max is exact: the only error allowed is none.
    assert_close(out, _reference(x, *geometry), 0.0, what=f"max_pool2d {shape} {geometry}")


@pytest.mark.interpreter
@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_max_pool_matches_reference(shape, dtype, geometry):
    _check(shape, dtype, geometry)


@pytest.mark.interpreter
def test_gpu_config_under_interpreter(monkeypatch):
    """The shipped GPU tile config, run under the interpreter (which otherwise uses bigger tiles)."""
    monkeypatch.setattr(pool, "POOL_INTERP_BLOCK_P", pool.POOL_BLOCK_P)
    monkeypatch.setattr(pool, "POOL_INTERP_BLOCK_C", pool.POOL_BLOCK_C)
    _check((2, 17, 15, 72), torch.float16, (3, 2, 1))


@pytest.mark.interpreter
def test_allocates_output_and_propagates_nan():
    x = torch.randn(1, 4, 4, 16, device=DEVICE)
    x[0, 1, 1, 3] = float("nan")
    out = max_pool2d_nhwc(x)
    assert out.shape == (1, 2, 2, 16)
    assert torch.isnan(out[0, 0, 0, 3]) and torch.isnan(out[0, 1, 1, 3])
    assert torch.isfinite(out[..., 4:]).all()


@pytest.mark.interpreter
def test_rejects_bad_inputs():
    x = torch.randn(1, 4, 4, 16, device=DEVICE)
    with pytest.raises(TypeError, match="dtype must be one of"):
        max_pool2d_nhwc(x.to(torch.int32))
    with pytest.raises(ValueError, match="4-d NHWC"):
        max_pool2d_nhwc(x[0])
    with pytest.raises(ValueError, match="contiguous"):
        max_pool2d_nhwc(x.permute(0, 2, 1, 3))
    with pytest.raises(ValueError, match="padding <= kernel_size // 2"):
        max_pool2d_nhwc(x, kernel_size=3, padding=2)
    with pytest.raises(ValueError, match=r"contiguous \(1, 2, 2, 16\)"):
        max_pool2d_nhwc(x, out=torch.empty(1, 2, 2, 8, device=DEVICE))
    with pytest.raises(TypeError, match="out must be a torch.float32"):
        max_pool2d_nhwc(x, out=torch.empty(1, 2, 2, 16, device=DEVICE, dtype=torch.float16))


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 8, 64])
@pytest.mark.parametrize("dtype", DTYPES + [pytest.param(torch.bfloat16, id="bf16")])
def test_resnet_stem_pool_gpu(batch, dtype):
    _check((batch, 112, 112, 64), dtype, (3, 2, 1))


@pytest.mark.interpreter
@pytest.mark.parametrize("out_dtype", [torch.int8, torch.float8_e4m3fn], ids=["int8", "fp8"])
def test_quantizing_pool_stores_the_max_rounded_to_the_format(out_dtype):
    """The quantized engines' pool: the fp16 max times 1/scale (in fp32, as the kernel computes it),
    saturated and rounded to nearest even in int8 or e4m3, bit for bit; scale chosen so that both the
    saturation and (for e4m3) the subnormal range are reached."""
    from fastres.quantize import quant_format

    fmt = quant_format(out_dtype)
    shape, geometry = (2, 17, 19, 72), (3, 2, 1)  # the function's defaults
    x = (torch.randn(shape) * 3).to(DEVICE, torch.float16)
    scale = 2.5 / fmt.max  # |x| beyond 2.5 saturates
    out = torch.empty(pool_output_shape(shape, *geometry), dtype=out_dtype, device=DEVICE)
    out.view(torch.uint8).fill_(0x7F)  # poison: int8 127, e4m3 NaN
    result = max_pool2d_nhwc(x, out=out, out_scale=scale, out_dtype=out_dtype)
    assert result is out and out.dtype == out_dtype
    expected = fmt.round(_reference(x, *geometry).float() * torch.tensor(1.0 / scale, dtype=torch.float32))
    got = out.cpu().float()
    assert torch.equal(got, expected), (got - expected).abs().max()
    assert (got.abs() == fmt.max).any() and (got.abs() < 1).any()  # saturated and small values occur
    with pytest.raises(TypeError, match="quantized out_dtype"):
        max_pool2d_nhwc(x, out_scale=scale, out_dtype=torch.float16)
