"""The first-use self-check: the Triton plan against the torch backend on a small batch, once per GPU.

The first time an engine's plan runs on a GPU (per cache key: GPU, driver, CUDA, torch, Triton and
fastres versions), the Triton backend and the torch backend (cuDNN) run the same small batch of
random images, and both are compared with the plan run in float64 by the torch backend, as
`fastres check` judges them: the Triton logits may have at most `parity_bound` of the torch backend's
own error. On a mismatch the check finds where: each conv runs alone on the float64 run's inputs
(cast to the engine dtype) and is held to the parity gate against the cuDNN tactic. Layers that fail
are moved to the cuDNN tactic and the whole check repeats; if it still fails, or no conv failed alone
(the stem, pool or head is wrong: not local), the engine falls back to the torch backend. Either way
a loud warning names what drifted, and the verdict is recorded in the tuning cache, so later loads
on the same software apply it without checking again.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import asdict, dataclass, field

import torch

from ..backends.torch_backend import TorchBackend
from ..graph import INPUT, ConvOp
from ..numerics import parity_bound, relative_error
from ..testing import random_images
from .gate import parity_problem
from .timing import on_device

CHECK_BATCH, CHECK_SIZE = 2, 64  # small: a few ms of GPU work for ResNet-50 (plus first compiles)


class SelfCheckWarning(UserWarning):
    """fastres's Triton kernels gave wrong results on this GPU; it fell back (see the message)."""


@dataclass
class SelfCheckVerdict:
    ok: bool  # the Triton plan passed as it was
    relative_error: float
    bound: float
    drifted: list[str] = field(default_factory=list)  # convs that failed alone: moved to cuDNN
    action: str = "none"  # "none", "cudnn" (the drifted convs) or "torch" (the whole engine)

    def to_json(self) -> dict:
        return asdict(self)


def plan_key(backend) -> str:
    """Names what the verdict is about: the plan's distinct convs (shapes, epilogues) and dtype."""
    signatures = sorted({sig for sig, _ in backend.conv_inputs(1, CHECK_SIZE, CHECK_SIZE).values()})
    return "plan-" + hashlib.sha256("\n".join(signatures).encode()).hexdigest()[:16]


def _logits(backend, x: torch.Tensor, observer=None) -> torch.Tensor:
    workspace = backend.make_workspace(x.shape[0], x.shape[2], x.shape[3])
    with torch.inference_mode():
        return backend.run(x, workspace, observer=observer)


def _drifted_convs(backend, values64: dict[str, torch.Tensor]) -> list[str]:
    """Convs whose own output, from the float64 run's inputs, fails the gate against cuDNN's."""
    nhwc = lambda t: t.permute(0, 2, 3, 1).to(backend.dtype).contiguous()
    drifted = []
    for op in backend.plan.ops[1:]:
        if not isinstance(op, ConvOp):
            continue
        values = {v: nhwc(values64[v]) for v in op.inputs}
        out_shape = nhwc(values64[op.output]).shape
        values[op.output] = torch.full(out_shape, float("nan"), device=backend.device, dtype=backend.dtype)
        with torch.inference_mode():
            ours = backend._conv(op, values[op.inputs[0]], values, None).clone()
            reference = backend.cudnn_layer(op.name)(
                values[op.inputs[0]],
                values[op.residual] if op.residual else None,
                torch.empty_like(ours),
                values[op.shortcut_input] if op.shortcut_input is not None else None,
            )
        if parity_problem(ours, reference, backend.dtype, tf32=getattr(backend, "allow_tf32", False)):
            drifted.append(op.name)
    return drifted


def run_self_check(backend, *, seed: int = 0, size: int | None = None) -> SelfCheckVerdict:
    """Check a TritonBackend against the torch backend; moves drifted convs to cuDNN in place.

    The verdict's action says what the caller must do: "torch" means replace the backend."""
    with on_device(backend.device):
        return _self_check(backend, seed, size)


def _self_check(backend, seed: int, size: int | None) -> SelfCheckVerdict:
    device, dtype = backend.device, backend.dtype
    size = size or CHECK_SIZE
    x = random_images(CHECK_BATCH, size, size, seed=seed).to(device)
    reference = TorchBackend(backend.plan, device, torch.float64)
    values64: dict[str, torch.Tensor] = {INPUT: x.double()}
    outputs = {op.name: op.output for op in backend.plan.ops}
    with torch.inference_mode():
        ref = reference.run(
            x.double(), None, observer=lambda name, out: values64.__setitem__(outputs[name], out)
        )
        eager = TorchBackend(backend.plan, device, dtype, allow_tf32=getattr(backend, "allow_tf32", False))
        eager_error = relative_error(eager.run(x.to(dtype), None), ref)
    bound = parity_bound(eager_error)
    error = relative_error(_logits(backend, x.to(dtype)), ref)
    if error <= bound:
        return SelfCheckVerdict(True, error, bound)
    drifted = _drifted_convs(backend, values64)
    for name in drifted:
        backend.use_cudnn(name)
    if drifted:
        fixed = relative_error(_logits(backend, x.to(dtype)), ref)
        if fixed <= bound:
            return SelfCheckVerdict(False, error, bound, drifted, "cudnn")
    return SelfCheckVerdict(False, error, bound, drifted, "torch")


def warn_verdict(verdict: SelfCheckVerdict, where: str) -> None:
    if verdict.ok:
        return
    what = (
        f"conv layers {', '.join(verdict.drifted)} drifted and now run on cuDNN"
        if verdict.action == "cudnn"
        else "the whole engine now runs on the torch backend (cuDNN)"
        + (
            f"; convs that failed alone: {', '.join(verdict.drifted)}"
            if verdict.drifted
            else "; not local to a conv"
        )
    )
    warnings.warn(
        f"fastres SELF-CHECK FAILED on {where}: the Triton plan's logits have relative error "
        f"{verdict.relative_error:.2e} > {verdict.bound:.2e} (2x the torch backend's); {what}. "
        "Please report this GPU, driver and Triton version.",
        SelfCheckWarning,
        stacklevel=4,
    )
