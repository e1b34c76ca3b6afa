"""Planner passes: each preserves the network's function (checked in float64) and the plan is fused."""

import copy

import pytest
import torch

import fastres
from fastres.graph import (
    INPUT,
    LOGITS,
    AddOp,
    BatchNormOp,
    ConvOp,
    HeadOp,
    MaxPoolOp,
    ReluOp,
    build_eager_graph,
    execute,
)
from fastres.numerics import assert_close
from fastres.passes import (
    assign_buffers,
    fold_batchnorm,
    fold_normalization,
    fuse_head,
    fuse_relu,
    fuse_residual,
    fuse_shortcut,
)
from fastres.planner import plan_resnet, planning_passes
from fastres.reference import build_resnet
from fastres.specs import MODEL_SPECS, get_spec
from fastres.testing import make_calibrated_model, random_images


@pytest.fixture(scope="module")
def resnet18_state():
    return make_calibrated_model("resnet18", 10, seed=3).state_dict()


@pytest.fixture(scope="module")
def resnext_state():
    return make_calibrated_model("resnext50_32x4d", 7, seed=4).state_dict()


PASSES = [
    pytest.param([fold_batchnorm], id="fold_batchnorm"),
    pytest.param([fold_batchnorm, fuse_residual], id="+fuse_residual"),
    pytest.param([fold_batchnorm, fuse_residual, fuse_relu], id="+fuse_relu"),
    pytest.param([fold_batchnorm, fuse_residual, fuse_relu, fuse_head], id="+fuse_head"),
]


@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("model", ["resnet18_state", "resnext_state"])
def test_each_pass_preserves_the_function_in_float64(passes, model, request):
    state = request.getfixturevalue(model)
    spec = get_spec("resnet18" if model == "resnet18_state" else "resnext50_32x4d")
    x = random_images(2, 45, 51, seed=11).double()
    expected = execute(build_eager_graph(spec, state), x)
    ops = build_eager_graph(spec, state)
    for run_pass in passes:
        ops = run_pass(ops)
    assert_close(execute(ops, x), expected, 1e-12, what=f"after {[p.__name__ for p in passes]}")


def test_fold_batchnorm_formula_on_one_conv():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(4, 3, 3, 3, generator=g), torch.randn(4, generator=g)
    gamma, beta = torch.rand(4, generator=g) + 0.5, torch.randn(4, generator=g)
    mean, var = torch.randn(4, generator=g), torch.rand(4, generator=g) + 0.1
    ops = [
        ConvOp("c", [INPUT], "c", weight=w, bias=b, stride=1, padding=1),
        BatchNormOp("bn", ["c"], "bn", weight=gamma, bias=beta, running_mean=mean, running_var=var, eps=1e-5),
    ]
    (conv,) = fold_batchnorm(ops)
    scale = gamma.double() / torch.sqrt(var.double() + 1e-5)
    assert conv.weight.dtype == torch.float64 and conv.output == "bn"
    torch.testing.assert_close(conv.weight, w.double() * scale.view(-1, 1, 1, 1), rtol=0, atol=0)
    torch.testing.assert_close(
        conv.bias, beta.double() + (b.double() - mean.double()) * scale, rtol=0, atol=0
    )


@pytest.mark.parametrize("name", list(MODEL_SPECS))
def test_plan_is_fully_fused(name):
    spec = get_spec(name)
    with torch.device("meta"):  # structure only: no real weights needed
        state = build_resnet(spec).state_dict()
    plan = plan_resnet(spec, 1000, state)
    kinds = [op.kind for op in plan.ops]
    assert not any(isinstance(op, (BatchNormOp, ReluOp, AddOp)) for op in plan.ops)
    assert kinds.count("maxpool") == 1 and kinds[-1] == "head" and plan.ops[-1].output == LOGITS
    convs = [op for op in plan.ops if isinstance(op, ConvOp)]
    blocks = sum(spec.layers)
    # BasicBlock keeps its 3 projection convs; Bottleneck's 4 are merged into their blocks' conv3.
    stem = 3 if spec.deep_stem else 1
    assert len(convs) == stem + blocks * (2 if spec.block == "basic" else 3) + (
        3 if spec.block == "basic" else 0
    )
    last = "conv2" if spec.block == "basic" else "conv3"
    for conv in convs:
        is_last = conv.name.endswith(last)
        assert (conv.residual is not None or conv.shortcut_input is not None) == is_last, conv.name
        assert conv.relu == (not conv.name.endswith(("downsample.0", "downsample.1"))), conv.name
        assert conv.bias is not None
    position = {op.output: i for i, op in enumerate(plan.ops)}
    for i, op in enumerate(plan.ops):
        for value in op.inputs:
            assert value == INPUT or position[value] < i, f"{op.name} reads {value} before it is computed"


def test_buffer_slots_never_overwrite_live_values(resnext_state):
    plan = plan_resnet(get_spec("resnext50_32x4d"), 7, resnext_state)
    last_use = {v: i for i, op in enumerate(plan.ops) for v in op.inputs}
    produced = {op.output: i for i, op in enumerate(plan.ops)}
    for i, op in enumerate(plan.ops):
        if op.output not in plan.slots:
            continue
        assert all(plan.slots.get(v) != plan.slots[op.output] for v in op.inputs), (
            f"{op.name} writes a slot it reads"
        )
        for value, slot in plan.slots.items():
            live = produced[value] < i <= last_use.get(value, -1)
            assert not (live and slot == plan.slots[op.output]), f"{op.name} overwrites live {value}"
    assert plan.num_slots <= 4


def test_peak_activation_bytes_beats_one_buffer_per_value(resnet18_state):
    plan = plan_resnet(get_spec("resnet18"), 10, resnet18_state)
    shapes = plan.shapes(8, 224, 224)
    every_value = sum(torch.Size(shapes[v]).numel() for v in plan.slots) * 2
    peak = plan.peak_activation_bytes(8, 224, 224, torch.float16)
    assert peak == sum(plan.slot_numels(8, 224, 224)) * 2
    assert 0 < peak < every_value / 2


def test_assign_buffers_reuses_a_slot_only_after_last_use():
    ops = [
        ConvOp("a", [INPUT], "a", weight=torch.ones(1, 3, 1, 1)),
        ConvOp("b", ["a"], "b", weight=torch.ones(1, 1, 1, 1)),
        ConvOp("c", ["b", "a"], "c", weight=torch.ones(1, 1, 1, 1)),
        MaxPoolOp("d", ["c"], "d"),
    ]
    slots = assign_buffers(ops)
    assert len({slots["a"], slots["b"], slots["c"]}) == 3  # a is still needed by c
    assert slots["d"] != slots["c"]


def test_describe_reports_every_op_and_the_traffic_saving(resnet18_state):
    plan = plan_resnet(get_spec("resnet18"), 10, resnet18_state)
    text = plan.describe(batch=2, height=224, width=224, dtype=torch.float16)
    for op in plan.ops:
        assert op.name in text
    assert "bias+residual+relu" in text and "eager" in text and "memory traffic saved" in text
    fused = plan.totals(plan.ops, 2, 224, 224, torch.float16)
    eager = plan.totals(plan.eager_ops, 2, 224, 224, torch.float16)
    assert eager.bytes_read + eager.bytes_written > 1.5 * (fused.bytes_read + fused.bytes_written)
    assert abs(fused.flops - eager.flops) / eager.flops < 0.01
    assert str(plan) == plan.describe()


def test_head_op_replaces_avgpool_and_fc(resnet18_state):
    plan = plan_resnet(get_spec("resnet18"), 10, resnet18_state)
    head = plan.ops[-1]
    assert isinstance(head, HeadOp) and tuple(head.weight.shape) == (10, 512)


def _snapshot(ops) -> list:
    """Every op's type and fields, tensors cloned: what a pure pass must leave as it found it."""
    return [
        (
            type(op),
            {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in vars(op).items()},
        )
        for op in ops
    ]


def _assert_unchanged(ops, snapshot, what: str) -> None:
    assert len(ops) == len(snapshot), f"{what} changed the length of its input"
    for op, (kind, fields) in zip(ops, snapshot):
        assert type(op) is kind and vars(op).keys() == fields.keys(), f"{what} changed {op.name}"
        for key, before in fields.items():
            now = getattr(op, key)
            if isinstance(before, torch.Tensor):
                same = (
                    isinstance(now, torch.Tensor) and now.dtype == before.dtype and torch.equal(now, before)
                )
            else:
                same = now == before
            assert same, f"{what} changed {op.name}.{key}"


def _no_bn(ops):
    return not any(isinstance(op, BatchNormOp) for op in ops) and all(
        op.weight.dtype == torch.float64 for op in ops if isinstance(op, ConvOp)
    )


def _no_add(ops):
    return not any(isinstance(op, AddOp) for op in ops) and any(
        isinstance(op, ConvOp) and op.residual is not None for op in ops
    )


def _relu_fused(ops):
    # Only the block outputs' ReLUs read an add; after fuse_residual those adds are convs, so none is left.
    return not any(isinstance(op, ReluOp) for op in ops) and any(
        isinstance(op, ConvOp) and op.relu and op.residual is not None for op in ops
    )


def _shortcut_merged(ops):
    return sum(isinstance(op, ConvOp) and op.shortcut_input is not None for op in ops) == 4


def _head_fused(ops):
    return isinstance(ops[-1], HeadOp) and not any(op.kind in ("avgpool", "linear") for op in ops)


# Each pass, given the output of the passes before it, and what its own output must show.
PIPELINE = [
    (fold_batchnorm, _no_bn),
    (fuse_residual, _no_add),
    (fuse_relu, _relu_fused),
    (fuse_shortcut, _shortcut_merged),
    (fuse_head, _head_fused),
]


@pytest.mark.parametrize("index", range(len(PIPELINE)), ids=[p.__name__ for p, _ in PIPELINE])
def test_each_pass_leaves_its_input_unchanged(index, resnext_state):
    ops = build_eager_graph(get_spec("resnext50_32x4d"), resnext_state)
    for earlier, _ in PIPELINE[:index]:
        ops = earlier(ops)
    run_pass, produced_what_it_should = PIPELINE[index]
    snapshot = _snapshot(ops)
    assert not produced_what_it_should(ops), "the check must fail before the pass runs"
    result = run_pass(ops)
    _assert_unchanged(ops, snapshot, run_pass.__name__)
    assert produced_what_it_should(result)


def test_fold_batchnorm_copies_a_conv_without_bn_to_float64():
    w = torch.randn(2, 3, 1, 1, generator=torch.Generator().manual_seed(1))
    ops = [ConvOp("c", [INPUT], "c", weight=w, bias=None)]
    (conv,) = fold_batchnorm(ops)
    assert conv is not ops[0] and conv.weight.dtype == torch.float64 and ops[0].weight.dtype == torch.float32
    torch.testing.assert_close(conv.weight, w.double(), rtol=0, atol=0)


def test_fold_normalization_and_assign_buffers_leave_their_input_unchanged(resnet18_state):
    plan = plan_resnet(get_spec("resnet18"), 10, resnet18_state)
    snapshot = _snapshot(plan.ops)
    stem = fold_normalization(plan.ops[0], (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    slots = assign_buffers(plan.ops)
    _assert_unchanged(plan.ops, snapshot, "fold_normalization / assign_buffers")
    assert stem is not plan.ops[0] and stem.pad_value is not None and plan.ops[0].pad_value is None
    assert not torch.equal(stem.weight, plan.ops[0].weight)
    assert slots == plan.slots


def test_plan_keeps_the_eager_graph_it_was_built_from(resnet18_state):
    plan = plan_resnet(get_spec("resnet18"), 10, resnet18_state)
    eager = build_eager_graph(get_spec("resnet18"), resnet18_state)
    _assert_unchanged(plan.eager_ops, _snapshot(eager), "plan_resnet")


def test_planning_passes_is_the_pipeline_and_an_option_drops_its_entry():
    assert planning_passes() == tuple(run_pass for run_pass, _ in PIPELINE)
    assert planning_passes(fuse_shortcuts=False) == (fold_batchnorm, fuse_residual, fuse_relu, fuse_head)


def test_printed_plan_reports_its_dtype_and_counts_bytes_in_it(resnet18_state):
    fp32 = plan_resnet(get_spec("resnet18"), 10, resnet18_state, dtype=torch.float32)
    fp16 = plan_resnet(get_spec("resnet18"), 10, resnet18_state)
    assert fp16.dtype == torch.float16 and str(fp16) == fp16.describe(dtype=torch.float16)
    assert str(fp32) == fp32.describe(dtype=torch.float32) != str(fp16)
    header = str(fp32).splitlines()[0]
    assert header.endswith("1x3x224x224 float32") and "float16" not in str(fp32)
    saving = lambda plan: [line for line in str(plan).splitlines() if line.startswith("memory traffic")]
    peak = lambda plan: float(saving(plan)[0].split("peak activations ")[1].split(" MB")[0])
    assert peak(fp32) == pytest.approx(2 * peak(fp16), rel=1e-3)


def test_a_float32_engine_prints_its_plan_in_float32():
    engine = fastres.optimize(
        make_calibrated_model("resnet18", 10, seed=3), device="cpu", dtype=torch.float32
    )
    assert engine.dtype == torch.float32
    assert str(engine.plan) == engine.plan.describe(dtype=torch.float32)
    assert str(engine.plan).splitlines()[0].endswith(" float32")
