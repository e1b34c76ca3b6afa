"""The reference family matches torchvision: names, parameter counts, state-dict layout, forward.

torchvision is not a dependency, so most checks assert facts published by torchvision (parameter
counts from its weight tables, key names and shapes). Where torchvision is importable, the last
tests load our weights into its models with strict=True and compare outputs.
"""

import functools

import pytest
import torch

from fastres import list_models, reference
from fastres.numerics import relative_error
from fastres.reference import build_resnet
from fastres.specs import MODEL_SPECS, ResNetSpec
from fastres.testing import make_calibrated_model, random_images

# torchvision's published "num_params" (1000 classes), from its ResNet weight tables.
TORCHVISION_NUM_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "resnext50_32x4d": 25_028_904,
    "resnext101_32x8d": 88_791_336,
    "resnext101_64x4d": 83_455_272,
    "wide_resnet50_2": 68_883_240,
    "wide_resnet101_2": 126_886_696,
}
# (key, shape) samples per model; layer1.0.conv2 carries the grouping and width.
KEY_SHAPES = {
    "resnet18": {
        "conv1.weight": (64, 3, 7, 7),
        "layer1.1.conv2.weight": (64, 64, 3, 3),
        "layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "layer4.1.bn2.running_var": (512,),
    },
    "resnet34": {"layer3.5.conv2.weight": (256, 256, 3, 3), "layer4.2.bn2.running_mean": (512,)},
    "resnet50": {
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer1.0.downsample.1.running_mean": (256,),
        "layer2.0.conv2.weight": (128, 128, 3, 3),
        "layer4.2.bn3.running_var": (2048,),
    },
    "resnet101": {"layer3.22.conv3.weight": (1024, 256, 1, 1), "layer4.2.bn3.running_var": (2048,)},
    "resnet152": {"layer2.7.conv1.weight": (128, 512, 1, 1), "layer3.35.bn3.weight": (1024,)},
    "resnext50_32x4d": {"layer1.0.conv2.weight": (128, 4, 3, 3), "layer4.0.conv2.weight": (1024, 32, 3, 3)},
    "resnext101_32x8d": {"layer1.0.conv2.weight": (256, 8, 3, 3), "layer4.2.bn3.running_var": (2048,)},
    "resnext101_64x4d": {"layer1.0.conv2.weight": (256, 4, 3, 3), "layer3.22.conv2.weight": (1024, 16, 3, 3)},
    "wide_resnet50_2": {
        "layer1.0.conv2.weight": (128, 128, 3, 3),
        "layer4.0.conv2.weight": (1024, 1024, 3, 3),
    },
    "wide_resnet101_2": {"layer1.0.conv1.weight": (128, 64, 1, 1), "layer4.2.bn3.running_var": (2048,)},
}
NUM_CLASSES = [pytest.param(1000, id="1000cls"), pytest.param(10, id="10cls"), pytest.param(1, id="1cls")]
# Odd sizes down to 1x1 (torchvision's min_size for ResNets is (1, 1)).
ODD_INPUTS = [
    pytest.param((2, 3, 67, 93), id="2x3x67x93"),
    pytest.param((3, 3, 33, 17), id="3x3x33x17"),
    pytest.param((1, 3, 7, 5), id="1x3x7x5"),
    pytest.param((1, 3, 1, 1), id="1x3x1x1"),
]


def meta_model(name: str, num_classes: int = 1000) -> reference.ResNet:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        return getattr(reference, name)(num_classes=num_classes)


@functools.lru_cache(maxsize=1)
def eval_model(name: str) -> reference.ResNet:
    return make_calibrated_model(name, 10, calibration_images=2, image_size=32)


def test_list_models_is_the_torchvision_family_then_timms_resnet_d():
    timm_d = ["resnet18d", "resnet26d", "resnet34d", "resnet50d", "resnet101d", "resnet152d", "resnet200d"]
    assert list_models() == [*TORCHVISION_NUM_PARAMS, *timm_d]


@pytest.mark.parametrize("name", list(TORCHVISION_NUM_PARAMS))
@pytest.mark.parametrize("num_classes", NUM_CLASSES)
def test_parameter_count_matches_torchvision(name, num_classes):
    model = meta_model(name, num_classes)
    features = MODEL_SPECS[name].feature_channels
    # torchvision's counts are for 1000 classes; the head changes by (features + 1) per class.
    expected = TORCHVISION_NUM_PARAMS[name] + (num_classes - 1000) * (features + 1)
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("name", list(TORCHVISION_NUM_PARAMS))
@pytest.mark.parametrize("num_classes", NUM_CLASSES)
def test_state_dict_layout(name, num_classes):
    spec = MODEL_SPECS[name]
    state = meta_model(name, num_classes).state_dict()
    for key, shape in KEY_SHAPES[name].items():
        assert tuple(state[key].shape) == shape, key
    assert tuple(state["fc.weight"].shape) == (num_classes, spec.feature_channels)
    assert tuple(state["fc.bias"].shape) == (num_classes,)
    # Convs: stem + per block (2 or 3) + one downsample per stage, except resnet18/34's layer1.
    per_block = 2 if spec.block == "basic" else 3
    downsamples = 3 if spec.block == "basic" else 4
    convs = 1 + per_block * sum(spec.layers) + downsamples
    # Every conv has one BN (weight, bias, running_mean, running_var, num_batches_tracked).
    assert len(state) == convs + 5 * convs + 2
    assert ("layer1.0.downsample.0.weight" in state) == (spec.block == "bottleneck")
    assert not any(k.endswith(".bias") and "conv" in k for k in state), "torchvision convs have no bias"
    assert state["bn1.num_batches_tracked"].dtype == torch.int64
    assert state["bn1.num_batches_tracked"].shape == ()


@pytest.mark.parametrize("name", list(TORCHVISION_NUM_PARAMS))
def test_constructors_are_named_and_documented(name):
    constructor = getattr(reference, name)
    assert constructor.__name__ == name
    assert MODEL_SPECS[name].describe() in constructor.__doc__
    with torch.device("meta"):
        assert constructor().fc.out_features == 1000


def test_build_resnet_accepts_spec_or_name():
    custom = ResNetSpec("resnet-custom", "basic", (1, 1, 1, 1))
    with torch.device("meta"):
        assert build_resnet("resnet50", 3).fc.out_features == 3
        assert len(build_resnet(custom, 5).layer4) == 1


@pytest.mark.parametrize("num_classes", [0, -1, 2.5, "10"], ids=["zero", "negative", "float", "str"])
def test_invalid_num_classes_is_refused(num_classes):
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        build_resnet("resnet18", num_classes)


@pytest.mark.parametrize("shape", ODD_INPUTS)
@pytest.mark.parametrize("name", list(TORCHVISION_NUM_PARAMS))
def test_odd_input_sizes_run(name, shape):
    model = eval_model(name)
    with torch.no_grad():
        out = model(random_images(shape[0], shape[2], shape[3]))
    assert out.shape == (shape[0], 10)
    assert torch.isfinite(out).all()


def test_custom_spec_runs():
    spec = ResNetSpec("resnet-custom", "bottleneck", (1, 2, 1, 1), groups=2, width_per_group=16)
    model = make_calibrated_model(spec, 7, calibration_images=2, image_size=32)
    with torch.no_grad():
        assert model(random_images(2, 41, 29)).shape == (2, 7)


# --- against torchvision itself, when it is importable -------------------------------------------


@pytest.mark.parametrize("name", list(TORCHVISION_NUM_PARAMS))
@pytest.mark.parametrize("num_classes", NUM_CLASSES)
def test_state_dict_loads_into_torchvision_strictly(name, num_classes):
    torchvision = pytest.importorskip("torchvision", reason="torchvision not installed")
    ours = meta_model(name, num_classes).state_dict()
    with torch.device("meta"):
        theirs = getattr(torchvision.models, name)(num_classes=num_classes).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


@pytest.mark.parametrize("shape", ODD_INPUTS)
@pytest.mark.parametrize("name", list(TORCHVISION_NUM_PARAMS))
def test_same_output_as_torchvision(name, shape):
    torchvision = pytest.importorskip("torchvision", reason="torchvision not installed")
    ours = eval_model(name)
    theirs = getattr(torchvision.models, name)(num_classes=10).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    images = random_images(shape[0], shape[2], shape[3], seed=1)
    with torch.no_grad():
        assert relative_error(ours(images), theirs(images)) <= 1e-6
