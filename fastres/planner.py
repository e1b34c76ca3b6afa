"""The graph planner: a checkpoint in, a short list of fused ops over reusable buffers out.

Passes, each a small function over the plain data model in `graph.py`:
  fold_batchnorm   conv -> BN becomes one conv with folded weights and bias (float64 arithmetic)
  fuse_residual    the block's add becomes the residual input of its last conv
  fuse_relu        a ReLU after a conv becomes that conv's epilogue
  fuse_shortcut    a block's 1x1 projection (downsample.0, BN folded) joins its last 1x1 conv as one
                   GEMM concatenated along K; the projection's output is never written
  fuse_head        global average pool + fc become one head op
  assign_buffers   values share a few buffers by liveness
  fold_normalization  a second stem for uint8 pixels, with (x / 255 - mean) / std folded in
fuse_shortcut runs last among the conv passes: it needs fuse_residual's residual input to find the
projection, and fuse_relu's final word on which convs are linear (only a linear projection merges).
It is optional (`plan_resnet(..., fuse_shortcuts=False)`, e.g. to benchmark each conv alone).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .graph import (
    INPUT,
    LOGITS,
    AddOp,
    AvgPoolOp,
    BatchNormOp,
    ConvOp,
    HeadOp,
    LinearOp,
    MaxPoolOp,
    Op,
    ReluOp,
    build_eager_graph,
    infer_shapes,
    to_float64,
)
from .specs import IMAGENET_MEAN, IMAGENET_STD, ResNetSpec, check_normalization


def _consumers(ops: list[Op]) -> dict[str, list[Op]]:
    users: dict[str, list[Op]] = {}
    for op in ops:
        for value in op.inputs:
            users.setdefault(value, []).append(op)
    return users


def _producers(ops: list[Op]) -> dict[str, Op]:
    return {op.output: op for op in ops}


def _sole_consumer(users: dict[str, list[Op]], value: str) -> Op | None:
    found = users.get(value, [])
    return found[0] if len(found) == 1 else None


def fold_batchnorm(ops: list[Op]) -> list[Op]:
    """conv -> BN into one conv: W' = W * g / sqrt(v + eps), b' = beta + (b - mean) * g / sqrt(v + eps).

    Done in float64 so that folding adds no error of its own before the single cast to the
    compute dtype.
    """
    users = _consumers(ops)
    folded: dict[str, ConvOp] = {}
    result: list[Op] = []
    for op in ops:
        if isinstance(op, BatchNormOp):
            conv = _producers(ops).get(op.inputs[0])
            if not isinstance(conv, ConvOp) or _sole_consumer(users, conv.output) is not op:
                raise ValueError(
                    f"{op.name}: BatchNorm does not follow a conv that only it reads; cannot fold"
                )
            scale = to_float64(op.weight) / torch.sqrt(to_float64(op.running_var) + op.eps)
            weight = to_float64(conv.weight) * scale.view(-1, 1, 1, 1)
            conv_bias = to_float64(conv.bias) if conv.bias is not None else torch.zeros_like(scale)
            bias = to_float64(op.bias) + (conv_bias - to_float64(op.running_mean)) * scale
            new = ConvOp(
                conv.name,
                list(conv.inputs),
                op.output,
                weight=weight,
                bias=bias,
                stride=conv.stride,
                padding=conv.padding,
                groups=conv.groups,
                relu=conv.relu,
            )
            folded[conv.name] = new
            result[result.index(conv)] = new
        else:
            result.append(op)
    # A conv without BN still leaves in float64, like every folded one; a copy, its input stays as given.
    return [
        dataclasses.replace(op, weight=to_float64(op.weight), bias=to_float64(op.bias))
        if isinstance(op, ConvOp) and op.name not in folded
        else op
        for op in result
    ]


def fuse_residual(ops: list[Op]) -> list[Op]:
    """add(F(x), shortcut) -> residual epilogue of the conv producing F(x).

    The shortcut must exist before that conv runs: a projection computed later is moved up.
    """
    result = list(ops)
    users = _consumers(ops)
    for add in [op for op in ops if isinstance(op, AddOp)]:
        branch, shortcut = add.inputs
        conv = _producers(result).get(branch)
        if not isinstance(conv, ConvOp) or conv.relu or _sole_consumer(users, branch) is not add:
            continue
        fused = ConvOp(
            conv.name,
            [conv.inputs[0], shortcut],
            add.output,
            weight=conv.weight,
            bias=conv.bias,
            stride=conv.stride,
            padding=conv.padding,
            groups=conv.groups,
        )
        result.remove(add)
        result[result.index(conv)] = fused
        shortcut_op = _producers(result).get(shortcut)
        if shortcut_op is not None and result.index(shortcut_op) > result.index(fused):
            result.remove(shortcut_op)
            result.insert(result.index(fused), shortcut_op)
    return result


def fuse_relu(ops: list[Op]) -> list[Op]:
    """ReLU after a conv (including one with a fused residual) -> that conv's epilogue."""
    result: list[Op] = []
    users = _consumers(ops)
    renamed: dict[str, str] = {}  # a fused ReLU's output -> the conv output that now carries it
    position: dict[str, int] = {}  # value -> index in result of the op producing it
    for op in ops:
        inputs = [renamed.get(v, v) for v in op.inputs]
        if isinstance(op, ReluOp) and inputs[0] in position:
            producer = result[position[inputs[0]]]
            # `users` holds the ops as given, so the sole-consumer test compares against `op` itself.
            if (
                isinstance(producer, ConvOp)
                and not producer.relu
                and _sole_consumer(users, producer.output) is op
            ):
                result[position[inputs[0]]] = dataclasses.replace(producer, relu=True)
                renamed[op.output] = producer.output
                continue
        position[op.output] = len(result)
        result.append(op if inputs == op.inputs else dataclasses.replace(op, inputs=inputs))
    return result


def _is_pointwise(conv: ConvOp) -> bool:
    return conv.kernel_size == 1 and conv.padding == 0 and conv.groups == 1


def fuse_shortcut(ops: list[Op]) -> list[Op]:
    """relu(W3 * y + b3 + (Wd * x[::s, ::s] + bd)) -> one conv over [y | x[::s, ::s]] along K.

    Applies where the conv with the fused residual is 1x1, stride 1, pad 0, groups 1 (Bottleneck's
    conv3) and the residual is produced by a linear 1x1 pad-0 groups-1 conv read by nothing else
    (the projection shortcut, BN folded). Both then are GEMMs over the same output pixels, so their
    K dimensions concatenate; the biases are summed in float64. BasicBlock's last conv is 3x3, whose
    K (9 taps x C) cannot share a GEMM with the 1x1 projection's K in one implicit-GEMM gather: its
    projection stays a conv of its own, as do identity shortcuts (nothing to merge).
    """
    users = _consumers(ops)
    producers = _producers(ops)
    merged: dict[str, ConvOp] = {}  # consumer name -> merged op
    absorbed: set[str] = set()  # projection names
    for conv in ops:
        if not isinstance(conv, ConvOp) or conv.residual is None or not _is_pointwise(conv):
            continue
        proj = producers.get(conv.residual)
        if (
            conv.stride != 1
            or not isinstance(proj, ConvOp)
            or not _is_pointwise(proj)
            or proj.relu
            or proj.residual is not None
            or proj.shortcut_weight is not None
            or _sole_consumer(users, proj.output) is not conv
        ):
            continue
        biases = [to_float64(b) for b in (conv.bias, proj.bias) if b is not None]
        merged[conv.name] = dataclasses.replace(
            conv,
            inputs=[conv.inputs[0], proj.inputs[0]],
            bias=sum(biases[1:], biases[0]) if biases else None,
            shortcut_weight=to_float64(proj.weight),
            shortcut_stride=proj.stride,
        )
        absorbed.add(proj.name)
    return [merged.get(op.name, op) for op in ops if op.name not in absorbed]


def fuse_head(ops: list[Op]) -> list[Op]:
    """avgpool -> fc into one head op that writes float32 logits."""
    result: list[Op] = []
    for op in ops:
        if (
            isinstance(op, LinearOp)
            and result
            and isinstance(result[-1], AvgPoolOp)
            and result[-1].output == op.inputs[0]
        ):
            pool = result.pop()
            op = HeadOp(
                "head", list(pool.inputs), op.output, weight=to_float64(op.weight), bias=to_float64(op.bias)
            )
        result.append(op)
    return result


def fold_normalization(stem: ConvOp, mean, std) -> ConvOp:
    """The stem for raw uint8 pixels x, with the normalisation (x / 255 - mean) / std folded in.

    (x / 255 - mean) / std = (x - 255 * mean) * s with s = 1 / (255 * std), so per input channel c
    W' = W * s_c and b' = b - sum_{c,r,s} W'[:, c, r, s] * 255 * mean_c, in float64. This equals
    "normalise, zero-pad, convolve" exactly only if the border is padded with 255 * mean (the raw value
    that normalises to 0), which `pad_value` tells every backend.
    """
    mean, std = check_normalization(mean, std)
    if stem.weight.shape[1] != 3 or stem.groups != 1:
        raise ValueError(
            f"{stem.name}: the normalisation folds into a 3-channel stem, got {tuple(stem.weight.shape)}"
        )
    weight = to_float64(stem.weight)
    # On the weight's device: planning may run on meta tensors (shapes only).
    pad_value = 255.0 * torch.tensor(mean, dtype=torch.float64, device=weight.device)
    scale = 1.0 / (255.0 * torch.tensor(std, dtype=torch.float64, device=weight.device))
    weight = weight * scale.view(1, 3, 1, 1)
    bias = (
        to_float64(stem.bias) if stem.bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype)
    )
    bias = bias - (weight * pad_value.view(1, 3, 1, 1)).sum(dim=(1, 2, 3))
    return ConvOp(
        stem.name,
        list(stem.inputs),
        stem.output,
        weight=weight,
        bias=bias,
        stride=stem.stride,
        padding=stem.padding,
        groups=stem.groups,
        relu=stem.relu,
        pad_value=pad_value,
    )


def assign_buffers(ops: list[Op]) -> dict[str, int]:
    """Give every intermediate value a buffer slot; a slot is reused once its value is dead.

    An op never writes into a slot it reads from, so kernels need not support aliasing.
    The network input and the logits get no slot: the caller owns both.
    """
    last_use: dict[str, int] = {}
    for i, op in enumerate(ops):
        for value in op.inputs:
            last_use[value] = i
    slot_of: dict[str, int] = {}
    free: list[int] = []
    live: dict[str, int] = {}
    next_slot = 0
    for i, op in enumerate(ops):
        if op.output != LOGITS:
            if free:
                slot = free.pop(0)
            else:
                slot, next_slot = next_slot, next_slot + 1
            slot_of[op.output] = live[op.output] = slot
        for value in set(op.inputs):
            if value in live and last_use[value] == i:
                free.append(live.pop(value))
                free.sort()
    return slot_of


@dataclass
class OpCost:
    flops: int
    bytes_read: int
    bytes_written: int


def op_cost(op: Op, shapes: dict[str, tuple[int, ...]], elem: int) -> OpCost:
    """FLOPs and bytes of one op executed as a single pass (activations and weights in `elem` bytes)."""

    def numel(value: str) -> int:
        n = 1
        for d in shapes[value]:
            n *= d
        return n

    out = numel(op.output)
    reads = sum(numel(v) for v in op.inputs) * elem
    if isinstance(op, ConvOp):
        k = op.weight[0].numel()
        weights = op.weight.numel() + (op.out_channels if op.bias is not None else 0)
        n, _, oh, ow = shapes[op.output]
        if op.kernel_size == 1 and op.padding == 0:
            # A strided 1x1 conv reads only the pixels it samples: N x C_in x OH x OW.
            reads -= (numel(op.inputs[0]) - n * shapes[op.inputs[0]][1] * oh * ow) * elem
        if op.shortcut_input is not None:  # likewise for the merged projection (1x1, pad 0)
            c2 = op.shortcut_weight.shape[1]
            reads -= (numel(op.shortcut_input) - n * c2 * oh * ow) * elem
            k += c2
            weights += op.shortcut_weight.numel()
        return OpCost(2 * out * k, reads + weights * elem, out * elem)
    if isinstance(op, (LinearOp, HeadOp)):
        n, c = shapes[op.output][0], op.weight.shape[1]
        pool = numel(op.inputs[0]) if isinstance(op, HeadOp) else 0
        return OpCost(2 * n * c * op.weight.shape[0] + pool, reads + op.weight.numel() * elem, out * 4)
    if isinstance(op, BatchNormOp):
        return OpCost(2 * out, reads, out * elem)
    if isinstance(op, MaxPoolOp):
        return OpCost(out * op.kernel_size**2, reads, out * elem)
    return OpCost(numel(op.inputs[0]), reads, out * elem)  # relu, add, avgpool


@dataclass
class Plan:
    """An ordered list of fused ops over named values, with a buffer slot per intermediate value."""

    spec: ResNetSpec
    num_classes: int
    ops: list[Op]
    slots: dict[str, int]
    eager_ops: list[Op] = field(repr=False, default_factory=list)
    mean: tuple[float, float, float] = IMAGENET_MEAN  # for uint8 input only
    std: tuple[float, float, float] = IMAGENET_STD
    # ops[0] for uint8 input: the same stem with the normalisation folded in (fold_normalization).
    uint8_stem: ConvOp | None = field(repr=False, default=None)

    def ops_for(self, input_dtype: torch.dtype) -> list[Op]:
        """The op list that runs an input of this dtype (uint8 pixels swap in the uint8 stem)."""
        if input_dtype == torch.uint8:
            return [self.uint8_stem, *self.ops[1:]]
        return self.ops

    @property
    def num_slots(self) -> int:
        return max(self.slots.values()) + 1

    def shapes(self, batch: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
        return infer_shapes(self.ops, batch, height, width)

    def slot_numels(self, batch: int, height: int, width: int) -> list[int]:
        """Elements each buffer slot must hold for this input size."""
        sizes = [0] * self.num_slots
        for value, shape in self.shapes(batch, height, width).items():
            if value in self.slots:
                n = 1
                for d in shape:
                    n *= d
                sizes[self.slots[value]] = max(sizes[self.slots[value]], n)
        return sizes

    def peak_activation_bytes(self, batch: int, height: int, width: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return sum(self.slot_numels(batch, height, width)) * elem

    def totals(self, ops: list[Op], batch: int, height: int, width: int, dtype: torch.dtype) -> OpCost:
        elem = torch.empty((), dtype=dtype).element_size()
        shapes = infer_shapes(ops, batch, height, width)
        costs = [op_cost(op, shapes, elem) for op in ops]
        return OpCost(
            sum(c.flops for c in costs), sum(c.bytes_read for c in costs), sum(c.bytes_written for c in costs)
        )

    def describe(
        self, batch: int = 1, height: int = 224, width: int = 224, dtype: torch.dtype = torch.float16
    ) -> str:
        """The plan as a table: op, kind, shapes, fused epilogue, FLOPs, bytes; totals vs eager."""
        elem = torch.empty((), dtype=dtype).element_size()
        shapes = self.shapes(batch, height, width)
        rows = []
        for op in self.ops:
            cost = op_cost(op, shapes, elem)
            epilogue = ""
            if isinstance(op, ConvOp):
                k, parts = op.kernel_size, ["bias"]
                kind = f"conv{k}x{k}/{op.stride}" + (f" g{op.groups}" if op.groups > 1 else "")
                if op.shortcut_input is not None:  # the projection, K-concatenated into this GEMM
                    kind += f" +proj1x1/{op.shortcut_stride}"
                if op.residual:
                    parts.append("residual")
                if op.relu:
                    parts.append("relu")
                epilogue = "+".join(parts)
            else:
                kind = op.kind
            io = f"{_fmt_shape(shapes[op.inputs[0]])} -> {_fmt_shape(shapes[op.output])}"
            rows.append(
                (
                    op.name,
                    kind,
                    io,
                    epilogue,
                    f"{cost.flops / 1e6:,.1f}",
                    f"{cost.bytes_read / 1e6:,.2f}",
                    f"{cost.bytes_written / 1e6:,.2f}",
                )
            )
        header = ("op", "kind", "input -> output (NCHW)", "epilogue", "MFLOP", "MB read", "MB written")
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        line = lambda r: "  ".join(
            str(c).ljust(w) if i < 4 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))
        )
        dtype_name = str(dtype).replace("torch.", "")
        out = [
            f"{self.spec.name} ({self.spec.describe()}, {self.num_classes} classes): "
            f"{len(self.ops)} fused ops for input {batch}x3x{height}x{width} {dtype_name}",
            line(header),
            line(tuple("-" * w for w in widths)),
            *map(line, rows),
        ]
        fused = self.totals(self.ops, batch, height, width, dtype)
        eager = self.totals(self.eager_ops, batch, height, width, dtype)
        traffic_f, traffic_e = fused.bytes_read + fused.bytes_written, eager.bytes_read + eager.bytes_written
        peak_mb = self.peak_activation_bytes(batch, height, width, dtype) / 1e6
        out += [
            "",
            _total_line("fused", len(self.ops), fused.flops, traffic_f),
            _total_line("eager", len(self.eager_ops), eager.flops, traffic_e)
            + " (conv, BN, ReLU, add as separate passes)",
            f"memory traffic saved: {(1 - traffic_f / traffic_e) * 100:.1f}% "
            f"({traffic_e / traffic_f:.2f}x less); "
            f"peak activations {peak_mb:.1f} MB "
            f"in {self.num_slots} reusable buffers",
        ]
        return "\n".join(out)

    def __str__(self) -> str:
        return self.describe()


def _total_line(label: str, ops: int, flops: int, traffic: int) -> str:
    return f"{label} : {ops:4d} ops  {flops / 1e9:8.2f} GFLOP  {traffic / 1e6:9.1f} MB moved"


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def plan_resnet(
    spec: ResNetSpec,
    num_classes: int,
    state_dict: dict[str, Tensor],
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    *,
    fuse_shortcuts: bool = True,
) -> Plan:
    """Run every pass; the result has no BatchNorm, no standalone ReLU or add left.

    mean/std: how uint8 input is normalised (folded into `Plan.uint8_stem`); float input is taken
    as already normalised. fuse_shortcuts=False keeps each projection shortcut a conv of its own
    (see fuse_shortcut).
    """
    mean, std = check_normalization(mean, std)
    eager = build_eager_graph(spec, state_dict)
    ops = fuse_relu(fuse_residual(fold_batchnorm(eager)))
    if fuse_shortcuts:
        ops = fuse_shortcut(ops)
    ops = fuse_head(ops)
    leftovers = [op.name for op in ops if isinstance(op, (BatchNormOp, ReluOp, AddOp, AvgPoolOp, LinearOp))]
    if leftovers:
        raise AssertionError(f"planner left unfused ops: {leftovers[:5]}")
    assert ops[0].inputs == [INPUT] and ops[-1].output == LOGITS
    return Plan(
        spec,
        num_classes,
        ops,
        assign_buffers(ops),
        eager_ops=eager,
        mean=mean,
        std=std,
        uint8_stem=fold_normalization(ops[0], mean, std),
    )
