"""The planner's passes: pure functions from an op list to a new op list (see `planner.py`).

Each returns new ops (`dataclasses.replace`) and leaves the list and the ops it was given as they
were, so the eager graph a plan is built from stays intact for comparison and costing.
  fold_batchnorm   conv -> BN becomes one conv with folded weights and bias (float64 arithmetic)
  fuse_residual    the block's add becomes the residual input of its last conv
  fuse_relu        a ReLU after a conv becomes that conv's epilogue
  fuse_shortcut    a block's 1x1 projection (BN folded; ResNet-D's avg pool included) joins its last
                   1x1 conv as one GEMM concatenated along K; the projection's output is never written
  fuse_head        global average pool + fc become one head op
Two steps run after them on the fused list: fold_normalization (a second stem for uint8 pixels,
with (x / 255 - mean) / std folded in) and assign_buffers (values share a few buffers by liveness).
"""

from __future__ import annotations

import dataclasses

import torch

from .graph import (
    LOGITS,
    AddOp,
    AvgPoolOp,
    BatchNormOp,
    ConvOp,
    HeadOp,
    LinearOp,
    Op,
    ReluOp,
    to_float64,
)
from .specs import check_normalization


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
                dilation=conv.dilation,
                groups=conv.groups,
                relu=conv.relu,
                avg_pool=conv.avg_pool,
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
            dilation=conv.dilation,
            groups=conv.groups,
            avg_pool=conv.avg_pool,
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
            shortcut_avg_pool=proj.avg_pool,
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
        dilation=stem.dilation,
        groups=stem.groups,
        relu=stem.relu,
        pad_value=pad_value,
    )


def assign_buffers(ops: list[Op], outputs=(LOGITS,)) -> dict[str, int]:
    """Give every intermediate value a buffer slot; a slot is reused once its value is dead.

    An op never writes into a slot it reads from, so kernels need not support aliasing.
    The network input and the `outputs` (logits, or the requested features) get no slot: the caller
    owns them, so no later op may overwrite them (a backend gives each its own tensor).
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
        if op.output not in outputs:
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
