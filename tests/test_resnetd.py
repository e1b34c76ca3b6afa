"""timm's ResNet-D family: key layout and inference, planning, the pooled-shortcut kernel, parity.

ResNet-D (timm's resnet18d ... resnet200d) has a deep 3x3 stem (conv1.0/1/3/4/6) and a 2x2 average
pool (ceil_mode, count_include_pad=False) in front of each strided projection (downsample.1/2). The
pool is averaged while the projection's GEMM loads A, so odd image sizes (where ceil_mode leaves
partial windows) are where these tests look. Judged as the rest of the family: against float64, at
most parity_bound(eager's error in the same dtype) end to end, LAYER_RTOL per kernel.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from e2e import assert_parity, calibrated
from fastres.kernels import ConvLayer
from fastres.kernels.conv import ConvConfig
from test_backbone import assert_features_match

import fastres
from fastres.checkpoints import infer_architecture, resolve_model, validate_state_dict, weight_names
from fastres.errors import ArchitectureMismatchError, CheckpointError, InputError
from fastres.graph import ConvOp, MaxPoolOp, execute, normalize
from fastres.numerics import LAYER_RTOL, assert_close, poison_, relative_error
from fastres.planner import plan_resnet
from fastres.reference import build_resnet
from fastres.specs import MODEL_SPECS, ResNetSpec, get_spec
from fastres.testing import make_calibrated_model, random_images

# (block, layers) of timm's registrations, all with stem_width=32, stem_type="deep", avg_down=True;
# parameter counts (millions, 1000 classes) as timm's model cards round them.
RESNET_D = {
    "resnet18d": ("basic", (2, 2, 2, 2), 11.7),
    "resnet26d": ("bottleneck", (2, 2, 2, 2), 16.0),
    "resnet34d": ("basic", (3, 4, 6, 3), 21.8),
    "resnet50d": ("bottleneck", (3, 4, 6, 3), 25.6),
    "resnet101d": ("bottleneck", (3, 4, 23, 3), 44.6),
    "resnet152d": ("bottleneck", (3, 8, 36, 3), 60.2),
    "resnet200d": ("bottleneck", (3, 24, 36, 3), 64.7),
}
# One block per stage: the same ops as the named models (deep stem, pooled and unpooled projections,
# BasicBlock's standalone pooled conv, Bottleneck's K-concatenated one) at a cost the interpreter affords.
TINY_D = {
    "basic": ResNetSpec("resnet-custom", "basic", (1, 1, 1, 1), deep_stem=True, avg_down=True),
    "bottleneck": ResNetSpec("resnet-custom", "bottleneck", (1, 1, 1, 1), deep_stem=True, avg_down=True),
}
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# 41x53: the pooled projections read 11x14, 6x7 and 3x4 maps, so ceil_mode leaves partial windows in
# the last row (layer2, layer4) and the last column (layer3); the stem convs see 41x53 and 21x27.
ODD = (41, 53)


def meta_state(name_or_spec, num_classes: int = 1000) -> dict:
    with torch.device("meta"):  # names and shapes only
        return build_resnet(name_or_spec, num_classes).state_dict()


def random_pixels(seed: int, batch: int = 2) -> torch.Tensor:
    """Raw uint8 images (batch x 3 x ODD), never constant."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, *ODD), dtype=torch.uint8, generator=generator)


def without_counters(state: dict) -> dict:
    """As timm saves a state dict: its BatchNorms keep no num_batches_tracked."""
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


# --- names, keys, inference --------------------------------------------------------------------


def test_list_models_ends_with_the_resnet_d_family():
    names = fastres.list_models()
    assert names[-len(RESNET_D) :] == list(RESNET_D)
    for name, (block, layers, _) in RESNET_D.items():
        spec = get_spec(name)
        assert (spec.block, spec.layers, spec.deep_stem, spec.avg_down) == (block, layers, True, True)
        assert getattr(fastres.reference, name).__name__ == name
        assert "deep stem, avg-pool downsample" in spec.describe()


@pytest.mark.parametrize("name", list(RESNET_D))
def test_timm_key_layout_and_inference(name):
    block, layers, params_m = RESNET_D[name]
    state = meta_state(name)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    # The deep stem: conv 3->32 /2, BN, ReLU, conv 32->32, BN, ReLU, conv 32->64, then bn1.
    assert shapes["conv1.0.weight"] == (32, 3, 3, 3) and shapes["conv1.1.running_var"] == (32,)
    assert shapes["conv1.3.weight"] == (32, 32, 3, 3) and shapes["conv1.4.weight"] == (32,)
    assert shapes["conv1.6.weight"] == (64, 32, 3, 3) and shapes["bn1.weight"] == (64,)
    assert "conv1.weight" not in state and not any(k.startswith(("conv1.2", "conv1.5")) for k in state)
    # Projections: downsample.0 is the (parameter-free) pool, .1 the 1x1 conv, .2 its BN.
    expansion = 1 if block == "basic" else 4
    assert shapes["layer2.0.downsample.1.weight"] == (128 * expansion, 64 * expansion, 1, 1)
    assert shapes["layer4.0.downsample.2.running_mean"] == (512 * expansion,)
    assert not any(".downsample.0." in k for k in state)
    assert ("layer1.0.downsample.1.weight" in state) == (block == "bottleneck")
    conv_biases = [k for k in state if k.endswith(".bias") and len(shapes[k[: -len("bias")] + "weight"]) == 4]
    assert not conv_biases, "timm's convs have no bias"
    with torch.device("meta"):
        params = sum(p.numel() for p in build_resnet(name).parameters())
    assert round(params / 1e6, 1) == params_m
    timm_style = without_counters(state)
    arch = infer_architecture(timm_style)
    assert arch.spec is MODEL_SPECS[name] and arch.num_classes == 1000
    validate_state_dict(timm_style, arch)


def test_reference_pools_like_timm():
    model = build_resnet("resnet50d")
    assert isinstance(model.layer1[0].downsample[0], torch.nn.Identity)  # layer1 keeps the size: no pool
    pool = model.layer2[0].downsample[0]
    assert isinstance(pool, torch.nn.AvgPool2d)
    assert (pool.kernel_size, pool.stride, pool.ceil_mode, pool.count_include_pad) == (2, 2, True, False)
    assert model.layer2[0].downsample[1].stride == (1, 1) and model.layer2[0].conv2.stride == (2, 2)
    assert build_resnet("resnet18d").layer1[0].downsample is None


@pytest.mark.parametrize("name", ["resnet18d", "resnet50d"])
def test_matches_timms_own_model(name):
    timm = pytest.importorskip("timm", reason="timm is not installed here (optional comparison)")
    ours = make_calibrated_model(name, 10, calibration_images=2, image_size=32)
    theirs = timm.create_model(name, pretrained=False, num_classes=10).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = random_images(2, *ODD, seed=4)
    with torch.inference_mode():
        assert relative_error(ours(x), theirs(x)) < 1e-5


def test_timm_checkpoint_loads_by_name_and_by_path(tmp_path):
    model = calibrated("resnet18d", 10)
    path = tmp_path / "resnet18d_timm.pth"
    torch.save(without_counters(model.state_dict()), path)
    x = random_images(2, 33, 35, seed=7)
    by_name = fastres.load("resnet18d", weights=path, device="cpu", backend="torch")
    by_path = fastres.load(path, device="cpu", backend="torch")
    assert by_name.architecture.spec is by_path.architecture.spec is MODEL_SPECS["resnet18d"]
    assert torch.equal(by_name(x), by_path(x))
    with pytest.raises(ArchitectureMismatchError, match="resnet18d.*resnet18 "):
        resolve_model("resnet18", path)
    with pytest.raises(CheckpointError, match="no weights for resnet50d.*timm"):
        resolve_model("resnet50d", "DEFAULT")
    assert weight_names("resnet50d") == []


def test_transforms_for_a_model_without_torchvision_weights():
    t = fastres.transforms(model="resnet50d")
    assert (t.resize, t.crop) == (256, 224)
    with pytest.raises(InputError, match="no weights for resnet50d"):
        fastres.transforms("DEFAULT", model="resnet50d")


# --- planning ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18d", "resnet50d"])
def test_plan_deep_stem_and_pooled_projections(name):
    spec = get_spec(name)
    plan = plan_resnet(spec, 10, meta_state(name, 10))
    stem = plan.ops[:3]
    assert [op.name for op in stem] == ["conv1.0", "conv1.3", "conv1.6"]
    assert isinstance(plan.ops[3], MaxPoolOp)
    assert [(op.stride, op.padding, op.out_channels) for op in stem] == [(2, 1, 32), (1, 1, 32), (1, 1, 64)]
    assert all(op.relu and op.bias is not None and op.kernel_size == 3 for op in stem)
    # The uint8 stem is the first 3x3 conv with the normalisation folded in, padded with 255 * mean.
    assert plan.uint8_stem.name == "conv1.0" and plan.uint8_stem.pad_value is not None
    convs = [op for op in plan.ops if isinstance(op, ConvOp)]
    if spec.block == "basic":  # the projection stays a conv of its own, pooling as it reads
        pooled = [op.name for op in convs if op.avg_pool]
        assert pooled == [f"layer{i}.0.downsample.1" for i in (2, 3, 4)]
        assert all(op.stride == 2 and op.kernel_size == 1 for op in convs if op.avg_pool)
    else:  # merged into conv3 along K; layer1's projection (stride 1) has no pool
        merged = [op for op in convs if op.shortcut_input is not None]
        assert [op.shortcut_avg_pool for op in merged] == [False, True, True, True]
        assert not any(op.avg_pool for op in convs)
    assert "avg2x2" in plan.describe(1, *ODD)


@pytest.mark.parametrize("block", list(TINY_D))
def test_plan_computes_the_reference_in_float64(block):
    """From float and from uint8 input (the folded 3x3 stem padded with 255 * mean), at odd sizes."""
    model = make_calibrated_model(TINY_D[block], 10, calibration_images=4, image_size=48)
    plan = plan_resnet(TINY_D[block], 10, model.state_dict())
    x = random_images(2, *ODD, seed=11).double()
    pixels = random_pixels(seed=1)
    model64 = copy.deepcopy(model).double()
    with torch.inference_mode():
        assert_close(execute(plan.ops, x), model64(x), 1e-12, what=f"{block} plan in float64")
        expected = model64(normalize(pixels, plan.mean, plan.std))
        got = execute(plan.ops_for(torch.uint8), pixels.double())
        assert_close(got, expected, 1e-12, what=f"{block} uint8 plan in float64")


# --- kernel: the 2x2 mean read while loading A ------------------------------------------------------


def _pooled_case(n, h2, w2, c_in2, c_out, dtype, c_mid=0, seed=3):
    """A pooled 1x1 conv of x2 (h2 x w2, c_in2 channels): on its own (c_mid = 0, a BasicBlock's
    projection) or K-concatenated after a 1x1 conv of x (c_mid channels, a Bottleneck's conv3)."""
    gen = torch.Generator().manual_seed(seed)
    oh, ow = (h2 + 1) // 2, (w2 + 1) // 2
    ws = (torch.randn(c_out, c_in2, 1, 1, generator=gen, dtype=torch.float64) / c_in2**0.5).to(DEVICE)
    bias = torch.randn(c_out, generator=gen).to(DEVICE)
    x2 = torch.randn(n, h2, w2, c_in2, generator=gen).to(DEVICE, dtype)
    nchw = lambda t: t.double().permute(0, 3, 1, 2)
    pooled = F.avg_pool2d(nchw(x2), 2, 2, ceil_mode=True, count_include_pad=False)
    # The kernel rounds the mean to `dtype` once before the MMA, as eager's pooled tensor is.
    ref = F.conv2d(pooled.to(dtype).double(), ws.to(dtype).double(), bias.float().double())
    if not c_mid:
        layer = ConvLayer(ws, bias, stride=2, padding=0, dtype=dtype, avg_pool=True)
        return layer, x2, None, ref.permute(0, 2, 3, 1)
    w1 = (torch.randn(c_out, c_mid, 1, 1, generator=gen, dtype=torch.float64) / c_mid**0.5).to(DEVICE)
    x = torch.randn(n, oh, ow, c_mid, generator=gen).to(DEVICE, dtype)
    ref = (ref + F.conv2d(nchw(x), w1.to(dtype).double())).clamp_min(0)
    layer = ConvLayer(
        w1, bias, stride=1, padding=0, relu=True, dtype=dtype, shortcut_weight=ws, shortcut_stride=2,
        avg_pool=True,
    )  # fmt: skip
    return layer, x, x2, ref.permute(0, 2, 3, 1)


POOLED_CASES = [
    pytest.param(2, 9, 7, 24, 40, 0, id="alone_odd"),
    pytest.param(1, 8, 5, 48, 32, 0, id="alone_even_h_odd_w"),
    pytest.param(1, 1, 1, 32, 24, 0, id="alone_1x1"),
    pytest.param(2, 9, 7, 40, 32, 24, id="concat_odd"),
    pytest.param(1, 6, 11, 16, 40, 48, id="concat_even_h_odd_w"),
    pytest.param(1, 3, 1, 16, 16, 32, id="concat_3x1"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split", [pytest.param(1, id="nosplit"), pytest.param(2, id="split2")])
@pytest.mark.parametrize("n, h2, w2, c_in2, c_out, c_mid", POOLED_CASES)
def test_pooled_projection_matches_float64(n, h2, w2, c_in2, c_out, c_mid, split, dtype):
    layer, x, x2, ref = _pooled_case(n, h2, w2, c_in2, c_out, dtype, c_mid)
    config = layer.clip_config(ConvConfig(32, 32, 16, 4, 1, split_k=split))
    assert config.split_k == split
    out = poison_(torch.empty(ref.shape, dtype=dtype, device=DEVICE))
    assert layer.launch(x, None, out, config=config, shortcut_input=x2) is out
    assert_close(out, ref, LAYER_RTOL[dtype], what=repr(layer))
    assert "avg_pool" in repr(layer)


def test_pooled_conv_contract():
    w = torch.randn(16, 8, 1, 1)
    with pytest.raises(ValueError, match="avg_pool needs a 1x1, stride-2"):
        ConvLayer(w, None, stride=1, padding=0, avg_pool=True)  # nothing strided to pool
    with pytest.raises(ValueError, match="avg_pool needs a 1x1, stride-2"):
        ConvLayer(torch.randn(16, 8, 3, 3), None, stride=2, padding=1, avg_pool=True)
    with pytest.raises(ValueError, match="avg_pool needs a 1x1, stride-2"):
        ConvLayer(w, None, stride=1, padding=0, shortcut_weight=torch.randn(16, 4, 1, 1), avg_pool=True)
    layer = ConvLayer(w, None, stride=2, padding=0, dtype=torch.float16, avg_pool=True)
    (spec,) = layer.aot_specs((1, 9, 7, 8), 90)
    assert spec.constexpr_dict()["AVG_POOL"] is True and "avg2x2" in spec.name


# --- end to end ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18d", pytest.param("resnet50d", marks=pytest.mark.slow)])
def test_torch_backend_matches_reference(name):
    model = calibrated(name, 10)
    engine = fastres.optimize(model, device="cpu", backend="torch")
    assert engine.architecture.spec.name == name
    assert_parity(engine, model, random_images(2, *ODD, seed=5), torch.float32)


def test_torch_backend_uint8_input():
    model = calibrated("resnet18d", 10)
    engine = fastres.optimize(model, device="cpu", backend="torch")
    assert_parity(engine, model, random_pixels(seed=2), torch.float32)


@pytest.mark.slow  # converting to OpenVINO and compiling takes ~30 s on 2 cores
def test_openvino_backend_matches_reference():
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    model = calibrated("resnet18d", 10)
    engine = fastres.optimize(model, device="cpu", backend="openvino", dtype=torch.float32)
    assert_parity(engine, model, random_images(2, *ODD, seed=6), torch.float32)


def test_deep_stem_feature_is_after_bn1_and_relu():
    model = make_calibrated_model(TINY_D["bottleneck"], 10, calibration_images=4, image_size=48)
    names = ("stem", "layer1", "layer2")
    engine = fastres.optimize(model, device="cpu", backend="torch", features=names)
    assert engine.plan.ops[-1].name.startswith("layer2.")  # nothing past the last feature runs
    assert_features_match(engine, model, random_images(2, *ODD, seed=9), torch.float32, names=names)


# Under the interpreter on 2 shared cores even the one-block-per-stage models take 35-60 s each.
@pytest.mark.interpreter
@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", list(TINY_D))
def test_triton_backend_small_resnet_d(block, dtype):
    model = make_calibrated_model(TINY_D[block], 7, calibration_images=4, image_size=48)
    engine = fastres.optimize(model, device=DEVICE, dtype=dtype, backend="triton")
    assert engine.backend_name == "triton"
    # One kernel layer per planned conv: the three pooled projections pool in their own launch.
    layers = engine.backend.layers
    assert list(layers) == [op.name for op in engine.plan.ops[1:] if op.kind in ("conv", "head")]
    assert sum(getattr(layer, "avg_pool", False) for layer in layers.values()) == 3
    assert_parity(engine, model, random_images(1, *ODD, seed=8), dtype, device=DEVICE)


@pytest.mark.interpreter
@pytest.mark.slow
def test_triton_backend_uint8_deep_stem():
    model = make_calibrated_model(TINY_D["basic"], 7, calibration_images=4, image_size=48)
    engine = fastres.optimize(model, device=DEVICE, dtype=torch.float32, backend="triton")
    assert_parity(engine, model, random_pixels(seed=3, batch=1), torch.float32, device=DEVICE)


@pytest.mark.interpreter
@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["resnet18d", "resnet50d"])
def test_triton_backend_matches_reference(name, dtype):
    model = calibrated(name, 10)
    engine = fastres.optimize(model, device=DEVICE, dtype=dtype, backend="triton")
    assert_parity(engine, model, random_images(1, *ODD, seed=3), dtype, device=DEVICE)
