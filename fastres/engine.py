"""The Engine: validates inputs, runs a backend per input shape, replays CUDA graphs on the GPU.

Per input shape (batch, H, W) the engine keeps a runner: the backend's static workspace and, on
CUDA, a captured CUDA graph with static input and output tensors. Runners live in a bounded LRU.
Results are always fresh tensors owned by the caller, never views of static buffers, so a later
call cannot overwrite an earlier result. A runner is used by one thread at a time.
"""

from __future__ import annotations

import contextlib
import math
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backends import Backend, create_backend
from .checkpoints import Architecture
from .errors import ConfigError, InputError
from .graph import execute, normalize
from .labels import load_labels
from .numerics import relative_error, sqnr_db
from .planner import Plan, select_outputs
from .quantize import QUANTIZED_DTYPES
from .reference import build_resnet
from .runner import Runner, RunnerCache, device_lock

NORMALIZE_HINT = (
    "pass uint8 pixels (0-255) as they are, the engine normalises them in its first layer; or convert "
    "to float and normalise as torchvision does: x = (x.float() / 255 - mean) / std with mean "
    "(0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225) per channel"
)
LAYOUTS = ("NCHW", "NHWC")


def as_nchw(x: Any, layout: str | None = None) -> Tensor:
    """Validate an image batch and return it as a logical N x 3 x H x W view (never a copy).

    Float input is normalised images, NCHW unless layout="NHWC". uint8 input is raw pixels, NCHW or
    NHWC: the layout is inferred from which of dims 1 and 3 is 3, and must be given when both are.
    """
    if not isinstance(x, Tensor):
        raise InputError(f"expected a torch.Tensor of images N x 3 x H x W, got {type(x).__name__}")
    if layout is not None and (not isinstance(layout, str) or layout.upper() not in LAYOUTS):
        raise InputError(f"layout must be 'NCHW' or 'NHWC' (or None to infer), got {layout!r}")
    layout = layout.upper() if layout is not None else None
    if x.dim() != 4:
        hint = "; add a batch dimension with x.unsqueeze(0)" if x.dim() == 3 else ""
        raise InputError(f"expected a 4-D batch N x 3 x H x W, got shape {tuple(x.shape)}{hint}")
    if x.dtype == torch.uint8:
        if layout is None:
            c1, c3 = x.shape[1] == 3, x.shape[3] == 3
            if c1 and c3:
                raise InputError(
                    f"uint8 images of shape {tuple(x.shape)} are ambiguous: dims 1 and 3 are both 3; "
                    "pass layout='NCHW' or layout='NHWC'"
                )
            if not (c1 or c3):
                raise InputError(
                    f"expected uint8 images N x 3 x H x W or N x H x W x 3 (RGB), got shape {tuple(x.shape)}"
                )
            layout = "NCHW" if c1 else "NHWC"
    elif not x.is_floating_point():
        raise InputError(
            f"expected floating-point (normalised) or uint8 images, got dtype {x.dtype}; "
            f"for pixel values 0-255 use x.to(torch.uint8), or {NORMALIZE_HINT}"
        )
    layout = layout or "NCHW"
    channel_dim = 1 if layout == "NCHW" else 3
    if x.shape[channel_dim] != 3:
        hint = ""
        if layout == "NCHW" and x.shape[-1] == 3:
            hint = "; for channels-last NHWC data pass layout='NHWC' (or x.permute(0, 3, 1, 2))"
        raise InputError(
            f"expected 3 (RGB) channels in dim {channel_dim} ({layout}), got shape {tuple(x.shape)}{hint}"
        )
    x = x if layout == "NCHW" else x.permute(0, 3, 1, 2)
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise InputError(f"images must be at least 1x1 pixels, got shape {tuple(x.shape)}")
    return x


def validate_images(x: Any, layout: str | None = None) -> None:
    """Raise InputError with what to do when `x` is not an image batch the engine can run."""
    as_nchw(x, layout)


@dataclass(frozen=True)
class Prediction:
    """One of an image's top-k classes."""

    index: int
    label: str
    prob: float  # softmax probability


def _canonical_layout(x: Tensor) -> Tensor:
    """x as contiguous NCHW or channels-last storage: the two layouts runners are keyed and captured by."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


@dataclass
class LayerError:
    op: str
    kind: str
    relative_error: float  # this op's output vs the same plan executed in float64 from the same input
    # Signal-to-quantization-noise ratio in dB: 10 log10(sum ref^2 / sum (out - ref)^2); inf if exact.
    sqnr_db: float = math.inf


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


def _runner_builder(engine: Engine) -> Callable[[Tensor], Runner]:
    """engine._new_runner through a weak reference: the runner cache must not hold its engine, or a
    dropped engine (and its weights, GPU buffers and graphs) would live on until the cycle collector
    runs, which large tensors do not prompt."""
    ref = weakref.ref(engine)
    return lambda x: ref()._new_runner(x)


class Engine:
    """Runs a planned ResNet. Call it with N x 3 x H x W images; get float32 logits N x classes.

    A plan cut by `planner.select_outputs` returns features instead: a dict name -> tensor (conv
    features N x C x H x W channels-last in the engine dtype, "pool" float32 N x C), or with
    embedding=True (fastres.load(..., num_classes=0)) the pooled N x C tensor itself.
    """

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
        labels=None,
        embedding: bool = False,
        tuner=None,
    ):
        if max_batch < 1 or max_cached_shapes < 1:
            raise ConfigError("max_batch and max_cached_shapes must be at least 1")
        if embedding and list(plan.outputs or ()) != ["pool"]:
            raise ConfigError("embedding=True needs a plan whose only output is 'pool'")
        self.embedding = embedding
        self.plan, self.backend, self.architecture = plan, backend, architecture
        self.device, self.dtype = backend.device, backend.dtype
        self.cuda_graphs = (self.device.type == "cuda") if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and self.device.type != "cuda":
            raise ConfigError("cuda_graphs=True needs a CUDA device")
        self.max_batch, self.max_cached_shapes = max_batch, max_cached_shapes
        self._state_dict = state_dict
        self.labels: list[str] = load_labels(labels, architecture.num_classes)
        self.mean, self.std = plan.mean, plan.std
        # Keyed by (shape, dtype, stride): kernels read the input by its strides.
        # tune=True (fastres.tuning.use.FirstUseTuner): called with (batch, H, W) before a new shape's
        # runner is built, so its workspace and CUDA graph are made with the tuned tactics.
        self._tuner = tuner
        self._runners = RunnerCache(max_cached_shapes, _runner_builder(self))
        self._embedder: Engine | None = None  # built on first use (an embedder is its own)
        self._embedder_lock = threading.Lock()

    def _new_runner(self, x: Tensor) -> Runner:
        if self._tuner is not None:
            self._tuner(x.shape[0], x.shape[2], x.shape[3])
        return Runner(self.backend, x, self.cuda_graphs)

    @property
    def num_classes(self) -> int:
        """The classifier's size; 0 for an engine that returns features or embeddings (timm's convention)."""
        return self.architecture.num_classes if self.plan.outputs is None else 0

    @property
    def outputs(self) -> tuple[str, ...]:
        """What a call returns: ("logits",), ("pool",) for an embedder, else the feature names (a dict)."""
        return ("logits",) if self.plan.outputs is None else tuple(self.plan.outputs)

    def output_shapes(
        self, batch: int = 1, height: int = 224, width: int = 224
    ) -> dict[str, tuple[int, ...]]:
        """Each output's shape for this input size (conv features N x C x H x W)."""
        return self.plan.output_shapes(batch, height, width)

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def __repr__(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        spec = self.architecture.spec  # a backbone's fc (perhaps a placeholder) never runs: no classes
        network = (
            self.architecture.describe() if self.plan.outputs is None else f"{spec.name} ({spec.describe()})"
        )
        return (
            f"Engine({network}, backend={self.backend.name}, device={self.device}, "
            f"dtype={dtype}, cuda_graphs={self.cuda_graphs}, outputs={'+'.join(self.outputs)})"
        )

    def __call__(self, x: Tensor, layout: str | None = None) -> Tensor | dict[str, Tensor]:
        """Float32 logits N x num_classes (a backbone: its features dict, an embedder: N x C pooled).

        x: normalised float images N x 3 x H x W, or uint8 pixels N x 3 x H x W or N x H x W x 3
        (normalised with this engine's mean/std inside its first layer). `layout` ('NCHW' or 'NHWC')
        is needed only when it cannot be inferred (uint8 with both dims 1 and 3 equal to 3).
        """
        x = as_nchw(x, layout)
        if x.shape[0] == 0:  # documented: an empty batch gives an empty result
            out = self._empty(x.shape[2], x.shape[3])
        else:
            # uint8 stays uint8 (4x less to move; the first layer reads it), float takes the engine dtype.
            float_dtype = self.backend.input_float_dtype or self.dtype
            x = x.to(self.device) if x.dtype == torch.uint8 else x.to(device=self.device, dtype=float_dtype)
            x = _canonical_layout(x)
            chunks = [self._run_chunk(chunk) for chunk in x.split(self.max_batch)]
            out = chunks[0]
            if len(chunks) > 1:  # torch.cat keeps channels-last
                out = (
                    {k: torch.cat([c[k] for c in chunks]) for k in out}
                    if isinstance(out, dict)
                    else torch.cat(chunks)
                )
        return out["pool"] if self.embedding else out

    def _empty(self, height: int, width: int) -> Tensor | dict[str, Tensor]:
        shapes = self.plan.output_shapes(0, height, width)
        if self.plan.outputs is None:
            return torch.empty(shapes["logits"], device=self.device, dtype=torch.float32)
        return {
            name: torch.empty(shape, device=self.device, dtype=self.dtype, memory_format=torch.channels_last)
            if len(shape) == 4
            else torch.empty(shape, device=self.device, dtype=torch.float32)
            for name, shape in shapes.items()
        }

    def embed(self, x: Tensor, normalize: bool = False, layout: str | None = None) -> Tensor:
        """Float32 N x C pooled features (global average pool, no fc) from any engine: one with an fc
        runs its plan up to the pool. normalize=True scales each row to unit L2 norm (F.normalize)."""
        out = self._embedding_engine()(x, layout)
        # A torch op after the pool kernel, not a fused epilogue: one pass over N x C floats.
        return F.normalize(out, dim=1) if normalize else out

    def _embedding_engine(self) -> Engine:
        """This engine when it is an embedder, else one beside it sharing the packed weights (built once)."""
        if self.embedding:
            return self
        with self._embedder_lock:
            if self._embedder is None:
                plan = select_outputs(self.backend.packed_plan, ("pool",))
                if self.backend.runs_cut_plans:
                    backend = self.backend.for_plan(plan)
                else:  # a quantized plan (int8, fp8) is not cut: the torch backend packs its own weights once
                    dtype = torch.float32 if self.dtype in QUANTIZED_DTYPES else self.dtype
                    backend = create_backend("torch", self.backend.packed_plan, self.device, dtype)
                    backend = backend.for_plan(plan)
                self._embedder = Engine(
                    plan,
                    backend,
                    self.architecture,
                    self._state_dict,
                    cuda_graphs=self.cuda_graphs,
                    max_batch=self.max_batch,
                    max_cached_shapes=self.max_cached_shapes,
                    labels=self.labels,
                    embedding=True,
                )
            return self._embedder

    def _run_chunk(self, x: Tensor) -> Tensor:
        runner = self._runners.get((tuple(x.shape), x.dtype, x.stride()), x)
        if runner.workspace is None and runner.graph is None:
            return runner(x)  # stateless: threads may run concurrently
        with runner.lock:
            return runner(x)

    def predict(self, x: Tensor, topk: int = 5, layout: str | None = None) -> list[list[Prediction]]:
        """Per image, its `topk` most probable classes (best first) with softmax probabilities and names."""
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ConfigError(f"topk must be a positive integer, got {topk!r}")
        self._require_logits("predict")
        probs = self(x, layout).float().softmax(dim=1)
        top = probs.topk(min(topk, self.num_classes), dim=1)
        values, indices = top.values.cpu().tolist(), top.indices.cpu().tolist()
        return [
            [Prediction(i, self.labels[i], p) for i, p in zip(row_indices, row_values)]
            for row_indices, row_values in zip(indices, values)
        ]

    def warmup(
        self,
        batch_sizes=(1,),
        image_size: int | tuple[int, int] = 224,
        input_dtype: torch.dtype | None = None,
        layout: str = "NCHW",
        tune: bool = False,
        budget_s: float = 60.0,
    ) -> None:
        """Compile kernels and capture CUDA graphs for these shapes ahead of the first real call.

        input_dtype: torch.uint8 to warm the raw-pixel path (in `layout`), else normalised float.
        tune=True (triton backend): first tune these batch sizes at this image size within budget_s
        seconds, reusing and filling the tuning cache (fastres.tuning); shapes already captured are
        captured again with the tuned tactics.
        """
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        if tune:
            if self.backend.name != "triton":
                raise ConfigError(f"warmup(tune=True) applies to the triton backend, not {self.backend.name}")
            if self.dtype in QUANTIZED_DTYPES:
                raise ConfigError("warmup(tune=True) covers the float kernels; int8/fp8 are not tuned")
            from .tuning.use import tune_and_cache

            tune_and_cache(self.backend, list(batch_sizes), h, w, budget_s=budget_s, progress=False)
            for runner in self._runners.values():
                runner.release()
            self._runners = RunnerCache(self.max_cached_shapes, _runner_builder(self))
        for batch in batch_sizes:
            if input_dtype == torch.uint8:
                shape = (batch, 3, h, w) if layout.upper() == "NCHW" else (batch, h, w, 3)
                self(torch.randint(0, 256, shape, dtype=torch.uint8, device=self.device), layout=layout)
            else:
                self(torch.randn(batch, 3, h, w, device=self.device))
        if self.device.type == "cuda":
            with device_lock(self.device).shared():  # a device-wide sync would break a capture under way
                torch.cuda.synchronize(self.device)

    def state_dict(self) -> dict[str, Tensor]:
        """The checkpoint's tensors this engine was planned from (CPU, unfolded; do not modify)."""
        return self._state_dict

    def save_calibration(self, path) -> None:
        """Write this int8 engine's calibration (a .json record and its artefact beside it) for reuse:
        `fastres.load(..., dtype="int8", calibration=path)` then skips calibrating."""
        save = getattr(self.backend, "save_calibration", None)
        if save is None:
            raise ConfigError(f"save_calibration: the {self.backend.name} backend has no int8 calibration")
        save(path)

    def _require_logits(self, what: str) -> None:
        if self.plan.outputs is not None:
            raise ConfigError(
                f"{what}() needs logits; this engine returns {', '.join(self.outputs)} "
                "(load without features= / num_classes=0 for a classifier)"
            )

    def reference(self) -> nn.Module:
        """The unfolded PyTorch reference network with this engine's weights (float32, eval mode)."""
        model = build_resnet(self.architecture.spec, self.num_classes, self._state_dict)
        return model.to(self.device).eval()

    def _float64_input(self, x: Tensor) -> Tensor:
        """The normalised float64 CPU images that x (float, or uint8 pixels) stands for."""
        x = x.detach().cpu()
        return normalize(x, self.mean, self.std) if x.dtype == torch.uint8 else x.double()

    def check(self, x: Tensor, layout: str | None = None) -> CheckResult:
        """Compare this engine's logits with the reference model run in float64 on the CPU.

        uint8 input: the reference (and eager PyTorch) get the float64 normalised images.
        """
        self._require_logits("check")
        x = as_nchw(x, layout)
        if x.shape[0] == 0:
            raise InputError("check() needs at least one image")
        ours = self(x).double().cpu()
        model = self.reference().cpu()
        x = self._float64_input(x)
        with torch.inference_mode():
            ref = model.double()(x)
            # Eager in the backend's layout: channels-last kernels round differently from NCHW ones.
            memory_format = getattr(self.backend, "memory_format", torch.contiguous_format)
            # Eager PyTorch has no int8 or fp8 convolution: such an engine is shown beside eager float32.
            eager_dtype = torch.float32 if self.dtype in QUANTIZED_DTYPES else self.dtype
            eager_model = model.to(self.device, eager_dtype, memory_format=memory_format)
            eager_input = x.to(self.device, eager_dtype).contiguous(memory_format=memory_format)
            eager = eager_model(eager_input).double().cpu()
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

    def layer_errors(self, x: Tensor, layout: str | None = None) -> list[LayerError]:
        """Per-op relative error of this engine against the plan run in float64: where drift starts."""
        x = as_nchw(x, layout)
        if x.shape[0] == 0:
            raise InputError("layer_errors() needs at least one image")
        float_dtype = self.backend.input_float_dtype or self.dtype  # int8 engines take float input
        x = x.to(self.device) if x.dtype == torch.uint8 else x.to(device=self.device, dtype=float_dtype)
        reference: dict[str, Tensor] = {}
        # uint8 pixels run the plan's uint8 stem on the raw values, in float64 like the rest.
        execute(self.plan.ops_for(x.dtype), x.detach().cpu().double(), observer=reference.__setitem__)
        kinds = {op.name: op.kind for op in self.plan.ops}
        report: list[LayerError] = []
        observe = lambda name, value: report.append(
            LayerError(
                name, kinds[name], relative_error(value, reference[name]), sqnr_db(value, reference[name])
            )
        )
        workspace = self.backend.make_workspace(x.shape[0], x.shape[2], x.shape[3])
        on_device = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        with torch.inference_mode(), on_device:
            self.backend.run(x, workspace, observer=observe)
        return report
