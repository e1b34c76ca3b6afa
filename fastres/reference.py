"""Plain PyTorch reference for the ResNet family, state-dict compatible with torchvision and timm.

Module names, parameter shapes, initialisation and forward semantics follow torchvision's
``torchvision.models.resnet`` so that its checkpoints load with ``strict=True`` and give the
same outputs. The ResNet-D members follow timm's ``timm.models.resnet`` layout instead: a deep stem
``conv1 = Sequential(conv 3->32 /2, BN, ReLU, conv 32->32, BN, ReLU, conv 32->64)`` (keys
``conv1.0/1/3/4/6``), and projections ``downsample = Sequential(pool, conv1x1, BN)`` (keys
``downsample.1/2``) whose pool is a 2x2/2 average (ceil_mode, count_include_pad=False) where the
block strides, an identity where it does not. This path is unfused and unfolded on purpose: it is the
yardstick for parity.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import CheckpointError, ConfigError
from .specs import DEEP_STEM_WIDTH, MODEL_SPECS, STAGE_PLANES, STEM_CHANNELS, ResNetSpec, get_spec


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(
        in_ch, out_ch, 3, stride=stride, padding=dilation, groups=groups, bias=False, dilation=dilation
    )


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


def _avg_pool_2x2() -> nn.AvgPool2d:
    """ResNet-D's projection pool: a partial window at an odd edge averages only its in-image pixels."""
    return nn.AvgPool2d(2, stride=2, ceil_mode=True, count_include_pad=False)


def _deep_stem() -> nn.Sequential:
    """timm's "deep" stem; its last conv is followed by the network's bn1 and ReLU, as the 7x7 is."""
    w = DEEP_STEM_WIDTH
    return nn.Sequential(
        _conv3x3(3, w, stride=2), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
        _conv3x3(w, w), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
        _conv3x3(w, STEM_CHANNELS),
    )  # fmt: skip


class BasicBlock(nn.Module):
    """Two 3x3 convs; output relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, grouped), 1x1 expand; stride sits on the 3x3 as in torchvision (V1.5)."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        width_per_group: int = 64,
        dilation: int = 1,
    ):
        super().__init__()
        width = int(planes * (width_per_group / 64.0)) * groups
        self.conv1 = _conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride, groups, dilation)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """The torchvision ResNet skeleton, built from a :class:`ResNetSpec`.

    replace_stride_with_dilation (torchvision's argument; or the spec's own): dilated stages, as
    ResNetSpec.with_dilation takes them.
    """

    def __init__(self, spec: ResNetSpec, num_classes: int = 1000, replace_stride_with_dilation=None):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"num_classes must be a positive int, got {num_classes!r}")
        spec = spec.with_dilation(replace_stride_with_dilation)
        self.spec = spec
        self.inplanes = STEM_CHANNELS
        if spec.deep_stem:
            self.conv1 = _deep_stem()
        else:
            self.conv1 = nn.Conv2d(3, STEM_CHANNELS, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        stages = zip(STAGE_PLANES, spec.layers, spec.stage_geometry())
        for index, (planes, blocks, geometry) in enumerate(stages):
            setattr(self, f"layer{index + 1}", self._make_stage(planes, blocks, *geometry))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(STAGE_PLANES[-1] * spec.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_stage(
        self, planes: int, blocks: int, stride: int, first_dilation: int = 1, dilation: int = 1
    ) -> nn.Sequential:
        spec = self.spec
        out_channels = planes * spec.expansion
        downsample = None
        if (stride != 1 or self.inplanes != out_channels) and spec.avg_down:
            pool = _avg_pool_2x2() if stride != 1 else nn.Identity()
            conv = _conv1x1(self.inplanes, out_channels)
            downsample = nn.Sequential(pool, conv, nn.BatchNorm2d(out_channels))
        elif stride != 1 or self.inplanes != out_channels:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, out_channels, stride), nn.BatchNorm2d(out_channels)
            )
        layers: list[nn.Module] = []
        for i in range(blocks):
            block_stride, block_down = (stride, downsample) if i == 0 else (1, None)
            if spec.block == "basic":  # never dilated (ResNetSpec.with_dilation refuses)
                layers.append(BasicBlock(self.inplanes, planes, block_stride, block_down))
            else:
                layers.append(
                    Bottleneck(
                        self.inplanes,
                        planes,
                        block_stride,
                        block_down,
                        spec.groups,
                        spec.width_per_group,
                        first_dilation if i == 0 else dilation,
                    )  # fmt: skip
                )
            self.inplanes = out_channels
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_resnet(
    spec: ResNetSpec | str,
    num_classes: int = 1000,
    state_dict: dict[str, Tensor] | None = None,
    replace_stride_with_dilation=None,
) -> ResNet:
    """A reference network: torchvision's random initialisation, or the given weights.

    `state_dict` must match exactly, except that BatchNorm's `num_batches_tracked` counters
    (absent from timm checkpoints, unused in eval mode) may be missing. Dilation changes no key.
    """
    if isinstance(spec, str):
        spec = get_spec(spec)
    model = ResNet(spec, num_classes, replace_stride_with_dilation)
    if state_dict is not None:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise CheckpointError(
                f"state dict does not fit {spec.name}: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    return model


def _constructor(name: str):
    def make(*, num_classes: int = 1000, replace_stride_with_dilation=None) -> ResNet:
        spec = MODEL_SPECS[name].with_dilation(replace_stride_with_dilation)
        return build_resnet(spec, num_classes)

    origin = "timm" if MODEL_SPECS[name].deep_stem else "torchvision"
    make.__name__ = make.__qualname__ = name
    make.__doc__ = f"{origin}-compatible {name} ({MODEL_SPECS[name].describe()}), randomly initialised."
    return make


resnet18 = _constructor("resnet18")
resnet34 = _constructor("resnet34")
resnet50 = _constructor("resnet50")
resnet101 = _constructor("resnet101")
resnet152 = _constructor("resnet152")
resnext50_32x4d = _constructor("resnext50_32x4d")
resnext101_32x8d = _constructor("resnext101_32x8d")
resnext101_64x4d = _constructor("resnext101_64x4d")
wide_resnet50_2 = _constructor("wide_resnet50_2")
wide_resnet101_2 = _constructor("wide_resnet101_2")
resnet18d = _constructor("resnet18d")
resnet26d = _constructor("resnet26d")
resnet34d = _constructor("resnet34d")
resnet50d = _constructor("resnet50d")
resnet101d = _constructor("resnet101d")
resnet152d = _constructor("resnet152d")
resnet200d = _constructor("resnet200d")
