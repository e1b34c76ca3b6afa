"""What a tuned plan can run per conv layer: a Triton config, or the cuDNN tactic; and how a layer is named.

A `Tactic` is either a `ConvConfig` for fastres's conv kernel or "cudnn": the same folded conv run by
`torch.nn.functional.conv2d` on channels-last tensors, then the residual add and ReLU (`CudnnConv`).
The Triton backend keeps activations NHWC, and an NHWC buffer viewed as N x C x H x W *is* a
channels-last tensor, so a cuDNN layer reads and writes the plan's own buffers and the two kinds mix
in one plan. Its cost over the fused kernel: the epilogue runs as separate passes and the result is
copied into the plan's buffer (F.conv2d has no out= that keeps the fused epilogue).

A layer is named by its `layer_signature`: the conv's geometry, epilogue, input size and dtype. Layers
with the same signature launch the same kernel on the same shape (ResNet-50's layer3 repeats one
block five times), so they are tuned once and share a choice; the signature, with the batch bucket,
is the persistent cache's key.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backends.torch_backend import tf32_during
from ..graph import ConvOp, avg_pool_2x2
from ..kernels import ConvConfig
from .keys import batch_bucket  # noqa: F401  (re-exported: a tactic is chosen per batch bucket)

CUDNN = "cudnn"
TRITON = "triton"


@dataclass(frozen=True)
class Tactic:
    kind: str  # TRITON or CUDNN
    config: ConvConfig | None = None  # TRITON only

    @property
    def label(self) -> str:
        return CUDNN if self.kind == CUDNN else str(self.config)

    def to_json(self) -> dict:
        return {"kind": self.kind, "config": None if self.config is None else asdict(self.config)}

    @classmethod
    def from_json(cls, data) -> Tactic:
        """The tactic a cache entry describes; ValueError for anything that is not one."""
        if not isinstance(data, dict) or data.get("kind") not in (TRITON, CUDNN):
            raise ValueError(f"not a tactic: {data!r}")
        if data["kind"] == CUDNN:
            return cls(CUDNN)
        config = data.get("config")
        if not isinstance(config, dict):
            raise ValueError(f"triton tactic without a config: {data!r}")
        try:
            parsed = ConvConfig(**config)
        except TypeError as exc:
            raise ValueError(f"bad conv config {config!r}: {exc}") from None
        ints = (parsed.block_m, parsed.block_n, parsed.block_k, parsed.num_warps, parsed.num_stages)
        if not all(isinstance(v, int) and v > 0 for v in (*ints, parsed.split_k)):
            raise ValueError(f"bad conv config {config!r}")
        return cls(TRITON, parsed)


def triton_tactic(config: ConvConfig) -> Tactic:
    return Tactic(TRITON, config)


CUDNN_TACTIC = Tactic(CUDNN)


def layer_signature(op: ConvOp, input_hw: tuple[int, int], dtype: torch.dtype) -> str:
    """The conv's geometry, epilogue, input size and dtype: equal signatures launch the same kernel."""
    c_out, cg_in, r, s = op.weight.shape
    geometry = f"conv{r}x{s}/{op.stride}p{op.padding}"
    if op.dilation != 1:
        geometry += f"d{op.dilation}"
    if op.avg_pool:  # ResNet-D's pooled projection: another computation than the strided 1x1
        geometry += "avg"
    parts = [
        geometry,
        f"{cg_in * op.groups}to{c_out}g{op.groups}",
        f"{input_hw[0]}x{input_hw[1]}",
        str(dtype).replace("torch.", ""),
    ]
    if op.shortcut_input is not None:
        parts.append(f"sc{op.shortcut_weight.shape[1]}s{op.shortcut_stride}" + "avg" * op.shortcut_avg_pool)
    epilogue = [
        name for name, on in (("bias", op.bias is not None), ("res", op.residual), ("relu", op.relu)) if on
    ]
    return "_".join(parts + epilogue)


class CudnnConv:
    """One plan conv run by F.conv2d on NHWC buffers (channels-last views), epilogue as torch ops."""

    def __init__(self, op: ConvOp, device, dtype: torch.dtype, allow_tf32: bool = False):
        cl = torch.channels_last
        self.weight = op.weight.to(device=device, dtype=dtype).contiguous(memory_format=cl)
        self.bias = None if op.bias is None else op.bias.to(device=device, dtype=dtype)
        self.stride, self.padding, self.groups, self.relu = op.stride, op.padding, op.groups, op.relu
        self.dilation = op.dilation
        # ResNet-D's pooled projections: the 2x2 mean, then a stride-1 1x1 conv (as graph.conv_reference).
        self.avg_pool = op.avg_pool
        self.shortcut_weight = None
        if op.shortcut_input is not None:
            self.shortcut_weight = op.shortcut_weight.to(device=device, dtype=dtype).contiguous(
                memory_format=cl
            )
            self.shortcut_stride = op.shortcut_stride
            self.shortcut_avg_pool = op.shortcut_avg_pool
        self.allow_tf32 = allow_tf32

    def __call__(self, x: Tensor, residual: Tensor | None, out: Tensor, shortcut_input: Tensor | None = None):
        """x, residual, shortcut_input, out: NHWC tensors; writes `out` and returns it."""
        nchw = lambda t: t.permute(0, 3, 1, 2)  # the same memory as a channels-last tensor
        with torch.no_grad(), tf32_during(self.allow_tf32):
            x, stride = nchw(x), self.stride
            if self.avg_pool:
                x, stride = avg_pool_2x2(x), 1
            y = F.conv2d(x, self.weight, self.bias, stride, self.padding, self.dilation, self.groups)
            if self.shortcut_weight is not None:
                sc, sc_stride = nchw(shortcut_input), self.shortcut_stride
                if self.shortcut_avg_pool:
                    sc, sc_stride = avg_pool_2x2(sc), 1
                y += F.conv2d(sc, self.shortcut_weight, None, sc_stride)
            if residual is not None:
                y += nchw(residual)
            if self.relu:
                y.relu_()
            nchw(out).copy_(y)
        return out
