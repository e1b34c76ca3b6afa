"""The ResNet stem: a 3-input-channel conv read straight from the network input, bias, ReLU.

GEMM view (C = 3 input channels, usually a 7x7 filter, stride 2, padding 3, 64 output channels):

    out[m, co] = sum_k A[m, k] * B[k, co]          M = N*OH*OW, N = C_out, K = R*S*C
    A[m, (r*S + s)*C + c] = x[b, c, oh*stride - pad + r, ow*stride - pad + s]   (pad value outside)

Input: the network input itself, logical NCHW (N, 3, H, W) with ANY strides (contiguous NCHW, or
channels-last storage, which is NHWC), in the compute dtype or uint8. No NCHW->NHWC copy precedes
this kernel. Output: contiguous NHWC (N, OH, OW, C_out) in the compute dtype.

Why not the conv kernel's gather mode: it decodes every k into (r, s, c) per element per K-step and
recomputes every bound check, about 590 SASS instructions per 2 wgmma on sm_90. Here one K-step is
ROWS_PER_STEP whole filter rows: k = (rl*S + s)*C + c inside a step, rl < ROWS_PER_STEP. The
column part of the address (b, s, c, rl) and of the mask (w bounds, tile bounds) does not depend on
the step, so it is computed once before the loop; a step only adds the row offset of its first
filter row and checks the row bounds. Weights are packed to match, (steps*BLOCK_K, C_out) with zero
rows where k runs past the filter, so the weight load needs no K mask.

Padding value: `pad_value[c]` (None = 0) is what the border holds. The uint8 path of the engine folds
(x/255 - mean)/std into the weights and bias, which is exact only if the border holds 255*mean. The
kernel centres the input instead, A = x - pad_value[c] inside the image and 0 outside (so masked loads
stay zero-filled), and the bias absorbs sum_{r,s,c} W[:, c, r, s] * pad_value[c] (float64, from the
weights as given). In real arithmetic this is "pad with pad_value, then conv"; the MMA operands are
the centred values, the same magnitude as a normalised image, rounded once to the compute dtype.

The A loads are scalar (a filter row of a stride-2 conv is neither contiguous nor aligned in the
input, whatever its layout), so Triton cannot turn them into cp.async; they are issued one K-step
ahead by hand, to overlap the previous step's MMA.

Why the max-pool after it is not fused: see kernels/pool.py. PDL (USE_PDL, sm_90): kernels/pdl.py;
before its gdc_wait the stem touches only its weights, bias and pad values, never the input x.

Limitations: int32 offsets (the input's addressed span and the output below 2**31 elements).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .aot import KernelSpec
from .conv_configs import device_arch
from .launch import (
    INT32_LIMIT,
    SUPPORTED_DTYPES,
    LaunchConfig,
    check_int32_indexing,
    check_launchable,
)
from .pdl import pdl_enabled, prefetch_then_wait
from .stem_aot import stem_aot_specs

STEM_IN_CHANNELS = 3


@dataclass(frozen=True)
class StemConfig(LaunchConfig):
    block_m: int
    block_n: int
    rows_per_step: int  # filter rows per K-step; BLOCK_K = next power of two >= rows_per_step*S*C
    num_warps: int
    num_stages: int
    maxnreg: int | None = None

    def tile_name(self) -> str:
        return f"BM{self.block_m}_BN{self.block_n}_rows{self.rows_per_step}"


# Config table: (arch family, operand width) -> tile config, by rule (never autotuned). One filter row
# per K-step (K = 21 of 32 used for 7x7x3): the loop's per-element work is the same at any rows per
# step, and one row keeps 16 A elements per thread, so registers stay low. 64-row tiles: the A loads
# are scalar (an image row is not aligned to vectors at stride 2), so latency is hidden by resident
# programs (3-4 per SM at 127-192 registers) and 64-row tiles give 196 programs at batch 1, 224x224
# (128-row tiles: 98, fewer than the 132 SMs of an H100, and 190-252 registers).
# Main loop per K-step from the SASS (float16 input / uint8 input): sm_90 144 / 350 instructions
# per 2 wgmma; sm_80 170 / 287 per 16 mma.sync. fp32 runs on FMA units (1024 FFMA per thread per step).
STEM_CONFIGS: dict[tuple[str, str], StemConfig] = {
    ("sm90", "16bit"): StemConfig(64, 64, 1, 4, 3),
    ("sm80", "16bit"): StemConfig(64, 64, 1, 4, 3),
    ("sm90", "fp32"): StemConfig(64, 64, 1, 4, 2),
    ("sm80", "fp32"): StemConfig(64, 64, 1, 4, 2),
    # Triton's interpreter pays per program and per loop step: large tiles, few steps.
    ("interp", "any"): StemConfig(128, 64, 3, 4, 1),
}


@triton.jit(do_not_specialize=["M", "H", "W", "OH", "OW", "stride_xn", "stride_xc", "stride_xh", "stride_xw"])
def _stem_kernel(
    # pointers
    x_ptr,
    w_ptr,
    bias_ptr,
    pad_ptr,
    out_ptr,
    # sizes (one binary for every batch, image size and input layout)
    M,
    H,
    W,
    OH,
    OW,
    # input strides, in elements, of logical NCHW
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    # compile-time: geometry, epilogue, tiles
    C_OUT: tl.constexpr,
    C_IN: tl.constexpr,
    R: tl.constexpr,
    S: tl.constexpr,
    STRIDE: tl.constexpr,
    PAD: tl.constexpr,
    ROWS_PER_STEP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_PAD_VALUE: tl.constexpr,
    APPLY_RELU: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr,  # programmatic dependent launch (kernels/pdl.py's hazard rule)
    PREFETCH_STEPS: tl.constexpr,  # USE_PDL: weight K-steps prefetched into L2 before gdc_wait
):
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    # Output-channel tiles fastest, as in the conv kernel: programs sharing an input slab run together.
    n_tiles = tl.cdiv(C_OUT, BLOCK_N)
    pid = tl.program_id(0)
    pid_m = pid // n_tiles
    offs_n = (pid % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < C_OUT
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    ow = offs_m % OW
    oh = (offs_m // OW) % OH
    batch = offs_m // (OW * OH)
    ih0 = oh * STRIDE - PAD
    iw0 = ow * STRIDE - PAD

    # Step-invariant decode of k = (rl*S + s)*C_IN + c: column offsets and column mask, once.
    K_ROW: tl.constexpr = S * C_IN
    k = tl.arange(0, BLOCK_K)
    rl = k // K_ROW
    s = (k % K_ROW) // C_IN
    c = k % C_IN
    k_ok = k < ROWS_PER_STEP * K_ROW
    iw = iw0[:, None] + s[None, :]
    col_ok = m_mask[:, None] & k_ok[None, :] & (iw >= 0) & (iw < W)
    # Per element, the rows it may read: [0, H) where its column is valid, none where it is not. With
    # the row index in unsigned arithmetic (negative -> huge) the bounds check is then one compare.
    row_limit = tl.where(col_ok, H, 0).to(tl.uint32)
    ih = ih0[:, None] + rl[None, :]  # input row per element, advanced by ROWS_PER_STEP each step
    a_ptrs = x_ptr + (batch[:, None] * stride_xn + ih * stride_xh + iw * stride_xw + (c * stride_xc)[None, :])
    if HAS_PAD_VALUE:
        pad = tl.load(pad_ptr + c, mask=k_ok, other=0.0)
    w_ptrs = w_ptr + k[:, None] * C_OUT + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    # A is loaded one step ahead, by hand: the loads are scalar (no cp.async), so Triton's pipeliner
    # would leave their latency exposed; here it overlaps the previous step's MMA. The extra load after
    # the last step reads rows past the filter (in bounds by the mask) and is discarded.
    if USE_PDL:  # constants until here; x (the previous node may write it) only after the wait
        steps_k = tl.cdiv(R, ROWS_PER_STEP) * BLOCK_K
        prefetch_then_wait(w_ptr, steps_k, (pid % n_tiles) * BLOCK_N, C_OUT, C_OUT, bias_ptr, HAS_BIAS,
                           PREFETCH_STEPS, BLOCK_K, BLOCK_N)  # fmt: skip
    a_mask = ih.to(tl.uint32) < row_limit
    a_next = tl.load(a_ptrs, mask=a_mask, other=0)
    for step in range(0, tl.cdiv(R, ROWS_PER_STEP)):
        a = a_next
        if ROWS_PER_STEP > 1 and R % ROWS_PER_STEP != 0:
            a_mask &= (step * ROWS_PER_STEP + rl < R)[None, :]  # rows past the filter (zero weights)
            a = tl.where(a_mask, a, 0)
        if HAS_PAD_VALUE:
            # Recomputed, not carried from the load: a carried mask costs predicate-register shuffles.
            a_mask = ih.to(tl.uint32) < row_limit
            a = tl.where(a_mask, a.to(tl.float32) - pad[None, :], 0.0)
        a_ptrs += ROWS_PER_STEP * stride_xh
        ih += ROWS_PER_STEP
        a_mask = ih.to(tl.uint32) < row_limit
        a_next = tl.load(a_ptrs, mask=a_mask, other=0)
        b = tl.load(w_ptrs + step * (BLOCK_K * C_OUT), mask=n_mask[None, :], other=0.0)
        acc = tl.dot(a.to(w_ptr.dtype.element_ty), b, acc, input_precision=INPUT_PRECISION)

    # Epilogue on the fp32 accumulator: bias, ReLU, one cast, one store (contiguous NHWC).
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    if APPLY_RELU:
        acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN, as in eager
    out_offs = offs_m[:, None] * C_OUT + offs_n[None, :]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _block_k(rows_per_step: int, s: int, c: int) -> int:
    return max(16, triton.next_power_of_2(rows_per_step * s * c))


class StemLayer:
    """The 3-channel stem conv, prepared once (weights packed per config), reading the raw network input.

    `layer(x, out=None)`: x is logical NCHW (N, 3, H, W) with any strides, in `dtype` or uint8; the
    result is contiguous NHWC (N, OH, OW, C_out) in `dtype`.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        stride: int = 2,
        padding: int = 3,
        relu: bool = True,
        dtype: torch.dtype = torch.float16,
        pad_value: torch.Tensor | None = None,
        allow_tf32: bool = False,
    ):
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"StemLayer: dtype must be one of {SUPPORTED_DTYPES}, got {dtype}")
        if not isinstance(weight, torch.Tensor) or weight.ndim != 4 or not weight.is_floating_point():
            raise ValueError("StemLayer: weight must be a float tensor of shape (C_out, 3, R, S)")
        c_out, c_in, r, s = weight.shape
        if c_in != STEM_IN_CHANNELS:
            raise ValueError(
                f"StemLayer: the stem kernel reads {STEM_IN_CHANNELS}-channel images, got a weight with "
                f"{c_in} input channels; use ConvLayer for other convolutions"
            )
        if stride < 1 or padding < 0:
            raise ValueError(f"StemLayer: expected stride >= 1 and padding >= 0, got {stride}, {padding}")
        if bias is not None and tuple(bias.shape) != (c_out,):
            raise ValueError(f"StemLayer: bias must have shape ({c_out},), got {tuple(bias.shape)}")
        if pad_value is not None and tuple(pad_value.shape) != (c_in,):
            raise ValueError(f"StemLayer: pad_value must have shape ({c_in},), got {tuple(pad_value.shape)}")
        self.in_channels = c_in
        self.out_channels = c_out
        self.kernel_size = (r, s)
        self.stride = stride
        self.padding = padding
        self.relu = relu
        self.dtype = dtype
        self.device = weight.device
        self.input_precision = "tf32" if (dtype == torch.float32 and allow_tf32) else "ieee"
        w64 = weight.detach().to(torch.float64)
        # Packed weights per rows_per_step (configs differ by arch): built lazily, once each.
        self._w_rsc = w64.permute(2, 3, 1, 0).reshape(r, s * c_in, c_out)  # [r, s*C + c, co]
        self._packed: dict[int, torch.Tensor] = {}
        b64 = torch.zeros(c_out, dtype=torch.float64, device=self.device) if bias is None else None
        if bias is not None:
            b64 = bias.detach().to(self.device, torch.float64)
        self.pad_value = None
        if pad_value is not None:
            pad64 = pad_value.detach().to(self.device, torch.float64)
            # The kernel feeds x - pad_value to the MMA with zeros outside the image; the constant part
            # of "pad with pad_value, then conv" moves into the bias (exact in float64).
            b64 = b64 + (w64.sum(dim=(2, 3)) * pad64).sum(dim=1)
            self.pad_value = pad64.to(torch.float32).contiguous()
        self.has_bias = bias is not None or pad_value is not None
        self.bias = b64.to(torch.float32).contiguous() if self.has_bias else None
        self._configs: dict[int, StemConfig] = {}
        # Packed now for this device's config, so that no forward pass (or CUDA-graph capture) packs.
        self.packed_weight(self.config_for(device_arch(self.device)).rows_per_step)

    def __repr__(self) -> str:
        pad = "" if self.pad_value is None else ", pad_value"
        return (
            f"StemLayer({self.in_channels}->{self.out_channels}, k={self.kernel_size}, s={self.stride}, "
            f"p={self.padding}{pad}, dtype={self.dtype})"
        )

    def packed_weight(self, rows_per_step: int) -> torch.Tensor:
        """B[(step*BLOCK_K + rl*S*C + s*C + c), co], zero rows past the filter; in the compute dtype."""
        packed = self._packed.get(rows_per_step)
        if packed is None:
            r, k_row, c_out = self._w_rsc.shape
            block_k = _block_k(rows_per_step, 1, k_row)
            steps = triton.cdiv(r, rows_per_step)
            buf = torch.zeros(steps * rows_per_step, k_row, c_out, dtype=torch.float64, device=self.device)
            buf[:r] = self._w_rsc
            buf = buf.reshape(steps, rows_per_step * k_row, c_out)
            full = torch.zeros(steps, block_k, c_out, dtype=torch.float64, device=self.device)
            full[:, : rows_per_step * k_row] = buf
            packed = self._packed[rows_per_step] = full.reshape(steps * block_k, c_out).to(self.dtype)
        return packed

    def output_shape(self, input_shape_nchw) -> tuple[int, int, int, int]:
        """NHWC output shape for a logical NCHW input shape."""
        n, _, h, w = input_shape_nchw
        r, s = self.kernel_size
        oh = (h + 2 * self.padding - r) // self.stride + 1
        ow = (w + 2 * self.padding - s) // self.stride + 1
        return (n, oh, ow, self.out_channels)

    def config_for(self, arch: int) -> StemConfig:
        """The table config on compute capability `arch` (0 = interpreter); rows clipped to R."""
        if arch == 0:
            base = STEM_CONFIGS[("interp", "any")]
        else:
            family = "sm90" if arch >= 90 else "sm80"
            base = STEM_CONFIGS[(family, "fp32" if self.dtype == torch.float32 else "16bit")]
        rows = min(base.rows_per_step, self.kernel_size[0])
        block_n = min(base.block_n, max(16, triton.next_power_of_2(self.out_channels)))
        return StemConfig(base.block_m, block_n, rows, base.num_warps, base.num_stages, base.maxnreg)

    def _kernel_args(self, x, x_strides, out, config: StemConfig, pdl: bool = False):
        n, _, h, w = x.shape
        _, oh, ow, _ = out.shape
        packed = self.packed_weight(config.rows_per_step)
        r, s = self.kernel_size
        args = dict(
            x_ptr=x,
            w_ptr=packed,
            # Absent operands get a dummy pointer (never dereferenced: the constexpr switch is off).
            bias_ptr=self.bias if self.has_bias else packed,
            pad_ptr=self.pad_value if self.pad_value is not None else packed,
            out_ptr=out,
            M=n * oh * ow,
            H=h,
            W=w,
            OH=oh,
            OW=ow,
            stride_xn=x_strides[0],
            stride_xc=x_strides[1],
            stride_xh=x_strides[2],
            stride_xw=x_strides[3],
        )
        constexprs = dict(
            C_OUT=self.out_channels,
            C_IN=self.in_channels,
            R=r,
            S=s,
            STRIDE=self.stride,
            PAD=self.padding,
            ROWS_PER_STEP=config.rows_per_step,
            HAS_BIAS=self.has_bias,
            HAS_PAD_VALUE=self.pad_value is not None,
            APPLY_RELU=self.relu,
            INPUT_PRECISION=self.input_precision,
            BLOCK_M=config.block_m,
            BLOCK_N=config.block_n,
            BLOCK_K=_block_k(config.rows_per_step, s, self.in_channels),
            USE_PDL=pdl,
            PREFETCH_STEPS=min(config.num_stages, triton.cdiv(r, config.rows_per_step)),
        )
        grid = (triton.cdiv(n * oh * ow, config.block_m) * triton.cdiv(self.out_channels, config.block_n),)
        return args, constexprs, grid

    def _check_input(self, x) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise ValueError(
                f"StemLayer: x must be a 4-d logical NCHW tensor, got {getattr(x, 'shape', type(x))}"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"StemLayer: x must be logical NCHW with {self.in_channels} channels in dim 1, got shape "
                f"{tuple(x.shape)} (pass NHWC storage as the view x.permute(0, 3, 1, 2))"
            )
        if x.dtype not in (torch.uint8, self.dtype):
            raise TypeError(f"StemLayer: x must be uint8 or {self.dtype}, got {x.dtype}")
        if x.device != self.device:
            raise ValueError(f"StemLayer: expected x on {self.device}, got {x.device}")
        check_launchable(x, "StemLayer")
        if any(st < 0 for st in x.stride()):
            raise ValueError(f"StemLayer: negative strides are not supported, got {x.stride()}")
        span = sum((size - 1) * st for size, st in zip(x.shape, x.stride())) if x.numel() else 0
        # The pointer of the discarded prefetch past the last filter row must not wrap either.
        if span + (self.kernel_size[0] + 1) * x.stride(2) >= INT32_LIMIT:
            raise ValueError(
                "StemLayer: inputs spanning 2**31 elements or more need int64 indexing (unsupported)"
            )

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input(x)
        key = device_arch(x.device)
        config = self._configs.get(key)
        if config is None:
            config = self._configs[key] = self.config_for(key)
        return self.launch(x, out, config=config)

    def launch(self, x: torch.Tensor, out: torch.Tensor | None = None, *, config: StemConfig) -> torch.Tensor:
        """`__call__` with an explicit tile config (the tests run every table entry through it)."""
        self._check_input(x)
        out_shape = self.output_shape(tuple(x.shape))
        if out_shape[1] < 1 or out_shape[2] < 1:
            raise ValueError(f"StemLayer: input {tuple(x.shape)} is too small for {self!r}")
        if out is None:
            out = torch.empty(out_shape, dtype=self.dtype, device=self.device)
        elif (
            not isinstance(out, torch.Tensor)
            or tuple(out.shape) != out_shape
            or out.dtype != self.dtype
            or out.device != self.device
            or not out.is_contiguous()
        ):
            raise ValueError(
                f"StemLayer: out must be a contiguous {self.dtype} NHWC tensor of shape {out_shape} on "
                f"{self.device}, got {getattr(out, 'shape', type(out))}"
            )
        check_int32_indexing(out.numel(), "StemLayer", "outputs")
        if out.numel() == 0:
            return out
        pdl = pdl_enabled(x.device)
        args, constexprs, grid = self._kernel_args(x, x.stride(), out, config, pdl)
        _stem_kernel[grid](**args, **constexprs, **config.launch_options(pdl))
        return out

    def aot_specs(
        self,
        input_shape_nchw,
        arch: int,
        input_dtype: torch.dtype | None = None,
        config: StemConfig | None = None,
    ) -> list[KernelSpec]:
        """What `__call__` compiles for this input shape on `arch`, without launching (kernels/stem_aot.py).

        Strides and sizes are not specialized, so one binary serves every layout and image size.
        """
        return stem_aot_specs(self, _stem_kernel, input_shape_nchw, arch, input_dtype, config)


__all__ = ["STEM_CONFIGS", "StemConfig", "StemLayer"]
