"""The quantized conv epilogue: from the int32 (int8) or fp32 (fp8) accumulator to the next layer's input.

Symmetric quantization (zero point 0): a tensor t is stored as q = round(t / s_t) in [-127, 127].
For an int8 conv with per-output-channel weight scales s_w[co] and input scale s_x, the int32
accumulator acc = sum q_x * q_w gives, in fp32,

    y = acc * (s_w[co] * s_x) + bias[co] + q_res * s_res      (then ReLU)

and the stored value depends on the output pointer's type, fixed at compile time:
* int8: q = round_half_even(clamp(y / s_out, -127, 127)) -- the next layer's input, no other kernel
  in between. -128 is never produced, so negating a value (symmetric range) cannot overflow.
* fp8 (e4m3, the fp8 engine; acc is then fp32): `quantize_fp8`, the same formula on e4m3's grid;
* fp16 / bf16 / fp32: y itself (the network's last conv, read by the floating-point head);
* int32: the raw accumulator, no epilogue (exposed for the bitwise test of the integer GEMM).

Rounding uses the fp32 magic number 1.5 * 2**23: for |v| <= 127, (v + M) - M is v rounded to the
nearest integer, ties to even, in IEEE round-to-nearest arithmetic (the values are clamped first, and
the two additions are not contracted). NaN cannot be represented in int8: a NaN y clamps to some
finite code here, so the engine flags non-finite images itself (backends/triton_int8.py).

fp8 (e4m3: 3 mantissa bits, exponent bias 7, largest finite 448, subnormal step 2**-9): v = y / s_out
is clamped to [-448, 448] (saturation, as cvt.rn.satfinite does) and rounded to the nearest e4m3
value, ties to even, in fp32 before the (then exact) conversion: normal magnitudes (>= 2**-6) round
their fp32 bit pattern to 3 mantissa bits with the integer round-half-even trick, subnormal ones to a
multiple of 2**-9 with the magic number. The hardware conversion would round the same way; doing it
explicitly makes Triton's interpreter, whose fp32 -> fp8 conversion neither rounds to even nor
saturates (it carries a rounded-up mantissa into the wrong exponent bit), run the very arithmetic the
GPU runs, so the interpreter tests check it.
"""

import triton
import triton.language as tl

# 1.5 * 2**23: adding it leaves fp32 no fractional bits for |v| < 2**22.
ROUND_MAGIC = tl.constexpr(12582912.0)
FP8_MAX = tl.constexpr(448.0)  # e4m3's largest finite value
FP8_MIN_NORMAL = tl.constexpr(0.015625)  # 2**-6; below it e4m3 is evenly spaced by 2**-9


@triton.jit
def quantize_int8(y, inv_scale):
    """round_half_even(clamp(y * inv_scale, -127, 127)) as int8 (see the module docstring)."""
    v = tl.minimum(tl.maximum(y * inv_scale, -127.0), 127.0)
    return ((v + ROUND_MAGIC) - ROUND_MAGIC).to(tl.int8)


@triton.jit
def quantize_fp8(y, inv_scale):
    """y * inv_scale saturated to [-448, 448] and rounded to the nearest e4m3 value, ties to even, as
    float8e4nv (see the module docstring)."""
    v = tl.minimum(tl.maximum(y * inv_scale, -FP8_MAX), FP8_MAX)
    bits = v.to(tl.int32, bitcast=True)  # |v| <= 448: the carry never reaches the sign bit
    kept_lsb = (bits >> 20) & 1  # 23 - 3 = 20 mantissa bits are dropped
    normal = ((bits + 0x7FFFF + kept_lsb) & -0x100000).to(tl.float32, bitcast=True)
    subnormal = ((v * 512.0 + ROUND_MAGIC) - ROUND_MAGIC) * 0.001953125  # multiples of 2**-9
    return tl.where(tl.abs(v) < FP8_MIN_NORMAL, subnormal, normal).to(tl.float8e4nv)


@triton.jit
def epilogue_store_int8(
    acc, scale_ptr, bias_ptr, res_ptr, out_ptr, offs_n, n_mask, offs, mask, res_scale, out_inv_scale,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, APPLY_RELU: tl.constexpr,
):  # fmt: skip
    if out_ptr.dtype.element_ty == tl.int32:
        tl.store(out_ptr + offs, acc, mask=mask)
    else:
        scale = tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)
        y = acc.to(tl.float32) * scale[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
        if HAS_RESIDUAL:
            y += tl.load(res_ptr + offs, mask=mask).to(tl.float32) * res_scale
        if APPLY_RELU:
            y = tl.maximum(y, 0.0)
        if out_ptr.dtype.element_ty == tl.int8:
            tl.store(out_ptr + offs, quantize_int8(y, out_inv_scale), mask=mask)
        elif out_ptr.dtype.element_ty == tl.float8e4nv:
            tl.store(out_ptr + offs, quantize_fp8(y, out_inv_scale), mask=mask)
        else:
            tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
