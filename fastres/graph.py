"""The plan's data model: ops over named values, and the eager graph a checkpoint describes.

Every op reads and writes named values (activation tensors). Parameters are plain tensors kept
in float64 on the CPU once folded, so that each backend casts them exactly once to its own dtype.
Shapes are not stored: a plan serves any batch and image size, and `infer_shapes` derives them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .specs import STAGE_PLANES, STEM_CHANNELS, ResNetSpec

INPUT = "input"
LOGITS = "logits"
POOLED = "pooled"  # the globally pooled N x C features (an embedding), when the plan ends before the fc


@dataclass
class Op:
    name: str
    inputs: list[str]
    output: str

    kind = "op"


@dataclass
class ConvOp(Op):
    """A convolution; after planning it carries the folded bias and its fused epilogue.

    With `shortcut_weight` set (a 1x1 projection merged in by the planner), the op is one GEMM
    over two inputs concatenated along K: conv(inputs[0], weight) + conv(inputs[1], shortcut_weight,
    stride=shortcut_stride) + bias, where bias is the sum of both convs' biases. It then has no
    residual: the projection's output is never materialised.

    `avg_pool` (`shortcut_avg_pool` for the merged projection): a 1x1 stride-2 conv that reads the
    average of each 2x2 window instead of its top-left pixel, i.e. ResNet-D's avg_pool2d(2, 2,
    ceil_mode=True, count_include_pad=False) then a 1x1 stride-1 conv. The output size is the same
    ((H + 1) // 2) and the pooled tensor is never materialised.
    """

    weight: Tensor = field(repr=False, default=None)  # (C_out, C_in // groups, R, S)
    bias: Tensor | None = field(repr=False, default=None)
    stride: int = 1
    padding: int = 0
    dilation: int = 1  # spacing of the filter taps (a dilated ResNet's later 3x3s); padding = dilation there
    groups: int = 1
    relu: bool = False
    shortcut_weight: Tensor | None = field(repr=False, default=None)  # (C_out, C_in2, 1, 1)
    shortcut_stride: int = 1
    avg_pool: bool = False
    shortcut_avg_pool: bool = False
    # Per-input-channel border value (float64, shape (C_in,)); None pads with 0. The uint8 stem pads
    # with 255 * mean, the raw value that normalises to 0, so folding the normalisation stays exact.
    pad_value: Tensor | None = field(repr=False, default=None)
    kind = "conv"

    @property
    def residual(self) -> str | None:
        """The value added before the ReLU (second input), when the residual add is fused."""
        return self.inputs[1] if len(self.inputs) > 1 and self.shortcut_weight is None else None

    @property
    def shortcut_input(self) -> str | None:
        """The value the merged projection reads (second input), when a shortcut is K-concatenated."""
        return self.inputs[1] if self.shortcut_weight is not None else None

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def kernel_size(self) -> int:
        return self.weight.shape[-1]


@dataclass
class BatchNormOp(Op):
    weight: Tensor = field(repr=False, default=None)
    bias: Tensor = field(repr=False, default=None)
    running_mean: Tensor = field(repr=False, default=None)
    running_var: Tensor = field(repr=False, default=None)
    eps: float = 1e-5
    kind = "batchnorm"


@dataclass
class ReluOp(Op):
    kind = "relu"


@dataclass
class AddOp(Op):
    """inputs[0] is the block's residual branch F(x), inputs[1] the shortcut."""

    kind = "add"


@dataclass
class MaxPoolOp(Op):
    kernel_size: int = 3
    stride: int = 2
    padding: int = 1
    kind = "maxpool"


@dataclass
class AvgPoolOp(Op):
    kind = "avgpool"


@dataclass
class LinearOp(Op):
    weight: Tensor = field(repr=False, default=None)  # (num_classes, C)
    bias: Tensor | None = field(repr=False, default=None)
    kind = "linear"


@dataclass
class HeadOp(Op):
    """Global average pool + fully connected + bias, producing float32 logits."""

    weight: Tensor = field(repr=False, default=None)
    bias: Tensor | None = field(repr=False, default=None)
    kind = "head"


@dataclass
class GlobalPoolOp(Op):
    """Global average pool to float32 N x C: the plan's last op when it returns embeddings, not logits."""

    kind = "globalpool"


def build_eager_graph(spec: ResNetSpec, state_dict: dict[str, Tensor]) -> list[Op]:
    """The ops eager PyTorch runs for this network, in an order where each value precedes its use.

    A block's projection shortcut is placed right before the add that consumes it, so that once
    the add is fused into the block's last conv the projection is computed just before that conv.
    ResNet-D's pooled projection is one op from the start (a ConvOp with avg_pool): no backend ever
    runs its pool as a pass of its own.
    """
    ops: list[Op] = []

    def conv(
        prefix: str, src: str, stride: int, padding: int, groups: int = 1, dilation: int = 1, avg_pool=False
    ) -> str:
        ops.append(
            ConvOp(
                prefix,
                [src],
                prefix,
                weight=state_dict[f"{prefix}.weight"],
                bias=state_dict.get(f"{prefix}.bias"),
                stride=stride,
                padding=padding,
                dilation=dilation,
                groups=groups,
                avg_pool=avg_pool,
            )
        )
        return prefix

    def batchnorm(prefix: str, src: str) -> str:
        ops.append(
            BatchNormOp(
                prefix,
                [src],
                prefix,
                weight=state_dict[f"{prefix}.weight"],
                bias=state_dict[f"{prefix}.bias"],
                running_mean=state_dict[f"{prefix}.running_mean"],
                running_var=state_dict[f"{prefix}.running_var"],
            )
        )
        return prefix

    def relu(name: str, src: str) -> str:
        ops.append(ReluOp(name, [src], name))
        return name

    if spec.deep_stem:  # timm's Sequential: conv1.0 conv, .1 BN, .2 ReLU, .3 conv, .4 BN, .5 ReLU, .6 conv
        x = relu("conv1.2", batchnorm("conv1.1", conv("conv1.0", INPUT, stride=2, padding=1)))
        x = relu("conv1.5", batchnorm("conv1.4", conv("conv1.3", x, stride=1, padding=1)))
        x = relu("relu", batchnorm("bn1", conv("conv1.6", x, stride=1, padding=1)))
    else:
        x = relu("relu", batchnorm("bn1", conv("conv1", INPUT, stride=2, padding=3)))
    ops.append(MaxPoolOp("maxpool", [x], "maxpool"))
    x = "maxpool"
    in_channels = STEM_CHANNELS
    geometry = spec.stage_geometry()  # (stride, first block's dilation, later blocks' dilation) per stage
    for stage, (planes, blocks) in enumerate(zip(STAGE_PLANES, spec.layers), start=1):
        for index in range(blocks):
            p = f"layer{stage}.{index}"
            stage_stride, first_dilation, later_dilation = geometry[stage - 1]
            stride = stage_stride if index == 0 else 1
            d = first_dilation if index == 0 else later_dilation  # 1 for BasicBlocks (spec.with_dilation)
            out_channels = planes * spec.expansion
            if spec.block == "basic":
                y = relu(f"{p}.relu1", batchnorm(f"{p}.bn1", conv(f"{p}.conv1", x, stride, 1)))
                y = batchnorm(f"{p}.bn2", conv(f"{p}.conv2", y, 1, 1))
            else:
                y = relu(f"{p}.relu1", batchnorm(f"{p}.bn1", conv(f"{p}.conv1", x, 1, 0)))
                y = conv(f"{p}.conv2", y, stride, d, spec.groups, dilation=d)
                y = relu(f"{p}.relu2", batchnorm(f"{p}.bn2", y))
                y = batchnorm(f"{p}.bn3", conv(f"{p}.conv3", y, 1, 0))
            shortcut = x
            if index == 0 and (stride != 1 or in_channels != out_channels) and spec.avg_down:
                pooled = stride != 1  # timm: identity instead of the pool where the block keeps the size
                down = conv(f"{p}.downsample.1", x, stride, 0, avg_pool=pooled)
                shortcut = batchnorm(f"{p}.downsample.2", down)
            elif index == 0 and (stride != 1 or in_channels != out_channels):
                shortcut = batchnorm(f"{p}.downsample.1", conv(f"{p}.downsample.0", x, stride, 0))
            ops.append(AddOp(f"{p}.add", [y, shortcut], f"{p}.add"))
            x = relu(f"{p}.out", f"{p}.add")
            in_channels = out_channels
    ops.append(AvgPoolOp("avgpool", [x], "avgpool"))
    ops.append(
        LinearOp("fc", ["avgpool"], LOGITS, weight=state_dict["fc.weight"], bias=state_dict.get("fc.bias"))
    )
    return ops


def conv_out_size(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def infer_shapes(ops: list[Op], batch: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
    """Shape of every value, NCHW (logits: N x classes, pooled: N x C), for one input size."""
    shapes: dict[str, tuple[int, ...]] = {INPUT: (batch, 3, height, width)}
    for op in ops:
        n, c, h, w = shapes[op.inputs[0]]
        if isinstance(op, ConvOp):
            k = op.kernel_size
            shape = (
                n,
                op.out_channels,
                conv_out_size(h, k, op.stride, op.padding, op.dilation),
                conv_out_size(w, k, op.stride, op.padding, op.dilation),
            )
        elif isinstance(op, MaxPoolOp):
            shape = (
                n,
                c,
                conv_out_size(h, op.kernel_size, op.stride, op.padding),
                conv_out_size(w, op.kernel_size, op.stride, op.padding),
            )
        elif isinstance(op, AvgPoolOp):
            shape = (n, c, 1, 1)
        elif isinstance(op, GlobalPoolOp):
            shape = (n, c)
        elif isinstance(op, (LinearOp, HeadOp)):
            shape = (n, op.weight.shape[0])
        else:  # elementwise
            shape = (n, c, h, w)
        shapes[op.output] = shape
    return shapes


def to_float64(t: Tensor | None) -> Tensor | None:
    if t is None:
        return None
    # Meta tensors (shape-only planning, e.g. for reports) stay on the meta device.
    return t.detach().to("meta" if t.is_meta else "cpu", torch.float64)


def normalize(x: Tensor, mean, std) -> Tensor:
    """uint8 NCHW pixels -> float64 (x / 255 - mean) / std: the yardstick for the folded stem."""
    x = x.double() / 255.0
    # Sequences or tensors already on x's device (no host-to-device copy: CUDA-graph capture safe).
    mean, std = (torch.as_tensor(v, dtype=torch.float64, device=x.device) for v in (mean, std))
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def pad_with_values(x: Tensor, padding: int, pad_value: Tensor) -> Tensor:
    """NCHW `x` padded on every side by `padding` pixels of the per-channel `pad_value` (layout kept)."""
    n, c, h, w = x.shape
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    size = (n, c, h + 2 * padding, w + 2 * padding)
    out = torch.empty(size, dtype=x.dtype, device=x.device, memory_format=layout)
    out.copy_(pad_value.to(x.device, x.dtype).view(1, c, 1, 1).expand(size))
    out[:, :, padding : padding + h, padding : padding + w] = x
    return out


def avg_pool_2x2(x: Tensor) -> Tensor:
    """ResNet-D's projection pool: avg_pool2d(2, 2, ceil_mode=True, count_include_pad=False)."""
    import torch.nn.functional as F

    return F.avg_pool2d(x, 2, 2, ceil_mode=True, count_include_pad=False)


def conv2d_padded(
    x,
    weight,
    bias,
    stride: int,
    padding: int,
    groups: int,
    pad_value=None,
    avg_pool: bool = False,
    dilation: int = 1,
) -> Tensor:
    """F.conv2d, padding with `pad_value` per input channel when given (else zeros); with `avg_pool`
    (a 1x1 stride-2 ConvOp.avg_pool), the 2x2 average pool and then a stride-1 conv."""
    import torch.nn.functional as F

    if avg_pool:
        x, stride = avg_pool_2x2(x), 1
    if pad_value is not None and padding > 0:
        x, padding = pad_with_values(x, padding, pad_value), 0
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def execute(ops: list[Op], x: Tensor, observer=None) -> Tensor:
    """Run any op list (eager or planned) with plain torch ops, parameters cast to x's dtype.

    Slow and simple on purpose: the float64 yardstick for planner passes and per-layer drift.
    """
    import torch.nn.functional as F

    def cast(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(x.device, x.dtype)

    values = {INPUT: x}
    for op in ops:
        a = values[op.inputs[0]]
        if isinstance(op, ConvOp):
            y = conv2d_padded(
                a,
                cast(op.weight),
                cast(op.bias),
                op.stride,
                op.padding,
                op.groups,
                op.pad_value,
                op.avg_pool,
                op.dilation,
            )
            if op.shortcut_input is not None:
                shortcut, weight = values[op.shortcut_input], cast(op.shortcut_weight)
                pool = op.shortcut_avg_pool
                y = y + conv2d_padded(shortcut, weight, None, op.shortcut_stride, 0, 1, None, pool)
            if op.residual is not None:
                y = y + values[op.residual]
            y = y.relu() if op.relu else y
        elif isinstance(op, BatchNormOp):
            y = F.batch_norm(
                a,
                cast(op.running_mean),
                cast(op.running_var),
                cast(op.weight),
                cast(op.bias),
                False,
                0.0,
                op.eps,
            )
        elif isinstance(op, ReluOp):
            y = a.relu()
        elif isinstance(op, AddOp):
            y = a + values[op.inputs[1]]
        elif isinstance(op, MaxPoolOp):
            y = F.max_pool2d(a, op.kernel_size, op.stride, op.padding)
        elif isinstance(op, AvgPoolOp):
            y = a.mean(dim=(2, 3), keepdim=True)
        elif isinstance(op, LinearOp):
            y = F.linear(a.flatten(1), cast(op.weight), cast(op.bias))
        elif isinstance(op, HeadOp):
            y = F.linear(a.mean(dim=(2, 3)), cast(op.weight), cast(op.bias))
        elif isinstance(op, GlobalPoolOp):
            y = a.mean(dim=(2, 3))
        else:
            raise TypeError(f"cannot execute op kind {op.kind!r}")
        values[op.output] = y
        if observer is not None:
            observer(op.name, y)
    return values[ops[-1].output]
