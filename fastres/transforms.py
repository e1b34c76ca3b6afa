"""torchvision's evaluation preprocessing for its ResNet weights, in torch ops, without torchvision.

torchvision evaluates each published weight set with `ImageClassification(crop_size, resize_size)`:
resize the short side to `resize` (bilinear, antialiased; the long side follows the aspect ratio,
truncated to an int), take the centre `crop` x `crop` square, scale to [0, 1], normalise by mean/std.
Here the first two steps run on uint8 tensors exactly as torchvision runs them on uint8 tensors
(compute in float32, round, back to uint8) and the result stays uint8: the engine folds /255 and
mean/std into its first convolution, so pass the transform's .mean and .std to fastres.load.

    t = fastres.transforms("IMAGENET1K_V2", model="resnet50")   # resize 232, crop 224
    engine = fastres.load("resnet50", "IMAGENET1K_V2", mean=t.mean, std=t.std)
    predictions = engine.predict(t(fastres.images.decode_image("cat.jpg"))[None])
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import InputError
from .specs import IMAGENET_MEAN, IMAGENET_STD, get_spec

# (resize, crop) of each published weight set, from torchvision 0.29's models/resnet.py: V1 weights use
# ImageClassification's default resize of 256, every V2 recipe (and resnext101_64x4d's only weights) 232.
_V1, _V2 = (256, 224), (232, 224)
PRESETS: dict[str, dict[str, tuple[int, int]]] = {
    "resnet18": {"IMAGENET1K_V1": _V1},
    "resnet34": {"IMAGENET1K_V1": _V1},
    "resnet50": {"IMAGENET1K_V1": _V1, "IMAGENET1K_V2": _V2},
    "resnet101": {"IMAGENET1K_V1": _V1, "IMAGENET1K_V2": _V2},
    "resnet152": {"IMAGENET1K_V1": _V1, "IMAGENET1K_V2": _V2},
    "resnext50_32x4d": {"IMAGENET1K_V1": _V1, "IMAGENET1K_V2": _V2},
    "resnext101_32x8d": {"IMAGENET1K_V1": _V1, "IMAGENET1K_V2": _V2},
    "resnext101_64x4d": {"IMAGENET1K_V1": _V2},
    "wide_resnet50_2": {"IMAGENET1K_V1": _V1, "IMAGENET1K_V2": _V2},
    "wide_resnet101_2": {"IMAGENET1K_V1": _V1, "IMAGENET1K_V2": _V2},
}


# Without a model a name means its usual recipe (only resnext101_64x4d's V1 weights differ: 232)
_GENERIC = {"IMAGENET1K_V1": _V1, "IMAGENET1K_V2": _V2}


def _newest(model: str) -> str:
    return max(PRESETS[model])  # IMAGENET1K_V2 > IMAGENET1K_V1


# ---------------------------------------------------------------------------------------------
# The two geometric steps, as torchvision computes them


def resized_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """torchvision's output size for resizing the short side to `short_side` (long side truncated)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(short_side * long / short)
    return (new_long, short_side) if width <= height else (short_side, new_long)


def resize_short_side(images: torch.Tensor, short_side: int) -> torch.Tensor:
    """uint8 (..., C, H, W) -> uint8 with the short side `short_side`: bilinear, antialiased.

    Interpolates in float32 and rounds back to uint8, as torchvision does for uint8 tensors. Bilinear
    weights are non-negative and sum to 1, so the result stays in [0, 255]; the clamp is only a guard.
    """
    height, width = images.shape[-2:]
    size = resized_size(height, width, short_side)
    if size == (height, width):
        return images
    batch = images.reshape(-1, *images.shape[-3:]).float()
    out = F.interpolate(batch, size=size, mode="bilinear", align_corners=False, antialias=True)
    out = out.round_().clamp_(0, 255).to(torch.uint8)
    return out.reshape(*images.shape[:-2], *size)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """The centre `size` x `size` of (..., H, W), with torchvision's offsets and zero padding.

    The offset is Python's round((H - size) / 2), which rounds halves to even (an odd excess of 3
    starts the crop at 2, of 5 also at 2), exactly as torchvision. An image smaller than the crop is
    padded with zeros first, the extra pixel of an odd padding going to the right/bottom.
    """
    height, width = images.shape[-2:]
    if size > height or size > width:
        pad_w, pad_h = max(size - width, 0), max(size - height, 0)
        images = F.pad(images, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2), value=0)
        height, width = images.shape[-2:]
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return images[..., top : top + size, left : left + size]


# ---------------------------------------------------------------------------------------------
# The transform object


@dataclass(frozen=True)
class ImageTransform:
    """Resize the short side, centre-crop, keep uint8. resize or crop None: that step is skipped."""

    resize: int | None
    crop: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str = "custom"

    def __str__(self) -> str:
        steps = [
            f"resize {self.resize}" if self.resize else "no resize",
            f"crop {self.crop}" if self.crop else "no crop",
        ]
        return f"{', '.join(steps)}, mean {self.mean}, std {self.std} ({self.source})"

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The (H, W) an image of height x width comes out as."""
        if self.resize is not None:
            height, width = resized_size(height, width, self.resize)
        return (self.crop, self.crop) if self.crop is not None else (height, width)

    def __call__(self, image, *, device: str | torch.device | None = None) -> torch.Tensor:
        """uint8 3 x H x W or N x 3 x H x W (also a PIL image, a path or encoded bytes) -> uint8.

        device: move the uint8 input there first, so that the resize runs there (e.g. on the GPU).
        """
        x = _as_uint8_images(image)
        if device is not None:
            x = x.to(device, non_blocking=True)
        if self.resize is not None:
            x = resize_short_side(x, self.resize)
        if self.crop is not None:
            x = center_crop(x, self.crop)
        return x

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 -> float32 (x / 255 - mean) / std: what the engine computes inside its first conv."""
        mean = torch.tensor(self.mean, device=images.device).view(3, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(3, 1, 1)
        return (images.float() / 255 - mean) / std


def _as_uint8_images(image) -> torch.Tensor:
    if not isinstance(image, torch.Tensor):
        from .images import decode_image, pil_to_tensor

        if isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
            return decode_image(image)
        if type(image).__module__.startswith("PIL."):
            return pil_to_tensor(image)
        raise TypeError(
            f"transforms take a uint8 image tensor, a PIL image, a path or encoded bytes; "
            f"got {type(image).__name__}"
        )
    if image.dtype != torch.uint8:
        raise InputError(
            f"transforms take uint8 images (0..255), got {image.dtype}; for floats in [0, 1] pass "
            "(x * 255).round().to(torch.uint8)"
        )
    if image.dim() not in (3, 4) or image.shape[-3] != 3:
        hint = (
            " (channels last? pass x.permute(2, 0, 1) or x.permute(0, 3, 1, 2))"
            if image.shape[-1:] == (3,)
            else ""
        )
        raise InputError(
            f"transforms take 3 x H x W or N x 3 x H x W RGB images, got {tuple(image.shape)}{hint}"
        )
    return image


# ---------------------------------------------------------------------------------------------
# Choosing the preset


def _weights_and_model(weights, model: str | None) -> tuple[str | None, str | None]:
    """Accepts 'IMAGENET1K_V2', 'DEFAULT', 'ResNet50_Weights.IMAGENET1K_V2' or torchvision's enum."""
    if weights is not None and not isinstance(weights, str):
        if type(weights).__name__.endswith("_Weights") and hasattr(weights, "name"):
            weights = f"{type(weights).__name__}.{weights.name}"  # torchvision's enum, by name only
        else:
            raise TypeError(
                f"weights must be a weight name such as 'IMAGENET1K_V2', got {type(weights).__name__}"
            )
    if weights is not None and "." in weights:
        enum_name, weights = weights.rsplit(".", 1)
        named = enum_name.lower().removesuffix("_weights")
        if named not in PRESETS:
            raise InputError(
                f"unknown weights {enum_name}.{weights}; fastres knows the ResNet family's weights"
            )
        if model is not None and model != named:
            raise InputError(f"weights {enum_name}.{weights} belong to {named}, not {model}")
        model = named
    if model is not None:
        get_spec(model)  # UnknownModelError listing the family
    return (None if weights is None else weights.upper()), model


def _positive_or_off(name: str, value) -> int | None:
    if value is False or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive int (or 0 to skip it), got {value!r}")
    return value


def _triple(name: str, value) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in value)
    except TypeError:
        values = ()
    if len(values) != 3:
        raise InputError(f"{name} must be 3 numbers (R, G, B), got {value!r}")
    if name == "std" and not all(v > 0 for v in values):
        raise InputError(f"std must be positive, got {values}")
    return values  # type: ignore[return-value]


def transforms(
    weights: str | None = None,
    *,
    model: str | None = None,
    resize: int | None = None,
    crop: int | None = None,
    mean=None,
    std=None,
) -> ImageTransform:
    """The evaluation preprocessing of torchvision's `weights` for `model`, as a uint8 -> uint8 callable.

    weights: 'IMAGENET1K_V1', 'IMAGENET1K_V2' or 'DEFAULT' (the model's newest, as torchvision), also
        as 'ResNet50_Weights.IMAGENET1K_V2'. None: the model's newest weights, or without a model the
        classic ImageNet evaluation every model has (IMAGENET1K_V1: resize 256, crop 224).
    model: a family name; needed for DEFAULT, and checks that the model has those weights (without
        one, IMAGENET1K_V1 means resize 256, IMAGENET1K_V2 resize 232; resnext101_64x4d's V1 is 232).
    resize, crop, mean, std: override the preset (custom models); resize=0 or crop=0 skips that step.
    The result carries .resize, .crop, .mean, .std; pass mean/std on to fastres.load.
    """
    weights, model = _weights_and_model(weights, model)
    if model is not None and model not in PRESETS:  # timm's ResNet-D: torchvision publishes no weights
        if weights is not None:
            raise InputError(
                f"torchvision publishes no weights for {model}; without weights= this is the classic "
                "ImageNet evaluation (resize 256, crop 224): pass resize= and crop= for another recipe"
            )
        base, source = _V1, f"{model}: IMAGENET1K_V1 recipe"
    elif model is not None:
        name = _newest(model) if weights in (None, "DEFAULT") else weights
        if name not in PRESETS[model]:
            raise InputError(
                f"unknown weights {weights!r} for {model}; torchvision publishes "
                f"{', '.join([*PRESETS[model], 'DEFAULT'])} for it"
            )
        base, source = PRESETS[model][name], f"{model} {name}"
    elif weights is None:
        base, source = _V1, "IMAGENET1K_V1"
    elif weights == "DEFAULT":
        raise InputError("weights='DEFAULT' depends on the model: pass model='resnet50' (for example)")
    elif weights in _GENERIC:
        base, source = _GENERIC[weights], weights
    else:
        raise InputError(f"unknown weights {weights!r}; use IMAGENET1K_V1, IMAGENET1K_V2 or DEFAULT")
    custom = any(v is not None for v in (resize, crop, mean, std))
    return ImageTransform(
        resize=base[0] if resize is None else _positive_or_off("resize", resize),
        crop=base[1] if crop is None else _positive_or_off("crop", crop),
        mean=IMAGENET_MEAN if mean is None else _triple("mean", mean),
        std=IMAGENET_STD if std is None else _triple("std", std),
        source=f"{source}, customised" if custom else source,
    )
