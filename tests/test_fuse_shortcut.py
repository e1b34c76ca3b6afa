"""The projection shortcut merged into the block's last 1x1 conv (one K-concatenated GEMM).

Planner: the pass preserves the function in float64, merges exactly the Bottleneck projections,
counts its FLOPs and traffic. Backends: torch and triton (interpreter) end to end against float64,
held to eager PyTorch's own error, with the merged op run as one GEMM or split into two launches.
"""

import pytest
import torch
from e2e import assert_parity, calibrated

import fastres
from fastres.graph import INPUT, ConvOp, build_eager_graph, execute
from fastres.numerics import assert_close
from fastres.passes import fold_batchnorm, fuse_relu, fuse_residual, fuse_shortcut
from fastres.planner import op_cost, plan_resnet
from fastres.reference import build_resnet
from fastres.specs import MODEL_SPECS, get_spec
from fastres.testing import random_images

BOTTLENECKS = [name for name, spec in MODEL_SPECS.items() if spec.block != "basic"]


def _before_shortcut(name: str, state) -> list:
    return fuse_relu(fuse_residual(fold_batchnorm(build_eager_graph(get_spec(name), state))))


@pytest.mark.parametrize("name", ["resnet50", "resnext50_32x4d", "wide_resnet50_2", "resnet18"])
def test_fuse_shortcut_preserves_the_function_in_float64(name):
    state = calibrated(name, 7, seed=5).state_dict()
    x = random_images(2, 45, 51, seed=12).double()  # odd sizes: stride-2 sampling of odd extents
    before = _before_shortcut(name, state)
    after = fuse_shortcut(before)
    expected = execute(before, x)
    assert_close(execute(after, x), expected, 1e-12, what=f"{name} after fuse_shortcut")
    assert_close(expected, execute(build_eager_graph(get_spec(name), state), x), 1e-12, what="before")
    merged = [op for op in after if isinstance(op, ConvOp) and op.shortcut_input is not None]
    if name == "resnet18":  # BasicBlock: the last conv is 3x3, nothing merges
        assert after == before and not merged
        return
    by_name = {op.name: op for op in before}
    assert len(merged) == 4
    for op in merged:
        block = op.name.rsplit(".", 1)[0]
        proj, conv3 = by_name[f"{block}.downsample.0"], by_name[f"{block}.conv3"]
        assert op.name == conv3.name and op.inputs == [conv3.inputs[0], proj.inputs[0]]
        assert op.residual is None and op.relu and op.shortcut_stride == proj.stride
        assert op.shortcut_weight.dtype == torch.float64
        assert tuple(op.shortcut_weight.shape) == (op.out_channels, proj.weight.shape[1], 1, 1)
        torch.testing.assert_close(op.bias, conv3.bias + proj.bias, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(MODEL_SPECS))
def test_op_counts_with_and_without_the_pass(name):
    spec = get_spec(name)
    with torch.device("meta"):
        state = build_resnet(spec).state_dict()
    fused, unfused = plan_resnet(spec, 10, state), plan_resnet(spec, 10, state, fuse_shortcuts=False)
    names = [op.name for op in fused.ops]
    if spec.block == "basic":
        assert names == [op.name for op in unfused.ops]
        return
    projection = "downsample.1" if spec.avg_down else "downsample.0"  # timm's ResNet-D: (pool, conv, BN)
    projections = [op.name for op in unfused.ops if op.name.endswith(projection)]
    assert len(projections) == 4 and len(fused.ops) == len(unfused.ops) - 4
    assert names == [op.name for op in unfused.ops if op.name not in projections]
    merged = [op.name for op in fused.ops if isinstance(op, ConvOp) and op.shortcut_input is not None]
    assert merged == [p.replace(projection, "conv3") for p in projections]
    assert [op.shortcut_stride for op in fused.ops if op.name in merged] == [1, 2, 2, 2]
    pooled = [op.shortcut_avg_pool for op in fused.ops if op.name in merged]
    assert pooled == ([False, True, True, True] if spec.avg_down else [False] * 4)


def test_pass_merges_only_a_linear_1x1_projection_read_once_by_a_1x1_conv():
    g = torch.Generator().manual_seed(1)
    w = lambda co, ci, k=1: torch.randn(co, ci, k, k, generator=g, dtype=torch.float64)
    b = lambda co: torch.randn(co, generator=g, dtype=torch.float64)

    def block(proj=(), conv=(), extra_reader=False):
        ops = [
            ConvOp("y", [INPUT], "y", weight=w(4, 3), bias=b(4), stride=2, relu=True),
            ConvOp("p", [INPUT], "p", **{"weight": w(6, 3), "bias": b(6), "stride": 2, **dict(proj)}),
            ConvOp("c", ["y", "p"], "c", **{"weight": w(6, 4), "bias": b(6), "relu": True, **dict(conv)}),
        ]
        return ops + ([ConvOp("q", ["p"], "q", weight=w(2, 6))] if extra_reader else [])

    x = random_images(1, 9, 11, seed=2).double()
    for ops in [block(), block(proj={"bias": None}), block(conv={"bias": None})]:
        fused = fuse_shortcut(ops)
        assert [op.name for op in fused] == ["y", "c"] and fused[1].inputs == ["y", INPUT]
        assert_close(execute(fused, x), execute(ops, x), 1e-12, what="merged")
    refused = {
        "projection with a relu": block(proj={"relu": True}),
        "projection 3x3": block(proj={"weight": w(6, 3, 3), "padding": 1}),
        "projection read twice": block(extra_reader=True),
        "consumer 3x3": block(conv={"weight": w(6, 4, 3), "padding": 1}),
        "consumer grouped": block(conv={"weight": w(6, 2), "groups": 2}),
    }
    for why, ops in refused.items():
        assert fuse_shortcut(ops) == ops, why
        execute(ops, x)  # each refused block is itself a valid graph


def test_buffer_liveness_with_merged_shortcuts():
    plan = plan_resnet(get_spec("resnet50"), 7, calibrated("resnet50", 7, seed=5).state_dict())
    last_use = {v: i for i, op in enumerate(plan.ops) for v in op.inputs}
    produced = {op.output: i for i, op in enumerate(plan.ops)}
    for i, op in enumerate(plan.ops):
        assert all(plan.slots.get(v) != plan.slots.get(op.output) for v in op.inputs), op.name
        for value, slot in plan.slots.items():
            live = produced[value] < i <= last_use.get(value, -1)
            assert not (live and slot == plan.slots.get(op.output)), f"{op.name} overwrites live {value}"
    assert not any("downsample" in value for value in plan.slots)
    assert plan.num_slots <= 3


def test_cost_counts_the_shortcut_and_describe_shows_it():
    spec = get_spec("resnet50")
    with torch.device("meta"):
        state = build_resnet(spec).state_dict()
    fused, unfused = plan_resnet(spec, 10, state), plan_resnet(spec, 10, state, fuse_shortcuts=False)
    dtype, elem = torch.float16, 2
    shapes = unfused.shapes(4, 96, 80)
    old = {op.name: op_cost(op, shapes, elem) for op in unfused.ops}
    merged = [op for op in fused.ops if isinstance(op, ConvOp) and op.shortcut_input is not None]
    for op in merged:
        proj = op.name.replace("conv3", "downsample.0")
        new, a, b = op_cost(op, shapes, elem), old[op.name], old[proj]
        assert new.flops == a.flops + b.flops
        # Gone: the projection's write and its read back as the residual, and one of two biases.
        proj_out = shapes[next(o.output for o in unfused.ops if o.name == proj)]
        saved = 2 * torch.Size(proj_out).numel() * elem + op.out_channels * elem
        assert (
            new.bytes_read + new.bytes_written == sum(c.bytes_read + c.bytes_written for c in (a, b)) - saved
        )
    f, u = fused.totals(fused.ops, 4, 96, 80, dtype), unfused.totals(unfused.ops, 4, 96, 80, dtype)
    assert f.flops == u.flops and f.bytes_read + f.bytes_written < u.bytes_read + u.bytes_written
    text = fused.describe(4, 96, 80, dtype)
    assert text.count("+proj1x1/2") == 3 and text.count("+proj1x1/1") == 1 and "downsample" not in text
    assert f"{len(fused.ops)} fused ops" in text and len(fused.ops) == len(unfused.ops) - 4


@pytest.mark.parametrize("name", ["resnet50", "resnext50_32x4d"])
def test_torch_backend_runs_merged_shortcuts(name):
    model = calibrated(name, 10)
    engine = fastres.optimize(model, device="cpu", dtype=torch.float32, backend="torch")
    assert sum(isinstance(op, ConvOp) and op.shortcut_input is not None for op in engine.plan.ops) == 4
    assert_parity(engine, model, random_images(2, 53, 47, seed=14), torch.float32)
    report = engine.layer_errors(random_images(1, 32, 32, seed=15))
    assert [r.op for r in report] == [op.name for op in engine.plan.ops]
    assert max(r.relative_error for r in report) < 1e-4  # drift accumulated from the input, as in e2e tests


DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_backend_runs_merged_shortcuts_as_one_gemm(dtype):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = calibrated("resnet50", 10)
    engine = fastres.optimize(model, device=device, dtype=dtype, backend="triton")
    merged = [op for op in engine.plan.ops if isinstance(op, ConvOp) and op.shortcut_input]
    assert len(merged) == 4 and all(engine.backend.layers[op.name].shortcut_channels for op in merged)
    convs = sum(isinstance(op, ConvOp) for op in engine.plan.ops[1:])  # the stem is a StemLayer
    assert len([n for n in engine.backend.layers if n != "head"]) == convs
    assert_parity(engine, model, random_images(1, 40, 36, seed=16), dtype, device=device)
