"""Split-K reduction: sum the conv kernel's fp32 partials in a fixed order, then run its epilogue once.

The conv kernel (kernels/conv_kernel.py) with `split_k = S > 1` writes each K-slice's fp32 accumulator
to `ws[s, m, co]` (a workspace of shape (S, M, C_out), no epilogue). The S partials of an output tile are
then read in slice order 0..S-1, the bias and residual added, ReLU applied, cast once and stored once:
* fused (default): by the tile's last program to finish, found with an integer arrival counter per tile
  (`sum_partials` and `epilogue_store`, called from the conv kernel): no extra launch;
* or by `_splitk_reduce_kernel`, a second launch (the fallback, `ConvConfig.fused_reduce=False`).
Either way the order of the fp32 additions never depends on scheduling, so the result is the same bits
on every run (float atomics would not be).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .aot import KernelSpec, Pointer, make_spec
from .pdl import prefetch_l2_tile

# Memory-bound and launched for small layers (batch 1: M = 49..784): 16x64 fp32 tiles on 2 warps (16
# values, four 16-byte loads per thread per slice) give 32-128 programs on ResNet-50's batch-1 layers,
# so the partials are read by many SMs at once (32x128 tiles gave 8 programs on 7x7x512).
REDUCE_BLOCK_M = 16
REDUCE_BLOCK_N = 64
REDUCE_WARPS = 2


# Every slice of a chunk of the tile is loaded before the first is added (no load depends on the running
# sum), so one chunk costs about one L2 round trip where a rolled loop over the slices paid one per slice.
# Chunks hold at most this many fp32 partials per thread: enough loads in flight to cover L2 latency
# (ptxas still splits a chunk into 2-3 batches of loads without a register cap), and under the fp32
# configs' cap of 128 registers half as many, which do not spill (a fully hoisted 64x64 tile at split 3
# spilled 32 bytes there; 128 values spilled 8 at split 16).
REDUCE_VALUES_PER_THREAD = 128
# When the config caps registers at 128 or fewer, and for fp32 (its FMA-path tiles sit near 128
# registers: on sm_80, uncapped, 128 values spilled 8 bytes at split 16).
REDUCE_VALUES_PER_THREAD_CAPPED = 64


def reduce_rows(block_m: int, block_n: int, split: int, num_warps: int, maxnreg: int | None = None,
                fp32: bool = False) -> int:  # fmt: skip
    """Rows of a (block_m, block_n) tile that one chunk of the reduction covers: the largest power of two
    whose split * rows * block_n partials give at most the per-thread budget of values (but at least one
    value per thread, so no lane idles), clipped to the tile."""
    threads = 32 * num_warps
    capped = fp32 or (maxnreg is not None and maxnreg <= 128)
    budget = REDUCE_VALUES_PER_THREAD_CAPPED if capped else REDUCE_VALUES_PER_THREAD
    rows = max(1, threads // block_n)
    while rows * 2 <= block_m and split * rows * 2 * block_n <= budget * threads:
        rows *= 2
    return min(rows, block_m)


def reduce_chunks(block_m: int, block_n: int, split: int, num_warps: int, maxnreg: int | None = None,
                  fp32: bool = False) -> int:  # fmt: skip
    """Chunks (trips of the reduction's loop over rows) of one tile's reduction."""
    return triton.cdiv(block_m, reduce_rows(block_m, block_n, split, num_warps, maxnreg, fp32))


@triton.jit
def sum_partials(tile_ptr, slice_stride, mask, SPLIT: tl.constexpr):
    """Sum of the SPLIT fp32 partials at tile_ptr + s * slice_stride, in slice order 0..SPLIT-1.

    Unrolled: no load depends on the sum, so all SPLIT loads issue before the first add, and the adds
    run in the same fixed order on every run and in every kernel that calls this. Loads bypass L1 (.cg):
    partials written by other SMs must come from L2, never from a stale line."""
    acc = tl.load(tile_ptr, mask=mask, other=0.0, cache_modifier=".cg")
    for s in tl.static_range(1, SPLIT):
        acc += tl.load(tile_ptr + s * slice_stride, mask=mask, other=0.0, cache_modifier=".cg")
    return acc


@triton.jit
def reduce_tile(
    ws_ptr, bias_ptr, res_ptr, out_ptr, row0, M, C_OUT, offs_n, n_mask,
    SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, ROWS: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, APPLY_RELU: tl.constexpr,
):  # fmt: skip
    """Rows [row0, row0 + BLOCK_M) x columns offs_n of the output: sum the SPLIT partials of `ws`
    ((SPLIT, M, C_OUT) fp32) and run the epilogue, ROWS rows at a time (chunks are independent)."""
    for r in range(0, BLOCK_M, ROWS):
        offs_m = row0 + r + tl.arange(0, ROWS)
        mask = (offs_m < M)[:, None] & n_mask[None, :]
        offs = offs_m[:, None] * C_OUT + offs_n[None, :]
        acc = sum_partials(ws_ptr + offs, M * C_OUT, mask, SPLIT)
        epilogue_store(
            acc, bias_ptr, res_ptr, out_ptr, offs_n, n_mask, offs, mask, HAS_BIAS, HAS_RESIDUAL, APPLY_RELU
        )


@triton.jit
def epilogue_store(
    acc, bias_ptr, res_ptr, out_ptr, offs_n, n_mask, offs, mask,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, APPLY_RELU: tl.constexpr,
):  # fmt: skip
    """The conv epilogue on an fp32 tile: bias, residual, ReLU, then one cast and one store."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if APPLY_RELU:
        acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN, as in eager
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M"])
def _splitk_reduce_kernel(
    ws_ptr,
    bias_ptr,
    res_ptr,
    out_ptr,
    M,
    C_OUT,
    SPLIT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    APPLY_RELU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    USE_PDL: tl.constexpr,  # kernels/pdl.py: only the bias (a constant) is touched before gdc_wait
):
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    n_tiles = tl.cdiv(C_OUT, BLOCK_N)
    pid = tl.program_id(0)
    offs_n = (pid % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    if USE_PDL:
        if HAS_BIAS:
            prefetch_l2_tile(bias_ptr, 0, 1, (pid % n_tiles) * BLOCK_N, C_OUT, 0, 1, BLOCK_N)
        tl.extra.cuda.gdc_wait()  # the partials in ws are the conv kernel's: read only after it
    reduce_tile(
        ws_ptr, bias_ptr, res_ptr, out_ptr, (pid // n_tiles) * BLOCK_M, M, C_OUT, offs_n, offs_n < C_OUT,
        SPLIT, BLOCK_M, ROWS, HAS_BIAS, HAS_RESIDUAL, APPLY_RELU,
    )  # fmt: skip


def _reduce_block_n(c_out: int) -> int:
    return min(REDUCE_BLOCK_N, max(16, triton.next_power_of_2(c_out)))


def reduce_args(ws, bias, residual, out, *, m: int, c_out: int, split: int, relu: bool, pdl: bool = False):
    """Arguments, constexprs and grid of one reduce launch (tensors or aot.Pointer placeholders)."""
    block_n = _reduce_block_n(c_out)
    args = dict(
        ws_ptr=ws,
        bias_ptr=bias if bias is not None else ws,  # dummies: never dereferenced when switched off
        res_ptr=residual if residual is not None else out,
        out_ptr=out,
        M=m,
        C_OUT=c_out,
    )
    constexprs = dict(
        SPLIT=split,
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None,
        APPLY_RELU=relu,
        BLOCK_M=REDUCE_BLOCK_M,
        BLOCK_N=block_n,
        ROWS=reduce_rows(REDUCE_BLOCK_M, block_n, split, REDUCE_WARPS),
        USE_PDL=pdl,
    )
    grid = (triton.cdiv(m, REDUCE_BLOCK_M) * triton.cdiv(c_out, block_n),)
    return args, constexprs, grid


def splitk_reduce(ws, bias, residual, out, *, m: int, c_out: int, split: int, relu: bool,
                  pdl: bool = False) -> None:  # fmt: skip
    """Launch the reduction of `ws[:split]` (fp32, (split, m, c_out)) into `out` (NHWC, m * c_out);
    pdl: with programmatic dependent launch (kernels/pdl.py)."""
    args, constexprs, grid = reduce_args(
        ws, bias, residual, out, m=m, c_out=c_out, split=split, relu=relu, pdl=pdl
    )
    launch = dict(num_warps=REDUCE_WARPS, num_stages=1, enable_fp_fusion=True)
    if pdl:
        launch["launch_pdl"] = True
    _splitk_reduce_kernel[grid](**args, **constexprs, **launch)


def reduce_spec(out_dtype, *, has_bias: bool, has_residual: bool, m: int, c_out: int, split: int,
                relu: bool, name: str, pdl: bool = False) -> KernelSpec:  # fmt: skip
    """The AOT spec of the reduce launch `splitk_reduce` would make for these sizes."""
    out = Pointer(out_dtype)
    args, constexprs, _ = reduce_args(
        Pointer(torch.float32),
        Pointer(torch.float32) if has_bias else None,
        out if has_residual else None,
        out,
        m=m,
        c_out=c_out,
        split=split,
        relu=relu,
        pdl=pdl,
    )
    return make_spec(
        _splitk_reduce_kernel,
        args,
        constexprs,
        num_warps=REDUCE_WARPS,
        num_stages=1,
        name=name,
        config=f"reduce_BM{REDUCE_BLOCK_M}_BN{constexprs['BLOCK_N']}_k{split}",
    )


__all__ = ["reduce_chunks", "reduce_rows", "reduce_spec", "splitk_reduce"]
