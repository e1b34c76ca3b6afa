"""The plan executed with torch ops: the CPU fallback, and a second opinion for the Triton path.

Activations are channels-last. On the CPU in float32 each conv and its whole epilogue (bias,
residual add, ReLU) is one oneDNN call with post-ops, the fusion Inductor's CPU path uses; where
that private op is missing or refuses, the epilogue runs in place after a plain conv.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..graph import INPUT, LOGITS, ConvOp, GlobalPoolOp, HeadOp, MaxPoolOp, avg_pool_2x2, pad_with_values
from .base import Backend, Observer


def _onednn_fusion_works() -> bool:
    """Probe the private oneDNN conv+post-op entry points once on a tiny problem."""
    try:
        op = torch.ops.mkldnn._convolution_pointwise
        x = torch.randn(1, 4, 5, 5).to(memory_format=torch.channels_last)
        w, b = torch.randn(8, 4, 3, 3), torch.randn(8)
        other = torch.randn(1, 8, 5, 5).to(memory_format=torch.channels_last)
        expect = F.conv2d(x, w, b, 1, 1)
        unary = op(x, w, b, [1, 1], [1, 1], [1, 1], 1, "relu", [None], "")
        binary = op.binary(x, other, w, b, [1, 1], [1, 1], [1, 1], 1, "add", 1.0, "relu", [], "")
        return bool(
            torch.allclose(unary, expect.relu(), atol=1e-5)
            and torch.allclose(binary, (expect + other).relu(), atol=1e-5)
        )
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


_ONEDNN_FUSION: bool | None = None


@contextmanager
def tf32_during(allowed: bool):
    """TF32 for cuDNN convs and cuBLAS matmuls during one call only (PyTorch's switches are global)."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = saved


# Channels-last everywhere: cuDNN's tensor-core convs and oneDNN's nhwc kernels avoid the
# per-layer reorders that NCHW costs. On the CPU, oneDNN's channels-last fp32 convs round a bit
# more than its NCHW path (measured: 1.5x the error on resnet34 logits, the same for eager
# channels-last); fastres is held to eager's error in the same layout.


class TorchBackend(Backend):
    name = "torch"
    runs_cut_plans = True

    def __init__(
        self,
        plan,
        device,
        dtype,
        *,
        memory_format: torch.memory_format = torch.channels_last,
        allow_tf32: bool = False,
    ):
        super().__init__(plan, device, dtype)
        self.memory_format = memory_format
        self.allow_tf32 = allow_tf32
        global _ONEDNN_FUSION
        use_onednn = (
            self.device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
        )
        if use_onednn and _ONEDNN_FUSION is None:
            _ONEDNN_FUSION = _onednn_fusion_works()
        self.onednn = bool(use_onednn and _ONEDNN_FUSION)
        # Packed once: folded float64 weights cast straight to the compute dtype.
        self.params: dict[str, tuple[Tensor, Tensor | None]] = {}
        self.shortcut_weights: dict[str, Tensor] = {}
        for op in plan.ops:
            if isinstance(op, (ConvOp, HeadOp)):
                self.params[op.name] = self._pack(op)
            if isinstance(op, ConvOp) and op.shortcut_input is not None:
                weight = op.shortcut_weight.to(device=self.device, dtype=dtype)
                self.shortcut_weights[op.name] = weight.contiguous(memory_format=self.memory_format)
        # (value name, the tensor) -> the 2x2 mean a pooled conv reads, instead of avg_pool_2x2:
        # quantize.simulate_int8 averages 8-bit codes and rounds the mean, as the quantized kernel does.
        self.avg_pool: Callable[[str, Tensor], Tensor] | None = None
        # uint8 pixels: the stem with the normalisation folded in, padded with 255 * mean (exact).
        # Its pad value moves to the device once: a per-call host-to-device copy is not allowed while a
        # CUDA graph is being captured.
        self.uint8_stem = plan.uint8_stem
        if self.uint8_stem is not None:
            pad_value = self.uint8_stem.pad_value.to(device=self.device, dtype=dtype)
            self.uint8_stem = dataclasses.replace(self.uint8_stem, pad_value=pad_value)
        self.uint8_stem_params = self._pack(plan.uint8_stem) if plan.uint8_stem is not None else None
        self.dead_after = self._dead_after(plan)

    @staticmethod
    def _dead_after(plan) -> list[list[str]]:
        """Per op, the activations to drop after it (their last reader), as eager execution would;
        requested outputs are kept to the end."""
        dead_after: list[list[str]] = [[] for _ in plan.ops]
        last_reader = {v: i for i, op in enumerate(plan.ops) for v in op.inputs}
        for value, index in last_reader.items():
            if value not in (plan.outputs or {}).values():
                dead_after[index].append(value)
        return dead_after

    def for_plan(self, plan) -> TorchBackend:
        backend = super().for_plan(plan)
        backend.dead_after = self._dead_after(plan)
        return backend

    def _pack(self, op: ConvOp | HeadOp) -> tuple[Tensor, Tensor | None]:
        weight = op.weight.to(device=self.device, dtype=self.dtype)
        if isinstance(op, ConvOp):
            weight = weight.contiguous(memory_format=self.memory_format)
        bias = None if op.bias is None else op.bias.to(device=self.device, dtype=self.dtype)
        return weight, bias

    def _conv(self, op: ConvOp, x: Tensor, residual: Tensor | None, params=None) -> Tensor:
        weight, bias = params or self.params[op.name]
        op_stride = op.stride
        if op.avg_pool:  # ResNet-D's pooled projection: the pool, then a stride-1 1x1 conv
            x, op_stride = self._pooled(op.inputs[0], x), 1
        if op.pad_value is not None and op.padding:
            x = pad_with_values(x, op.padding, op.pad_value)
            op_padding = 0
        else:
            op_padding = op.padding
        stride, padding, dilation = [op_stride] * 2, [op_padding] * 2, [op.dilation] * 2
        if self.onednn:
            relu = "relu" if op.relu else "none"
            if residual is None:
                return torch.ops.mkldnn._convolution_pointwise(
                    x, weight, bias, padding, stride, dilation, op.groups, relu, [None], ""
                )
            return torch.ops.mkldnn._convolution_pointwise.binary(
                x,
                residual,
                weight,
                bias,
                padding,
                stride,
                dilation,
                op.groups,
                "add",
                1.0,
                relu if op.relu else None,
                [],
                "",
            )
        y = F.conv2d(x, weight, bias, stride, padding, dilation, op.groups)
        if residual is not None:
            y.add_(residual)
        return y.relu_() if op.relu else y

    def _pooled(self, value: str, x: Tensor) -> Tensor:
        return avg_pool_2x2(x) if self.avg_pool is None else self.avg_pool(value, x)

    def _shortcut(self, op: ConvOp, x: Tensor) -> Tensor:
        """The merged projection of a K-concatenated op, computed as its own conv (no bias).

        Its result goes to the main conv as the residual: two oneDNN calls, as in the unfused plan.
        A single conv over the channel concat [y | x[::s, ::s]] with [W3 | Wd] measured no faster
        on the CPU (resnet50, batch 8, fp32: within noise) and copies both operands, so the GEMMs
        stay separate here; the fused plan's only change on this path is where the bias is added.
        """
        weight = self.shortcut_weights[op.name]
        stride = [op.shortcut_stride] * 2
        if op.shortcut_avg_pool:
            x, stride = self._pooled(op.shortcut_input, x), [1, 1]
        if self.onednn:
            return torch.ops.mkldnn._convolution_pointwise(
                x, weight, None, [0, 0], stride, [1, 1], 1, "none", [None], ""
            )
        return F.conv2d(x, weight, None, stride)

    def run(self, x: Tensor, workspace: Any, observer: Observer | None = None) -> Tensor:
        pixels = x.dtype == torch.uint8  # raw 0-255 values: exact in every float dtype
        # oneDNN's fused ReLU post-op turns NaN into 0 (and so an Inf pixel's inf - inf), which would
        # hand back finite logits for a corrupt image; eager PyTorch gives that image NaN logits.
        non_finite = None if pixels else ~torch.isfinite(x).flatten(1).all(dim=1)
        x = x.to(self.dtype) if pixels else x
        values: dict[str, Tensor] = {INPUT: x.contiguous(memory_format=self.memory_format)}
        # Outside inference mode, no_grad: the results (fresh per call, no workspace) are then ordinary
        # tensors the caller may update in place, e.g. features fed to a decoder.
        no_grad = torch.inference_mode() if torch.is_inference_mode_enabled() else torch.no_grad()
        with no_grad, tf32_during(self.allow_tf32):
            for index, op in enumerate(self.plan.ops):
                src = values[op.inputs[0]]
                if index == 0 and pixels:
                    out = self._conv(self.uint8_stem, src, None, self.uint8_stem_params)
                elif isinstance(op, ConvOp):
                    if op.shortcut_input is not None:
                        residual = self._shortcut(op, values[op.shortcut_input])
                    else:
                        residual = values[op.residual] if op.residual else None
                    out = self._conv(op, src, residual)
                elif isinstance(op, MaxPoolOp):
                    out = F.max_pool2d(src, op.kernel_size, op.stride, op.padding)
                elif isinstance(op, HeadOp):
                    weight, bias = self.params[op.name]
                    pooled = src.float().mean(dim=(2, 3))
                    out = F.linear(pooled, weight.float(), None if bias is None else bias.float())
                elif isinstance(op, GlobalPoolOp):
                    out = src.float().mean(dim=(2, 3))
                else:
                    raise TypeError(f"torch backend cannot run op kind {op.kind!r} ({op.name})")
                values[op.output] = out
                if observer is not None:
                    observer(op.name, out)
                for value in self.dead_after[index]:
                    del values[value]
            outputs = {LOGITS: LOGITS} if self.plan.outputs is None else self.plan.outputs
            results = {name: values[value] for name, value in outputs.items()}
            if non_finite is not None:  # masked_fill, not `if any()`: no host sync per call on a GPU
                mask = non_finite.to(out.device)
                for t in results.values():  # in place: fresh tensors of this call; keeps channels-last
                    t.masked_fill_(mask.view(-1, *[1] * (t.dim() - 1)), float("nan"))
        return results[LOGITS] if self.plan.outputs is None else results
