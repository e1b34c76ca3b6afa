"""`Int8ConvLayer`: the implicit-GEMM conv (kernels/conv_kernel.py) on int8 activations and weights.

The same kernel, loop modes and configs as `ConvLayer` (GEMM, channel-blocked, gather, K-concatenated
shortcut, split-K), switched by the QUANTIZED constexpr: operands are int8, `tl.dot` accumulates exactly in
int32 (IMMA on sm_80, integer wgmma or IMMA on sm_90), split-K partials are int32 (so the fixed-order
reduction is exact, not merely deterministic), and kernels/int8_epilogue.py turns the accumulator into
the next layer's int8 (or, for a network's last conv, fp16/fp32; or the raw int32 for tests).

Quantization is the caller's: this layer takes int8 weights (C_out, C_in/groups, R, S) and a per-output
channel `dequant_scale` = weight scale x input scale, so that conv(q_x, q_w) * dequant_scale is the real
pre-bias output. A K-concatenated projection shares the accumulator, so its int8 weights must be
quantized against the same per-channel factor: q_wd = round(w_d * s_x2 / dequant_scale).

Channels: int8 `tl.dot` needs K >= 32 per step (mma.sync m16n8k32 on sm_80), so BLOCK_K is at least 32;
layers with fewer channels per (super-)group run the same loops with the channel tail masked to zero
(padding inside the tile), never a slower path.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import triton

from .conv import ConvLayer
from .conv_configs import ConvConfig, finalize, steps_per_split

INT8_MIN_BLOCK_K = 32  # int8 MMA's K per instruction on sm_80 (m16n8k32)
INT8_OUT_DTYPES = (torch.int8, torch.float16, torch.bfloat16, torch.float32, torch.int32)


def _check_int8_weight(weight, what: str) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dtype != torch.int8 or weight.ndim != 4:
        raise TypeError(f"Int8ConvLayer: {what} must be an int8 tensor (C_out, C_in/groups, R, S)")
    if int(weight.min()) < -127:
        raise ValueError(f"Int8ConvLayer: {what} must lie in [-127, 127] (symmetric int8), found -128")


class Int8ConvLayer(ConvLayer):
    operand_dtype = torch.int8  # activations and packed weights (Fp8ConvLayer: float8_e4m3fn)
    out_dtypes = INT8_OUT_DTYPES

    def _check_weight(self, weight, what: str) -> None:
        _check_int8_weight(weight, what)

    """A conv on int8 NHWC activations with int8 weights packed once; see the module docstring.

    out_dtype: torch.int8 (requantized with `output_scale`), a float dtype (dequantized; the network's
    last conv), or torch.int32 (the raw accumulator). residual_scale: the int8 residual's scale.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        dequant_scale: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        residual_scale: float | None = None,
        out_dtype: torch.dtype | None = None,  # default: the operand dtype (requantized)
        output_scale: float | None = None,
        shortcut_weight: torch.Tensor | None = None,
        **conv_options,  # ConvLayer's geometry and epilogue: stride, padding, groups, relu, has_residual, ...
    ):
        who = type(self).__name__
        out_dtype = out_dtype or self.operand_dtype
        self._check_weight(weight, "weight")
        if shortcut_weight is not None:
            self._check_weight(shortcut_weight, "shortcut_weight")
        if out_dtype not in self.out_dtypes:
            raise TypeError(f"{who}: out_dtype must be one of {self.out_dtypes}, got {out_dtype}")
        if out_dtype == self.operand_dtype and not (output_scale and output_scale > 0):
            raise ValueError("Int8ConvLayer: an int8 output needs output_scale > 0")
        if conv_options.get("has_residual") and not (residual_scale and residual_scale > 0):
            raise ValueError("Int8ConvLayer: has_residual=True needs residual_scale > 0")
        c_out = weight.shape[0]
        if tuple(dequant_scale.shape) != (c_out,) or not bool((dequant_scale > 0).all()):
            raise ValueError(f"Int8ConvLayer: dequant_scale must be ({c_out},) positive scales")
        # int8 and e4m3 values are exact in every float dtype: packed by ConvLayer in fp32, then cast.
        shortcut = None if shortcut_weight is None else shortcut_weight.double()
        super().__init__(weight.double(), bias, dtype=torch.float32, shortcut_weight=shortcut, **conv_options)
        self.weight_packed = self.weight_packed.to(self.operand_dtype)
        self.dtype = self.operand_dtype
        self.out_dtype = out_dtype
        self.acc_dtype = torch.int32 if self.operand_dtype == torch.int8 else torch.float32
        self.dequant_scale = dequant_scale.detach().to(self.device, torch.float32).contiguous()
        self.residual_scale = float(residual_scale or 1.0)
        self.output_scale = output_scale
        self.out_inv_scale = 1.0 / output_scale if output_scale else 1.0

    def __repr__(self) -> str:
        return super().__repr__().replace("dtype=torch.int8", f"int8 -> {self.out_dtype}")

    def clip_config(self, config: ConvConfig) -> ConvConfig:
        """`ConvLayer.clip_config`, with BLOCK_K raised to int8 MMA's 32 (channels beyond the layer's
        are masked to zero: padding inside the tile)."""
        config = super().clip_config(config)
        if config.block_k >= INT8_MIN_BLOCK_K:
            return config
        k_steps = self.total_k_steps(INT8_MIN_BLOCK_K)
        split = triton.cdiv(k_steps, steps_per_split(k_steps, min(config.split_k, k_steps)))
        return finalize(replace(config, block_k=INT8_MIN_BLOCK_K), split, k_steps)

    def _kernel_args(self, x, residual, out, config: ConvConfig, shortcut_input=None, workspace=(None, None)):
        if config.block_k < INT8_MIN_BLOCK_K:
            raise ValueError(f"Int8ConvLayer: BLOCK_K must be >= {INT8_MIN_BLOCK_K} (int8 MMA), got {config}")
        if config.split_k > 1 and not config.fused_reduce:
            raise ValueError("Int8ConvLayer: split-K reduces in the conv kernel only (fused_reduce=True)")
        args, constexprs, grid = super()._kernel_args(x, residual, out, config, shortcut_input, workspace)
        args.update(scale_ptr=self.dequant_scale, RES_SCALE=self.residual_scale)
        args.update(OUT_INV_SCALE=self.out_inv_scale)
        constexprs["QUANTIZED"] = True
        return args, constexprs, grid


__all__ = ["INT8_MIN_BLOCK_K", "Int8ConvLayer"]
