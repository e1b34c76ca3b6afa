"""The plan executed with fastres's Triton kernels on NHWC activations.

Every conv is one fused implicit-GEMM launch (bias, residual, ReLU in the epilogue), then one
max-pool and one head launch. Per input shape the workspace holds one flat buffer per plan
slot, so a forward pass allocates nothing and is safe to capture in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..graph import INPUT, ConvOp, HeadOp, MaxPoolOp, normalize
from ..kernels import ConvLayer, HeadLayer, max_pool2d_nhwc
from .base import Backend, Observer


@dataclass
class TritonWorkspace:
    input: Tensor  # NHWC copy of the network input
    values: dict[str, Tensor]  # the NHWC input and NHWC views into the slot buffers
    logits: Tensor
    buffers: list[Tensor]


class TritonBackend(Backend):
    name = "triton"

    def __init__(self, plan, device, dtype, *, allow_tf32: bool = False):
        super().__init__(plan, device, dtype)
        self.layers: dict[str, ConvLayer | HeadLayer] = {}
        for op in plan.ops:
            if isinstance(op, ConvOp):
                self.layers[op.name] = ConvLayer(
                    op.weight.to(self.device),
                    None if op.bias is None else op.bias.to(self.device),
                    stride=op.stride,
                    padding=op.padding,
                    groups=op.groups,
                    relu=op.relu,
                    has_residual=op.residual is not None,
                    dtype=dtype,
                    allow_tf32=allow_tf32,
                )
            elif isinstance(op, HeadOp):
                self.layers[op.name] = HeadLayer(
                    op.weight.to(self.device),
                    None if op.bias is None else op.bias.to(self.device),
                    dtype=dtype,
                )

    def make_workspace(self, batch: int, height: int, width: int) -> TritonWorkspace:
        shapes = self.plan.shapes(batch, height, width)
        buffers = [
            torch.empty(n, device=self.device, dtype=self.dtype)
            for n in self.plan.slot_numels(batch, height, width)
        ]
        values = {}
        for value, slot in self.plan.slots.items():
            n, c, h, w = shapes[value]
            values[value] = buffers[slot][: n * h * w * c].view(n, h, w, c)
        logits = torch.empty(batch, self.plan.num_classes, device=self.device, dtype=torch.float32)
        nhwc_input = torch.empty(batch, height, width, 3, device=self.device, dtype=self.dtype)
        values[INPUT] = nhwc_input
        return TritonWorkspace(nhwc_input, values, logits, [*buffers, logits, nhwc_input])

    def run(self, x: Tensor, workspace: TritonWorkspace, observer: Observer | None = None) -> Tensor:
        if x.dtype == torch.uint8:  # interim until the stem kernel reads pixels itself
            x = normalize(x, self.plan.mean, self.plan.std).to(self.dtype)
        workspace.input.copy_(x.permute(0, 2, 3, 1))
        values = workspace.values  # includes INPUT -> workspace.input: no per-call dict building
        for op in self.plan.ops:
            src = values[op.inputs[0]]
            if isinstance(op, ConvOp):
                out = self.layers[op.name](
                    src, values[op.residual] if op.residual else None, out=values[op.output]
                )
            elif isinstance(op, MaxPoolOp):
                out = max_pool2d_nhwc(
                    src,
                    kernel_size=op.kernel_size,
                    stride=op.stride,
                    padding=op.padding,
                    out=values[op.output],
                )
            elif isinstance(op, HeadOp):
                out = self.layers[op.name](src, out=workspace.logits)
            else:
                raise TypeError(f"triton backend cannot run op kind {op.kind!r} ({op.name})")
            if observer is not None:
                observer(op.name, out.permute(0, 3, 1, 2) if out.dim() == 4 else out)
        return out

    def kernel_specs(self, batch: int, height: int, width: int, arch: int) -> list:
        """Every (kernel, config) this plan launches for one input size, for ahead-of-time compilation."""
        from ..kernels import max_pool_aot_specs

        shapes = self.plan.shapes(batch, height, width)
        specs = []
        for op in self.plan.ops:
            n, c, h, w = shapes[op.inputs[0]]
            if isinstance(op, (ConvOp, HeadOp)):
                specs += self.layers[op.name].aot_specs((n, h, w, c), arch)
            elif isinstance(op, MaxPoolOp):
                specs += max_pool_aot_specs(
                    (n, h, w, c), self.dtype, arch, op.kernel_size, op.stride, op.padding
                )
        return specs
