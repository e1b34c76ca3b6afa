"""`Fp8ConvLayer`: the implicit-GEMM conv on fp8 (e4m3) activations and weights (sm_89+ on a GPU).

The int8 layer's plumbing (kernels/conv_int8.py: the QUANTIZED constexpr, the same loop modes, configs,
BLOCK_K >= 32 padding and fused split-K) with float8_e4m3fn operands: `tl.dot` e4m3 x e4m3 accumulates
in fp32 (split-K partials fp32, summed in slice order) and the epilogue requantizes to e4m3
(`int8_epilogue.quantize_fp8`: saturating to +-448, round to nearest even). fp8 MMA takes K = 32 per
instruction (mma.sync m16n8k32 on sm_89, wgmma k32 on sm_90), the same minimum BLOCK_K as int8.

Weights are the caller's e4m3 values with a per-output-channel `dequant_scale` (weight scale x input
scale, weight scale = max |w| / 448). On sm_90 Triton's default for fp8 dots (max_num_imprecise_acc
2**30) leaves the whole K reduction in wgmma's own accumulator, which keeps fewer bits than IEEE fp32:
over a 3x3x512 conv's K = 4608 that loses precision. This layer promotes once per K-step instead
(IMPRECISE_ACC = BLOCK_K: each step's wgmma result is added into the fp32 accumulator), the remedy
DeepSeek-V3's fp8 GEMMs use at a 128-element interval. The interpreter accumulates exactly in fp32;
only a GPU run measures what remains.
"""

from __future__ import annotations

import torch

from .conv_int8 import Int8ConvLayer

FP8_MAX = 448.0
FP8_OUT_DTYPES = (torch.float8_e4m3fn, torch.float16, torch.bfloat16, torch.float32)


class Fp8ConvLayer(Int8ConvLayer):
    """A conv on e4m3 NHWC activations with e4m3 weights; out_dtype torch.float8_e4m3fn (requantized with
    `output_scale`) or a float dtype (dequantized: the network's last conv, or fp32 for the tests)."""

    operand_dtype = torch.float8_e4m3fn
    out_dtypes = FP8_OUT_DTYPES

    def _kernel_args(self, x, residual, out, config, shortcut_input=None, workspace=(None, None)):
        args, constexprs, grid = super()._kernel_args(x, residual, out, config, shortcut_input, workspace)
        constexprs["IMPRECISE_ACC"] = config.block_k  # fp32 promotion once per K-step (module docstring)
        return args, constexprs, grid

    def _check_weight(self, weight, what: str) -> None:
        if not isinstance(weight, torch.Tensor) or weight.dtype != torch.float8_e4m3fn or weight.ndim != 4:
            raise TypeError(f"Fp8ConvLayer: {what} must be a float8_e4m3fn tensor (C_out, C_in/groups, R, S)")
        if not bool(torch.isfinite(weight.float()).all()):
            raise ValueError(f"Fp8ConvLayer: {what} holds NaN (e4m3 has no infinity): requantize it")


__all__ = ["FP8_MAX", "Fp8ConvLayer"]
