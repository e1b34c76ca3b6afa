"""The Engine: validates inputs, runs a backend per input shape, replays CUDA graphs on the GPU.

Per input shape (batch, H, W) the engine keeps a runner: the backend's static workspace and, on
CUDA, a captured CUDA graph with static input and output tensors. Runners live in a bounded LRU.
Results are always fresh tensors owned by the caller, never views of static buffers, so a later
call cannot overwrite an earlier result. A runner is used by one thread at a time.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .backends import Backend
from .checkpoints import Architecture
from .errors import InputError
from .graph import execute
from .planner import Plan
from .reference import build_resnet

NORMALIZE_HINT = (
    "convert images to float and normalise them as torchvision does: "
    "x = (x.float() / 255 - mean) / std with mean (0.485, 0.456, 0.406) "
    "and std (0.229, 0.224, 0.225) per channel"
)


def validate_images(x: Any) -> None:
    """Raise InputError with what to do when `x` is not an N x 3 x H x W floating batch."""
    if not isinstance(x, Tensor):
        raise InputError(f"expected a torch.Tensor of images N x 3 x H x W, got {type(x).__name__}")
    if x.dim() != 4:
        hint = "; add a batch dimension with x.unsqueeze(0)" if x.dim() == 3 else ""
        raise InputError(f"expected a 4-D batch N x 3 x H x W, got shape {tuple(x.shape)}{hint}")
    if x.shape[1] != 3:
        hint = "; channels-last NHWC data needs x.permute(0, 3, 1, 2)" if x.shape[-1] == 3 else ""
        raise InputError(f"expected 3 (RGB) channels in dim 1, got shape {tuple(x.shape)}{hint}")
    if not x.is_floating_point():
        raise InputError(f"expected floating-point images, got dtype {x.dtype}; {NORMALIZE_HINT}")
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise InputError(f"images must be at least 1x1 pixels, got shape {tuple(x.shape)}")


def relative_error(out: Tensor, ref: Tensor) -> float:
    """max |out - ref| / max |ref|, in float64 on the CPU."""
    out, ref = out.detach().to("cpu", torch.float64), ref.detach().to("cpu", torch.float64)
    return (out - ref).abs().max().item() / max(ref.abs().max().item(), 1e-300)


@dataclass
class LayerError:
    op: str
    kind: str
    relative_error: float  # this op's output vs the same plan executed in float64 from the same input


@dataclass
class CheckResult:
    """fastres's logits against the reference model run in float64 on the same inputs."""

    max_abs_error: float
    relative_error: float  # max |fastres - ref| / max |ref|
    eager_relative_error: float  # the same measure for eager PyTorch in the engine's dtype
    top1_agreement: float
    top5_agreement: float

    def __str__(self) -> str:
        return (
            f"max abs error {self.max_abs_error:.3e}, relative {self.relative_error:.3e} "
            f"(eager PyTorch in the same dtype: {self.eager_relative_error:.3e}), "
            f"top-1 agreement {self.top1_agreement:.1%}, top-5 agreement {self.top5_agreement:.1%}"
        )


class _Runner:
    """Static state for one input shape: the backend workspace and, on CUDA, a captured graph.

    On CUDA all work on the static buffers runs on the runner's own stream, ordered against the
    caller's stream on entry and exit, so callers on different streams cannot race on them.
    """

    def __init__(self, backend: Backend, shape: tuple[int, int, int, int], use_cuda_graph: bool):
        self.backend = backend
        self.device = backend.device
        self.workspace = backend.make_workspace(shape[0], shape[2], shape[3])
        self.lock = threading.Lock()
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.graph: torch.cuda.CUDAGraph | None = None
        if use_cuda_graph:
            self._capture(shape)

    def _capture(self, shape: tuple[int, int, int, int]) -> None:
        with torch.cuda.device(self.device):
            self._capture_on_device(shape)

    def _capture_on_device(self, shape: tuple[int, int, int, int]) -> None:
        caller = torch.cuda.current_stream(self.device)
        self.static_input = torch.randn(shape, device=self.device).to(self.backend.dtype)
        self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            for _ in range(2):  # compile kernels and settle allocations outside the capture
                self.backend.run(self.static_input, self.workspace)
        caller.wait_stream(self.stream)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: other threads may keep replaying their graphs while this one captures.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.static_output = self.backend.run(self.static_input, self.workspace)
        caller.synchronize()

    def _run(self, x: Tensor) -> Tensor:
        if self.graph is not None:
            self.static_input.copy_(x)
            self.graph.replay()
            return self.static_output.clone()
        out = self.backend.run(x, self.workspace)
        return out.clone() if self.workspace is not None and _may_alias(out, self.workspace) else out

    def __call__(self, x: Tensor) -> Tensor:
        if self.stream is None:
            return self._run(x)
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)
        # Triton launches on the current device: make it the engine's (e.g. cuda:1) for this call.
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            out = self._run(x)
        caller.wait_stream(self.stream)
        out.record_stream(caller)  # the result's memory is used on the caller's stream from here on
        return out


def _may_alias(out: Tensor, workspace: Any) -> bool:
    return any(
        out.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        for b in getattr(workspace, "buffers", ())
    )


class Engine:
    """Runs a planned ResNet. Call it with N x 3 x H x W images; get float32 logits N x classes."""

    def __init__(
        self,
        plan: Plan,
        backend: Backend,
        architecture: Architecture,
        state_dict: dict[str, Tensor],
        *,
        cuda_graphs: bool | None = None,
        max_batch: int = 256,
        max_cached_shapes: int = 8,
    ):
        if max_batch < 1 or max_cached_shapes < 1:
            raise ValueError("max_batch and max_cached_shapes must be at least 1")
        self.plan, self.backend, self.architecture = plan, backend, architecture
        self.device, self.dtype = backend.device, backend.dtype
        self.cuda_graphs = (self.device.type == "cuda") if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs a CUDA device")
        self.max_batch, self.max_cached_shapes = max_batch, max_cached_shapes
        self._state_dict = state_dict
        self._runners: OrderedDict[tuple[int, ...], _Runner] = OrderedDict()
        self._runners_lock = threading.Lock()
        self._build_lock = threading.Lock()

    @property
    def num_classes(self) -> int:
        return self.architecture.num_classes

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def __repr__(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        return (
            f"Engine({self.architecture.describe()}, backend={self.backend.name}, device={self.device}, "
            f"dtype={dtype}, cuda_graphs={self.cuda_graphs})"
        )

    def _runner(self, shape: tuple[int, int, int, int]) -> _Runner:
        with self._runners_lock:
            runner = self._runners.get(shape)
            if runner is not None:
                self._runners.move_to_end(shape)
                return runner
        # One build at a time: a CUDA-graph capture must not race another capture. Calls for
        # shapes that are already built go on meanwhile (they only take _runners_lock).
        with self._build_lock:
            with self._runners_lock:
                runner = self._runners.get(shape)
            if runner is None:
                runner = _Runner(self.backend, shape, self.cuda_graphs)
            with self._runners_lock:
                self._runners[shape] = runner
                self._runners.move_to_end(shape)
                while len(self._runners) > self.max_cached_shapes:
                    self._runners.popitem(last=False)
        return runner

    def __call__(self, x: Tensor) -> Tensor:
        validate_images(x)
        if x.shape[0] == 0:  # documented: an empty batch gives an empty result
            return torch.empty(0, self.num_classes, device=self.device, dtype=torch.float32)
        x = x.to(device=self.device, dtype=self.dtype)
        outputs = [self._run_chunk(chunk) for chunk in x.split(self.max_batch)]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _run_chunk(self, x: Tensor) -> Tensor:
        runner = self._runner(tuple(x.shape))
        if runner.workspace is None and runner.graph is None:
            return runner(x)  # stateless: threads may run concurrently
        with runner.lock:
            return runner(x)

    def warmup(self, batch_sizes=(1,), image_size: int | tuple[int, int] = 224) -> None:
        """Compile kernels and capture CUDA graphs for these shapes ahead of the first real call."""
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        for batch in batch_sizes:
            self(torch.randn(batch, 3, h, w, device=self.device))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reference(self) -> nn.Module:
        """The unfolded PyTorch reference network with this engine's weights (float32, eval mode)."""
        model = build_resnet(self.architecture.spec, self.num_classes, self._state_dict)
        return model.to(self.device).eval()

    def check(self, x: Tensor) -> CheckResult:
        """Compare this engine's logits with the reference model run in float64 on the CPU."""
        validate_images(x)
        if x.shape[0] == 0:
            raise InputError("check() needs at least one image")
        ours = self(x).double().cpu()
        model = self.reference().cpu()
        with torch.inference_mode():
            ref = model.double()(x.detach().cpu().double())
            # Eager in the backend's layout: channels-last kernels round differently from NCHW ones.
            layout = getattr(self.backend, "memory_format", torch.contiguous_format)
            eager_model = model.to(self.device, self.dtype, memory_format=layout)
            eager = eager_model(x.to(self.device, self.dtype).contiguous(memory_format=layout)).double().cpu()
        scale = ref.abs().max().item() or 1.0
        k = min(5, self.num_classes)
        top_ref = ref.topk(k, dim=1).indices
        top1 = (ours.argmax(1) == ref.argmax(1)).double().mean().item()
        top5 = torch.stack([torch.isin(top_ref[i], ours[i].topk(k).indices).all() for i in range(len(ref))])
        return CheckResult(
            max_abs_error=(ours - ref).abs().max().item(),
            relative_error=(ours - ref).abs().max().item() / scale,
            eager_relative_error=(eager - ref).abs().max().item() / scale,
            top1_agreement=top1,
            top5_agreement=top5.double().mean().item(),
        )

    def layer_errors(self, x: Tensor) -> list[LayerError]:
        """Per-op relative error of this engine against the plan run in float64: where drift starts."""
        validate_images(x)
        if x.shape[0] == 0:
            raise InputError("layer_errors() needs at least one image")
        x = x.to(device=self.device, dtype=self.dtype)
        reference: dict[str, Tensor] = {}
        execute(self.plan.ops, x.detach().cpu().double(), observer=reference.__setitem__)
        kinds = {op.name: op.kind for op in self.plan.ops}
        report: list[LayerError] = []
        observe = lambda name, value: report.append(
            LayerError(name, kinds[name], relative_error(value, reference[name]))
        )
        workspace = self.backend.make_workspace(x.shape[0], x.shape[2], x.shape[3])
        on_device = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        with torch.inference_mode(), on_device:
            self.backend.run(x, workspace, observer=observe)
        return report
