"""Int8ConvLayer (kernels/conv_int8.py) under the interpreter, in every loop mode of the conv kernel:
the int32 accumulator bitwise against an exact integer conv, and the dequantize / bias / residual /
ReLU / requantize epilogue against a float64 evaluation of the same quantized arithmetic."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import test_conv
import torch
import torch.nn.functional as F
from fastres.kernels.conv import ConvConfig
from fastres.kernels.conv_int8 import INT8_MIN_BLOCK_K, Int8ConvLayer

from fastres.graph import avg_pool_2x2
from fastres.numerics import LAYER_RTOL, assert_close, poison_

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Sentinels the kernel never writes: -128 is outside symmetric int8's [-127, 127]; INT32_MIN cannot
# be reached by these layers' sums (|acc| <= 127 * 127 * K < 2**31).
POISON = {torch.int8: -128, torch.int32: -(2**31)}


@dataclass(frozen=True)
class Case(test_conv.Case):
    shortcut: int = 0  # > 0: a K-concatenated 1x1 projection of a second input with these channels
    shortcut_stride: int = 1
    avg_pool: bool = False  # ResNet-D: the stride-2 1x1 read (of x2 with a shortcut) is a 2x2 mean


MODES = [
    pytest.param(Case(2, 5, 7, 48, 40, 1, 1, 0, residual=True), id="gemm_residual_c48"),
    pytest.param(Case(2, 6, 5, 40, 24, 3, 1, 1), id="channel_blocked_3x3_c40"),
    pytest.param(Case(1, 7, 9, 64, 32, 3, 2, 1, relu=False), id="channel_blocked_3x3s2"),
    pytest.param(Case(2, 6, 6, 32, 32, 3, 1, 1, groups=4), id="supergroups_4x8"),
    pytest.param(Case(2, 9, 7, 4, 24, 3, 1, 1), id="gather_cin4"),
    pytest.param(Case(2, 4, 5, 32, 48, 1, 1, 0, shortcut=24, shortcut_stride=2), id="shortcut_s2"),
    pytest.param(Case(1, 3, 3, 16, 16, 1, 1, 0, shortcut=40), id="shortcut_c16_padded"),
    # ResNet-D's pooled projections on odd maps (ceil_mode's partial windows in the last row/column).
    pytest.param(Case(2, 7, 9, 32, 40, 1, 2, 0, relu=False, avg_pool=True), id="pooled_1x1s2_odd"),
    pytest.param(
        Case(1, 4, 5, 32, 48, 1, 1, 0, shortcut=32, shortcut_stride=2, avg_pool=True),
        id="pooled_shortcut_odd",
    ),
]


def _int8(gen, *shape) -> torch.Tensor:
    """Random int8 in [-127, 127]: the symmetric range, no -128."""
    return torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8)


def _build(case: Case, out_dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    weight = _int8(gen, case.c_out, case.c_in // case.groups, case.k, case.k)
    x = _int8(gen, case.n, case.h, case.w, case.c_in)
    shortcut_weight = x2 = None
    if case.shortcut:
        shortcut_weight = _int8(gen, case.c_out, case.shortcut, 1, 1)
        h2, w2 = case.h * case.shortcut_stride, case.w * case.shortcut_stride
        if case.avg_pool:  # odd: the last row and column of windows hold 2 (and one 1) of 4 pixels
            h2, w2 = h2 - 1, w2 - 1
        x2 = _int8(gen, case.n, h2, w2, case.shortcut)
    k_total = case.c_in // case.groups * case.k**2 + case.shortcut
    # acc has standard deviation 127**2 / 3 * sqrt(K) (uniform int8 operands): these scales give y a
    # deviation of 0.5-1.5 per channel, so the output scale (2.5 / 127) uses the range and clips a little.
    spread = torch.rand(case.c_out, generator=gen, dtype=torch.float64) + 0.5
    dequant = spread * 3 / (127**2 * k_total**0.5)
    bias = torch.randn(case.c_out, generator=gen) * 0.3
    residual = None
    layer = Int8ConvLayer(
        weight.to(DEVICE), dequant.to(DEVICE), bias.to(DEVICE), stride=case.stride, padding=case.pad,
        groups=case.groups, relu=case.relu, has_residual=case.residual,
        residual_scale=0.011 if case.residual else None, out_dtype=out_dtype,
        output_scale=2.5 / 127 if out_dtype == torch.int8 else None,
        shortcut_weight=None if shortcut_weight is None else shortcut_weight.to(DEVICE),
        shortcut_stride=case.shortcut_stride, avg_pool=case.avg_pool,
    )  # fmt: skip
    out_shape = layer.output_shape(tuple(x.shape))
    if case.residual:
        residual = _int8(gen, *out_shape)
    to = lambda t: None if t is None else t.to(DEVICE)
    return layer, weight, dequant, bias, to(x), to(residual), to(x2), shortcut_weight


def _integer_reference(case: Case, weight, x, x2, shortcut_weight) -> torch.Tensor:
    """The exact integer conv (float64 holds every partial sum of these sizes exactly), as int64. A
    pooled input is the 2x2 mean of its codes rounded to the nearest code, ties to even (torch.round)."""
    nchw = lambda t: t.cpu().double().permute(0, 3, 1, 2)
    pooled = lambda t: torch.round(avg_pool_2x2(nchw(t)))
    main_pooled = case.avg_pool and not case.shortcut
    a, stride = (pooled(x), 1) if main_pooled else (nchw(x), case.stride)
    acc = F.conv2d(a, weight.double(), stride=stride, padding=case.pad, groups=case.groups)
    if case.shortcut:
        a2, stride2 = (pooled(x2), 1) if case.avg_pool else (nchw(x2), case.shortcut_stride)
        acc = acc + F.conv2d(a2, shortcut_weight.double(), stride=stride2)
    return acc.permute(0, 2, 3, 1).to(torch.int64)


def _dequantized_reference(layer: Int8ConvLayer, acc, dequant, bias, residual) -> torch.Tensor:
    """float64 y = acc * dequant_scale + bias + q_res * s_res, then ReLU (the kernel's math, unrounded;
    the scales as the kernel holds them, in fp32)."""
    y = acc.double() * dequant.float().double() + bias.float().double()
    if residual is not None:
        y = y + residual.cpu().double() * torch.tensor(layer.residual_scale, dtype=torch.float32).double()
    return y.clamp_min(0) if layer.relu else y


def _run(layer, x, residual, x2, out_dtype, config=None):
    out = torch.empty(layer.output_shape(tuple(x.shape)), dtype=out_dtype, device=DEVICE)
    out = poison_(out) if out_dtype.is_floating_point else out.fill_(POISON[out_dtype])
    if config is None:
        result = layer(x, residual, out=out, shortcut_input=x2)
    else:
        result = layer.launch(x, residual, out, config=config, shortcut_input=x2)
    assert result is out
    return out.cpu()


def _split_config(layer, split: int) -> ConvConfig:
    config = layer.clip_config(ConvConfig(32, 32, 32, 4, 1, split_k=split))
    assert config.split_k == split and config.block_k == INT8_MIN_BLOCK_K
    return config


def _check_accumulator(case: Case, config_split: int = 1):
    layer, weight, _, _, x, residual, x2, wd = _build(case, torch.int32)
    config = _split_config(layer, config_split) if config_split > 1 else None
    acc = _run(layer, x, residual, x2, torch.int32, config)
    ref = _integer_reference(case, weight, x, x2, wd)
    assert ref.abs().max() > 127 * 127  # sums of many products, not a trivially small range
    assert torch.equal(acc.to(torch.int64), ref), f"{layer}: {(acc.to(torch.int64) != ref).sum()} mismatches"


def _check_requantized(case: Case, config_split: int = 1):
    layer, weight, dequant, bias, x, residual, x2, wd = _build(case, torch.int8)
    config = _split_config(layer, config_split) if config_split > 1 else None
    q = _run(layer, x, residual, x2, torch.int8, config)
    y = _dequantized_reference(layer, _integer_reference(case, weight, x, x2, wd), dequant, bias, residual)
    inv = torch.tensor(layer.out_inv_scale, dtype=torch.float32).double()
    q_ref = torch.round(y * inv).clamp(-127, 127)
    steps = (q.double() - q_ref).abs()
    assert steps.max() <= 1, f"{layer}: {int((steps > 1).sum())} outputs off by more than one int8 step"
    assert (steps == 0).double().mean() > 0.99  # off by one only where fp32 rounding meets a tie
    assert q.unique().numel() > min(64, q.numel() // 8)  # a real spread of codes, not a clipped few
    assert q.min() >= (0 if layer.relu else -127)


@pytest.mark.interpreter
@pytest.mark.parametrize("case", MODES)
def test_int8_accumulator_is_exact(case):
    _check_accumulator(case)


@pytest.mark.interpreter
@pytest.mark.parametrize("case", MODES)
def test_int8_epilogue_requantizes_within_one_step(case):
    _check_requantized(case)


SPLIT_CASES = [
    pytest.param(Case(1, 4, 4, 64, 32, 3, 1, 1, residual=True), 3, id="channel_blocked_split3"),
    pytest.param(Case(1, 5, 3, 64, 32, 1, 1, 0, shortcut=64, shortcut_stride=2), 2, id="shortcut_split2"),
    pytest.param(Case(1, 6, 6, 8, 32, 3, 1, 1), 2, id="gather_split2"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("case, split", SPLIT_CASES)
def test_int8_split_k_is_exact_and_requantizes_within_one_step(case, split):
    _check_accumulator(case, split)
    _check_requantized(case, split)


@pytest.mark.interpreter
@pytest.mark.parametrize("out_dtype", [pytest.param(torch.float16, id="fp16"), pytest.param(torch.float32, id="fp32")])  # noqa: E501
def test_int8_conv_with_a_float_output_dequantizes(out_dtype):
    """The network's last conv writes floating point for the head: y itself, rounded once."""
    case = Case(2, 5, 5, 40, 24, 3, 1, 1, residual=True)
    layer, weight, dequant, bias, x, residual, x2, wd = _build(case, out_dtype)
    out = _run(layer, x, residual, x2, out_dtype)
    y = _dequantized_reference(layer, _integer_reference(case, weight, x, x2, wd), dequant, bias, residual)
    assert_close(out, y, LAYER_RTOL[out_dtype], what=repr(layer))


def test_int8_layer_refuses_what_it_cannot_run():
    w = torch.randint(-127, 128, (8, 8, 1, 1), dtype=torch.int8)
    scale = torch.full((8,), 0.01)
    with pytest.raises(TypeError, match="int8 tensor"):
        Int8ConvLayer(w.float(), scale, None, stride=1, padding=0)
    with pytest.raises(ValueError, match="-128"):
        Int8ConvLayer(torch.full_like(w, -128), scale, None, stride=1, padding=0)
    with pytest.raises(ValueError, match="output_scale"):
        Int8ConvLayer(w, scale, None, stride=1, padding=0)
    layer = Int8ConvLayer(w, scale, None, stride=1, padding=0, out_dtype=torch.float16)
    x = torch.zeros(1, 2, 2, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="BLOCK_K"):
        layer.launch(x, config=ConvConfig(32, 32, 16, 4, 1))
    with pytest.raises(ValueError, match="fused_reduce"):
        layer.launch(x, config=ConvConfig(32, 32, 32, 4, 1, split_k=2, fused_reduce=False))
    with pytest.raises(TypeError, match="dtype torch.int8"):
        layer(x.float())
