"""Dilated ResNets (torchvision's replace_stride_with_dilation, timm's output_stride): DeepLabV3's backbone.

The dilated network is judged as the plain one is: against the reference built with the same flags, run
in float64, fastres's relative error at most parity_bound(eager PyTorch's own error in the same dtype).
The conv kernel's dilated address math is checked layer by layer against float64 F.conv2d.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from e2e import assert_parity
from fastres.kernels.conv import ConvConfig, ConvLayer
from test_backbone import assert_features_match

import fastres
from fastres.backends.openvino_runtime import openvino_available
from fastres.numerics import LAYER_RTOL, assert_close, poison_, relative_error
from fastres.planner import plan_resnet, select_outputs
from fastres.reference import build_resnet
from fastres.specs import ResNetSpec, get_spec
from fastres.testing import make_calibrated_model, random_images

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
STRIDES = [pytest.param(8, id="os8"), pytest.param(16, id="os16")]
# Bottleneck stages of 1, 1, 2 and 2 blocks with narrow 3x3s: a dilated stage's first block (previous
# dilation) and a later one (the new dilation), small enough for Triton's interpreter.
SMALL = ResNetSpec("small_bottleneck", "bottleneck", (1, 1, 2, 2), width_per_group=16)


@functools.cache
def dilated_model(spec: ResNetSpec | str, output_stride: int, num_classes: int = 10):
    """A calibrated reference built dilated (BN statistics from the dilated net itself); do not modify."""
    spec = get_spec(spec) if isinstance(spec, str) else spec
    return make_calibrated_model(spec.with_dilation(output_stride=output_stride), num_classes)


# ------------------------------------------------------------------------------------ planning as torchvision


def test_stage_geometry_follows_torchvision():
    """(stride, first block's dilation, later blocks' dilation) per stage, as torchvision's _make_layer."""
    r50 = get_spec("resnet50")
    assert r50.stage_geometry() == [(1, 1, 1), (2, 1, 1), (2, 1, 1), (2, 1, 1)]
    os16, os8 = r50.with_dilation(output_stride=16), r50.with_dilation(output_stride=8)
    assert os16.stage_geometry() == [(1, 1, 1), (2, 1, 1), (2, 1, 1), (1, 1, 2)]
    assert os8.stage_geometry() == [(1, 1, 1), (2, 1, 1), (1, 1, 2), (1, 2, 4)]
    # A dilation once gained carries on through later strided stages, as torchvision's self.dilation does.
    early = r50.with_dilation((True, False, False))
    assert early.stage_geometry() == [(1, 1, 1), (1, 1, 2), (2, 2, 2), (2, 2, 2)]
    assert early.output_stride == 16 and os8.output_stride == 8 and os16.output_stride == 16
    assert os8 == r50.with_dilation((False, True, True))
    assert r50.with_dilation() is r50 and r50.with_dilation(output_stride=32) == r50


def _shapes(module) -> dict:
    return {k: v.shape for k, v in module.state_dict().items()}


def test_reference_module_is_built_as_torchvision_builds_it():
    model = build_resnet("resnet50", replace_stride_with_dilation=(False, True, True))
    geometry = lambda conv: (conv.stride, conv.padding, conv.dilation)  # noqa: E731
    assert geometry(model.layer2[0].conv2) == ((2, 2), (1, 1), (1, 1))
    assert geometry(model.layer3[0].conv2) == ((1, 1), (1, 1), (1, 1))  # the previous dilation
    assert all(geometry(b.conv2) == ((1, 1), (2, 2), (2, 2)) for b in model.layer3[1:])
    assert geometry(model.layer4[0].conv2) == ((1, 1), (2, 2), (2, 2))
    assert all(geometry(b.conv2) == ((1, 1), (4, 4), (4, 4)) for b in model.layer4[1:])
    assert model.layer3[0].downsample[0].stride == (1, 1) and model.layer4[0].downsample[0].stride == (1, 1)
    assert _shapes(model) == _shapes(build_resnet("resnet50"))
    from fastres.reference import resnet101

    assert resnet101(replace_stride_with_dilation=[False, False, True]).layer4[1].conv2.dilation == (2, 2)


def test_feature_maps_keep_their_resolution():
    """Output stride 8: layer2..layer4 all at 1/8 of the input (45x61 -> 6x8), stride 16: layer4 at 1/16."""
    with torch.device("meta"):  # shapes only
        state = build_resnet("resnet50", 10).state_dict()
    expected = {8: ((6, 8), (6, 8)), 16: ((3, 4), (3, 4)), 32: ((3, 4), (2, 2))}  # layer3, layer4
    for output_stride, ((h3, w3), (h4, w4)) in expected.items():
        plan = plan_resnet(get_spec("resnet50").with_dilation(output_stride=output_stride), 10, state)
        shapes = select_outputs(plan, ("layer2", "layer3", "layer4")).output_shapes(1, 45, 61)
        assert shapes["layer2"] == (1, 512, 6, 8)
        assert shapes["layer3"] == (1, 1024, h3, w3) and shapes["layer4"] == (1, 2048, h4, w4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        pytest.param(dict(output_stride=4), "output_stride must be one of 32, 16, 8", id="os4"),
        pytest.param(dict(output_stride=True), "output_stride must be one of", id="os-bool"),
        pytest.param(dict(output_stride="8"), "output_stride must be one of", id="os-str"),
        pytest.param(dict(output_stride=[8]), "output_stride must be one of", id="os-list"),
        pytest.param(dict(replace_stride_with_dilation=(True, False)), "three bools", id="two-flags"),
        pytest.param(dict(replace_stride_with_dilation=(0, 1, 1)), "three bools", id="ints"),
        pytest.param(dict(replace_stride_with_dilation="FTT"), "three bools", id="string"),
        pytest.param(
            dict(replace_stride_with_dilation=(False, True, True), output_stride=8), "not both", id="both"
        ),
    ],
)
def test_bad_dilation_requests_are_config_errors(kwargs, message):
    state = build_resnet("resnet50", 10).state_dict()
    with pytest.raises(fastres.ConfigError, match=message):
        fastres.load("resnet50", state, device="cpu", backend="torch", **kwargs)


def test_basic_blocks_refuse_dilation_as_torchvision_does():
    with pytest.raises(fastres.ConfigError, match="BasicBlocks.*resnet50, resnet101"):
        fastres.load("resnet18", device="cpu", backend="torch", output_stride=16)
    with pytest.raises(fastres.ConfigError, match="BasicBlocks"):
        build_resnet("resnet34", replace_stride_with_dilation=(False, False, True))
    state = build_resnet("resnet18").state_dict()
    plain = fastres.load("resnet18", state, device="cpu", backend="torch", output_stride=32)
    assert plain.architecture.spec.output_stride == 32


def test_a_live_dilated_module_plans_dilated_and_a_contradiction_is_refused():
    model = dilated_model(SMALL, 8)
    x = random_images(1, 45, 61, seed=40)
    engine = fastres.optimize(model, device="cpu", backend="torch")  # read from the module itself
    assert engine.architecture.spec.replace_stride_with_dilation == (False, True, True)
    assert "output stride 8" in engine.architecture.describe()
    assert_parity(engine, model, x, torch.float32)
    with pytest.raises(fastres.ArchitectureMismatchError, match="layer3.0.conv2 has stride"):
        fastres.optimize(model, device="cpu", backend="torch", output_stride=16)
    resnet50 = dilated_model("resnet50", 16)
    loaded = fastres.load("resnet50", resnet50, device="cpu", backend="torch")  # weights= a module
    assert loaded.architecture.spec.output_stride == 16
    backbone = fastres.load("resnet50", resnet50, device="cpu", backend="torch", features="layer4")
    assert backbone.output_shapes(1, 45, 61)["layer4"] == (1, 2048, 3, 4)
    # The same weights as a state dict carry no dilation: the caller says so.
    plain = fastres.load("resnet50", resnet50.state_dict(), device="cpu", backend="torch")
    assert plain.architecture.spec.output_stride == 32
    assert plain.architecture.spec.variant_name != loaded.architecture.spec.variant_name  # int8 records


# ---------------------------------------------------------------------------- end to end on the CPU backends


@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
)
@pytest.mark.parametrize("output_stride", STRIDES)
@pytest.mark.parametrize("name", ["resnet50", pytest.param("resnet101", marks=pytest.mark.slow)])
def test_torch_backend_matches_the_dilated_reference(name, output_stride, dtype):
    model = dilated_model(name, output_stride)
    flags = model.spec.replace_stride_with_dilation
    engine = fastres.load(
        name, model.state_dict(), device="cpu", dtype=dtype, backend="torch",
        replace_stride_with_dilation=flags,
    )  # fmt: skip
    assert_parity(engine, model, random_images(2, 45, 61, seed=41), dtype)


def test_dilation_changes_the_result():
    """The parity tests can fail: the same weights planned without dilation miss the reference by far."""
    model = dilated_model("resnet50", 8)
    x = random_images(1, 45, 61, seed=42)
    plain = fastres.load("resnet50", model.state_dict(), device="cpu", backend="torch")
    with torch.inference_mode():
        ref = model.double()(x.double())
        model.float()
    assert relative_error(plain(x), ref) > 1e-2


@pytest.mark.parametrize("output_stride", STRIDES)
def test_features_and_embeddings_of_a_dilated_backbone(output_stride):
    model = dilated_model("resnet50", output_stride)
    engine = fastres.optimize(
        model, device="cpu", backend="torch", features=("layer2", "layer3", "layer4", "pool")
    )
    x = random_images(2, 45, 61, seed=43)
    assert_features_match(engine, model, x, torch.float32, names=engine.outputs)


def test_reference_backend_is_the_dilated_module():
    model = dilated_model(SMALL, 16)
    engine = fastres.optimize(model, device="cpu", backend="reference")
    x = random_images(1, 45, 61, seed=44)
    with torch.inference_mode():
        torch.testing.assert_close(engine(x), model(x), rtol=0, atol=0)
    assert engine.reference().layer4[1].conv2.dilation == (2, 2)


@pytest.mark.skipif(not openvino_available(), reason="needs openvino: pip install 'fastres[openvino]'")
def test_openvino_backend_runs_the_dilated_plan():
    """One conversion (about 10 s on 2 cores): the dilated feature maps and the pooled vector."""
    model = dilated_model(SMALL, 8)
    names = ("layer3", "layer4", "pool")
    engine = fastres.optimize(model, device="cpu", dtype="fp32", backend="openvino", features=names)
    assert engine.backend_name == "openvino"
    assert engine.output_shapes(2, 45, 61)["layer4"] == (2, 2048, 6, 8)
    assert_features_match(engine, model, random_images(2, 45, 61, seed=45), torch.float32, names=names)


# ------------------------------------------------------------------------------ the Triton path, interpreted


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "output_stride",
    # Output stride 8 has dilations 1, 2 and 4 and both first-block cases; 16 adds nothing new.
    [pytest.param(8, id="os8"), pytest.param(16, id="os16", marks=pytest.mark.slow)],
)
def test_triton_backend_matches_the_dilated_reference(output_stride, dtype):
    model = dilated_model(SMALL, output_stride)
    engine = fastres.optimize(model, device=DEVICE, dtype=dtype, backend="triton")
    dilations = {layer.dilation for layer in engine.backend.layers.values() if isinstance(layer, ConvLayer)}
    assert dilations == ({1, 2} if output_stride == 16 else {1, 2, 4})
    assert_parity(engine, model, random_images(1, 45, 61, seed=46), dtype, device=DEVICE)


@pytest.mark.interpreter
@pytest.mark.slow
def test_triton_dilated_features():
    model = dilated_model(SMALL, 8)
    engine = fastres.optimize(
        model, device=DEVICE, dtype=torch.float16, backend="triton", features=("layer3", "layer4")
    )
    assert_features_match(
        engine, model, random_images(1, 45, 61, seed=47), torch.float16, names=engine.outputs, device=DEVICE
    )


@pytest.mark.interpreter
@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "name, output_stride",
    [pytest.param("resnet50", 8, id="resnet50-os8"), pytest.param("resnet101", 16, id="resnet101-os16")],
)
def test_triton_full_size_dilated_networks(name, output_stride, dtype):
    if name == "resnet101" and dtype == torch.float32:  # 5 min interpreted; its layers are resnet50's
        pytest.skip("resnet101 runs fp16 only under the interpreter (fp32: resnet50 and the small net)")
    model = dilated_model(name, output_stride)
    engine = fastres.optimize(model, device=DEVICE, dtype=dtype, backend="triton")
    assert_parity(engine, model, random_images(1, 45, 61, seed=48), dtype, device=DEVICE)


# ------------------------------------------------------------------------------------------- the conv kernel


def _dilated_conv(n, h, w, c_in, c_out, stride, dilation, dtype, groups=1, seed=0):
    """(layer, x, float64 reference) for a relu(conv3x3 + bias + residual) with padding = dilation."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(c_out, c_in // groups, 3, 3, generator=gen, dtype=torch.float64)
    weight = (weight / (9 * c_in // groups) ** 0.5).to(DEVICE)
    bias = torch.randn(c_out, generator=gen).to(DEVICE)
    layer = ConvLayer(
        weight, bias, stride=stride, padding=dilation, dilation=dilation, groups=groups, relu=True,
        has_residual=True, dtype=dtype,
    )  # fmt: skip
    x = torch.randn(n, h, w, c_in, generator=gen).to(DEVICE, dtype)
    residual = torch.randn(layer.output_shape(tuple(x.shape)), generator=gen).to(DEVICE, dtype)
    ref = F.conv2d(
        x.double().permute(0, 3, 1, 2), weight.to(dtype).double(), bias.double(), stride, dilation, dilation,
        groups,
    ).permute(0, 2, 3, 1)  # fmt: skip
    return layer, x, residual, (ref + residual.double()).clamp_min(0)


# Odd maps where taps `dilation` pixels apart fall off every border; c_in 8 takes the flattened-K gather loop.
KERNEL_CASES = [
    pytest.param((2, 9, 11, 32, 48, 1, 2), id="chblocked_s1_d2"),
    pytest.param((1, 13, 10, 32, 32, 2, 2), id="chblocked_s2_d2"),
    pytest.param((1, 9, 7, 48, 32, 1, 4), id="chblocked_s1_d4_taps_off_the_map"),
    pytest.param((2, 11, 13, 8, 16, 1, 2), id="gather_s1_d2"),
    pytest.param((1, 12, 9, 8, 24, 2, 3), id="gather_s2_d3"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", KERNEL_CASES)
def test_dilated_conv_kernel(case, dtype):
    n, h, w, c_in, c_out, stride, dilation = case
    layer, x, residual, ref = _dilated_conv(n, h, w, c_in, c_out, stride, dilation, dtype)
    assert bool(layer.gather_cg) == (c_in < 16)
    out = poison_(torch.empty(layer.output_shape(tuple(x.shape)), dtype=dtype, device=DEVICE))
    assert layer(x, residual, out=out) is out
    assert_close(out, ref, LAYER_RTOL[dtype], what=repr(layer))


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "case",
    [
        pytest.param((1, 7, 9, 64, 32, 1, 2, 1), id="s1_d2"),
        pytest.param((1, 9, 9, 32, 32, 2, 2, 2), id="s2_d2_groups2"),
    ],
)
def test_dilated_conv_kernel_split_k(case, dtype):
    *shape, groups = case
    layer, x, residual, ref = _dilated_conv(*shape, dtype, groups=groups)
    for fused in (True, False):
        config = layer.clip_config(ConvConfig(32, 32, 16, 4, 1, split_k=3, fused_reduce=fused))
        assert config.split_k == 3
        out = poison_(torch.empty(layer.output_shape(tuple(x.shape)), dtype=dtype, device=DEVICE))
        layer.launch(x, residual, out, config=config)
        assert_close(out, ref, LAYER_RTOL[dtype], what=f"{layer!r} {config}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [*DTYPES, pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize(
    "case",
    [  # resnet50's dilated 3x3s at 224 px: the rules' own config, split-K included at batch 1
        pytest.param((1, 28, 28, 256, 256, 1, 2), id="os8_layer3_b1"),
        pytest.param((8, 28, 28, 512, 512, 1, 4), id="os8_layer4_b8"),
        pytest.param((1, 14, 14, 512, 512, 1, 2), id="os16_layer4_b1"),
    ],
)
def test_dilated_resnet50_layers_gpu(case, dtype):
    layer, x, residual, ref = _dilated_conv(*case, dtype)
    out = poison_(torch.empty(layer.output_shape(tuple(x.shape)), dtype=dtype, device=DEVICE))
    layer(x, residual, out=out)
    assert_close(out, ref, LAYER_RTOL[dtype], what=repr(layer))


@pytest.mark.gpu
@pytest.mark.parametrize("output_stride", STRIDES)
def test_triton_dilated_resnet50_gpu(output_stride):
    model = dilated_model("resnet50", output_stride)
    engine = fastres.load("resnet50", model, device="cuda", dtype="fp16", backend="triton")
    assert engine.architecture.spec.output_stride == output_stride
    assert_parity(engine, model, random_images(4, 225, 227, seed=50), torch.float16, device="cuda")


def test_config_rules_treat_a_dilated_conv_as_its_plain_twin():
    """Dilation changes no K and no tile: the same config, and split-K where the plain layer gets it."""
    weight = torch.randn(512, 512, 3, 3)
    dilated = ConvLayer(weight, None, stride=1, padding=4, dilation=4, dtype=torch.float16)
    plain = ConvLayer(weight, None, stride=1, padding=1, dtype=torch.float16)
    shape = (1, 28, 28, 512)  # batch 1, resnet50 layer4 at output stride 8
    assert dilated.output_shape(shape) == plain.output_shape(shape) == (1, 28, 28, 512)
    for arch in (90, 80):
        assert dilated.config_for(shape, arch) == plain.config_for(shape, arch)
    assert dilated.config_for((1, 14, 14, 512), 90).split_k > 1
    one_by_one = ConvLayer(torch.randn(64, 32, 1, 1), None, stride=1, padding=0, dilation=2)
    assert one_by_one.dilation == 1  # a 1x1 stays in GEMM mode
    with pytest.raises(ValueError, match="dilation >= 1"):
        ConvLayer(torch.randn(8, 8, 3, 3), None, stride=1, padding=1, dilation=0)


# --------------------------------------------------------------------------------------- compile reports

def test_compile_report_collects_the_dilated_kernels():
    from fastres.tools.compile_report import collect_specs

    specs, _ = collect_specs("resnet50", torch.float16, 1, 64, 64, 90, output_stride=8)
    dilations = sorted({s.constexpr_dict().get("DIL") for s, _ in specs} - {None})
    assert dilations == [1, 2, 4]  # layer3's and layer4's dilated 3x3s have binaries of their own


def test_info_prints_the_dilated_plan(capsys):
    from fastres.cli import main

    assert main(["info", "resnet50", "--output-stride", "8", "--image-size", "65"]) == 0
    out = capsys.readouterr().out
    assert "output stride 8 (layer3+layer4 dilated)" in out
    assert "layer4.1.conv2  conv3x3/1 d4" in out and "1x2048x9x9" in out  # 65 px at stride 8: 9 x 9
    assert main(["info", "resnet18", "--output-stride", "16"]) == 2
    assert "BasicBlocks" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ torchvision


def test_torchvision_dilated_resnet50_keys_and_outputs():
    tv = pytest.importorskip("torchvision", reason="torchvision not installed")
    torch.manual_seed(0)
    theirs = tv.models.resnet50(replace_stride_with_dilation=[False, True, True]).eval()
    ours = build_resnet("resnet50", replace_stride_with_dilation=(False, True, True))
    assert _shapes(ours) == _shapes(theirs)
    mine = dict(ours.named_modules())
    for name, module in theirs.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            assert (module.stride, module.padding, module.dilation) == (
                mine[name].stride, mine[name].padding, mine[name].dilation
            ), name  # fmt: skip
    engine = fastres.optimize(theirs, device="cpu", backend="torch")  # dilation read from the module
    assert engine.architecture.spec.output_stride == 8
    assert_parity(engine, theirs, random_images(1, 45, 61, seed=49), torch.float32)


def test_resnet_d_refuses_dilation_rather_than_plan_timm_s_stride_1_pool():
    with pytest.raises(fastres.ConfigError, match="avg-pool downsamples"):
        fastres.load("resnet50d", device="cpu", backend="torch", output_stride=16)
