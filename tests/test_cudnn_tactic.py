"""The cuDNN tactic (the tuner's parity reference and the self-check's fallback) computes every conv
option the plan has: dilation, ResNet-D's pooled projections, the merged shortcut; tuning-cache keys
tell those convs apart from the plain ones; and no backend copies host data to the device per call
(not allowed while a CUDA graph is captured).

On the CPU, F.conv2d stands in for cuDNN: the same call the tactic makes on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fastres.backends.reference_backend import ReferenceBackend
from fastres.backends.torch_backend import TorchBackend
from fastres.graph import INPUT, ConvOp
from fastres.numerics import LAYER_RTOL, assert_close
from fastres.planner import plan_resnet
from fastres.specs import get_spec
from fastres.testing import make_calibrated_model, random_images
from fastres.tuning.gate import gate_bound, parity_problem
from fastres.tuning.tactics import CudnnConv, layer_signature

SIZE = 64
CASES = {
    "resnet50d": lambda: get_spec("resnet50d"),  # pooled projection merged into conv3 (K-concatenated)
    "resnet18d": lambda: get_spec("resnet18d"),  # pooled projection as its own conv
    "resnet50-os8": lambda: get_spec("resnet50").with_dilation(output_stride=8),  # dilated layer3/4
}


def _plan(spec):
    return plan_resnet(spec, 10, make_calibrated_model(spec, 10).state_dict())


@pytest.mark.parametrize("case", list(CASES))
def test_cudnn_tactic_matches_float64_on_every_conv(case):
    """Each conv after the stem, fed the float64 run's own inputs in fp32, against that run's output."""
    plan = _plan(CASES[case]())
    x = random_images(2, SIZE, SIZE, seed=5)
    values = {INPUT: x.double()}
    outputs = {op.name: op.output for op in plan.ops}
    observe = lambda name, out: values.__setitem__(outputs[name], out)
    TorchBackend(plan, "cpu", torch.float64).run(x.double(), None, observer=observe)
    nhwc = lambda t: t.permute(0, 2, 3, 1).float().contiguous()
    convs = [op for op in plan.ops[1:] if isinstance(op, ConvOp)]
    assert any(op.avg_pool or op.shortcut_avg_pool or op.dilation > 1 for op in convs)
    for op in convs:
        expected = values[op.output]
        out = torch.full(nhwc(expected).shape, float("nan"))
        CudnnConv(op, "cpu", torch.float32)(
            nhwc(values[op.inputs[0]]),
            nhwc(values[op.residual]) if op.residual else None,
            out,
            nhwc(values[op.shortcut_input]) if op.shortcut_input is not None else None,
        )
        assert_close(out.permute(0, 3, 1, 2), expected, LAYER_RTOL[torch.float32], what=f"{case} {op.name}")


def test_tuning_keys_tell_pooled_and_dilated_convs_from_plain_ones():
    """The cache is per device, not per model: a plain model's tuned choice must never apply to a
    ResNet-D pooled projection or a dilated conv of the same shape."""

    def signatures(spec):
        convs = [op for op in _plan(spec).ops[1:] if isinstance(op, ConvOp)]
        return {op.name: layer_signature(op, (28, 28), torch.float16) for op in convs}

    plain, pooled = signatures(get_spec("resnet50")), signatures(get_spec("resnet50d"))
    dilated = signatures(get_spec("resnet50").with_dilation(output_stride=8))
    assert plain["layer2.0.conv3"] != pooled["layer2.0.conv3"]  # strided vs pooled merged projection
    assert plain["layer4.1.conv2"] != dilated["layer4.1.conv2"]
    assert plain["layer1.0.conv1"] == pooled["layer1.0.conv1"] == dilated["layer1.0.conv1"]
    plain18, pooled18 = signatures(get_spec("resnet18")), signatures(get_spec("resnet18d"))
    assert plain18["layer2.0.downsample.0"] != pooled18["layer2.0.downsample.1"]  # timm: .0 is the pool


class _CrossDeviceCopies(TorchDispatchMode):
    """Records every op that reads a tensor on another device than the one it writes."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = lambda tree: [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]
        devices, outs = {t.device for t in tensors((args, kwargs))}, tensors(out)
        if len(devices) > 1 or (devices and any(o.device not in devices for o in outs)):
            self.seen.append(str(func))
        return out


@pytest.mark.parametrize("backend_name", ["torch", "reference"])
def test_a_forward_copies_nothing_from_the_host(backend_name, monkeypatch):
    """uint8 pixels through the torch and reference backends on a device of their own ("meta" stands in
    for a GPU): every constant the forward reads is already there, so the forward captures into a CUDA
    graph (a host-to-device copy during capture is an error)."""
    spec = get_spec("resnet18")
    model = make_calibrated_model(spec, 10)
    plan = plan_resnet(spec, 10, model.state_dict())
    if backend_name == "torch":
        backend = TorchBackend(plan, "meta", torch.float32)
    else:
        backend = ReferenceBackend(plan, "meta", torch.float32, module=model)
    pixels = torch.empty(2, 3, SIZE, SIZE, dtype=torch.uint8, device="meta")
    # A tensor made from Python numbers on the device is a host-to-device copy the dispatcher never sees.
    made, tensor = [], torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(k.get("device")) or tensor(*a, **k))
    with _CrossDeviceCopies() as copies:
        logits = backend.run(pixels, None)
    assert logits.shape == (2, 10) and logits.device.type == "meta"
    assert copies.seen == [] and made == []


def test_the_gate_holds_tf32_layers_to_tf32s_bound():
    """allow_tf32: both sides run on TF32 tensor cores, each within fp16's bound of float64; IEEE
    float32's bound would drop every correct Triton tactic."""
    reference = torch.randn(64, 64, dtype=torch.float64)
    scale = reference.abs().max().item()
    off_by_tf32 = (reference + 1e-3 * scale * torch.randn_like(reference).clamp(-1, 1)).float()
    assert parity_problem(off_by_tf32, reference.float(), torch.float32) is not None
    assert parity_problem(off_by_tf32, reference.float(), torch.float32, tf32=True) is None
    assert gate_bound(torch.float16, tf32=True) == gate_bound(torch.float16)  # tf32 only widens float32

