"""int8 (and fp8) on the Triton path: every conv after the stem reads and writes int8 with calibrated
scales. dtype=torch.float8_e4m3fn runs the same plan in e4m3 (sm_89+; `Fp8ConvLayer`, the same kernel):
every "int8" below is then "fp8", with fp32 accumulation and split-K partials instead of int32.

What runs in which precision, and why:
* the stem (7x7, 3 input channels) is fp16: its K per tap is 3 channels, which int8 MMA (32 per step)
  would pad 10x, and it reads the caller's float or uint8 images directly; it is ~2% of ResNet-50's
  FLOPs. The max-pool after it quantizes in its store (kernels/pool.py), so the first int8 conv's
  input costs no kernel of its own.
* a deep stem's other two 3x3 convs (ResNet-D) are fp16 as well, up to the max-pool
  (`quantize.float_stem`): ~8% of ResNet-50-D's FLOPs, left in fp16 rather than give the stem kernel
  a quantizing store;
* every other conv is an `Int8ConvLayer`: int8 activations, per-output-channel int8 weights, an exact
  int32 accumulator, and an epilogue that writes the next layer's int8 (bias, int8 residual, ReLU and
  requantization fused); a merged projection shortcut shares the accumulator (its weights quantized
  against the main conv's per-channel factor, see `quantize.quantize_conv_weights`).
* the network's last conv dequantizes in its epilogue to fp16 for the head (global pool + fc, <0.1%
  of the FLOPs): the logits keep fp16's precision, not 8 bits'.

Activation scales come from a calibration (fastres/quantize.py) on the torch backend's float32 run
of the same folded plan, or from a saved calibration file (the scales are in the .json record). int8
cannot carry NaN, so an image with a non-finite value gets NaN logits from a check on the input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import __version__
from .. import calibration as records
from ..calibration import CalibrationRecord, write_record
from ..errors import ConfigError
from ..graph import ConvOp, HeadOp, MaxPoolOp
from ..kernels import ConvLayer, HeadLayer, max_pool2d_nhwc
from ..kernels.conv_fp8 import Fp8ConvLayer
from ..kernels.conv_int8 import Int8ConvLayer
from ..quantize import (
    DEFAULT_METHOD,
    INT8,
    QuantFormat,
    activation_scales,
    float_stem,
    method_name,
    parse_method,
    quant_format,
    quantize_conv_weights,
    quantized_values,
)
from .base import Backend, Observer
from .triton_backend import _stem_layer, conv_options, float_conv_layer

FLOAT_DTYPE = torch.float16  # the stem, the last conv's output and the head
LAYER_CLASSES: dict[torch.dtype, type[Int8ConvLayer]] = {
    torch.int8: Int8ConvLayer,
    torch.float8_e4m3fn: Fp8ConvLayer,
}


def triton_calibration(
    plan, calibration, *, model_name: str, weights_sha256: str, method: str, fmt: QuantFormat = INT8
):
    """The CalibrationRecord (with per-value scales) from a saved file, or calibrated now on images."""
    if records.is_saved_calibration(calibration):
        record = records.read_record(calibration)
        expected = dict(model=model_name, weights_sha256=weights_sha256, backend="triton", dtype=fmt.name)
        records.check_record(record, calibration, **expected)
        missing = [v for v in quantized_values(plan) if v not in (record.scales or {})]
        if missing:
            raise ConfigError(f"calibration {calibration} has no scale for {missing[:3]}: recalibrate")
        return record
    method, percentile = parse_method(method)
    images = records.calibration_images(calibration, plan.mean, plan.std)
    scales = activation_scales(plan, images, method, percentile, fmt)
    return CalibrationRecord(
        model=model_name, weights_sha256=weights_sha256, method=method_name(method, percentile),
        images=int(images.shape[0]), backend="triton", artifact="", fastres=__version__, scales=scales,
        dtype=fmt.name,
    )  # fmt: skip


def _conv_layer(op: ConvOp, scales: dict[str, float], device, fmt: QuantFormat) -> Int8ConvLayer:
    """op as an 8-bit conv (weights and a merged projection quantized by `quantize_conv_weights`)."""
    q_w, q_wd, factor = quantize_conv_weights(op, scales, fmt)
    shortcut = {} if q_wd is None else dict(shortcut_weight=q_wd.to(device))
    out_8bit = op.output in scales
    return LAYER_CLASSES[fmt.dtype](
        q_w.to(device),
        factor.to(device),
        None if op.bias is None else op.bias.to(device),
        residual_scale=scales[op.residual] if op.residual else None,
        out_dtype=fmt.dtype if out_8bit else FLOAT_DTYPE,
        output_scale=scales[op.output] if out_8bit else None,
        **conv_options(op),
        **shortcut,
    )


@dataclass
class Int8Workspace:
    values: dict[str, Tensor]  # NHWC views (int8 or fp16) into the byte slot buffers
    logits: Tensor
    pooled: Tensor
    split_scratch: tuple[Tensor, Tensor]  # split-K partials (int32; fp8: fp32), counters: shared by all convs
    buffers: list[Tensor]


class TritonInt8Backend(Backend):
    name = "triton"
    input_float_dtype = FLOAT_DTYPE

    def __init__(self, plan, device, dtype=torch.int8, *, calibration, model_name: str, weights_sha256: str,
                 save_calibration=None, calibration_method: str = DEFAULT_METHOD):  # fmt: skip
        super().__init__(plan, device, dtype)
        self.format = quant_format(dtype)
        if dtype == torch.float8_e4m3fn and self.device.type == "cuda":
            capability = torch.cuda.get_device_capability(self.device)
            if capability < (8, 9):
                raise ConfigError(
                    f"fp8 needs an sm_89+ GPU (Ada, Hopper or later), this one is sm_{capability[0]}"
                    f"{capability[1]}: use dtype='int8' (sm_80+) or fp16"
                )
        self.calibration = triton_calibration(
            plan, calibration, model_name=model_name, weights_sha256=weights_sha256,
            method=calibration_method, fmt=self.format,
        )  # fmt: skip
        if save_calibration is not None:
            write_record(save_calibration, self.calibration)
        self.scales = dict(self.calibration.scales)
        stem = plan.ops[0]
        self.stem = _stem_layer(stem, self.device, FLOAT_DTYPE, False)
        self.uint8_stem = None
        if plan.uint8_stem is not None:  # raw pixels: the normalisation folded in (as the float backend)
            self.uint8_stem = _stem_layer(plan.uint8_stem, self.device, FLOAT_DTYPE, False)
        self.layers: dict[str, ConvLayer | Int8ConvLayer | HeadLayer] = {}
        float_convs = {op.name for op in float_stem(plan)}
        for op in plan.ops[1:]:
            if op.name in float_convs:  # a deep stem's 2nd and 3rd convs (quantize.float_stem)
                self.layers[op.name] = float_conv_layer(op, self.device, FLOAT_DTYPE, False)
            elif isinstance(op, ConvOp):
                self.layers[op.name] = _conv_layer(op, self.scales, self.device, self.format)
            elif isinstance(op, HeadOp):
                weight, bias = op.weight.to(self.device), None if op.bias is None else op.bias.to(self.device)
                self.layers[op.name] = HeadLayer(weight, bias, dtype=FLOAT_DTYPE)
            elif not isinstance(op, MaxPoolOp):
                raise ConfigError(f"{self.format.name} on triton cannot run op kind {op.kind!r} ({op.name})")
        self.value_dtypes = {op.output: self._dtype_of(op) for op in plan.ops}

    def _dtype_of(self, op) -> torch.dtype:
        if isinstance(op, HeadOp):
            return torch.float32
        return self.format.dtype if op.output in self.scales else FLOAT_DTYPE

    def save_calibration(self, path) -> CalibrationRecord:
        write_record(path, self.calibration)
        return self.calibration

    def make_workspace(self, batch: int, height: int, width: int) -> Int8Workspace:
        shapes = self.plan.shapes(batch, height, width)
        nhwc = {v: (s[0], s[2], s[3], s[1]) for v, s in shapes.items() if len(s) == 4}
        slot_bytes: dict[int, int] = {}
        for value, slot in self.plan.slots.items():
            size = torch.Size(nhwc[value]).numel() * self.value_dtypes[value].itemsize
            slot_bytes[slot] = max(slot_bytes.get(slot, 0), size)
        # Slots hold int8 and fp16 values in turn: byte buffers, viewed per value (8-byte aligned sizes).
        buffers = {
            slot: torch.empty(-(-n // 8) * 8, dtype=torch.uint8, device=self.device)
            for slot, n in slot_bytes.items()
        }
        values = {}
        for value, slot in self.plan.slots.items():
            dtype = self.value_dtypes[value]
            count = torch.Size(nhwc[value]).numel()
            values[value] = buffers[slot][: count * dtype.itemsize].view(dtype).view(nhwc[value])
        logits = torch.empty(batch, self.plan.num_classes, device=self.device, dtype=torch.float32)
        pooled = torch.empty(batch, self.plan.spec.feature_channels, device=self.device, dtype=torch.float32)
        convs = [op for op in self.plan.ops[1:] if isinstance(op, ConvOp)]
        sizes = [self.layers[op.name].scratch_size(nhwc[op.inputs[0]]) for op in convs]
        # Every 8-bit layer of one plan shares a format, so any one's accumulator names the partials'
        # dtype; a float stem conv views the same 4-byte partials as fp32 (run()).
        eight_bit = [layer for layer in self.layers.values() if isinstance(layer, Int8ConvLayer)]
        partial_dtype = eight_bit[0].acc_dtype if eight_bit else torch.int32
        split_scratch = (
            torch.empty(max((p for p, _ in sizes), default=1), device=self.device, dtype=partial_dtype),
            torch.zeros(max((c for _, c in sizes), default=1), device=self.device, dtype=torch.int32),
        )
        all_buffers = [*buffers.values(), logits, pooled, *split_scratch]
        return Int8Workspace(values, logits, pooled, split_scratch, all_buffers)

    def run(self, x: Tensor, workspace: Int8Workspace, observer: Observer | None = None) -> Tensor:
        values = workspace.values
        non_finite = None if x.dtype == torch.uint8 else ~torch.isfinite(x).flatten(1).all(dim=1)
        stem = self.uint8_stem if x.dtype == torch.uint8 else self.stem
        if stem is None:
            raise TypeError("triton backend: this plan has no uint8 stem; pass normalised float input")
        workspace.split_scratch[1].zero_()  # re-arm the split-K counters (as the float backend does)
        out = stem(x, out=values[self.plan.ops[0].output])
        self._observe(observer, self.plan.ops[0], out)
        for op in self.plan.ops[1:]:
            src = values[op.inputs[0]]
            if isinstance(op, ConvOp):
                layer, dst = self.layers[op.name], values[op.output]
                if not isinstance(layer, Int8ConvLayer):  # a float stem conv: fp32 partials, no residual
                    partials, counters = workspace.split_scratch
                    out = layer(src, None, out=dst, scratch=(partials.view(torch.float32), counters))
                elif op.shortcut_input is not None:
                    out = layer(src, None, out=dst, shortcut_input=values[op.shortcut_input],
                                scratch=workspace.split_scratch)  # fmt: skip
                else:
                    residual = values[op.residual] if op.residual else None
                    out = layer(src, residual, out=dst, scratch=workspace.split_scratch)
            elif isinstance(op, MaxPoolOp):
                out = max_pool2d_nhwc(
                    src, kernel_size=op.kernel_size, stride=op.stride, padding=op.padding,
                    out=values[op.output], out_scale=self.scales.get(op.output), out_dtype=self.format.dtype,
                )  # fmt: skip
            else:  # HeadOp (the constructor refused anything else)
                out = self.layers[op.name](src, out=workspace.logits, pooled=workspace.pooled)
            self._observe(observer, op, out)
        if non_finite is not None:  # masked_fill, not `if any()`: no host sync per call on a GPU
            out.masked_fill_(non_finite.view(-1, 1), float("nan"))
        return out

    def kernel_specs(self, batch: int, height: int, width: int, arch: int, input_dtype=None) -> list:
        """Every (kernel, config) one forward launches, in launch order, for ahead-of-time compilation."""
        from ..kernels import max_pool_aot_specs

        shapes = self.plan.shapes(batch, height, width)
        stem = self.uint8_stem if input_dtype == torch.uint8 else self.stem
        specs = stem.aot_specs((batch, 3, height, width), arch, input_dtype=input_dtype)
        for op in self.plan.ops[1:]:
            n, c, h, w = shapes[op.inputs[0]]
            if isinstance(op, MaxPoolOp):
                specs += max_pool_aot_specs(
                    (n, h, w, c), FLOAT_DTYPE, arch, op.kernel_size, op.stride, op.padding,
                    out_dtype=self.value_dtypes[op.output],
                )  # fmt: skip
            else:
                specs += self.layers[op.name].aot_specs((n, h, w, c), arch)
        return specs

    def _observe(self, observer: Observer | None, op, out: Tensor) -> None:
        """An observer sees every op's output as the real values it stands for (int8/fp8 dequantized)."""
        if observer is None:
            return
        if out.dtype == self.format.dtype:
            out = out.float() * self.scales[op.output]
        observer(op.name, out.permute(0, 3, 1, 2) if out.dim() == 4 else out)


__all__ = ["TritonInt8Backend", "triton_calibration"]
