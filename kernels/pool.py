"""Max pooling on NHWC activations (ResNet's 3x3 / stride 2 / padding 1 after the stem).

out[b, oh, ow, c] = max over (r, s) of x[b, oh*stride - pad + r, ow*stride - pad + s, c], where padding
acts as -inf (it never wins; pad <= kernel_size // 2 guarantees every window holds a real pixel). Each
program owns BLOCK_P output pixels x BLOCK_C channels; channels are the contiguous axis, so every tap is
a coalesced (BLOCK_P, BLOCK_C) load. NaN propagates, as in torch.nn.functional.max_pool2d.

With an int8 or fp8 `out` (the quantized engine: its first conv reads the pool's output), the max is
quantized in the store with `out_scale` (kernels/int8_epilogue.py): quantization is monotone, so this
equals pooling quantized values, and no separate quantize kernel runs between the stem and the convs.

Why this pool is not fused into the stem (kernels/stem.py): a pooled row needs three stem rows, one
shared with each neighbouring pooled row, so a fused tile either recomputes a third of its stem rows
(the stem is the costliest conv per output value: 147 MACs each) or exchanges halos between programs,
and the kernel would need 2-D output tiles instead of flat pixel ranges. What fusion would save: one read of
the stem output and one write of a quarter of it, about 2 MB per 224x224 image in fp16, ~0.6 us per
image at 3.35 TB/s (estimate; ~2% of the batch-256 goal), plus one launch. Left separate.

PDL (USE_PDL, sm_90; kernels/pdl.py): the pool has no constants to prefetch, so it lets its dependents
launch, does its index math and waits before its first load of x.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .aot import KernelSpec, Pointer, ShapeOnly, interpreting, make_spec
from .int8_epilogue import quantize_fp8, quantize_int8
from .launch import SUPPORTED_DTYPES, check_int32_indexing, check_launchable
from .pdl import pdl_enabled, pdl_for_arch

# One config: the op is a pure bandwidth-bound gather; 32 pixels x 64 channels over 4 warps keeps the
# nine taps' loads in flight without spilling (64x64 spilled on sm_90) and gives 98 pixel tiles per
# channel tile at batch 1 (56*56 outputs). The interpreter gets larger tiles (it pays per program).
POOL_BLOCK_P, POOL_BLOCK_C, POOL_NUM_WARPS = 32, 64, 4
POOL_INTERP_BLOCK_P, POOL_INTERP_BLOCK_C = 256, 128


# Sizes other than the channel count only bound masks: not specialized, so one binary fits all shapes.
@triton.jit(do_not_specialize=["P", "H", "W", "OH", "OW"])
def _max_pool_kernel(
    # pointers
    x_ptr,
    out_ptr,
    # sizes
    P,  # N*OH*OW output pixels
    H,
    W,
    OH,
    OW,
    C,
    OUT_INV_SCALE,  # an int8 or fp8 out: 1 / its scale
    # compile-time
    KERNEL: tl.constexpr,
    STRIDE: tl.constexpr,
    PAD: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    USE_PDL: tl.constexpr,  # programmatic dependent launch (kernels/pdl.py): no memory access before the wait
):
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_mask = offs_p < P
    c_mask = offs_c < C
    ow = offs_p % OW
    oh = (offs_p // OW) % OH
    batch = offs_p // (OW * OH)
    ih0 = oh * STRIDE - PAD
    iw0 = ow * STRIDE - PAD
    rows = x_ptr + batch * (H * W * C)
    # max is exact in any float dtype: keep the running max in the input dtype (half the registers).
    best = tl.full((BLOCK_P, BLOCK_C), float("-inf"), dtype=x_ptr.dtype.element_ty)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()  # x is the previous kernel's output
    for r in tl.static_range(KERNEL):
        for s in tl.static_range(KERNEL):
            ih = ih0 + r
            iw = iw0 + s
            ok = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            v = tl.load(
                (rows + (ih * W + iw) * C)[:, None] + offs_c[None, :],
                mask=ok[:, None] & c_mask[None, :],
                other=float("-inf"),
            )
            best = tl.maximum(best, v, propagate_nan=tl.PropagateNan.ALL)
    out_offs = offs_p[:, None] * C + offs_c[None, :]
    if out_ptr.dtype.element_ty == tl.int8:
        best = quantize_int8(best.to(tl.float32), OUT_INV_SCALE)
    elif out_ptr.dtype.element_ty == tl.float8e4nv:
        best = quantize_fp8(best.to(tl.float32), OUT_INV_SCALE)
    tl.store(out_ptr + out_offs, best, mask=p_mask[:, None] & c_mask[None, :])


QUANTIZED_OUT_DTYPES = (torch.int8, torch.float8_e4m3fn)


def pool_output_shape(input_shape_nhwc, kernel_size=3, stride=2, padding=1) -> tuple[int, int, int, int]:
    n, h, w, c = input_shape_nhwc
    return (
        n,
        (h + 2 * padding - kernel_size) // stride + 1,
        (w + 2 * padding - kernel_size) // stride + 1,
        c,
    )


def _blocks(interpreter: bool) -> tuple[int, int]:
    return (POOL_INTERP_BLOCK_P, POOL_INTERP_BLOCK_C) if interpreter else (POOL_BLOCK_P, POOL_BLOCK_C)


def _check_geometry(kernel_size: int, stride: int, padding: int) -> None:
    if kernel_size < 1 or stride < 1 or not 0 <= padding <= kernel_size // 2:
        raise ValueError(
            f"max_pool2d_nhwc: expected kernel_size >= 1, stride >= 1 and 0 <= padding <= kernel_size // 2, "
            f"got kernel_size={kernel_size}, stride={stride}, padding={padding}"
        )


def _pool_args(x, out, kernel_size, stride, padding, block_p, block_c, out_scale=None, pdl=False):
    n, h, w, c = x.shape
    _, oh, ow, _ = out.shape
    inv_scale = 1.0 / out_scale if out_scale else 1.0
    args = dict(x_ptr=x, out_ptr=out, P=n * oh * ow, H=h, W=w, OH=oh, OW=ow, C=c, OUT_INV_SCALE=inv_scale)
    constexprs = dict(KERNEL=kernel_size, STRIDE=stride, PAD=padding, BLOCK_P=block_p, BLOCK_C=block_c)
    constexprs["USE_PDL"] = pdl
    grid = (triton.cdiv(n * oh * ow, block_p), triton.cdiv(c, block_c))
    return args, constexprs, grid


def max_pool2d_nhwc(
    x: torch.Tensor,
    *,
    kernel_size: int = 3,
    stride: int = 2,
    padding: int = 1,
    out: torch.Tensor | None = None,
    out_scale: float | None = None,
    out_dtype: torch.dtype = torch.int8,
) -> torch.Tensor:
    """Max pool a contiguous NHWC tensor; returns (N, OH, OW, C) in x's dtype (into `out` if given),
    or with `out_scale` in `out_dtype` (int8 or float8_e4m3fn), quantized with that scale (symmetric,
    saturating, round to nearest even)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"max_pool2d_nhwc: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"max_pool2d_nhwc: x dtype must be one of {SUPPORTED_DTYPES}, got {x.dtype}")
    if x.ndim != 4:
        raise ValueError(f"max_pool2d_nhwc: expected a 4-d NHWC tensor, got shape {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError(f"max_pool2d_nhwc: expected a contiguous NHWC tensor, got strides {x.stride()}")
    check_launchable(x, "max_pool2d_nhwc")
    _check_geometry(kernel_size, stride, padding)
    out_shape = pool_output_shape(tuple(x.shape), kernel_size, stride, padding)
    if out_shape[1] < 1 or out_shape[2] < 1:
        raise ValueError(f"max_pool2d_nhwc: input {tuple(x.shape)} is smaller than the {kernel_size}x window")
    if out_scale is not None and not out_scale > 0:
        raise ValueError(f"max_pool2d_nhwc: out_scale must be positive, got {out_scale}")
    if out_scale is not None and out_dtype not in QUANTIZED_OUT_DTYPES:
        raise TypeError(f"max_pool2d_nhwc: quantized out_dtype must be one of {QUANTIZED_OUT_DTYPES}")
    out_dtype = x.dtype if out_scale is None else out_dtype
    if out is None:
        out = torch.empty(out_shape, dtype=out_dtype, device=x.device)
    else:
        if not isinstance(out, torch.Tensor) or out.dtype != out_dtype:
            raise TypeError(
                f"max_pool2d_nhwc: out must be a {out_dtype} tensor, got {getattr(out, 'dtype', out)}"
            )
        if tuple(out.shape) != out_shape or out.device != x.device or not out.is_contiguous():
            raise ValueError(
                f"max_pool2d_nhwc: out must be a contiguous {out_shape} tensor on {x.device}, "
                f"got {tuple(out.shape)} on {out.device} (contiguous={out.is_contiguous()})"
            )
    check_int32_indexing(x.numel(), "max_pool2d_nhwc")
    block_p, block_c = _blocks(interpreting())
    pdl = pdl_enabled(x.device)
    geometry = (kernel_size, stride, padding, block_p, block_c)
    args, constexprs, grid = _pool_args(x, out, *geometry, out_scale, pdl)
    launch = dict(num_warps=POOL_NUM_WARPS, num_stages=1, enable_fp_fusion=True)
    if pdl:
        launch["launch_pdl"] = True
    _max_pool_kernel[grid](**args, **constexprs, **launch)
    return out


def max_pool_aot_specs(
    input_shape_nhwc, dtype, arch, kernel_size=3, stride=2, padding=1, out_dtype=None
) -> list[KernelSpec]:
    """What max_pool2d_nhwc compiles for this shape and dtype on compute capability `arch` (out_dtype
    torch.int8 or torch.float8_e4m3fn: the quantized engine's quantizing pool)."""
    out_dtype = out_dtype or dtype
    _check_geometry(kernel_size, stride, padding)
    out_shape = pool_output_shape(tuple(input_shape_nhwc), kernel_size, stride, padding)
    block_p, block_c = _blocks(False)
    shaped = ShapeOnly(tuple(input_shape_nhwc), dtype), ShapeOnly(out_shape, out_dtype)
    pdl = pdl_for_arch(arch)
    args, constexprs, grid = _pool_args(*shaped, kernel_size, stride, padding, block_p, block_c, pdl=pdl)
    args.update(x_ptr=Pointer(dtype), out_ptr=Pointer(out_dtype))
    shape = "x".join(map(str, input_shape_nhwc))
    spec = make_spec(
        _max_pool_kernel,
        args,
        constexprs,
        num_warps=POOL_NUM_WARPS,
        num_stages=1,
        name=f"maxpool{kernel_size}x{kernel_size}_s{stride}_{shape}_{str(out_dtype).replace('torch.', '')}",
        config=f"BP{block_p}_BC{block_c}_w{POOL_NUM_WARPS}",
        grid=grid,
        k_steps=0,  # the taps are unrolled (static_range): no loop
        flops=0,
        min_bytes=torch.empty((), dtype=dtype).element_size()
        * (math.prod(input_shape_nhwc) + math.prod(out_shape)),
    )
    return [spec]

