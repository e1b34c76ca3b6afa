"""The implicit-GEMM convolution kernel: see kernels/conv.py for the GEMM view, layouts and loop modes.

Launched by `ConvLayer` (kernels/conv.py) with a config from kernels/conv_configs.py; with split-K its
partials are summed by kernels/splitk.py.
"""

import triton
import triton.language as tl


# Spatial sizes and the pixel count only bound masks and offsets (channel strides stay specialized
# for vector loads), so they are not specialized: one binary serves every batch and image size.
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
    ws_ptr,  # fp32 split-K partials (SPLIT, M, C_OUT), when SPLIT > 1
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
    # compile-time: layer geometry, loop mode, K-steps, epilogue, tiles
    R: tl.constexpr,
    S: tl.constexpr,
    STRIDE: tl.constexpr,
    PAD: tl.constexpr,
    GATHER_CG: tl.constexpr,  # > 0: flattened-K gather loop with this many channels per group
    KC: tl.constexpr,  # K-steps per filter tap (channel blocks); the whole main K for gather mode
    EVEN_C: tl.constexpr,  # every channel count is a multiple of BLOCK_K: no channel masks
    HAS_SHORTCUT: tl.constexpr,
    STRIDE2: tl.constexpr,
    KC2: tl.constexpr,  # K-steps over the shortcut input's channels
    SPLIT: tl.constexpr,
    STEPS_PER_SPLIT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    APPLY_RELU: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
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
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

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

    if R == 1 and S == 1 and STRIDE == 1 and PAD == 0 and GATHER_CG == 0:
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
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        if HAS_SHORTCUT:
            # K-concatenated projection shortcut: a 1x1, stride-STRIDE2 conv of the block input,
            # whose packed weights follow the main ones in B (rows CG .. CG + C_IN2).
            if STRIDE2 == 1:
                a2_rows = x2_ptr + offs_m * C_IN2
            else:
                ow = offs_m % OW
                oh = (offs_m // OW) % OH
                batch = offs_m // (OW * OH)
                a2_rows = x2_ptr + ((batch * H2 + oh * STRIDE2) * W2 + ow * STRIDE2) * C_IN2
            for kb in range(lo2, hi2):
                c = (kb - KC1) * BLOCK_K + offs_k
                c_mask = (c < C_IN2) | EVEN_C
                a = tl.load(a2_rows[:, None] + c[None, :], mask=m_mask[:, None] & c_mask[None, :], other=0.0)
                b = tl.load(
                    w_ptr + (CG + c)[:, None] * C_OUT + offs_co[None, :],
                    mask=c_mask[:, None] & n_mask[None, :],
                    other=0.0,
                )
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
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
                ih = ih0[:, None] + r[None, :]
                iw = iw0[:, None] + s[None, :]
                a_mask = m_mask[:, None] & k_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                a = tl.load(x_rows[:, None] + (ih * W + iw) * C_IN + c[None, :], mask=a_mask, other=0.0)
                b = tl.load(
                    w_ptr + k[:, None] * C_OUT + offs_co[None, :],
                    mask=k_mask[:, None] & n_mask[None, :],
                    other=0.0,
                )
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        else:
            # Channel-blocked: one flat loop over (tap, channel block) so Triton pipelines a single
            # loop; KC is constexpr, so `step // KC` is a shift (KC a power of two) or a multiply.
            for step in range(lo1, hi1):
                tap = step // KC
                c = (step - tap * KC) * BLOCK_K + offs_k
                r = tap // S
                s = tap % S
                ih = ih0 + r
                iw = iw0 + s
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
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    out_offs = offs_m[:, None] * C_OUT + offs_co[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT > 1:
        # Raw fp32 partial of K-slice pid_k; kernels/splitk.py sums the slices and runs the epilogue.
        tl.store(ws_ptr + pid_k * M * C_OUT + out_offs, acc, mask=out_mask)
    else:
        # Epilogue on the fp32 accumulator: bias, residual, ReLU, then one cast and one store.
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_co, mask=n_mask, other=0.0)[None, :]
        if HAS_RESIDUAL:
            acc += tl.load(res_ptr + out_offs, mask=out_mask, other=0.0).to(tl.float32)
        if APPLY_RELU:
            acc = tl.maximum(acc, 0.0)
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
