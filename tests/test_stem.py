"""StemLayer (kernels/stem.py) against float64 F.conv2d on an explicitly padded input.

The input is the raw network input: logical NCHW with contiguous, channels-last or sliced strides,
in the compute dtype or uint8. The reference pads explicitly (F.pad), so the border value is tested
as a value, not as F.conv2d's implicit zero padding.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fastres.kernels.stem import STEM_CONFIGS, StemConfig, StemLayer

from fastres.numerics import LAYER_RTOL, assert_close, poison_

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
MEAN = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64)
STD = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64)


def _weights(c_out=64, r=7, s=7, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(c_out, 3, r, s, generator=gen, dtype=torch.float64) / (3 * r * s) ** 0.5
    b = torch.randn(c_out, generator=gen, dtype=torch.float64) if bias else None
    return weight, b


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same logical NCHW values with the storage a caller may hand over."""
    if layout == "nchw":
        return x.contiguous()
    if layout == "nhwc":  # channels-last storage, viewed as NCHW without a copy
        return x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    if layout == "sliced":  # every other column and channel of a wider NHWC buffer: no stride is 1
        n, c, h, w = x.shape
        wide = torch.zeros(n, h, 2 * w, 2 * c, dtype=x.dtype, device=x.device)
        wide[:, :, ::2, ::2] = x.permute(0, 2, 3, 1)
        view = wide[:, :, ::2, ::2].permute(0, 3, 1, 2)
        assert 1 not in view.stride()
        return view
    raise ValueError(layout)


def _reference(x, weight, bias, stride, padding, relu, pad_value=None):
    """float64 conv of the explicitly padded input; pad_value None pads with zeros."""
    x64 = x.to("cpu", torch.float64)
    if pad_value is None:
        padded = F.pad(x64, (padding,) * 4)
    else:
        n, c, h, w = x64.shape
        padded = pad_value.to(torch.float64).view(1, c, 1, 1).expand(n, c, h + 2 * padding, w + 2 * padding)
        padded = padded.clone()
        padded[:, :, padding : padding + h, padding : padding + w] = x64
    b64 = None if bias is None else bias.cpu().double()
    ref = F.conv2d(padded, weight.cpu().double(), b64, stride=stride)
    ref = ref.permute(0, 2, 3, 1)
    return ref.clamp_min(0) if relu else ref


def _run(layer: StemLayer, x: torch.Tensor, config: StemConfig | None = None) -> torch.Tensor:
    out = poison_(torch.empty(layer.output_shape(tuple(x.shape)), dtype=layer.dtype, device=DEVICE))
    result = layer(x, out=out) if config is None else layer.launch(x, out, config=config)
    assert result is out
    return out


SHAPES = [
    pytest.param((1, 1, 1), id="1x1"),
    pytest.param((1, 2, 3), id="2x3"),
    pytest.param((3, 37, 29), id="b3_37x29"),
    pytest.param((2, 16, 18), id="b2_16x18"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "sliced"])
def test_stem_float_input_matches_reference(dtype, shape, layout):
    n, h, w = shape
    weight, bias = _weights(seed=h * w)
    layer = StemLayer(weight.to(DEVICE), bias.to(DEVICE), stride=2, padding=3, relu=True, dtype=dtype)
    x = torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(n + h)).to(DEVICE, dtype)
    out = _run(layer, _layout(x, layout))
    # The kernel multiplies the weights rounded to `dtype` (and the bias in fp32): so does the reference.
    ref = _reference(x, weight.to(dtype), bias.float(), 2, 3, relu=True)
    assert_close(out, ref, LAYER_RTOL[dtype], f"stem {layout} {shape}")


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "bias, relu, geometry",
    [
        pytest.param(False, False, (7, 2, 3), id="no_bias_no_relu"),
        pytest.param(True, False, (7, 2, 3), id="bias_no_relu"),
        pytest.param(False, True, (3, 1, 1), id="3x3_s1_p1"),
        pytest.param(True, True, (5, 3, 0), id="5x5_s3_p0"),
    ],
)
def test_stem_epilogue_and_geometry(dtype, bias, relu, geometry):
    k, stride, padding = geometry
    weight, b = _weights(c_out=24, r=k, s=k, bias=bias, seed=k)
    layer = StemLayer(weight, b, stride=stride, padding=padding, relu=relu, dtype=dtype)
    x = torch.randn(2, 3, 13, 11, generator=torch.Generator().manual_seed(k)).to(DEVICE, dtype)
    out = _run(layer, _layout(x, "nhwc"))
    ref = _reference(x, weight.to(dtype), None if b is None else b.float(), stride, padding, relu)
    assert_close(out, ref, LAYER_RTOL[dtype], f"stem k={k} s={stride} p={padding}")
    if not relu:
        assert (out < 0).any(), "without ReLU some outputs must be negative"


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "config",
    [pytest.param(cfg, id=f"{fam}-{width}") for (fam, width), cfg in STEM_CONFIGS.items()]
    + [pytest.param(StemConfig(32, 32, 2, 4, 1), id="rows2-BM32-BN32")],
)
def test_stem_every_config(dtype, config):
    """Every table entry (the GPU tiles too, run under the interpreter), rows per step 1, 2 and 3."""
    weight, bias = _weights(seed=5)
    layer = StemLayer(weight, bias, dtype=dtype)
    x = torch.randn(2, 3, 23, 21, generator=torch.Generator().manual_seed(6)).to(DEVICE, dtype)
    out = _run(layer, _layout(x, "nchw"), config=StemConfig(*vars(config).values()))
    ref = _reference(x, weight.to(dtype), bias.float(), 2, 3, relu=True)
    assert_close(out, ref, LAYER_RTOL[dtype], f"stem config {config}")


def _fold_normalisation(weight, bias):
    """What the uint8 plan does: (x/255 - mean)/std folded into the weights and bias, pad = 255*mean."""
    scale = 1.0 / (255.0 * STD)
    w_fold = weight * scale.view(1, 3, 1, 1)
    pad_value = 255.0 * MEAN
    b_fold = bias - (w_fold.sum(dim=(2, 3)) * pad_value).sum(dim=1)
    return w_fold, b_fold, pad_value


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [pytest.param((1, 2, 3), id="2x3"), pytest.param((3, 37, 29), id="37x29")])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_stem_uint8_with_pad_value_equals_normalised_input(dtype, shape, layout):
    n, h, w = shape
    weight, bias = _weights(seed=11)
    w_fold, b_fold, pad_value = _fold_normalisation(weight, bias)
    layer = StemLayer(w_fold, b_fold, relu=True, dtype=dtype, pad_value=pad_value)
    gen = torch.Generator().manual_seed(h + w)
    x = torch.randint(0, 256, (n, 3, h, w), generator=gen, dtype=torch.uint8).to(DEVICE)
    out = _run(layer, _layout(x, layout))

    # The model's own math: normalise, zero-pad, conv with the unfolded weights (float64).
    normalised = (x.double().cpu() / 255.0 - MEAN.view(1, 3, 1, 1)) / STD.view(1, 3, 1, 1)
    truth = _reference(normalised, weight, bias, 2, 3, relu=True)
    # What the kernel computes: x - pad_value (fp32, then rounded to dtype) inside, 0 outside, times
    # the weights rounded to dtype, plus the bias with the pad term moved into it.
    centred = (x.cpu().float() - pad_value.float().view(1, 3, 1, 1)).to(dtype)
    b_kernel = (b_fold + (w_fold.sum(dim=(2, 3)) * pad_value).sum(dim=1)).float()
    seen = _reference(centred, w_fold.to(dtype), b_kernel, 2, 3, relu=True)
    assert_close(out, seen, LAYER_RTOL[dtype], f"uint8 stem {layout} {shape} vs its own arithmetic")
    assert_close(out, truth, LAYER_RTOL[dtype], f"uint8 stem {layout} {shape} vs normalised input")

    # The border matters: zero padding of the raw image (what a plain conv would do) is far off.
    zero_padded = _reference(x.double().cpu(), w_fold, b_fold, 2, 3, relu=True)
    gap = (zero_padded - truth).abs().max().item() / truth.abs().max().item()
    assert gap > 100 * LAYER_RTOL[dtype], f"test cannot tell pad values apart (gap {gap:.2e})"


@pytest.mark.interpreter
def test_stem_float_input_with_pad_value():
    weight, bias = _weights(c_out=16, seed=3)
    pad_value = torch.tensor([0.5, -1.25, 2.0])
    layer = StemLayer(weight, bias, relu=False, dtype=torch.float32, pad_value=pad_value)
    x = torch.randn(2, 3, 9, 10, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    out = _run(layer, _layout(x, "sliced"))
    ref = _reference(x, weight.float(), bias.float(), 2, 3, relu=False, pad_value=pad_value)
    assert_close(out, ref, LAYER_RTOL[torch.float32], "float stem with pad_value")


@pytest.mark.interpreter
def test_stem_rejects_bad_input():
    weight, bias = _weights(c_out=16)
    layer = StemLayer(weight, bias, dtype=torch.float32)
    with pytest.raises(ValueError, match="3 input channels|3-channel"):
        StemLayer(torch.randn(16, 4, 7, 7), None, dtype=torch.float32)
    with pytest.raises(ValueError, match="channels in dim 1"):
        layer(torch.randn(1, 8, 8, 3))
    with pytest.raises(TypeError, match="uint8 or torch.float32"):
        layer(torch.randn(1, 3, 8, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="out must be"):
        layer(torch.randn(1, 3, 8, 8), out=torch.empty(1, 3, 4, 4))
    with pytest.raises(ValueError, match="pad_value"):
        StemLayer(weight, bias, dtype=torch.float32, pad_value=torch.zeros(4))


@pytest.mark.interpreter
def test_stem_aot_specs_cover_both_input_dtypes():
    weight, bias = _weights()
    float_layer = StemLayer(weight, bias, dtype=torch.float16)
    uint8_layer = StemLayer(weight, bias, dtype=torch.float16, pad_value=255 * MEAN)
    (spec_f,) = float_layer.aot_specs((1, 3, 224, 224), 90)
    (spec_u,) = uint8_layer.aot_specs((1, 3, 224, 224), 90, input_dtype=torch.uint8)
    assert spec_f.signature_dict()["x_ptr"] == "*fp16" and spec_u.signature_dict()["x_ptr"] == "*u8"
    assert spec_f.constexpr_dict()["HAS_PAD_VALUE"] is False and spec_u.constexpr_dict()["HAS_PAD_VALUE"]
    assert spec_f.name != spec_u.name
    # Strides and sizes are not specialized: one binary serves every layout and image size.
    assert spec_f.signature_dict()["stride_xw"] == "i32" and spec_f.signature_dict()["H"] == "i32"


@pytest.mark.interpreter
def test_stem_packs_weights_at_construction():
    weight, bias = _weights(c_out=16)
    layer = StemLayer(weight.to(DEVICE), bias.to(DEVICE), dtype=torch.float32)
    packed = {rows: w.data_ptr() for rows, w in layer._packed.items()}
    assert packed
    layer(torch.randn(1, 3, 9, 9).to(DEVICE))
    assert {rows: w.data_ptr() for rows, w in layer._packed.items()} == packed
