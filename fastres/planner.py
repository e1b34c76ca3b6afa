"""The graph planner: a checkpoint in, a short list of fused ops over reusable buffers out.

`plan_resnet` builds the eager graph once and runs the tuple of passes `planning_passes` returns
(each pure, in `passes.py`), then folds the input normalisation into a uint8 stem and assigns
buffers. Order matters: fuse_shortcut runs last among the conv passes, since it needs
fuse_residual's residual input to find the projection and fuse_relu's final word on which convs
are linear (only a linear projection merges). An option adds or drops a tuple entry:
fuse_shortcuts=False drops fuse_shortcut (e.g. to benchmark each conv alone).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import ConfigError
from .graph import (
    INPUT,
    LOGITS,
    POOLED,
    AddOp,
    AvgPoolOp,
    BatchNormOp,
    ConvOp,
    GlobalPoolOp,
    HeadOp,
    LinearOp,
    MaxPoolOp,
    Op,
    ReluOp,
    build_eager_graph,
    infer_shapes,
)
from .passes import (
    assign_buffers,
    fold_batchnorm,
    fold_normalization,
    fuse_head,
    fuse_relu,
    fuse_residual,
    fuse_shortcut,
)
from .specs import IMAGENET_MEAN, IMAGENET_STD, ResNetSpec, check_normalization

Pass = Callable[[list[Op]], list[Op]]


def planning_passes(*, fuse_shortcuts: bool = True) -> tuple[Pass, ...]:
    """The op-list passes plan_resnet runs, in order; each option adds or drops one entry."""
    return (
        fold_batchnorm,
        fuse_residual,
        fuse_relu,
        *((fuse_shortcut,) if fuse_shortcuts else ()),
        fuse_head,
    )


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
        if op.kernel_size == 1 and op.padding == 0 and not op.avg_pool:
            # A strided 1x1 conv reads only the pixels it samples: N x C_in x OH x OW (a pooled one all).
            reads -= (numel(op.inputs[0]) - n * shapes[op.inputs[0]][1] * oh * ow) * elem
        if op.shortcut_input is not None and not op.shortcut_avg_pool:  # likewise for the projection
            c2 = op.shortcut_weight.shape[1]
            reads -= (numel(op.shortcut_input) - n * c2 * oh * ow) * elem
        if op.shortcut_input is not None:
            c2 = op.shortcut_weight.shape[1]
            k += c2
            weights += op.shortcut_weight.numel()
        return OpCost(2 * out * k, reads + weights * elem, out * elem)
    if isinstance(op, (LinearOp, HeadOp)):
        n, c = shapes[op.output][0], op.weight.shape[1]
        pool = numel(op.inputs[0]) if isinstance(op, HeadOp) else 0
        return OpCost(2 * n * c * op.weight.shape[0] + pool, reads + op.weight.numel() * elem, out * 4)
    if isinstance(op, GlobalPoolOp):
        return OpCost(numel(op.inputs[0]), reads, out * 4)
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
    # The engine's compute dtype: what printing the plan reports and sizes its byte columns by.
    dtype: torch.dtype = torch.float16
    # None: the plan ends with the head and returns logits. Else feature name -> the value it returns
    # (see select_outputs): the ops stop at the last of them and none of them gets a reused slot.
    outputs: dict[str, str] | None = None

    def output_shapes(self, batch: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
        """Each output's shape (NCHW for conv features, N x C pooled, N x classes logits)."""
        shapes = self.shapes(batch, height, width)
        if self.outputs is None:
            return {LOGITS: shapes[LOGITS]}
        return {name: shapes[value] for name, value in self.outputs.items()}

    def ops_for(self, input_dtype: torch.dtype) -> list[Op]:
        """The op list that runs an input of this dtype (uint8 pixels swap in the uint8 stem)."""
        if input_dtype == torch.uint8:
            return [self.uint8_stem, *self.ops[1:]]
        return self.ops

    @property
    def num_slots(self) -> int:
        return max(self.slots.values(), default=-1) + 1  # a plan cut after the stem has no slot

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
        self, batch: int = 1, height: int = 224, width: int = 224, dtype: torch.dtype | None = None
    ) -> str:
        """The plan as a table: op, kind, shapes, fused epilogue, FLOPs, bytes; totals vs eager.

        dtype: the activations' dtype the bytes are counted in; by default the plan's own.
        """
        dtype = self.dtype if dtype is None else dtype
        elem = torch.empty((), dtype=dtype).element_size()
        shapes = self.shapes(batch, height, width)
        rows = []
        for op in self.ops:
            cost = op_cost(op, shapes, elem)
            epilogue = ""
            if isinstance(op, ConvOp):
                k, parts = op.kernel_size, ["bias"]
                kind = f"conv{k}x{k}/{op.stride}" + (f" g{op.groups}" if op.groups > 1 else "")
                kind += f" d{op.dilation}" if op.dilation > 1 else ""
                kind += " avg2x2" if op.avg_pool else ""  # ResNet-D: the 2x2 mean read with A
                if op.shortcut_input is not None:  # the projection, K-concatenated into this GEMM
                    kind += f" +proj1x1/{op.shortcut_stride}" + (" avg2x2" if op.shortcut_avg_pool else "")
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
        what = (
            f"{self.num_classes} classes" if self.outputs is None else "features " + ", ".join(self.outputs)
        )
        out = [
            f"{self.spec.name} ({self.spec.describe()}, {what}): "
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
            "outputs: "
            + ", ".join(
                f"{name} {_fmt_shape(shape)}{'' if len(shape) == 4 else ' float32'}"
                for name, shape in self.output_shapes(batch, height, width).items()
            )
            + (" (conv features: NHWC memory)" if self.outputs and self.outputs.keys() - {"pool"} else ""),
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
    dtype: torch.dtype = torch.float16,
) -> Plan:
    """Run every pass; the result has no BatchNorm, no standalone ReLU or add left.

    mean/std: how uint8 input is normalised (folded into `Plan.uint8_stem`); float input is taken
    as already normalised. fuse_shortcuts=False keeps each projection shortcut a conv of its own
    (see fuse_shortcut). dtype: the compute dtype the plan will run in, for its printed costs.
    """
    mean, std = check_normalization(mean, std)
    eager = build_eager_graph(spec, state_dict)
    ops = eager
    for run_pass in planning_passes(fuse_shortcuts=fuse_shortcuts):
        ops = run_pass(ops)
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
        dtype=dtype,
    )


# What a backbone can return, shallowest first: the stem's ReLU (before the max-pool), each stage's
# last block, the globally pooled features. timm's out_indices number the first five (0 = stem).
FEATURE_NAMES = ("stem", "layer1", "layer2", "layer3", "layer4", "pool")
OUT_INDICES = dict(enumerate(FEATURE_NAMES[:5]))


def resolve_features(features=None, out_indices=None) -> tuple[str, ...] | None:
    """The requested feature names, shallowest first and once each; None when neither is given."""
    if features is None and out_indices is None:
        return None
    if features is not None and out_indices is not None:
        raise ConfigError("pass features= or out_indices=, not both")
    if out_indices is not None:
        indices = (out_indices,) if isinstance(out_indices, int) else tuple(out_indices)
        bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or i not in OUT_INDICES]
        if bad:
            valid = ", ".join(f"{i}={name}" for i, name in OUT_INDICES.items())
            raise ConfigError(f"unknown out_indices {bad}; valid: {valid}")
        names = [OUT_INDICES[i] for i in indices]
    else:
        names = [features] if isinstance(features, str) else list(features)
        bad = [n for n in names if n not in FEATURE_NAMES]
        if bad:
            raise ConfigError(f"unknown features {bad}; valid names: {', '.join(FEATURE_NAMES)}")
    if not names:
        raise ConfigError(f"no features requested; choose from {', '.join(FEATURE_NAMES)}")
    return tuple(n for n in FEATURE_NAMES if n in names)


def _feature_end(ops: list[Op], name: str) -> int:
    """Index of the op producing feature `name` in a fused or eager op list (pool: the head/avgpool)."""
    if name == "stem":  # fused: the conv bn1 folded into carries the ReLU; eager: the ReLU op itself
        is_stem_end = lambda op: op.name == "relu" or isinstance(op, ConvOp) and op.output == "bn1"
        return next(i for i, op in enumerate(ops) if is_stem_end(op))
    if name == "pool":
        return next(i for i, op in enumerate(ops) if isinstance(op, (HeadOp, AvgPoolOp, GlobalPoolOp)))
    return max(i for i, op in enumerate(ops) if op.name.startswith(f"{name}."))


def select_outputs(plan: Plan, names) -> Plan:
    """The plan cut after its last requested feature, returning `names` (see FEATURE_NAMES).

    Ops past the last output are dropped, so they never run; "pool" replaces the head by a global
    average pool (no fc). The outputs get no buffer slot, so no later op can overwrite one.
    """
    if plan.outputs is not None:
        raise ValueError("select_outputs cuts a whole plan (one ending with the head), not a cut one")
    names = resolve_features(names)
    ops = plan.ops
    end = max(_feature_end(ops, n) for n in names)
    ops = list(ops[: end + 1])
    if "pool" in names and not isinstance(ops[-1], GlobalPoolOp):
        ops[-1] = GlobalPoolOp("pool", [ops[-1].inputs[0]], POOLED)
    outputs = {n: POOLED if n == "pool" else ops[_feature_end(ops, n)].output for n in names}
    eager_end = max(_feature_end(plan.eager_ops, n) for n in names) if plan.eager_ops else -1
    return dataclasses.replace(
        plan,
        ops=ops,
        slots=assign_buffers(ops, outputs=tuple(outputs.values())),
        eager_ops=list(plan.eager_ops[: eager_end + 1]),
        outputs=outputs,
    )
