"""The plan executed with fastres's Triton kernels on NHWC activations.

The stem (the first op, a 3-input-channel conv) is a StemLayer that reads the network input as
given: logical NCHW with any strides, in the engine dtype or uint8 (then with the normalisation
folded into a second StemLayer built from `plan.uint8_stem`, padded with 255 * mean); it writes
NHWC, so no layout copy precedes it. Every other conv is one fused implicit-GEMM launch (bias,
residual, ReLU in the epilogue), then one max-pool and the head. A conv with a merged projection
shortcut is one launch too, a GEMM over both inputs concatenated along K; ResNet-D's avg-pool downsample
is averaged while that launch loads A (no pool launch, no pooled buffer). Per input shape the
workspace holds one flat buffer per plan slot and the kernels' scratch, so a forward pass allocates
nothing and is safe to capture in a CUDA graph.

Tuned plans (fastres.tuning): `tuned` maps (layer signature, batch bucket) to a tactic, which
make_workspace applies per input shape: a Triton config pinned for that shape, or the cuDNN tactic
(F.conv2d on the same NHWC buffers viewed channels-last, epilogue as torch ops, which allocate).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..graph import INPUT, ConvOp, GlobalPoolOp, HeadOp, MaxPoolOp
from ..kernels import ConvLayer, HeadLayer, StemLayer, global_avg_pool_nhwc, max_pool2d_nhwc
from ..tuning.tactics import CUDNN, CudnnConv, Tactic, batch_bucket, layer_signature
from .base import Backend, Observer


@dataclass
class TritonWorkspace:
    values: dict[str, Tensor]  # NHWC views into the slot buffers
    logits: Tensor
    pooled: Tensor  # the head's fp32 (N, C) scratch: per workspace, so concurrent graphs never share it
    split_scratch: tuple[Tensor, Tensor]  # split-K fp32 partials and int32 counters, shared by all convs
    buffers: list[Tensor]
    # A plan with outputs: value -> (shape as stored (NHWC, or N x C), dtype). They have no slot: run()
    # allocates each per call, so a result is never a reused buffer (in a CUDA graph, a static one the
    # runner clones).
    outputs: dict[str, tuple[tuple[int, ...], torch.dtype]] = field(default_factory=dict)


def _stem_layer(op: ConvOp, device, dtype, allow_tf32: bool) -> StemLayer:
    return StemLayer(
        op.weight.to(device),
        None if op.bias is None else op.bias.to(device),
        stride=op.stride,
        padding=op.padding,
        relu=op.relu,
        dtype=dtype,
        pad_value=op.pad_value,
        allow_tf32=allow_tf32,
    )


def conv_options(op: ConvOp) -> dict:
    """ConvLayer's geometry and epilogue options for op (all but its weights, bias and dtype): shared
    by the floating-point and the 8-bit layers, so that no option is dropped on one path."""
    # avg_pool: ResNet-D's 2x2 mean, taken while the GEMM loads A (of the shortcut input, if merged).
    options = dict(
        stride=op.stride, padding=op.padding, dilation=op.dilation, groups=op.groups, relu=op.relu,
        has_residual=op.residual is not None, avg_pool=op.avg_pool,
    )  # fmt: skip
    if op.shortcut_input is not None:
        if op.avg_pool:
            raise ValueError(f"triton backend: {op.name} pools its main input and has a shortcut")
        options.update(shortcut_stride=op.shortcut_stride, avg_pool=op.shortcut_avg_pool)
    return options


def float_conv_layer(op: ConvOp, device, dtype, allow_tf32: bool) -> ConvLayer:
    shortcut = {}
    if op.shortcut_input is not None:
        shortcut = dict(shortcut_weight=op.shortcut_weight.to(device))
    bias = None if op.bias is None else op.bias.to(device)
    return ConvLayer(
        op.weight.to(device), bias, dtype=dtype, allow_tf32=allow_tf32, **conv_options(op), **shortcut
    )


class TritonBackend(Backend):
    name = "triton"
    runs_cut_plans = True

    def __init__(self, plan, device, dtype, *, allow_tf32: bool = False):
        super().__init__(plan, device, dtype)
        stem = plan.ops[0]
        readers = [op.name for op in plan.ops[1:] if INPUT in op.inputs]
        if not (isinstance(stem, ConvOp) and stem.inputs == [INPUT] and stem.groups == 1) or readers:
            raise ValueError(
                "triton backend: the plan must start with the stem conv, the only op reading the input "
                f"(got {stem.name!r} first; also reading the input: {readers})"
            )
        self.stem = _stem_layer(stem, self.device, dtype, allow_tf32)
        self.uint8_stem = None
        if plan.uint8_stem is not None:  # raw pixels: the normalisation folded in, padded with 255*mean
            self.uint8_stem = _stem_layer(plan.uint8_stem, self.device, dtype, allow_tf32)
        self.layers: dict[str, ConvLayer | HeadLayer] = {}
        self.allow_tf32 = allow_tf32
        # Tuned choices (fastres.tuning): (layer signature, batch bucket) -> tactic, applied per input
        # shape by make_workspace; convs on the cuDNN tactic: op name -> the input shapes (None: all).
        self.tuned: dict[tuple[str, int], Tactic] = {}
        self.cudnn_layers: dict[str, CudnnConv] = {}
        self.cudnn_shapes: dict[str, set[tuple] | None] = {}
        for op in plan.ops[1:]:
            if isinstance(op, ConvOp):
                self.layers[op.name] = float_conv_layer(op, self.device, dtype, allow_tf32)
            elif isinstance(op, HeadOp):
                self.layers[op.name] = HeadLayer(
                    op.weight.to(self.device),
                    None if op.bias is None else op.bias.to(self.device),
                    dtype=dtype,
                )

    def conv_inputs(self, batch: int, height: int, width: int) -> dict[str, tuple[str, tuple]]:
        """Per conv but the stem: (its layer signature, its NHWC input shape) for this input size."""
        shapes = self.plan.shapes(batch, height, width)
        out = {}
        for op in self.plan.ops[1:]:
            if isinstance(op, ConvOp):
                n, c, h, w = shapes[op.inputs[0]]
                out[op.name] = (layer_signature(op, (h, w), self.dtype), (n, h, w, c))
        return out

    def set_tactic(self, op_name: str, input_shape_nhwc: tuple, tactic: Tactic | None) -> None:
        """Run conv `op_name` on this input shape with `tactic` (None: the rule config). A conv the
        self-check moved to cuDNN for every shape (`use_cudnn`) stays there."""
        shape, layer = tuple(input_shape_nhwc), self.layers[op_name]
        if op_name in self.cudnn_shapes and self.cudnn_shapes[op_name] is None:
            return
        # ConvLayer decides its config once per (input shape, device) and memoises it in _configs: an
        # entry put there is what every later launch of that shape runs (kernels/conv.py is at its
        # module-size limit, so no public setter was added there).
        key = (shape, layer.device)
        layer._configs.pop(key, None)  # the rule config, decided again on the next launch
        if tactic is not None and tactic.kind == CUDNN:
            self.cudnn_layer(op_name)
            self.cudnn_shapes.setdefault(op_name, set()).add(shape)
            return
        if tactic is not None:
            layer._configs[key] = layer.clip_config(tactic.config)
        self.cudnn_shapes.get(op_name, set()).discard(shape)

    def use_cudnn(self, op_name: str) -> None:
        """Run conv `op_name` with the cuDNN tactic at every input shape (the self-check's fallback)."""
        self.cudnn_layer(op_name)
        self.cudnn_shapes[op_name] = None

    def cudnn_layer(self, op_name: str) -> CudnnConv:
        if op_name not in self.cudnn_layers:
            op = next(op for op in self.plan.ops if op.name == op_name)
            self.cudnn_layers[op_name] = CudnnConv(op, self.device, self.dtype, self.allow_tf32)
        return self.cudnn_layers[op_name]

    def apply_tuned(self, batch: int, height: int, width: int) -> None:
        """Set every conv's tactic for this input size from `tuned` (its batch bucket's choices)."""
        bucket = batch_bucket(batch)
        for name, (signature, shape) in self.conv_inputs(batch, height, width).items():
            self.set_tactic(name, shape, self.tuned.get((signature, bucket)))

    def make_workspace(self, batch: int, height: int, width: int) -> TritonWorkspace:
        if self.tuned:
            self.apply_tuned(batch, height, width)
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
        pooled = torch.empty(batch, self.plan.spec.feature_channels, device=self.device, dtype=torch.float32)
        # Convs run one after another on one stream, so one scratch pair (the largest any needs) serves
        # them all. The last arriving CTA re-arms the counters it used, and run() also zeroes them once
        # per forward (one memset node in a graph), so an aborted launch cannot leave tiles unwritten.
        nhwc = lambda value: tuple(shapes[value][i] for i in (0, 2, 3, 1))
        sizes = [
            self.layers[op.name].scratch_size(nhwc(op.inputs[0]))
            for op in self.plan.ops[1:]
            if isinstance(op, ConvOp)
        ]
        split_scratch = (  # default 1: a plan cut after the stem has no other conv
            torch.empty(max((p for p, _ in sizes), default=1), device=self.device, dtype=torch.float32),
            torch.zeros(max((c for _, c in sizes), default=1), device=self.device, dtype=torch.int32),
        )
        buffers = [*buffers, logits, pooled, *split_scratch]
        outputs = {
            value: (nhwc(value), self.dtype) if len(shapes[value]) == 4 else (shapes[value], torch.float32)
            for value in (self.plan.outputs or {}).values()
        }
        return TritonWorkspace(values, logits, pooled, split_scratch, buffers, outputs)

    def run(self, x: Tensor, workspace: TritonWorkspace, observer: Observer | None = None) -> Tensor:
        values = workspace.values
        if workspace.outputs:
            values = dict(values)
            for value, (shape, dtype) in workspace.outputs.items():
                values[value] = torch.empty(shape, device=self.device, dtype=dtype)
        stem_op = self.plan.ops[0]
        if x.dtype == torch.uint8:
            if self.uint8_stem is None:
                raise TypeError("triton backend: this plan has no uint8 stem; pass normalised float input")
            stem = self.uint8_stem
        else:
            stem = self.stem
        workspace.split_scratch[1].zero_()  # re-arm the split-K counters (see make_workspace)
        # x is logical NCHW with the caller's strides: the stem reads it in place.
        out = stem(x, out=values[stem_op.output])
        if observer is not None:
            observer(stem_op.name, out.permute(0, 3, 1, 2))
        for op in self.plan.ops[1:]:
            src = values[op.inputs[0]]
            if isinstance(op, ConvOp):
                out = self._conv(op, src, values, workspace.split_scratch)
            elif isinstance(op, MaxPoolOp):
                out = max_pool2d_nhwc(
                    src,
                    kernel_size=op.kernel_size,
                    stride=op.stride,
                    padding=op.padding,
                    out=values[op.output],
                )
            elif isinstance(op, HeadOp):
                out = self.layers[op.name](src, out=workspace.logits, pooled=workspace.pooled)
            elif isinstance(op, GlobalPoolOp):
                out = global_avg_pool_nhwc(src, out=values[op.output])
            else:
                raise TypeError(f"triton backend cannot run op kind {op.kind!r} ({op.name})")
            if observer is not None:
                observer(op.name, out.permute(0, 3, 1, 2) if out.dim() == 4 else out)
        if self.plan.outputs is None:
            return out
        # NHWC memory as a logical NCHW (channels-last) tensor: the buffer itself, no copy.
        nchw = lambda t: t.permute(0, 3, 1, 2) if t.dim() == 4 else t
        return {name: nchw(values[value]) for name, value in self.plan.outputs.items()}

    def _conv(self, op: ConvOp, src: Tensor, values: dict[str, Tensor], scratch) -> Tensor:
        layer, out = self.layers[op.name], values[op.output]
        if op.name in self.cudnn_shapes:
            shapes = self.cudnn_shapes[op.name]
            if shapes is None or tuple(src.shape) in shapes:
                residual = values[op.residual] if op.residual else None
                shortcut = values[op.shortcut_input] if op.shortcut_input is not None else None
                return self.cudnn_layers[op.name](src, residual, out, shortcut)
        if op.shortcut_input is None:
            return layer(src, values[op.residual] if op.residual else None, out=out, scratch=scratch)
        return layer(src, None, out=out, shortcut_input=values[op.shortcut_input], scratch=scratch)

    def copy_nodes(self, batch: int, height: int, width: int) -> list[tuple[str, int]]:
        """Graph nodes of a forward that are not Triton kernels, as (name, bytes read + written)."""
        return []  # the stem reads the caller's input in place: no layout copy in the graph

    def kernel_specs(
        self, batch: int, height: int, width: int, arch: int, input_dtype: torch.dtype | None = None
    ) -> list:
        """Every (kernel, config) one forward launches for this input size and input dtype (the engine
        dtype, or torch.uint8 for pixels), in launch order, for ahead-of-time compilation."""
        from ..kernels import max_pool_aot_specs

        shapes = self.plan.shapes(batch, height, width)
        # The stem reads the input directly: its binary depends on the input dtype.
        if input_dtype == torch.uint8:
            specs = self.uint8_stem.aot_specs((batch, 3, height, width), arch, input_dtype=torch.uint8)
        else:
            specs = self.stem.aot_specs((batch, 3, height, width), arch)
        for op in self.plan.ops[1:]:
            n, c, h, w = shapes[op.inputs[0]]
            if isinstance(op, (ConvOp, HeadOp)):
                specs += self.layers[op.name].aot_specs((n, h, w, c), arch)
            elif isinstance(op, MaxPoolOp):
                specs += max_pool_aot_specs(
                    (n, h, w, c), self.dtype, arch, op.kernel_size, op.stride, op.padding
                )
        return specs
