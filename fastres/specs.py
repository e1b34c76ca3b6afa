"""The ResNet family as data: one spec per torchvision model name, no subclasses."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace
from typing import Literal

from .errors import ConfigError, UnknownModelError

BlockKind = Literal["basic", "bottleneck"]

# Output channels of the four stages before expansion ("planes" in torchvision's terms).
STAGE_PLANES = (64, 128, 256, 512)
STEM_CHANNELS = 64
# timm's ResNet-D deep stem: 3x3 convs 3 -> 32 (stride 2) -> 32 -> STEM_CHANNELS, each BN + ReLU.
DEEP_STEM_WIDTH = 32

# The per-channel RGB statistics every torchvision ImageNet checkpoint was trained with: uint8 images
# are normalised as (x / 255 - mean) / std unless a model says otherwise.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_normalization(mean, std) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """mean and std as three finite floats each (std > 0), or a ValueError saying what is wrong."""
    import math

    values = []
    for name, v in (("mean", mean), ("std", std)):
        try:
            t = tuple(float(c) for c in v)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be three numbers (R, G, B), got {v!r}") from None
        if len(t) != 3 or not all(math.isfinite(c) for c in t):
            raise ConfigError(f"{name} must be three finite numbers (R, G, B), got {v!r}")
        values.append(t)
    if min(values[1]) <= 0:
        raise ConfigError(f"std must be positive per channel, got {std!r}")
    return values[0], values[1]


@dataclass(frozen=True)
class ResNetSpec:
    """Everything that distinguishes one family member from another."""

    name: str
    block: BlockKind
    layers: tuple[int, int, int, int]
    groups: int = 1
    width_per_group: int = 64
    # timm's "D" tweaks (Bag of Tricks, arXiv:1812.01187): the deep stem, and a 2x2 average pool
    # (ceil_mode, count_include_pad=False) before each strided projection's 1x1 conv (avg_down).
    deep_stem: bool = False
    avg_down: bool = False

    @property
    def expansion(self) -> int:
        return 1 if self.block == "basic" else 4

    @property
    def feature_channels(self) -> int:
        """Channels entering the head (the fc layer's in_features)."""
        return STAGE_PLANES[-1] * self.expansion

    def block_width(self, planes: int) -> int:
        """Channels of a Bottleneck's 3x3 conv (torchvision: planes * base_width / 64 * groups)."""
        return int(planes * (self.width_per_group / 64.0)) * self.groups

    def describe(self) -> str:
        kind = "BasicBlock" if self.block == "basic" else "Bottleneck"
        extra = ""
        if self.groups != 1 or self.width_per_group != 64:
            extra = f", groups={self.groups}, width_per_group={self.width_per_group}"
        extra += ", deep stem" if self.deep_stem else ""
        extra += ", avg-pool downsample" if self.avg_down else ""
        return f"{kind} {list(self.layers)}{extra}"


MODEL_SPECS: dict[str, ResNetSpec] = {
    s.name: s
    for s in (
        ResNetSpec("resnet18", "basic", (2, 2, 2, 2)),
        ResNetSpec("resnet34", "basic", (3, 4, 6, 3)),
        ResNetSpec("resnet50", "bottleneck", (3, 4, 6, 3)),
        ResNetSpec("resnet101", "bottleneck", (3, 4, 23, 3)),
        ResNetSpec("resnet152", "bottleneck", (3, 8, 36, 3)),
        ResNetSpec("resnext50_32x4d", "bottleneck", (3, 4, 6, 3), groups=32, width_per_group=4),
        ResNetSpec("resnext101_32x8d", "bottleneck", (3, 4, 23, 3), groups=32, width_per_group=8),
        ResNetSpec("resnext101_64x4d", "bottleneck", (3, 4, 23, 3), groups=64, width_per_group=4),
        ResNetSpec("wide_resnet50_2", "bottleneck", (3, 4, 6, 3), width_per_group=128),
        ResNetSpec("wide_resnet101_2", "bottleneck", (3, 4, 23, 3), width_per_group=128),
        # timm's ResNet-D family (torchvision publishes none of these).
        *(
            ResNetSpec(name, block, layers, deep_stem=True, avg_down=True)
            for name, block, layers in (
                ("resnet18d", "basic", (2, 2, 2, 2)),
                ("resnet26d", "bottleneck", (2, 2, 2, 2)),
                ("resnet34d", "basic", (3, 4, 6, 3)),
                ("resnet50d", "bottleneck", (3, 4, 6, 3)),
                ("resnet101d", "bottleneck", (3, 4, 23, 3)),
                ("resnet152d", "bottleneck", (3, 8, 36, 3)),
                ("resnet200d", "bottleneck", (3, 24, 36, 3)),
            )
        ),
    )
}


def list_models() -> list[str]:
    """The names fastres supports: torchvision's ResNets, then timm's ResNet-D family."""
    return list(MODEL_SPECS)


def get_spec(name: str) -> ResNetSpec:
    try:
        return MODEL_SPECS[name]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(name).lower(), MODEL_SPECS, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UnknownModelError(
            f"unknown model {name!r}; {hint}fastres supports: {', '.join(MODEL_SPECS)}"
        ) from None


def find_spec(
    block: BlockKind,
    layers: tuple[int, ...],
    groups: int,
    width_per_group: int,
    deep_stem: bool = False,
    avg_down: bool = False,
) -> ResNetSpec | None:
    """The named family member with exactly this structure, if any."""
    wanted = ResNetSpec("", block, tuple(layers), groups, width_per_group, deep_stem, avg_down)
    return next((s for s in MODEL_SPECS.values() if replace(wanted, name=s.name) == s), None)
