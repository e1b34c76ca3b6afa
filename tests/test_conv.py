"""ConvLayer (kernels/conv.py) against float64 F.conv2d computed from the same low-precision inputs."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F
from fastres.kernels import splitk
from fastres.kernels.conv import CONV_CONFIGS, ConvConfig, ConvLayer
from fastres.kernels.conv_configs import SPLIT_MAX, k_step_cycles, split_cycles
from fastres.kernels.splitk import (
    REDUCE_VALUES_PER_THREAD,
    REDUCE_VALUES_PER_THREAD_CAPPED,
    reduce_chunks,
    reduce_rows,
)

from fastres.numerics import LAYER_RTOL, assert_close, poison_

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class Case:
    n: int
    h: int
    w: int
    c_in: int
    c_out: int
    k: int
    stride: int
    pad: int
    groups: int = 1
    bias: bool = True
    relu: bool = True
    residual: bool = False


def _build(case: Case, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    fan_in = case.c_in // case.groups * case.k * case.k
    weight = torch.randn(
        case.c_out, case.c_in // case.groups, case.k, case.k, generator=gen, dtype=torch.float64
    )
    weight = (weight / fan_in**0.5).to(DEVICE)
    bias = torch.randn(case.c_out, generator=gen).to(DEVICE) if case.bias else None
    layer = ConvLayer(
        weight,
        bias,
        stride=case.stride,
        padding=case.pad,
        groups=case.groups,
        relu=case.relu,
        has_residual=case.residual,
        dtype=dtype,
    )
    x = torch.randn(case.n, case.h, case.w, case.c_in, generator=gen).to(DEVICE, dtype)
    out_shape = layer.output_shape(tuple(x.shape))
    residual = torch.randn(out_shape, generator=gen).to(DEVICE, dtype) if case.residual else None
    return layer, weight, bias, x, residual


def _reference(case: Case, weight, bias, x, residual, dtype):
    """float64 conv of the inputs the kernel sees (weights rounded to `dtype`, bias fp32).

    Computed on the kernel's device: batch-64 ResNet layers in float64 take seconds each on a CPU.
    """
    w64 = weight.to(dtype).double()
    b64 = None if bias is None else bias.float().double()
    ref = F.conv2d(
        x.double().permute(0, 3, 1, 2),
        w64,
        b64,
        stride=case.stride,
        padding=case.pad,
        groups=case.groups,
    ).permute(0, 2, 3, 1)
    if residual is not None:
        ref = ref + residual.double()
    return ref.clamp_min(0) if case.relu else ref


def _check(case: Case, dtype: torch.dtype, config=None):
    layer, weight, bias, x, residual = _build(case, dtype)
    out = poison_(torch.empty(layer.output_shape(tuple(x.shape)), dtype=dtype, device=DEVICE))
    if config is None:
        result = layer(x, residual, out=out)
    else:
        result = layer.launch(x, residual, out, config=config)
    assert result is out
    assert_close(out, _reference(case, weight, bias, x, residual, dtype), LAYER_RTOL[dtype], what=repr(layer))


DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]

LAYER_KINDS = [
    pytest.param(Case(1, 32, 30, 3, 64, 7, 2, 3), id="stem7x7s2_cin3"),
    pytest.param(Case(2, 14, 14, 64, 64, 3, 1, 1), id="3x3s1"),
    pytest.param(Case(2, 15, 15, 128, 128, 3, 2, 1), id="3x3s2_odd"),
    pytest.param(Case(2, 14, 14, 64, 256, 1, 1, 0, residual=True), id="1x1s1_residual"),
    pytest.param(Case(2, 14, 14, 256, 512, 1, 2, 0, relu=False), id="1x1s2_projection"),
    pytest.param(Case(2, 14, 14, 128, 128, 3, 1, 1, groups=32), id="grouped32x4"),
    pytest.param(Case(2, 9, 9, 256, 256, 3, 2, 1, groups=64), id="grouped64x4_s2"),
    pytest.param(Case(2, 9, 9, 256, 256, 3, 1, 1, groups=32), id="grouped32x8"),
    pytest.param(Case(1, 7, 7, 512, 512, 3, 1, 1, groups=32), id="grouped32x16"),
    pytest.param(Case(1, 5, 5, 1024, 1024, 3, 2, 1, groups=32), id="grouped32x32_s2"),
    pytest.param(Case(1, 6, 6, 128, 96, 3, 1, 1, groups=2), id="grouped2x64_nonpow2_out"),
]

WEIRD_SHAPES = [
    pytest.param(Case(2, 33, 35, 24, 40, 3, 1, 1), id="2x33x35_c24to40"),
    pytest.param(Case(3, 1, 1, 40, 24, 3, 1, 1), id="1x1image_batch3"),
    pytest.param(Case(3, 7, 9, 48, 24, 1, 1, 0, bias=False, residual=True), id="1x1_batch3_nobias"),
    pytest.param(Case(1, 17, 19, 40, 24, 3, 2, 1, relu=False), id="3x3s2_c40_odd"),
    pytest.param(Case(2, 11, 13, 8, 16, 3, 1, 1), id="3x3_cin8_gather"),
    pytest.param(Case(1, 9, 9, 3, 8, 7, 2, 3, bias=False, relu=False), id="stem_cout8"),
    pytest.param(Case(1, 10, 10, 40, 40, 3, 1, 2, groups=10), id="grouped10x4_pad2"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", LAYER_KINDS + WEIRD_SHAPES)
def test_conv_matches_reference(case, dtype):
    _check(case, dtype)


@pytest.mark.interpreter
@pytest.mark.parametrize("bias", [pytest.param(False, id="nobias"), pytest.param(True, id="bias")])
@pytest.mark.parametrize("residual", [pytest.param(False, id="nores"), pytest.param(True, id="res")])
@pytest.mark.parametrize("relu", [pytest.param(False, id="norelu"), pytest.param(True, id="relu")])
def test_conv_epilogue_switches(bias, residual, relu):
    _check(Case(2, 6, 7, 32, 48, 3, 1, 1, bias=bias, relu=relu, residual=residual), torch.float32)


def _config_cases():
    """One test per shipped config entry, on a layer of the kind the entry is for."""
    params = []
    for (family, width, kind), config in CONV_CONFIGS.items():
        dtype = torch.float32 if width in ("fp32", "any") else torch.float16
        if kind == "gather":
            case = Case(1, 20, 18, 3, 64, 7, 2, 3)
        else:
            case = Case(2, 10, 9, 64, 128, 3, 2, 1, residual=True)
        params.append(pytest.param(case, dtype, config, id=f"{family}-{width}-{kind}-{config}"))
    return params


@pytest.mark.interpreter
@pytest.mark.parametrize("case, dtype, config", _config_cases())
def test_every_shipped_config(case, dtype, config):
    layer, *_ = _build(case, dtype)
    _check(case, dtype, config=layer.clip_config(config))
    if case.k == 3:  # the same config through the GEMM (1x1, stride 1) loop
        gemm = Case(2, 5, 7, 64, 128, 1, 1, 0)
        _check(gemm, dtype, config=_build(gemm, dtype)[0].clip_config(config))


@pytest.mark.interpreter
def test_supergroup_packing_is_block_diagonal():
    layer, *_ = _build(Case(1, 4, 4, 128, 128, 3, 1, 1, groups=32), torch.float32)
    assert (layer.supergroup, layer.kernel_groups, layer.kernel_cg, layer.kernel_ng) == (4, 8, 16, 16)
    # B[k, co] with k = tap*16 + c: channel c of super-group j feeds output co only within its own group.
    b = layer.weight_packed.reshape(9, 16, 128)
    c_group = torch.arange(16) // 4
    co_group = (torch.arange(128) % 16) // 4
    off_diagonal = c_group[:, None] != co_group[None, :]
    assert (b[:, off_diagonal] == 0).all()


@pytest.mark.parametrize(
    "shape, arch, kind",
    [
        pytest.param((1, 224, 224, 3), 90, "gather", id="stem"),
        pytest.param((64, 56, 56, 64), 90, "large", id="b64_56x56"),
        pytest.param((1, 7, 7, 64), 90, "small_m", id="b1_7x7"),
    ],
)
def test_config_kind(shape, arch, kind):
    c_in = shape[3]
    layer = ConvLayer(torch.randn(64, c_in, 3, 3), None, stride=1, padding=1, dtype=torch.float16)
    assert layer.kind(shape) == kind
    config = layer.config_for(shape, arch)
    assert config.num_warps == 4


# ---------------------------------------------------------------------------------------------- split-K

# Interpreter-sized tiles (few programs, few steps); BLOCK_K = 16 gives the tiny layers several K-steps.
_SPLIT_BASE = ConvConfig(32, 32, 16, 4, 1)

SPLIT_CASES = [
    pytest.param(Case(1, 5, 7, 48, 40, 1, 1, 0, residual=True), 3, id="gemm1x1_res"),
    pytest.param(Case(2, 6, 5, 32, 24, 3, 1, 1), 4, id="3x3_chblocked"),
    pytest.param(Case(1, 9, 7, 24, 32, 3, 2, 1, relu=False, residual=True), 5, id="3x3s2_c24_res"),
    pytest.param(Case(1, 8, 6, 48, 32, 1, 2, 0, bias=False), 2, id="1x1s2"),
    pytest.param(Case(1, 7, 6, 64, 64, 3, 1, 1, groups=4), 3, id="grouped4x16"),
    pytest.param(Case(1, 6, 5, 32, 32, 3, 1, 1, groups=8), 9, id="grouped8x4_supergroup"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("fused", [pytest.param(True, id="fused"), pytest.param(False, id="reduce_kernel")])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case, split", SPLIT_CASES)
def test_split_k_matches_reference(case, split, dtype, fused):
    layer, *_ = _build(case, dtype)
    config = layer.clip_config(ConvConfig(32, 32, 16, 4, 1, split_k=split, fused_reduce=fused))
    assert config.split_k == split  # every case has at least `split` K-steps
    _check(case, dtype, config=config)


@pytest.mark.interpreter
def test_split_k_is_deterministic():
    """Two runs give the same bits, and the workspace is reused (allocated once per shape)."""
    case = Case(1, 7, 7, 64, 32, 3, 1, 1, residual=True)
    layer, weight, bias, x, residual = _build(case, torch.float32)
    config = layer.clip_config(ConvConfig(32, 32, 16, 4, 1, split_k=6))
    outs = []
    for _ in range(2):
        out = poison_(torch.empty(layer.output_shape(tuple(x.shape)), dtype=torch.float32, device=DEVICE))
        outs.append(layer.launch(x, residual, out, config=config))
        ((partials, counters),) = layer._workspaces.values()
        assert not counters.any()  # every tile's last program re-armed its arrival counter
        poison_(partials)  # every run rewrites all partials: nothing stale is ever summed
    assert torch.equal(outs[0], outs[1])
    ref = _reference(case, weight, bias, x, residual, torch.float32)
    assert_close(outs[0], ref, LAYER_RTOL[torch.float32], what="split-K")


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
def test_split_k_fused_chunks_and_reduce_kernel_agree_bitwise(dtype, monkeypatch):
    """The fused reduction in one chunk, in chunks of 2 rows, and the separate reduce kernel sum every
    element's partials in the same order: the same bits, close to the float64 reference."""
    case = Case(1, 7, 6, 48, 40, 3, 1, 1, residual=True)
    layer, weight, bias, x, residual = _build(case, dtype, seed=int(torch.randint(1 << 30, ())))
    base = layer.clip_config(ConvConfig(32, 32, 16, 4, 1, split_k=5))
    outs, rows = {}, {}
    for label, config, budget in [
        ("one_chunk", base, REDUCE_VALUES_PER_THREAD),
        ("chunks_of_4_rows", base, 4),
        ("reduce_kernel", replace(base, fused_reduce=False), REDUCE_VALUES_PER_THREAD),
    ]:
        monkeypatch.setattr(splitk, "REDUCE_VALUES_PER_THREAD", budget)
        rows[label] = reduce_rows(32, 32, 5, 4)
        out = poison_(torch.empty(layer.output_shape(tuple(x.shape)), dtype=dtype, device=DEVICE))
        outs[label] = layer.launch(x, residual, out, config=config)
    assert rows["one_chunk"] == 32 and rows["chunks_of_4_rows"] == 4  # one chunk; eight
    assert torch.equal(outs["one_chunk"], outs["chunks_of_4_rows"])
    assert torch.equal(outs["one_chunk"], outs["reduce_kernel"])
    ref = _reference(case, weight, bias, x, residual, dtype)
    assert_close(outs["one_chunk"], ref, LAYER_RTOL[dtype], what="split-K")


@pytest.mark.interpreter
def test_split_k_with_caller_scratch_shared_by_two_layers():
    """Scratch owned by the caller (one pair per CUDA graph) serves layers run one after another, gives
    the same bits as the layer's own workspace, and is re-armed for the next launch."""
    case = Case(1, 7, 7, 64, 32, 3, 1, 1, residual=True)
    layer, weight, bias, x, residual = _build(case, torch.float32)
    config = layer.clip_config(ConvConfig(32, 32, 16, 4, 1, split_k=6))
    own = layer.launch(x, residual, config=config)
    m = 7 * 7
    partials = poison_(torch.empty(6 * m * 32 + 5, dtype=torch.float32, device=DEVICE))
    counters = torch.zeros(64, dtype=torch.int32, device=DEVICE)
    for _ in range(2):  # the second launch finds the counters re-armed by the first
        out = layer.launch(x, residual, config=config, scratch=(partials, counters))
        assert torch.equal(out, own) and not counters.any()
    with pytest.raises(ValueError, match="scratch too small"):
        layer.launch(x, residual, config=config, scratch=(partials[:10], counters))


# ------------------------------------------------------------------------------ K-concatenated shortcut


def _shortcut_case(n, h2, w2, c_mid, c_in2, c_out, stride2, dtype, relu=True, seed=1):
    """A bottleneck's last 1x1 conv (c_mid -> c_out) plus a 1x1 stride-`stride2` projection of the block
    input (c_in2 channels) concatenated along K; returns the layer, inputs and float64 reference."""
    gen = torch.Generator().manual_seed(seed)
    oh, ow = (h2 - 1) // stride2 + 1, (w2 - 1) // stride2 + 1
    w1 = (torch.randn(c_out, c_mid, 1, 1, generator=gen, dtype=torch.float64) / c_mid**0.5).to(DEVICE)
    ws = (torch.randn(c_out, c_in2, 1, 1, generator=gen, dtype=torch.float64) / c_in2**0.5).to(DEVICE)
    b1, b2 = torch.randn(c_out, generator=gen).to(DEVICE), torch.randn(c_out, generator=gen).to(DEVICE)
    layer = ConvLayer(
        w1, b1 + b2, stride=1, padding=0, relu=relu, dtype=dtype, shortcut_weight=ws, shortcut_stride=stride2
    )
    x = torch.randn(n, oh, ow, c_mid, generator=gen).to(DEVICE, dtype)
    x2 = torch.randn(n, h2, w2, c_in2, generator=gen).to(DEVICE, dtype)
    nchw = lambda t: t.double().permute(0, 3, 1, 2)
    ref = F.conv2d(nchw(x), w1.to(dtype).double(), (b1 + b2).float().double())
    ref = ref + F.conv2d(nchw(x2), ws.to(dtype).double(), stride=stride2)
    ref = ref.permute(0, 2, 3, 1)
    return layer, x, x2, (ref.clamp_min(0) if relu else ref)


SHORTCUT_CASES = [
    pytest.param(2, 5, 7, 32, 48, 40, 1, id="s1"),
    pytest.param(1, 9, 7, 24, 40, 32, 2, id="s2_odd"),
    pytest.param(1, 8, 6, 48, 16, 24, 2, id="s2_even_c16"),
]
# With BLOCK_K = 16 these have 5, 5 and 4 K-steps: split 2 puts the main/shortcut boundary inside a slice.


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split", [pytest.param(1, id="nosplit"), pytest.param(2, id="split2_straddles")])
@pytest.mark.parametrize("n, h2, w2, c_mid, c_in2, c_out, stride2", SHORTCUT_CASES)
def test_shortcut_concat_matches_reference(n, h2, w2, c_mid, c_in2, c_out, stride2, split, dtype):
    layer, x, x2, ref = _shortcut_case(n, h2, w2, c_mid, c_in2, c_out, stride2, dtype, relu=split == 1)
    config = layer.clip_config(ConvConfig(32, 32, 16, 4, 1, split_k=split))
    assert config.split_k == split
    out = poison_(torch.empty(ref.shape, dtype=dtype, device=DEVICE))
    assert layer.launch(x, None, out, config=config, shortcut_input=x2) is out
    assert_close(out, ref, LAYER_RTOL[dtype], what=repr(layer))
    if split == 1:  # the rule's config through __call__ as well
        assert_close(layer(x, shortcut_input=x2), ref, LAYER_RTOL[dtype], what=repr(layer))


def test_shortcut_contract_errors():
    w = torch.randn(32, 16, 1, 1)
    sw = torch.randn(32, 24, 1, 1)
    with pytest.raises(ValueError, match="1x1, stride-1"):
        ConvLayer(torch.randn(32, 16, 3, 3), None, stride=1, padding=1, shortcut_weight=sw)
    with pytest.raises(ValueError, match="1x1, stride-1"):
        ConvLayer(w, None, stride=1, padding=0, has_residual=True, shortcut_weight=sw)
    with pytest.raises(ValueError, match="shortcut_weight must have shape"):
        ConvLayer(w, None, stride=1, padding=0, shortcut_weight=torch.randn(16, 24, 1, 1))
    layer = ConvLayer(
        w, None, stride=1, padding=0, dtype=torch.float32, shortcut_weight=sw, shortcut_stride=2
    )
    x = torch.randn(1, 4, 4, 16)
    with pytest.raises(ValueError, match="shortcut_input is required"):
        layer(x)
    with pytest.raises(ValueError, match="does not give the output"):
        layer(x, shortcut_input=torch.randn(1, 9, 8, 24))
    with pytest.raises(ValueError, match="without shortcut_weight"):
        ConvLayer(w, None, stride=1, padding=0, dtype=torch.float32)(x, shortcut_input=x)


# ---------------------------------------------------------------------------------------------- rules


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_split_rule(dtype):
    """Split K where the output tiles cannot fill 132 SMs (batch 1, 7x7), never where they can; the split
    is the cheapest under the cycle model, which charges the reduction its chunks."""
    layer = ConvLayer(torch.randn(512, 512, 3, 3), None, stride=1, padding=1, dtype=dtype)
    small = layer.config_for((1, 7, 7, 512), 90)
    tiles = layer.output_tiles((1, 7, 7, 512), small)
    k_steps = layer.total_k_steps(small.block_k)
    step = k_step_cycles(small, dtype == torch.float32)
    assert 1 < small.split_k <= SPLIT_MAX and tiles * small.split_k <= 132  # one wave
    assert -(-k_steps // small.split_k) >= 4  # every slice keeps >= 4 K-steps
    fp32 = dtype == torch.float32
    cost = {s: split_cycles(tiles, k_steps, 132, s, step, small, fp32) for s in range(1, SPLIT_MAX + 1)}
    assert cost[small.split_k] == min(cost.values())
    if dtype == torch.float16:  # 72 K-steps on 8 tiles: the old rule's 15 slices cost 2 more chunks
        assert small.split_k < 15 and cost[small.split_k] < cost[15]
    assert layer.config_for((64, 56, 56, 512), 90).split_k == 1
    assert layer.config_for((1, 7, 7, 512), 0).split_k == 1  # the interpreter never splits
    assert small.fused_reduce and len(layer.aot_specs((1, 7, 7, 512), 90)) == 1  # no reduce launch
    fallback = layer.aot_specs((1, 7, 7, 512), 90, config=replace(small, fused_reduce=False))
    assert [spec.name.endswith("_splitk_reduce") for spec in fallback] == [False, True]


def test_split_rule_declines_where_the_reduction_costs_more():
    """Few K-steps (a 1x1 over 256 channels: 4 steps) are never split: the handshake costs more."""
    layer = ConvLayer(torch.randn(512, 256, 1, 1), None, stride=2, padding=0, dtype=torch.float16)
    assert layer.config_for((1, 14, 14, 256), 90).split_k == 1


@pytest.mark.parametrize("maxnreg", [None, 128])
@pytest.mark.parametrize("split", [2, 3, 8, 15, 16])
def test_reduce_rows_bound_the_loads_in_flight(split, maxnreg):
    """A chunk holds at most the register budget of partials per thread, at least one per thread."""
    threads = 128
    budget = REDUCE_VALUES_PER_THREAD if maxnreg is None else REDUCE_VALUES_PER_THREAD_CAPPED
    rows = reduce_rows(64, 64, split, 4, maxnreg)
    assert rows & (rows - 1) == 0 and 1 <= rows <= 64
    assert rows * 64 >= threads and split * rows * 64 <= budget * threads
    assert rows == 64 or split * 2 * rows * 64 > budget * threads  # the largest that fits
    assert reduce_chunks(64, 64, split, 4, maxnreg) == 64 // rows


def test_stages_clipped_to_k_steps():
    single = ConvLayer(torch.randn(64, 64, 1, 1), None, stride=1, padding=0, dtype=torch.float16)
    assert single.config_for((256, 56, 56, 64), 90).num_stages == 1  # K = 64: one step of 64
    assert single.config_for((256, 56, 56, 64), 80).num_stages == 2  # two steps of 32
    deep = ConvLayer(torch.randn(256, 256, 3, 3), None, stride=1, padding=1, dtype=torch.float16)
    assert (
        deep.config_for((64, 56, 56, 256), 90).num_stages
        == CONV_CONFIGS[("sm90", "16bit", "large")].num_stages
    )


# ---------------------------------------------------------------------------------------------- errors


def _small_layer(**kw):
    return ConvLayer(
        torch.randn(16, 8, 3, 3, device=DEVICE), None, stride=1, padding=1, dtype=torch.float32, **kw
    )


@pytest.mark.interpreter
def test_rejects_wrong_dtype():
    with pytest.raises(TypeError, match="expected dtype torch.float32"):
        _small_layer()(torch.randn(1, 4, 4, 8, device=DEVICE, dtype=torch.float16))


@pytest.mark.interpreter
def test_rejects_wrong_channels():
    with pytest.raises(ValueError, match=r"expected NHWC shape \(1, 4, 4, 8\)"):
        _small_layer()(torch.randn(1, 4, 4, 9, device=DEVICE))


@pytest.mark.interpreter
def test_rejects_non_contiguous():
    x = torch.randn(1, 8, 4, 4, device=DEVICE).permute(0, 2, 3, 1)
    with pytest.raises(ValueError, match="contiguous"):
        _small_layer()(x)


@pytest.mark.interpreter
def test_requires_residual_iff_declared():
    x = torch.randn(1, 4, 4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="residual tensor is required"):
        _small_layer(has_residual=True)(x)
    with pytest.raises(ValueError, match="has_residual=False"):
        _small_layer()(x, torch.randn(1, 4, 4, 16, device=DEVICE))
    with pytest.raises(ValueError, match="ConvLayer residual"):
        _small_layer(has_residual=True)(x, torch.randn(1, 4, 4, 15, device=DEVICE))


@pytest.mark.interpreter
def test_rejects_bad_out_buffer():
    x = torch.randn(1, 4, 4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="ConvLayer out"):
        _small_layer()(x, out=torch.empty(1, 4, 4, 15, device=DEVICE))


def test_rejects_bad_construction():
    with pytest.raises(TypeError, match="dtype must be one of"):
        ConvLayer(torch.randn(16, 8, 3, 3), None, stride=1, padding=1, dtype=torch.int8)
    with pytest.raises(ValueError, match="not divisible by groups"):
        ConvLayer(torch.randn(15, 8, 3, 3), None, stride=1, padding=1, groups=2)


# ---------------------------------------------------------------------------------------------- GPU only

RESNET50_LAYERS = [
    pytest.param(Case(0, 224, 224, 3, 64, 7, 2, 3), id="stem"),
    pytest.param(Case(0, 56, 56, 64, 64, 3, 1, 1), id="l1_3x3"),
    pytest.param(Case(0, 56, 56, 64, 256, 1, 1, 0, residual=True), id="l1_1x1_expand"),
    pytest.param(Case(0, 56, 56, 256, 128, 1, 1, 0), id="l2_1x1_reduce"),
    pytest.param(Case(0, 56, 56, 128, 128, 3, 2, 1), id="l2_3x3s2"),
    pytest.param(Case(0, 56, 56, 256, 512, 1, 2, 0, relu=False), id="l2_projection"),
    pytest.param(Case(0, 14, 14, 256, 256, 3, 1, 1), id="l3_3x3"),
    pytest.param(Case(0, 7, 7, 512, 2048, 1, 1, 0, residual=True), id="l4_1x1_expand"),
    pytest.param(Case(0, 56, 56, 128, 128, 3, 1, 1, groups=32), id="resnext_l1_grouped"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES + [pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("batch", [1, 8, 64])
@pytest.mark.parametrize("case", RESNET50_LAYERS)
def test_resnet50_layers_gpu(case, batch, dtype):
    _check(Case(**{**case.__dict__, "n": batch}), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("case", LAYER_KINDS + WEIRD_SHAPES)
def test_bf16_gpu(case):
    _check(case, torch.bfloat16)
