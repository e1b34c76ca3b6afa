"""Convolution as an implicit GEMM on NHWC activations, with a fused bias / residual / ReLU epilogue.

GEMM view, per group g (G groups, C_in/G input and C_out/G output channels each):

    out[m, g*NG + n] = sum_k A[m, k] * B[k, g*NG + n]      M = N*OH*OW, N = NG = C_out/G, K = R*S*C_in/G
    A[m, k] = x[b, oh*stride - pad + r*dil, ow*stride - pad + s*dil, g*CG + c]   (0 outside the image)
    m = (b*OH + oh)*OW + ow,  k = (r*S + s)*CG + c

Layouts: activations are contiguous NHWC (`x[b, h, w, c]`); weights are packed once, at construction, K-major
as `B[k, co]` of shape (R*S*CG, C_out) in the compute dtype, so one K-step loads a (BLOCK_K, BLOCK_N) tile
that is contiguous along the output channels. Each program owns one BLOCK_M x BLOCK_N output tile of one
group and accumulates in fp32 with `tl.dot` (IEEE fp32 unless `allow_tf32`). The epilogue adds the fp32
bias, the residual (same NHWC shape as the output), applies ReLU, casts once and stores once.

The K loop has three shapes, chosen per layer at construction (all are the same GEMM):
* GEMM mode (1x1, stride 1, no padding): A is `x` viewed as an (M, C_in) matrix, no index decoding.
* Channel-blocked mode: one flat loop over R*S*cdiv(CG, BLOCK_K) steps; each step is one filter tap
  (r, s) and one BLOCK_K slice of channels, so the pixel bounds check is per row, not per element.
* Flattened-K gather mode, for layers whose channels per group are fewer than 16 (the stem: C_in = 3,
  K = 147): k is decoded into (r, s, c) per element with constexpr divisors and masked at K, so no
  MMA work is spent on 13 padding channels per tap (`tl.dot` needs K >= 16 per step, not per tap).

Small groups (ResNeXt: 4..64 channels per group) would give per-group N and K below the 16 that `tl.dot`
needs. They are packed at construction into block-diagonal "super-groups" of P consecutive groups
(P the smallest power of two with P*CG >= 16 and P*NG >= 16): the kernel then runs a dense grouped conv
with G/P groups and zero off-diagonal blocks. This costs P times the MMA FLOPs on those layers only
(P = 4 for resnext50_32x4d's first stage and resnext101_64x4d's 4-channel groups, 2 for 8-channel
groups, 1 from 16 channels on) -- those layers are cheap in FLOPs and bound by memory traffic anyway.

K-concatenated projection shortcut (GEMM mode only): a bottleneck block's last 1x1 conv and its 1x1,
stride-STRIDE2 projection of the block input x2 are one GEMM over K = C_in + C_in2; B stacks both weights
(rows C_in.. hold the projection), the bias is their sum, and a second loop reads A from x2.

Dilation (DIL, constexpr) only spaces the taps in the address math above: a dilated 3x3 is the same single
K loop, same K and same tile config as a plain one, in both the channel-blocked and the gather loop (a 1x1
conv is built with DIL = 1, so it stays in GEMM mode). Its cost is the resolution it keeps: output stride
16 runs layer4 at 4x the plain net's pixels, output stride 8 runs layer3 at 4x and layer4 at 16x, and
their FLOPs and bytes grow alike: a whole ResNet-50 costs about 1.5x (output stride 16) and 4.7x (8) the
plain net's FLOPs (counted at 512x512).
AVG_POOL (ResNet-D's avg-pool downsample, avg_pool2d(2, 2, ceil_mode=True, count_include_pad=False)
before a 1x1 conv): the stride-2 1x1 read of x2 (with HAS_SHORTCUT) or of x (a 1x1, stride-2 conv, as a
BasicBlock's projection) loads the 2x2 window at (2*oh, 2*ow) instead of its top-left pixel, sums it in
fp32 and scales by 1 / (pixels inside the image): 1/4, or 1/2 or 1 at the last row/column of an odd
extent. The pooled tensor is never written and the pool costs no launch; the mean is rounded once to
the compute dtype before the MMA, as eager's pooled tensor is.

Split-K (SPLIT > 1, grid (tiles, SPLIT)): program (t, s) runs K-steps [s*STEPS_PER_SPLIT, ...) of the
concatenated K loop and stores its raw fp32 accumulator into a workspace slice; kernels/splitk.py sums
the slices in a fixed order and runs the epilogue once (in chunks of REDUCE_ROWS rows, every slice of a
chunk loaded before any is added).

QUANTIZED (kernels/conv_int8.py, kernels/conv_fp8.py): int8 or fp8 (e4m3) activations and packed
weights of the same type, with per-channel scales. int8: `tl.dot` int8 x int8 with an exact int32
accumulator (split-K partials are int32 too, summed exactly); fp8: e4m3 x e4m3 into fp32 (fp32
partials, summed in slice order). Either way the epilogue dequantizes, adds the bias and the quantized
residual, applies ReLU and requantizes to the operand type (kernels/int8_epilogue.py).

Limitations: int32 index arithmetic (tensors below 2**31 elements, checked); tiny super-groups get
BLOCK_N = 16 tiles.

PDL (USE_PDL, sm_90 only; kernels/pdl.py): every program calls `gdc_launch_dependents` first, so the
next kernel of the plan may start while this one drains; then it does the index math and asks L2 for
its first PREFETCH_STEPS weight tiles (K-steps lo.. of its slice) and its bias columns, and only then
`gdc_wait`s for the previous kernel. Hazard rule: nothing before `gdc_wait` may read or write memory
that an earlier kernel of the plan writes -- the activations (x, x2, the residual, `out`: ping-pong
buffers of `assign_buffers`), the split-K workspace and its arrival counters; only constants (weights,
bias, int8 scales) and index math. The prefetch holds no registers across the wait (a hint with no
result). Without USE_PDL (sm_80, the interpreter) neither call is compiled in.
"""

import triton
import triton.language as tl

from .int8_epilogue import epilogue_store_int8, quantize_fp8, quantize_int8
from .pdl import prefetch_l2_tile
from .splitk import epilogue_store, reduce_tile, sum_partials


@triton.jit
def _avg_pool_rows(x_ptr, offs_m, OH, OW, H, W, C):
    """Per output pixel: its 2x2 window's top-left pixel address in NHWC x, which of its right and lower
    neighbours are inside the image (ceil_mode's partial windows), and 1 / (pixels it averages)."""
    ow = offs_m % OW
    oh = (offs_m // OW) % OH
    batch = offs_m // (OW * OH)
    rows = x_ptr + ((batch * H + oh * 2) * W + ow * 2) * C
    has_right = ow * 2 + 1 < W
    has_below = oh * 2 + 1 < H
    inv_count = 1.0 / ((1 + has_right.to(tl.float32)) * (1 + has_below.to(tl.float32)))
    return rows, has_right, has_below, inv_count


@triton.jit
def _avg_pool_load(rows, c, mask, has_right, has_below, inv_count, W, C, dtype: tl.constexpr):
    """The (BLOCK_M, BLOCK_K) A tile of 2x2 means (count_include_pad=False), in `dtype`. A mean of
    8-bit codes is rounded to the nearest code, ties to even, as the epilogues round (the plain cast
    would truncate int8 and, under the interpreter, misround e4m3); the scale is the input's."""
    ptrs = rows[:, None] + c[None, :]
    right = mask & has_right[:, None]
    below = mask & has_below[:, None]
    a = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    a += tl.load(ptrs + C, mask=right, other=0.0).to(tl.float32)
    a += tl.load(ptrs + W * C, mask=below, other=0.0).to(tl.float32)
    a += tl.load(ptrs + (W + 1) * C, mask=right & below, other=0.0).to(tl.float32)
    if dtype == tl.int8:
        return quantize_int8(a, inv_count[:, None])
    if dtype == tl.float8e4nv:
        return quantize_fp8(a, inv_count[:, None])
    return (a * inv_count[:, None]).to(dtype)


@triton.jit
def _prefetch_constants(
    w_ptr, bias_ptr, scale_ptr, lo, hi, col0, col_end, CG, C_IN2, C_OUT,
    R: tl.constexpr, S: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, GATHER_CG: tl.constexpr,
    KC: tl.constexpr, KC1: tl.constexpr, HAS_SHORTCUT: tl.constexpr, AVG_POOL: tl.constexpr,
    HAS_BIAS: tl.constexpr, QUANTIZED: tl.constexpr, STEPS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Before gdc_wait (USE_PDL): L2 prefetch of the B rows of K-steps [lo, lo + STEPS) (clipped to this
    program's slice, [lo, hi)) x this tile's columns, and of its bias (and quantized scale) columns. Constants
    only: B, bias and scales are never written by a kernel of the plan."""
    for i in tl.static_range(STEPS):
        kb = lo + i
        if AVG_POOL and not HAS_SHORTCUT:
            row0 = kb * BLOCK_K
            row_end = CG
        elif GATHER_CG > 0:
            row0 = kb * BLOCK_K
            row_end = R * S * GATHER_CG
        elif R == 1 and S == 1 and STRIDE == 1 and PAD == 0:
            row0 = kb * BLOCK_K
            row_end = CG
        else:  # channel-blocked: step = (tap, channel block), rows tap*CG + c
            tap = kb // KC
            row0 = tap * CG + (kb - tap * KC) * BLOCK_K
            row_end = tap * CG + CG
        # Steps from KC1 on read the K-concatenated shortcut's rows, CG .. CG + C_IN2.
        row0 = tl.where(kb >= KC1, CG + (kb - KC1) * BLOCK_K, row0)
        row_end = tl.where(kb >= KC1, CG + C_IN2, row_end)
        row_end = tl.where(kb < hi, row_end, 0)
        prefetch_l2_tile(w_ptr, row0, row_end, col0, col_end, C_OUT, BLOCK_K, BLOCK_N)
    if HAS_BIAS:
        prefetch_l2_tile(bias_ptr, 0, 1, col0, col_end, 0, 1, BLOCK_N)
    if QUANTIZED:
        prefetch_l2_tile(scale_ptr, 0, 1, col0, col_end, 0, 1, BLOCK_N)


# Spatial sizes and the pixel count only bound masks and offsets (channel strides stay specialized
# for vector loads), so they are not specialized: one binary serves every batch and image size.
# The K-step counts are constexpr (they follow from channel counts, fixed per layer), so decoding a
# step into (tap, channel block) is a shift or a multiply-high, never a runtime integer division.
@triton.jit(do_not_specialize=["M", "H", "W", "OH", "OW", "H2", "W2"])
def _conv_kernel(
    # pointers
    x_ptr,
    w_ptr,
    bias_ptr,
    res_ptr,
    out_ptr,
    x2_ptr,  # shortcut input (K-concatenated projection), when HAS_SHORTCUT
    ws_ptr,  # fp32 (int32 for int8 operands) split-K partials (SPLIT, M, C_OUT), when SPLIT > 1
    lock_ptr,  # int32 arrival counters, one per output tile, zero between launches (FUSED_REDUCE)
    scale_ptr,  # QUANTIZED: fp32 per-output-channel dequantization scale (weight scale x input scale)
    # sizes
    M,
    H,
    W,
    OH,
    OW,
    C_IN,
    C_OUT,
    CG,  # input channels per (super-)group
    NG,  # output channels per (super-)group
    H2,
    W2,
    C_IN2,
    RES_SCALE,  # QUANTIZED: the quantized residual's scale
    OUT_INV_SCALE,  # QUANTIZED with an int8 / fp8 output: 1 / the output's scale
    # compile-time: layer geometry, loop mode, K-steps, epilogue, tiles
    R: tl.constexpr,
    S: tl.constexpr,
    STRIDE: tl.constexpr,
    PAD: tl.constexpr,
    DIL: tl.constexpr,  # dilation: tap (r, s) reads input pixel (oh*STRIDE - PAD + r*DIL, ...)
    GATHER_CG: tl.constexpr,  # > 0: flattened-K gather loop with this many channels per group
    KC: tl.constexpr,  # K-steps per filter tap (channel blocks); the whole main K for gather mode
    EVEN_C: tl.constexpr,  # every channel count is a multiple of BLOCK_K: no channel masks
    HAS_SHORTCUT: tl.constexpr,
    AVG_POOL: tl.constexpr,  # the stride-2 1x1 read (of x2 with HAS_SHORTCUT, else of x) averages 2x2
    STRIDE2: tl.constexpr,
    KC2: tl.constexpr,  # K-steps over the shortcut input's channels
    SPLIT: tl.constexpr,
    STEPS_PER_SPLIT: tl.constexpr,
    FUSED_REDUCE: tl.constexpr,  # the last program of a tile to finish reduces it (no extra launch)
    REDUCE_ROWS: tl.constexpr,  # rows per chunk of that reduction (splitk.reduce_rows)
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    APPLY_RELU: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    QUANTIZED: tl.constexpr,  # int8 or fp8 operands with scales: kernels/int8_epilogue.py's epilogue
    IMPRECISE_ACC: tl.constexpr,  # fp8: K-elements the MMA accumulates before fp32 promotion; else None
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr,  # programmatic dependent launch (sm_90): see the module docstring's hazard rule
    PREFETCH_STEPS: tl.constexpr,  # USE_PDL: weight tiles (K-steps) prefetched into L2 before gdc_wait
):
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()  # the next kernel may launch: it too waits before its reads
    # Grid (output tiles, K-slices), output-channel tiles fastest: the programs that read one BLOCK_M
    # slab of activations run back to back, so the slab comes from DRAM once and from L2 for every
    # other channel tile (a ResNet layer's packed weights, at most a few MiB, stay resident in L2).
    n_tiles_per_group = tl.cdiv(NG, BLOCK_N)
    n_tiles = tl.cdiv(C_OUT, NG) * n_tiles_per_group
    pid = tl.program_id(0)
    pid_m = pid // n_tiles
    pid_n = pid % n_tiles
    g = pid_n // n_tiles_per_group
    offs_n = (pid_n % n_tiles_per_group) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < NG
    offs_co = g * NG + offs_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32 if w_ptr.dtype.element_ty == tl.int8 else tl.float32)

    # K-steps [lo, hi) of this program: main-input steps [0, KC1), then shortcut steps [KC1, KC1 + KC2).
    KC1: tl.constexpr = KC if GATHER_CG > 0 else R * S * KC
    if SPLIT == 1:
        lo1 = 0
        hi1 = KC1
        lo2 = KC1
        hi2 = KC1 + KC2
    else:
        pid_k = tl.program_id(1)
        lo1 = pid_k * STEPS_PER_SPLIT
        hi2 = tl.minimum(lo1 + STEPS_PER_SPLIT, KC1 + KC2)
        hi1 = tl.minimum(hi2, KC1)
        lo2 = tl.maximum(lo1, KC1)
    if USE_PDL:
        # Constants only until the wait; every activation / workspace / counter access comes after it.
        col0 = g * NG + (pid_n % n_tiles_per_group) * BLOCK_N
        _prefetch_constants(
            w_ptr, bias_ptr, scale_ptr, lo1, hi2, col0, g * NG + NG, CG, C_IN2, C_OUT, R, S, STRIDE, PAD,
            GATHER_CG, KC, KC1, HAS_SHORTCUT, AVG_POOL, HAS_BIAS, QUANTIZED, PREFETCH_STEPS, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        tl.extra.cuda.gdc_wait()

    if AVG_POOL and not HAS_SHORTCUT:
        # A pooled 1x1 stride-2 conv on its own (R = S = 1, STRIDE = 2, PAD = 0, groups 1).
        rows, has_right, has_below, inv_count = _avg_pool_rows(x_ptr, offs_m, OH, OW, H, W, C_IN)
        for kb in range(lo1, hi1):
            c = kb * BLOCK_K + offs_k
            c_mask = (c < CG) | EVEN_C
            a_mask = m_mask[:, None] & c_mask[None, :]
            dtype = w_ptr.dtype.element_ty
            a = _avg_pool_load(rows, c, a_mask, has_right, has_below, inv_count, W, C_IN, dtype)
            b = tl.load(
                w_ptr + c[:, None] * C_OUT + offs_co[None, :],
                mask=c_mask[:, None] & n_mask[None, :],
                other=0.0,
            )
            acc = tl.dot(
                a, b, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype,
                max_num_imprecise_acc=IMPRECISE_ACC,
            )
    elif R == 1 and S == 1 and STRIDE == 1 and PAD == 0 and GATHER_CG == 0:
        # GEMM mode: output pixel m reads input pixel m.
        a_rows = x_ptr + offs_m * C_IN + g * CG
        for kb in range(lo1, hi1):
            c = kb * BLOCK_K + offs_k
            c_mask = (c < CG) | EVEN_C
            a = tl.load(a_rows[:, None] + c[None, :], mask=m_mask[:, None] & c_mask[None, :], other=0.0)
            b = tl.load(
                w_ptr + c[:, None] * C_OUT + offs_co[None, :],
                mask=c_mask[:, None] & n_mask[None, :],
                other=0.0,
            )
            acc = tl.dot(
                a, b, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype,
                max_num_imprecise_acc=IMPRECISE_ACC,
            )
        if HAS_SHORTCUT:
            # K-concatenated projection shortcut: a 1x1, stride-STRIDE2 conv of the block input,
            # whose packed weights follow the main ones in B (rows CG .. CG + C_IN2).
            if AVG_POOL:
                pooled = _avg_pool_rows(x2_ptr, offs_m, OH, OW, H2, W2, C_IN2)
                a2_rows, has_right, has_below, inv_count = pooled
            elif STRIDE2 == 1:
                a2_rows = x2_ptr + offs_m * C_IN2
            else:
                ow = offs_m % OW
                oh = (offs_m // OW) % OH
                batch = offs_m // (OW * OH)
                a2_rows = x2_ptr + ((batch * H2 + oh * STRIDE2) * W2 + ow * STRIDE2) * C_IN2
            for kb in range(lo2, hi2):
                c = (kb - KC1) * BLOCK_K + offs_k
                c_mask = (c < C_IN2) | EVEN_C
                a_mask = m_mask[:, None] & c_mask[None, :]
                if AVG_POOL:
                    dtype = w_ptr.dtype.element_ty
                    a = _avg_pool_load(a2_rows, c, a_mask, has_right, has_below, inv_count, W2, C_IN2, dtype)
                else:
                    a = tl.load(a2_rows[:, None] + c[None, :], mask=a_mask, other=0.0)
                b = tl.load(
                    w_ptr + (CG + c)[:, None] * C_OUT + offs_co[None, :],
                    mask=c_mask[:, None] & n_mask[None, :],
                    other=0.0,
                )
                acc = tl.dot(
                    a, b, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype,
                    max_num_imprecise_acc=IMPRECISE_ACC,
                )
    else:
        ow = offs_m % OW
        oh = (offs_m // OW) % OH
        batch = offs_m // (OW * OH)
        ih0 = oh * STRIDE - PAD
        iw0 = ow * STRIDE - PAD
        x_rows = x_ptr + batch * (H * W * C_IN) + g * CG
        if GATHER_CG > 0:
            # Flattened K: decode every k into (r, s, c); constexpr divisors keep this cheap.
            K: tl.constexpr = R * S * GATHER_CG
            for kb in range(lo1, hi1):
                k = kb * BLOCK_K + offs_k
                k_mask = k < K
                c = k % GATHER_CG
                r = k // (GATHER_CG * S)
                s = (k // GATHER_CG) % S
                ih = ih0[:, None] + (r * DIL)[None, :]
                iw = iw0[:, None] + (s * DIL)[None, :]
                a_mask = m_mask[:, None] & k_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                a = tl.load(x_rows[:, None] + (ih * W + iw) * C_IN + c[None, :], mask=a_mask, other=0.0)
                b = tl.load(
                    w_ptr + k[:, None] * C_OUT + offs_co[None, :],
                    mask=k_mask[:, None] & n_mask[None, :],
                    other=0.0,
                )
                acc = tl.dot(
                    a, b, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype,
                    max_num_imprecise_acc=IMPRECISE_ACC,
                )
        else:
            # Channel-blocked: one flat loop over (tap, channel block) so Triton pipelines a single
            # loop; KC is constexpr, so `step // KC` is a shift (KC a power of two) or a multiply.
            for step in range(lo1, hi1):
                tap = step // KC
                c = (step - tap * KC) * BLOCK_K + offs_k
                r = tap // S
                s = tap % S
                ih = ih0 + r * DIL
                iw = iw0 + s * DIL
                row_ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                c_mask = (c < CG) | EVEN_C
                a = tl.load(
                    (x_rows + (ih * W + iw) * C_IN)[:, None] + c[None, :],
                    mask=row_ok[:, None] & c_mask[None, :],
                    other=0.0,
                )
                b = tl.load(
                    w_ptr + (tap * CG + c)[:, None] * C_OUT + offs_co[None, :],
                    mask=c_mask[:, None] & n_mask[None, :],
                    other=0.0,
                )
                acc = tl.dot(
                    a, b, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype,
                    max_num_imprecise_acc=IMPRECISE_ACC,
                )

    out_offs = offs_m[:, None] * C_OUT + offs_co[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT == 1 and QUANTIZED:
        epilogue_store_int8(
            acc, scale_ptr, bias_ptr, res_ptr, out_ptr, offs_co, n_mask, out_offs, out_mask,
            RES_SCALE, OUT_INV_SCALE, HAS_BIAS, HAS_RESIDUAL, APPLY_RELU,
        )  # fmt: skip
    elif SPLIT == 1:
        epilogue_store(
            acc, bias_ptr, res_ptr, out_ptr, offs_co, n_mask, out_offs, out_mask,
            HAS_BIAS, HAS_RESIDUAL, APPLY_RELU,
        )  # fmt: skip
    else:
        # Raw fp32 partial of K-slice pid_k, then (FUSED_REDUCE) the tile's last program to finish
        # sums all slices in slice order and runs the epilogue; else kernels/splitk.py's kernel does.
        tl.store(ws_ptr + pid_k * M * C_OUT + out_offs, acc, mask=out_mask)
        if FUSED_REDUCE:
            # Serial split-K handshake (as CUTLASS's semaphore): the CTA barrier orders every thread's
            # partial store before the gpu-scope release of the arrival counter; the acquire (and
            # the barrier Triton places after a scalar atomic) orders the last program's reads after
            # every other slice's release. Integer atomics only: the sum order never changes.
            tl.debug_barrier()
            arrived = tl.atomic_add(lock_ptr + pid, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLIT - 1:
                tl.store(lock_ptr + pid, 0)  # re-armed for the next launch (and CUDA-graph replay)
                if QUANTIZED:  # int32 partials sum exactly; fp32 (fp8) ones in slice order
                    acc = sum_partials(ws_ptr + out_offs, M * C_OUT, out_mask, SPLIT)
                    epilogue_store_int8(
                        acc, scale_ptr, bias_ptr, res_ptr, out_ptr, offs_co, n_mask, out_offs, out_mask,
                        RES_SCALE, OUT_INV_SCALE, HAS_BIAS, HAS_RESIDUAL, APPLY_RELU,
                    )  # fmt: skip
                else:
                    reduce_tile(
                        ws_ptr, bias_ptr, res_ptr, out_ptr, pid_m * BLOCK_M, M, C_OUT, offs_co, n_mask,
                        SPLIT, BLOCK_M, REDUCE_ROWS, HAS_BIAS, HAS_RESIDUAL, APPLY_RELU,
                    )  # fmt: skip
