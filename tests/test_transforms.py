"""fastres.transforms: torchvision's evaluation preprocessing on uint8 tensors, without torchvision.

Hand-computed cases always run; the comparison with torchvision's own transforms runs where
torchvision imports (it needs a torch build it was compiled against).
"""

import pytest
import torch

import fastres
from fastres.checkpoints import _TORCHVISION_WEIGHTS
from fastres.transforms import PRESETS, center_crop, resize_short_side, resized_size


def two_colour(height: int, width: int, left: int, right: int) -> torch.Tensor:
    """3 x H x W uint8: the left half of the columns `left`, the right half `right`."""
    x = torch.full((3, height, width), left, dtype=torch.uint8)
    x[:, :, width // 2 :] = right
    return x


def random_uint8(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, shape, generator=g, dtype=torch.uint8)


# ---------------------------------------------------------------------------------------------
# Hand-computed geometry and values


@pytest.mark.parametrize(
    "height, width, short, expected",
    [
        pytest.param(375, 500, 256, (256, 341), id="landscape-256"),
        pytest.param(500, 375, 256, (341, 256), id="portrait-256"),
        pytest.param(375, 500, 232, (232, 309), id="landscape-232"),
        pytest.param(300, 300, 232, (232, 232), id="square"),
        pytest.param(1, 7, 4, (4, 28), id="one-row-upscaled"),
    ],
)
def test_resized_size_keeps_aspect_and_truncates_the_long_side(height, width, short, expected):
    assert resized_size(height, width, short) == expected


def test_antialiased_downscale_of_two_colours_matches_hand_computation():
    # 4 x 8 -> 2 x 4: each output column averages input columns with PIL-style triangle weights
    # (1, 3, 3, 1) / 8 inside, (3, 3, 1) / 7 at the borders. Columns 0-3 are 10, 4-7 are 201:
    # col 1 = (10 * 7 + 201) / 8 = 33.875 -> 34 (rounded, not truncated); col 2 = (10 + 201 * 7) / 8
    # = 177.125 -> 177.
    out = resize_short_side(two_colour(4, 8, 10, 201), 2)
    expected = torch.tensor([10, 34, 177, 201], dtype=torch.uint8).expand(3, 2, 4)
    assert out.dtype == torch.uint8 and torch.equal(out, expected)


def test_bilinear_upscale_matches_hand_computation():
    # 2 x 2 -> 4 x 4 (align_corners=False): source x = (j + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25,
    # clamped to the edge: 0, 25, 75, 100 for columns 0 and 100
    out = resize_short_side(two_colour(2, 2, 0, 100), 4)
    expected = torch.tensor([0, 25, 75, 100], dtype=torch.uint8).expand(3, 4, 4)
    assert torch.equal(out, expected)


def test_resize_is_the_identity_at_size():
    x = random_uint8(3, 224, 300)
    assert resize_short_side(x, 224) is x
    t = fastres.transforms(resize=224, crop=224)
    assert torch.equal(t(x), x[:, :, 38:262])  # round((300 - 224) / 2) = 38


@pytest.mark.parametrize(
    "size, crop, start",
    [
        pytest.param(8, 4, 2, id="even"),
        pytest.param(7, 4, 2, id="odd-3-rounds-1.5-up"),  # round(1.5) = 2
        pytest.param(9, 4, 2, id="odd-5-rounds-2.5-down"),  # round(2.5) = 2: halves go to even
        pytest.param(5, 4, 0, id="odd-1-rounds-0.5-down"),  # round(0.5) = 0
        pytest.param(4, 4, 0, id="at-size"),
    ],
)
def test_center_crop_offsets(size, crop, start):
    x = torch.arange(3 * size * (size + 2), dtype=torch.int64).reshape(3, size, size + 2).to(torch.uint8)
    left = int(round((size + 2 - crop) / 2))
    assert torch.equal(center_crop(x, crop), x[:, start : start + crop, left : left + crop])


def test_center_crop_pads_small_images_with_zeros():
    x = random_uint8(3, 2, 3)
    out = center_crop(x, 5)
    # height 2 -> 5: 1 row above, 2 below; width 3 -> 5: 1 column each side
    assert out.shape == (3, 5, 5)
    assert torch.equal(out[:, 1:3, 1:4], x)
    mask = torch.ones(5, 5, dtype=torch.bool)
    mask[1:3, 1:4] = False
    assert (out[:, mask] == 0).all()


def test_batch_equals_one_at_a_time():
    x = random_uint8(3, 3, 61, 47, seed=1)
    t = fastres.transforms(resize=40, crop=32)
    batched = t(x)
    assert batched.shape == (3, 3, 32, 32) and batched.dtype == torch.uint8
    for i in range(3):
        assert torch.equal(batched[i], t(x[i]))


def test_channels_last_input_gives_the_same_result():
    x = random_uint8(1, 3, 50, 70, seed=2)
    t = fastres.transforms(resize=40, crop=32)
    assert torch.equal(t(x.contiguous(memory_format=torch.channels_last)), t(x))


def test_transform_accepts_pil_images_paths_and_bytes(tmp_path):
    pil = pytest.importorskip("PIL.Image", reason="Pillow (the images extra) is not installed")
    array = random_uint8(3, 30, 41, seed=3)
    img = pil.fromarray(array.permute(1, 2, 0).numpy())
    img.save(tmp_path / "a.png")
    t = fastres.transforms(resize=20, crop=16)
    expected = t(array)
    assert torch.equal(t(img), expected)
    assert torch.equal(t(tmp_path / "a.png"), expected)
    assert torch.equal(t((tmp_path / "a.png").read_bytes()), expected)


# ---------------------------------------------------------------------------------------------
# Presets and options


def test_presets_cover_exactly_the_weights_fastres_can_load():
    assert {m: set(w) for m, w in PRESETS.items()} == {m: set(w) for m, w in _TORCHVISION_WEIGHTS.items()}
    # timm's ResNet-D models have no torchvision weights, so no preset (see test_resnetd.py)
    assert set(PRESETS) == {name for name in fastres.list_models() if not fastres.get_spec(name).deep_stem}


@pytest.mark.parametrize("model", sorted(PRESETS))
def test_default_is_the_newest_weights(model):
    newest = "IMAGENET1K_V2" if "IMAGENET1K_V2" in PRESETS[model] else "IMAGENET1K_V1"
    t = fastres.transforms(model=model)
    assert t == fastres.transforms("DEFAULT", model=model) == fastres.transforms(newest, model=model)
    assert (t.resize, t.crop) == PRESETS[model][newest]
    assert t.mean == (0.485, 0.456, 0.406) and t.std == (0.229, 0.224, 0.225)


def test_preset_sizes():
    assert (fastres.transforms("IMAGENET1K_V1", model="resnet50").resize, 224) == (256, 224)
    assert fastres.transforms("IMAGENET1K_V2", model="resnet50").resize == 232
    assert fastres.transforms("IMAGENET1K_V1", model="resnext101_64x4d").resize == 232
    assert fastres.transforms().resize == 256 and fastres.transforms().crop == 224
    assert fastres.transforms("imagenet1k_v2").resize == 232
    assert fastres.transforms("ResNet50_Weights.IMAGENET1K_V1") == fastres.transforms(
        "IMAGENET1K_V1", model="resnet50"
    )


def test_custom_options_override_the_preset():
    t = fastres.transforms(model="resnet50", resize=300, crop=256, mean=(0.5, 0.5, 0.5), std=[0.25] * 3)
    assert (t.resize, t.crop, t.mean, t.std) == (300, 256, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    off = fastres.transforms(resize=0, crop=0)
    x = random_uint8(3, 20, 30, seed=4)
    assert off.resize is None and off.crop is None and torch.equal(off(x), x)
    assert fastres.transforms(crop=0)(x).shape == (3, 256, 384)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        pytest.param({"weights": "IMAGENET1K_V2", "model": "resnet18"}, "resnet18", id="no-v2-weights"),
        pytest.param({"weights": "IMAGENET1K_V3"}, "IMAGENET1K_V3", id="unknown-name"),
        pytest.param({"weights": "DEFAULT"}, "model=", id="default-needs-model"),
        pytest.param(
            {"weights": "ResNet50_Weights.IMAGENET1K_V2", "model": "resnet18"}, "resnet50", id="clash"
        ),
        pytest.param({"resize": -3}, "resize", id="negative-resize"),
        pytest.param({"crop": 2.5}, "crop", id="float-crop"),
        pytest.param({"mean": (0.5, 0.5)}, "mean", id="two-means"),
        pytest.param({"std": (0.5, 0.0, 0.5)}, "std", id="zero-std"),
    ],
)
def test_bad_options_are_input_errors(kwargs, match):
    with pytest.raises(fastres.InputError, match=match):
        fastres.transforms(**kwargs)


def test_unknown_model_is_rejected():
    with pytest.raises(fastres.UnknownModelError):
        fastres.transforms(model="resnet51")


@pytest.mark.parametrize(
    "x, match",
    [
        pytest.param(torch.rand(3, 8, 8), "uint8", id="float"),
        pytest.param(torch.zeros(8, 8, 3, dtype=torch.uint8), "permute", id="channels-last"),
        pytest.param(torch.zeros(8, 8, dtype=torch.uint8), "3 x H x W", id="2d"),
    ],
)
def test_bad_images_are_input_errors(x, match):
    with pytest.raises(fastres.InputError, match=match):
        fastres.transforms()(x)


# ---------------------------------------------------------------------------------------------
# Against torchvision itself


@pytest.fixture(scope="module")
def torchvision():
    try:
        import torchvision
        from torchvision.transforms import v2  # noqa: F401
    except Exception as exc:  # a torchvision built for another torch fails with RuntimeError, not ImportError
        pytest.skip(f"torchvision is not importable beside this torch ({type(exc).__name__}: {exc})")
    return torchvision


def _weights_enum(torchvision, model):
    return torchvision.models.get_model_weights(model)


@pytest.mark.parametrize("model", sorted(PRESETS))
def test_presets_match_torchvision(torchvision, model):
    enum = _weights_enum(torchvision, model)
    assert {w.name for w in enum} == set(PRESETS[model])
    for weights in enum:
        preset = weights.transforms()
        ours = fastres.transforms(weights.name, model=model)
        assert (ours.resize, ours.crop) == (preset.resize_size[0], preset.crop_size[0]), weights
        assert ours.mean == tuple(preset.mean) and ours.std == tuple(preset.std)
    assert fastres.transforms(model=model).resize == enum.DEFAULT.transforms().resize_size[0]


SHAPES = [
    pytest.param((3, 375, 500), id="landscape"),
    pytest.param((3, 500, 333), id="portrait-odd"),
    pytest.param((3, 231, 233), id="just-below-232"),
    pytest.param((3, 232, 300), id="at-232"),
    pytest.param((3, 100, 120), id="upscaled"),
    pytest.param((2, 3, 257, 301), id="batch"),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weights", ["IMAGENET1K_V1", "IMAGENET1K_V2"])
def test_uint8_output_within_one_level_of_torchvision_v2(torchvision, shape, weights):
    from torchvision.transforms import v2

    t = fastres.transforms(weights, model="resnet50")
    theirs_tf = v2.Compose([v2.Resize(t.resize, antialias=True), v2.CenterCrop(t.crop)])
    x = random_uint8(*shape, seed=sum(shape))
    ours, theirs = t(x), theirs_tf(x)
    assert ours.dtype == theirs.dtype == torch.uint8 and ours.shape == theirs.shape
    diff = (ours.int() - theirs.int()).abs().max().item()
    assert diff <= 1, f"max difference {diff} levels of 255"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("model", ["resnet50", "resnet18", "resnext101_64x4d"])
def test_normalised_output_within_one_level_of_torchvision_preset(torchvision, shape, model):
    weights = _weights_enum(torchvision, model).DEFAULT
    preset = weights.transforms()
    t = fastres.transforms(model=model)
    x = random_uint8(*shape, seed=sum(shape) + 1)
    theirs = preset(x)  # float32, normalised: what torchvision feeds its model
    ours = t.normalize(t(x))
    assert ours.shape == theirs.shape
    std = torch.tensor(t.std).view(3, 1, 1)
    # compare in [0, 1] pixel units: at most one uint8 level (1/255), plus float rounding
    diff = ((ours - theirs) * std).abs().max().item()
    assert diff <= 1 / 255 + 1e-6, f"max difference {diff * 255:.3f} levels of 255"
