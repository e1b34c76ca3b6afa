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
    # torchvision's replace_stride_with_dilation, one flag per stage layer2..layer4: a flagged stage
    # keeps its input's resolution (stride 1) and dilates its 3x3 convs by the stride it gave up.
    replace_stride_with_dilation: tuple[bool, bool, bool] = (False, False, False)

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

    @property
    def output_stride(self) -> int:
        """Input pixels per pixel of layer4's output: 32, halved by each dilated stage."""
        return 32 >> sum(self.replace_stride_with_dilation)

    def stage_geometry(self) -> list[tuple[int, int, int]]:
        """Per stage, (stride, dilation of the first block's 3x3, dilation of the other blocks' 3x3s).

        As torchvision's _make_layer: a dilated stage multiplies the running dilation by the stride it
        replaces, and its first block still uses the dilation before that (its 3x3 sees the previous
        stage's sampling grid); the 3x3 pads by its dilation, so the map size only changes by stride.
        """
        geometry, dilation = [], 1
        for index in range(len(STAGE_PLANES)):
            stride, previous = (1 if index == 0 else 2), dilation
            if index > 0 and self.replace_stride_with_dilation[index - 1]:
                dilation, stride = dilation * stride, 1
            geometry.append((stride, previous, dilation))
        return geometry

    def with_dilation(self, replace_stride_with_dilation=None, output_stride=None) -> ResNetSpec:
        """This spec dilated as torchvision's `replace_stride_with_dilation` (three bools, layer2..layer4)
        or timm's `output_stride` (32, 16: layer4 dilated, 8: layer3 and layer4) ask; neither: unchanged."""
        flags = resolve_dilation(replace_stride_with_dilation, output_stride)
        if flags is None:
            return self
        if any(flags) and self.block == "basic":
            raise ConfigError(
                f"{self.name} has BasicBlocks, which have no dilated form (torchvision raises "
                "NotImplementedError for them too); dilation needs Bottleneck models: resnet50, resnet101, "
                "resnet152, resnext*, wide_resnet*"
            )
        if any(flags) and self.avg_down:
            # timm pools a dilated stage's shortcut with a 2x2 stride-1 window, which no kernel reads yet.
            raise ConfigError(
                f"{self.name} has avg-pool downsamples (ResNet-D), which fastres does not dilate yet; "
                "dilate a torchvision-layout Bottleneck model (resnet50, resnet101, ...) instead"
            )
        return replace(self, replace_stride_with_dilation=flags)

    def describe(self) -> str:
        kind = "BasicBlock" if self.block == "basic" else "Bottleneck"
        extra = ""
        if self.groups != 1 or self.width_per_group != 64:
            extra = f", groups={self.groups}, width_per_group={self.width_per_group}"
        if self.dilated_stages:
            extra += f", output stride {self.output_stride} ({'+'.join(self.dilated_stages)} dilated)"
        extra += ", deep stem" if self.deep_stem else ""
        extra += ", avg-pool downsample" if self.avg_down else ""
        return f"{kind} {list(self.layers)}{extra}"

    @property
    def dilated_stages(self) -> list[str]:
        return [f"layer{i + 2}" for i, flag in enumerate(self.replace_stride_with_dilation) if flag]

    @property
    def variant_name(self) -> str:
        """The name, plus the dilated stages when there are any: what a saved calibration is made for."""
        return self.name + (f"+dilated-{'+'.join(self.dilated_stages)}" if self.dilated_stages else "")


# timm's output_stride -> torchvision's replace_stride_with_dilation.
OUTPUT_STRIDES = {32: (False, False, False), 16: (False, False, True), 8: (False, True, True)}


def resolve_dilation(replace_stride_with_dilation=None, output_stride=None) -> tuple[bool, bool, bool] | None:
    """The three dilation flags either spelling asks for (None when neither is given), or a ConfigError
    saying what is allowed."""
    if replace_stride_with_dilation is not None and output_stride is not None:
        raise ConfigError(
            "pass replace_stride_with_dilation= (torchvision) or output_stride= (timm), not both"
        )
    if output_stride is not None:
        if type(output_stride) is not int or output_stride not in OUTPUT_STRIDES:  # bool is no stride
            raise ConfigError(
                f"output_stride must be one of {', '.join(map(str, OUTPUT_STRIDES))}, got {output_stride!r}"
            )
        return OUTPUT_STRIDES[output_stride]
    if replace_stride_with_dilation is None:
        return None
    flags = replace_stride_with_dilation
    if (
        isinstance(flags, (str, bytes))
        or not hasattr(flags, "__len__")
        or len(flags) != 3
        or not all(isinstance(f, bool) for f in flags)
    ):
        raise ConfigError(
            "replace_stride_with_dilation must be three bools (layer2, layer3, layer4), e.g. "
            f"(False, True, True) for output stride 8; got {replace_stride_with_dilation!r}"
        )
    return tuple(flags)


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
