"""Fp8ConvLayer (kernels/conv_fp8.py) under Triton's interpreter, in the int8 tests' loop modes.

What the interpreter does with e4m3: `tl.dot` converts both operands to fp16 (exact for e4m3) and
multiplies in numpy with an fp32 result, so the fp32 accumulation is IEEE fp32 (products of e4m3 values
are exact in fp32), not the sm_90 tensor core's narrower fp8 accumulator: that difference, the MMA
itself and the hardware fp32 -> e4m3 conversion are NOT covered here (compile test / GPU only). Its
fp32 -> fp8 conversion is wrong for inexact values, which is why the epilogue rounds explicitly first.
"""

from __future__ import annotations

import pytest
import test_conv_int8 as int8_tests
import torch
import torch.nn.functional as F
from fastres.kernels.conv_fp8 import Fp8ConvLayer
from test_conv_int8 import MODES, SPLIT_CASES, Case

from fastres.graph import avg_pool_2x2
from fastres.numerics import poison_

FP8 = torch.float8_e4m3fn


def _fp8(gen, *shape, spread=2.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * spread).to(FP8)


def _build(case: Case, out_dtype, seed: int, unit_scale: bool):
    gen = torch.Generator().manual_seed(seed)
    weight = _fp8(gen, case.c_out, case.c_in // case.groups, case.k, case.k)
    x = _fp8(gen, case.n, case.h, case.w, case.c_in)
    wd = x2 = None
    if case.shortcut:
        wd = _fp8(gen, case.c_out, case.shortcut, 1, 1)
        odd = 1 if case.avg_pool else 0  # as the int8 tests: partial pooling windows at the edges
        h2, w2 = case.h * case.shortcut_stride - odd, case.w * case.shortcut_stride - odd
        x2 = _fp8(gen, case.n, h2, w2, case.shortcut)
    k_total = case.c_in // case.groups * case.k**2 + case.shortcut
    spread = torch.rand(case.c_out, generator=gen) + 0.5
    dequant = torch.ones(case.c_out) if unit_scale else spread / (4 * k_total**0.5)
    bias = None if unit_scale else torch.randn(case.c_out, generator=gen) * 0.3
    residual_scale = 0.05
    layer = Fp8ConvLayer(
        weight, dequant, bias, stride=case.stride, padding=case.pad, groups=case.groups,
        relu=case.relu and not unit_scale, has_residual=case.residual and not unit_scale,
        residual_scale=residual_scale if case.residual else None, out_dtype=out_dtype,
        output_scale=0.01 if out_dtype == FP8 else None, shortcut_weight=wd,
        shortcut_stride=case.shortcut_stride, avg_pool=case.avg_pool,
    )  # fmt: skip
    residual = _fp8(gen, *layer.output_shape(tuple(x.shape))) if layer.has_residual else None
    return layer, weight, dequant, bias, x, residual, x2, wd


def _reference_acc(case, weight, x, x2, wd) -> torch.Tensor:
    """float64 conv of the e4m3 operands; a pooled input is the 2x2 mean of its values (exact in
    float64) rounded to e4m3 by torch's cast (round to nearest, ties to even)."""
    nchw = lambda t: t.double().permute(0, 3, 1, 2)
    pooled = lambda t: avg_pool_2x2(nchw(t)).to(FP8).double()
    main_pooled = case.avg_pool and not case.shortcut
    a, stride = (pooled(x), 1) if main_pooled else (nchw(x), case.stride)
    acc = F.conv2d(a, weight.double(), stride=stride, padding=case.pad, groups=case.groups)
    if case.shortcut:
        a2, stride2 = (pooled(x2), 1) if case.avg_pool else (nchw(x2), case.shortcut_stride)
        acc = acc + F.conv2d(a2, wd.double(), stride=stride2)
    return acc.permute(0, 2, 3, 1)


def _run(layer, x, residual, x2, out_dtype, split):
    out = torch.empty(layer.output_shape(tuple(x.shape)), dtype=out_dtype)
    out = poison_(out) if out_dtype != FP8 else out.view(torch.uint8).fill_(0x7F).view(FP8)  # NaN code
    config = int8_tests._split_config(layer, split) if split > 1 else None
    result = layer(x, residual, out=out, shortcut_input=x2) if config is None else layer.launch(
        x, residual, out, config=config, shortcut_input=x2)  # fmt: skip
    assert result is out
    return out


def _check(case: Case, split: int = 1):
    # Accumulator: unit scales, no bias / residual / ReLU, fp32 out = the fp32 sum itself. Products are
    # exact; K <= 700 fp32 additions of terms bounded by sum |a*b| give |err| <= K * 2**-24 * sum |a*b|.
    layer, weight, _, _, x, _, x2, wd = _build(case, torch.float32, 0, unit_scale=True)
    acc = _run(layer, x, None, x2, torch.float32, split).double()
    ref = _reference_acc(case, weight, x, x2, wd)
    bound = _reference_acc(case, weight.double().abs().to(FP8), x.double().abs().to(FP8),
                           None if x2 is None else x2.double().abs().to(FP8),
                           None if wd is None else wd.double().abs().to(FP8))  # fmt: skip
    k_total = case.c_in // case.groups * case.k**2 + case.shortcut
    assert torch.isfinite(acc).all() and ref.abs().max() > 10
    assert ((acc - ref).abs() <= k_total * 2**-24 * bound + 1e-30).all(), layer
    # Epilogue: within one e4m3 step of the float64 value rounded to e4m3 (torch's RNE, saturating).
    layer, weight, dequant, bias, x, residual, x2, wd = _build(case, FP8, 1, unit_scale=False)
    q = _run(layer, x, residual, x2, FP8, split).double()
    y = _reference_acc(case, weight, x, x2, wd) * dequant.double() + bias.double()
    if residual is not None:
        y = y + residual.double() * layer.residual_scale
    y = y.clamp_min(0) if layer.relu else y
    v = (y / 0.01).clamp(-448, 448)
    q_ref = v.to(FP8).double()
    exponent = torch.floor(torch.log2(v.abs().clamp_min(2**-6)))
    step = torch.where(v.abs() < 2**-6, torch.full_like(v, 2**-9), 2.0 ** (exponent - 3))  # e4m3 spacing
    assert torch.isfinite(q).all()
    assert ((q - q_ref).abs() <= step * 1.0001).all(), layer
    assert (q == q_ref).double().mean() > 0.98
    assert q.unique().numel() > 16


@pytest.mark.interpreter
@pytest.mark.parametrize("case", MODES)
def test_fp8_conv_accumulates_and_requantizes(case):
    _check(case)


@pytest.mark.interpreter
@pytest.mark.parametrize("case, split", SPLIT_CASES)
def test_fp8_split_k(case, split):
    _check(case, split)
