"""The plan run by OpenVINO's CPU plugin: the fastest CPU path (an optional extra: fastres[openvino]).

The folded plan is converted once, at load time, into an OpenVINO model with a dynamic batch and
image size. Each input kind (float or uint8 pixels, NCHW or NHWC) gets its own compiled model whose
PrePostProcessor does what the caller would otherwise do by hand: uint8 -> float, the
(x / 255 - mean) / std normalisation and the layout change, all inside the compiled model. The
normalisation runs before the stem, so its zero padding is zero in normalised space: the same
border as eager PyTorch on normalised images, and as the plan's folded uint8 stem.

Inputs and outputs are shared with torch, not copied: the input tensor's memory is handed to
OpenVINO, and each call's output is a fresh torch tensor that OpenVINO writes into.
"""

from __future__ import annotations

import dataclasses
import threading
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import BackendUnavailableError, ConfigError
from ..graph import LOGITS, ConvOp, HeadOp, LinearOp, execute
from .base import Backend, Observer
from .openvino_runtime import (  # noqa: F401  (openvino_available, default_precision: the api's)
    CAPABILITY,
    PRECISIONS,
    core,
    cpu_capabilities,
    default_precision,
    import_openvino,
    openvino_available,
)


def precision_config(dtype: torch.dtype) -> dict[str, Any]:
    """The CPU plugin's config for this compute dtype; a typed error where the CPU cannot run it."""
    capabilities = cpu_capabilities()
    if CAPABILITY[dtype] not in capabilities:
        raise BackendUnavailableError(
            f"this CPU has no {CAPABILITY[dtype]} support in OpenVINO (it has {', '.join(capabilities)}); "
            "use dtype='fp32'"
        )
    # int8: the quantized model's int8 layers run in int8, the rest in the plugin's default precision.
    return {"INFERENCE_PRECISION_HINT": PRECISIONS[dtype]} if dtype in PRECISIONS else {}


class PlanModule(nn.Module):
    """The folded plan as a module OpenVINO's converter can trace: float32 parameters, plain torch ops."""

    def __init__(self, ops, outputs: dict[str, str] | None = None):
        super().__init__()
        self.ops = [_as_float32(op) for op in ops]
        # A cut plan (features, embeddings) returns its outputs as a tuple, in `outputs` order.
        self.outputs = None if outputs is None else list(outputs.values())

    def forward(self, x: Tensor):
        if self.outputs is None:
            return execute(self.ops, x)
        producer = {op.output: op.name for op in self.ops}
        values: dict[str, Tensor] = {}
        execute(self.ops, x, observer=values.__setitem__)
        return tuple(values[producer[value]] for value in self.outputs)


def float_model(plan):
    """The plan as an OpenVINO model taking normalised float32 N x 3 x H x W, any batch and size."""
    ov = import_openvino()
    # The converter traces with torch.jit, which warns that it is deprecated: not the user's concern.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return ov.convert_model(
            PlanModule(plan.ops, plan.outputs),
            example_input=torch.randn(1, 3, 64, 64),
            input=[ov.PartialShape([-1, 3, -1, -1])],
        )


def _as_float32(op):
    if not isinstance(op, (ConvOp, HeadOp, LinearOp)):
        return op
    changes = {
        name: getattr(op, name).float()
        for name in ("weight", "bias", "shortcut_weight", "pad_value")
        if getattr(op, name, None) is not None
    }
    return dataclasses.replace(op, **changes)


class OpenVinoBackend(Backend):
    name = "openvino"
    # Float input stays float32: OpenVINO converts to its inference precision inside the model.
    input_float_dtype = torch.float32
    observes_layers = False  # one compiled graph: its intermediate values are not handed out
    # What eager is compared with: OpenVINO's CPU plugin runs oneDNN's blocked channels-last convs, and
    # rounds like them (resnet34 fp32 at 67x93: 1.16e-5 vs float64, eager channels-last 9.2e-6, eager
    # NCHW 4.8e-6, fastres's torch backend 1.14e-5).
    memory_format = torch.channels_last

    def __init__(
        self,
        plan,
        device,
        dtype,
        *,
        threads: int | None = None,
        streams: int | None = None,
        calibration=None,
        save_calibration=None,
        model_name: str | None = None,
        weights_sha256: str | None = None,
    ):
        super().__init__(plan, device, dtype)
        if self.device.type != "cpu":
            raise BackendUnavailableError(f"the openvino backend runs on the CPU, not on {self.device}")
        if threads is not None and threads < 1 or streams is not None and streams < 1:
            raise ConfigError("threads and streams must be at least 1")
        self.config = precision_config(dtype)
        if threads is not None:
            self.config["INFERENCE_NUM_THREADS"] = threads
        if streams is not None:
            self.config["NUM_STREAMS"] = streams
        self.calibration = None  # the CalibrationRecord of an int8 engine
        if dtype == torch.int8:
            from .openvino_int8 import int8_model

            self.model, self.calibration = int8_model(
                lambda: float_model(plan), plan, calibration, save_calibration, model_name, weights_sha256
            )
        else:
            self._model = None  # converted on first use: a features engine never converts the whole plan
        self._compiled: dict[tuple[torch.dtype, str], Any] = {}
        self._lock = threading.RLock()  # compiled() converts under it, and model re-enters it

    @property
    def runs_cut_plans(self) -> bool:
        # A cut of the float plan converts on its own (about a second); int8 would need recalibrating.
        return self.dtype != torch.int8

    def for_plan(self, plan) -> OpenVinoBackend:
        """This backend converting `plan`, a cut of its own, to a model of its own (features, embed)."""
        backend = super().for_plan(plan)
        backend._model, backend._compiled, backend._lock = None, {}, threading.RLock()
        return backend

    @property
    def model(self):
        with self._lock:
            if self._model is None:
                self._model = float_model(self.plan)
            return self._model

    @model.setter
    def model(self, model) -> None:
        self._model = model

    def save_calibration(self, path):
        if self.calibration is None:
            raise ConfigError("save_calibration: this engine is not int8 (load it with dtype='int8')")
        from .openvino_int8 import save

        self.calibration = save(self.model, self.calibration, path)
        return self.calibration

    def compiled(self, input_dtype: torch.dtype, layout: str):
        """The compiled model for one input kind, built on first use (about 0.1-1 s) and kept."""
        key = (input_dtype, layout)
        with self._lock:
            if key not in self._compiled:
                self._compiled[key] = core().compile_model(self._with_preprocessing(*key), "CPU", self.config)
            return self._compiled[key]

    def _with_preprocessing(self, input_dtype: torch.dtype, layout: str):
        ov = import_openvino()
        from openvino.preprocess import PrePostProcessor

        ppp = PrePostProcessor(self.model.clone())
        tensor = ppp.input().tensor()
        tensor.set_layout(ov.Layout(layout))
        ppp.input().model().set_layout(ov.Layout("NCHW"))
        if input_dtype == torch.uint8:
            tensor.set_element_type(ov.Type.u8)
            steps = ppp.input().preprocess().convert_element_type(ov.Type.f32)
            steps.mean([255.0 * m for m in self.plan.mean]).scale([255.0 * s for s in self.plan.std])
        for index, name in enumerate(self.plan.outputs or ()):
            if name != "pool":  # conv features come out NHWC: the channels-last memory callers get
                ppp.output(index).model().set_layout(ov.Layout("NCHW"))
                ppp.output(index).tensor().set_layout(ov.Layout("NHWC"))
        return ppp.build()

    def make_workspace(self, batch: int, height: int, width: int) -> Any:
        # Infer requests by input kind, made on the first call (the runner holds its lock), and the
        # output shapes: shape inference walks every op, once per input shape rather than per call.
        return {"output_shapes": self.plan.output_shapes(batch, height, width)}

    def run(self, x: Tensor, workspace: Any, observer: Observer | None = None) -> Tensor:
        if observer is not None:
            raise ConfigError(
                "per-layer drift is not available on the openvino backend (OpenVINO runs the plan as one "
                "compiled graph); use backend='torch'"
            )
        ov = import_openvino()
        # NHWC storage is fed as it lies (the compiled model transposes), anything else as NCHW.
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            layout, data = "NHWC", x.permute(0, 2, 3, 1)
        else:
            layout, data = "NCHW", x.contiguous()
        if data.dtype != torch.uint8:
            data = data.float()
        key = (data.dtype, layout)
        request = workspace.get(key) if workspace is not None else None
        if request is None:
            request = self.compiled(*key).create_infer_request()
            if workspace is not None:
                workspace[key] = request
        request.set_input_tensor(ov.Tensor(data.numpy(), shared_memory=True))
        # Fresh outputs OpenVINO writes into; conv features as NHWC storage seen as N x C x H x W.
        results: dict[str, Tensor] = {}
        shapes = (workspace or self.make_workspace(x.shape[0], x.shape[2], x.shape[3]))["output_shapes"]
        for index, (name, shape) in enumerate(shapes.items()):
            if len(shape) == 4:
                storage = torch.empty(shape[0], shape[2], shape[3], shape[1], dtype=torch.float32)
                results[name] = storage.permute(0, 3, 1, 2)
            else:
                storage = results[name] = torch.empty(shape, dtype=torch.float32)
            request.set_output_tensor(index, ov.Tensor(storage.numpy(), shared_memory=True))
        request.infer()
        if data.dtype != torch.uint8:
            # OpenVINO's fused ReLUs and max-pools turn NaN into numbers; eager gives that image NaN.
            non_finite = ~torch.isfinite(data).flatten(1).all(dim=1)
            for out in results.values():
                out.masked_fill_(non_finite.view(-1, *[1] * (out.dim() - 1)), float("nan"))
        return results[LOGITS] if self.plan.outputs is None else results
