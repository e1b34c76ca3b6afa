"""Convolution as an implicit GEMM on NHWC activations, with a fused bias / residual / ReLU epilogue.

GEMM view, per group g (G groups, C_in/G input and C_out/G output channels each):

    out[m, g*NG + n] = sum_k A[m, k] * B[k, g*NG + n]      M = N*OH*OW, N = NG = C_out/G, K = R*S*C_in/G
    A[m, k] = x[b, oh*stride - pad + r, ow*stride - pad + s, g*CG + c]   (0 outside the image)
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

Limitations: int32 index arithmetic (tensors below 2**31 elements, checked); no split-K, so a layer with
few output tiles (batch 1, 7x7 maps) cannot fill a large GPU; tiny super-groups get BLOCK_N = 16 tiles.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .aot import KernelSpec, Pointer, make_spec

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INT32_LIMIT = 2**31


@dataclass(frozen=True)
class ConvConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    maxnreg: int | None = None  # register cap for ptxas; None lets ptxas choose

    def __str__(self) -> str:
        cap = f"_r{self.maxnreg}" if self.maxnreg else ""
        return f"BM{self.block_m}_BN{self.block_n}_BK{self.block_k}_w{self.num_warps}_s{self.num_stages}{cap}"

    def launch_options(self) -> dict[str, int]:
        options = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.maxnreg is not None:
            options["maxnreg"] = self.maxnreg
        return options


# Config table: (arch family, operand width, layer kind) -> tile config. Chosen by rule, never autotuned.
# BLOCK_N and BLOCK_K are then clipped to the (super-)group's channel counts (next power of two, >= 16).
# Kinds: "large" = enough 128x128 tiles to fill the GPU; "small_m" = too few of them (batch 1, late
#        stages), so 64x64 tiles for more programs; "gather" = the flattened-K (stem) loop.
# All configs keep num_warps = 4: Inductor's non-1x1 conv template miscompiled with num_warps = 8
# (pytorch issue 173068) and 4 warps already form the one warpgroup that a 64/128-row wgmma needs.
CONV_CONFIGS: dict[tuple[str, str, str], ConvConfig] = {
    # Hopper: wgmma with a 128x128 fp32 accumulator; 64-wide K steps, 3 stages = 96 KiB of smem (fp16).
    ("sm90", "16bit", "large"): ConvConfig(128, 128, 64, 4, 3),
    ("sm90", "16bit", "small_m"): ConvConfig(64, 64, 64, 4, 4),
    # The stem's per-element (r, s, c) decode costs registers: 128-row tiles sat at 255 (and spilled
    # on sm_80), 64-row tiles take about 165 with no spills.
    ("sm90", "16bit", "gather"): ConvConfig(64, 64, 32, 4, 3),
    # Ampere: mma.sync keeps operands in registers; 128x64 tiles stay near 160 registers (128x128 took
    # 251), K steps of 32 with 4 cp.async stages.
    ("sm80", "16bit", "large"): ConvConfig(128, 64, 32, 4, 4),
    ("sm80", "16bit", "small_m"): ConvConfig(64, 64, 64, 4, 3),
    ("sm80", "16bit", "gather"): ConvConfig(64, 64, 32, 4, 3),
    # fp32: IEEE fp32 `tl.dot` runs on FMA units with operands in registers (no tensor cores), so the
    # tile is small enough to stay below ~140 registers without spills on sm_80 and sm_90; one entry
    # for every layer kind but the stem. On sm_90 ptxas left these tiles at 96 registers with a few
    # spill stores (STL in the SASS); a cap of 128 lets it allocate 108-120 registers and no spills.
    ("sm90", "fp32", "any"): ConvConfig(64, 64, 16, 4, 3, maxnreg=128),
    ("sm80", "fp32", "any"): ConvConfig(64, 64, 16, 4, 3),
    # The stem's per-element (r, s, c) decode with runtime image sizes spilled at 3 stages on sm_80
    # (and on sm_90 under the 128-register cap, while uncapped it takes 156 registers and no spills).
    ("sm90", "fp32", "gather"): ConvConfig(64, 64, 16, 4, 2),
    ("sm80", "fp32", "gather"): ConvConfig(64, 64, 16, 4, 2),
    # Triton's interpreter pays per program instance and per loop step: the largest tiles, fewest steps.
    ("interp", "any", "any"): ConvConfig(128, 128, 64, 4, 1),
}

_GPU_SM_COUNT_HINT = 132  # "fills the GPU" threshold for the large config (H100/H200 have 132 SMs)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _cuda_arch(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return major * 10 + minor


def device_arch(device: torch.device) -> int:
    """Compute capability as an int (90, 80, ...); 0 under the interpreter or on the CPU."""
    if _interpreting() or device.type != "cuda":
        return 0
    return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device())


def _pow2_at_least_16(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _supergroup_factor(groups: int, cg_in: int, ng: int) -> int:
    """Smallest power of two P dividing `groups` with P*cg_in >= 16 and P*ng >= 16 (or P = groups)."""
    p = 1
    while p < groups and (p * cg_in < 16 or p * ng < 16) and groups % (2 * p) == 0:
        p *= 2
    return p


# Spatial sizes and the pixel count only bound masks and offsets (channel strides stay specialized
# for vector loads), so they are not specialized: one binary serves every batch and image size.
@triton.jit(do_not_specialize=["M", "H", "W", "OH", "OW"])
def _conv_kernel(
    # pointers
    x_ptr,
    w_ptr,
    bias_ptr,
    res_ptr,
    out_ptr,
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
    # compile-time: layer geometry, loop mode, epilogue, tiles
    R: tl.constexpr,
    S: tl.constexpr,
    STRIDE: tl.constexpr,
    PAD: tl.constexpr,
    GATHER_CG: tl.constexpr,  # > 0: flattened-K gather loop with this many channels per group
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    APPLY_RELU: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # 1-D grid, output-channel tiles fastest: the programs that read one BLOCK_M slab of activations
    # run back to back, so the slab comes from DRAM once and from L2 for every other channel tile
    # (a ResNet layer's packed weights, at most a few MiB, stay resident in L2 throughout).
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

    if R == 1 and S == 1 and STRIDE == 1 and PAD == 0 and GATHER_CG == 0:
        # GEMM mode: output pixel m reads input pixel m.
        a_rows = x_ptr + offs_m * C_IN + g * CG
        for c0 in range(0, CG, BLOCK_K):
            c = c0 + offs_k
            c_mask = c < CG
            a = tl.load(a_rows[:, None] + c[None, :], mask=m_mask[:, None] & c_mask[None, :], other=0.0)
            b = tl.load(
                w_ptr + c[:, None] * C_OUT + offs_co[None, :],
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
            for k0 in range(0, K, BLOCK_K):
                k = k0 + offs_k
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
            # Channel-blocked: one flat loop over (tap, channel block) so Triton pipelines a single loop.
            kc = tl.cdiv(CG, BLOCK_K)
            for step in range(0, R * S * kc):
                tap = step // kc
                c = (step - tap * kc) * BLOCK_K + offs_k
                r = tap // S
                s = tap % S
                ih = ih0 + r
                iw = iw0 + s
                row_ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                c_mask = c < CG
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

    # Epilogue on the fp32 accumulator: bias, residual, ReLU, then one cast and one store.
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_co, mask=n_mask, other=0.0)[None, :]
    out_offs = offs_m[:, None] * C_OUT + offs_co[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + out_offs, mask=out_mask, other=0.0).to(tl.float32)
    if APPLY_RELU:
        acc = tl.maximum(acc, 0.0)
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def conv_out_shape(input_shape_nhwc, out_channels, kernel_size, stride, padding) -> tuple[int, int, int, int]:
    n, h, w, _ = input_shape_nhwc
    r, s = kernel_size
    return (n, (h + 2 * padding - r) // stride + 1, (w + 2 * padding - s) // stride + 1, out_channels)


def _check_tensor(t, what: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{what}: expected dtype {dtype}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{what}: expected NHWC shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{what}: expected device {device}, got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{what}: expected a contiguous NHWC tensor, got strides {t.stride()}")


def _check_launchable(x: torch.Tensor, who: str) -> None:
    if x.device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"{who}: expected a CUDA tensor, got one on {x.device} (CPU runs need TRITON_INTERPRET=1)"
        )


class ConvLayer:
    """A convolution prepared once (weights packed at construction) and launched many times."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        stride: int,
        padding: int,
        groups: int = 1,
        relu: bool = False,
        has_residual: bool = False,
        dtype: torch.dtype = torch.float16,
        allow_tf32: bool = False,
    ):
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"ConvLayer: dtype must be one of {SUPPORTED_DTYPES}, got {dtype}")
        if not isinstance(weight, torch.Tensor) or weight.ndim != 4 or not weight.is_floating_point():
            raise ValueError("ConvLayer: weight must be a float tensor of shape (C_out, C_in/groups, R, S)")
        c_out, cg_in, r, s = weight.shape
        if groups < 1 or c_out % groups:
            raise ValueError(f"ConvLayer: C_out={c_out} is not divisible by groups={groups}")
        if stride < 1 or padding < 0:
            raise ValueError(f"ConvLayer: expected stride >= 1 and padding >= 0, got {stride}, {padding}")
        if bias is not None and tuple(bias.shape) != (c_out,):
            raise ValueError(f"ConvLayer: bias must have shape ({c_out},), got {tuple(bias.shape)}")
        self.in_channels = cg_in * groups
        self.out_channels = c_out
        self.stride = stride
        self.padding = padding
        self.groups = groups
        self.kernel_size = (r, s)
        self.relu = relu
        self.has_residual = has_residual
        self.dtype = dtype
        self.device = weight.device
        self.input_precision = "tf32" if (dtype == torch.float32 and allow_tf32) else "ieee"

        ng = c_out // groups
        p = _supergroup_factor(groups, cg_in, ng)
        self.supergroup = p
        self.kernel_groups = groups // p
        self.kernel_cg = cg_in * p
        self.kernel_ng = ng * p
        # Block-diagonal super-group weights: (G/P, P*NG, P*CG, R, S), zero off the diagonal blocks.
        w = weight.detach().to(torch.float64).reshape(groups // p, p, ng, cg_in, r, s)
        dense = torch.zeros(groups // p, p, ng, p, cg_in, r, s, dtype=torch.float64, device=weight.device)
        for i in range(p):
            dense[:, i, :, i] = w[:, i]
        dense = dense.reshape(c_out, self.kernel_cg, r, s)
        # K-major packing: B[(r*S + s)*CG + c, co].
        self.weight_packed = dense.permute(2, 3, 1, 0).reshape(r * s * self.kernel_cg, c_out)
        self.weight_packed = self.weight_packed.to(dtype).contiguous()
        self.bias = None if bias is None else bias.detach().to(torch.float32).contiguous().to(weight.device)
        self.gather_cg = self.kernel_cg if self.kernel_cg < 16 else 0
        self._configs: dict[tuple, ConvConfig] = {}

    def __repr__(self) -> str:
        return (
            f"ConvLayer({self.in_channels}->{self.out_channels}, k={self.kernel_size}, s={self.stride}, "
            f"p={self.padding}, g={self.groups}, dtype={self.dtype})"
        )

    def output_shape(self, input_shape_nhwc) -> tuple[int, int, int, int]:
        return conv_out_shape(
            input_shape_nhwc, self.out_channels, self.kernel_size, self.stride, self.padding
        )

    def kind(self, input_shape_nhwc) -> str:
        """The config-table layer kind for this input shape: "gather", "small_m" or "large"."""
        if self.gather_cg:
            return "gather"
        n, oh, ow, _ = self.output_shape(input_shape_nhwc)
        tiles_128 = triton.cdiv(n * oh * ow, 128) * self.kernel_groups * triton.cdiv(self.kernel_ng, 128)
        return "small_m" if tiles_128 < _GPU_SM_COUNT_HINT else "large"

    def config_for(self, input_shape_nhwc, arch: int) -> ConvConfig:
        """The table config for this input shape on compute capability `arch` (0 = interpreter)."""
        if arch == 0:
            base = CONV_CONFIGS[("interp", "any", "any")]
        else:
            family = "sm90" if arch >= 90 else "sm80"
            if self.dtype == torch.float32:
                kind = "gather" if self.gather_cg else "any"
                base = CONV_CONFIGS[(family, "fp32", kind)]
            else:
                base = CONV_CONFIGS[(family, "16bit", self.kind(input_shape_nhwc))]
        return self.clip_config(base)

    def clip_config(self, config: ConvConfig) -> ConvConfig:
        """Clip BLOCK_N / BLOCK_K to this layer's per-group channel counts (no tile wider than a group)."""
        block_n = min(config.block_n, _pow2_at_least_16(self.kernel_ng))
        k_extent = self.kernel_size[0] * self.kernel_size[1] * self.gather_cg or self.kernel_cg
        block_k = min(config.block_k, _pow2_at_least_16(k_extent))
        return ConvConfig(
            config.block_m, block_n, block_k, config.num_warps, config.num_stages, config.maxnreg
        )

    def _kernel_args(self, x, residual, out, config: ConvConfig):
        """The launch's argument and constexpr dictionaries (tensors or aot.Pointer placeholders)."""
        n, h, w, _ = x.shape
        _, oh, ow, _ = out.shape
        has_bias = self.bias is not None
        args = dict(
            x_ptr=x,
            w_ptr=self.weight_packed,
            # Absent operands get a dummy pointer (never dereferenced: the constexpr switch is off).
            bias_ptr=self.bias if has_bias else self.weight_packed,
            res_ptr=residual if residual is not None else out,
            out_ptr=out,
            M=n * oh * ow,
            H=h,
            W=w,
            OH=oh,
            OW=ow,
            C_IN=self.in_channels,
            C_OUT=self.out_channels,
            CG=self.kernel_cg,
            NG=self.kernel_ng,
        )
        constexprs = dict(
            R=self.kernel_size[0],
            S=self.kernel_size[1],
            STRIDE=self.stride,
            PAD=self.padding,
            GATHER_CG=self.gather_cg,
            HAS_BIAS=has_bias,
            HAS_RESIDUAL=self.has_residual,
            APPLY_RELU=self.relu,
            INPUT_PRECISION=self.input_precision,
            BLOCK_M=config.block_m,
            BLOCK_N=config.block_n,
            BLOCK_K=config.block_k,
        )
        grid = (
            triton.cdiv(n * oh * ow, config.block_m)
            * self.kernel_groups
            * triton.cdiv(self.kernel_ng, config.block_n),
        )
        return args, constexprs, grid

    def __call__(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"ConvLayer: x must be a torch.Tensor, got {type(x).__name__}")
        key = (tuple(x.shape), device_arch(x.device))
        config = self._configs.get(key)
        if config is None:  # decided once per input shape: no table lookups on the hot path
            config = self._configs[key] = self.config_for(*key)
        return self.launch(x, residual, out, config=config)

    def launch(self, x, residual=None, out=None, *, config: ConvConfig) -> torch.Tensor:
        """`__call__` with an explicit tile config (used by the tests to run every table entry)."""
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise ValueError(f"ConvLayer: x must be a 4-d NHWC tensor, got {getattr(x, 'shape', type(x))}")
        _check_tensor(x, "ConvLayer input x", (*x.shape[:3], self.in_channels), self.dtype, self.device)
        _check_launchable(x, "ConvLayer")
        out_shape = self.output_shape(tuple(x.shape))
        if out_shape[1] < 1 or out_shape[2] < 1:
            raise ValueError(f"ConvLayer: input {tuple(x.shape)} is too small for {self!r}")
        if self.has_residual and residual is None:
            raise ValueError("ConvLayer: built with has_residual=True, so a residual tensor is required")
        if not self.has_residual and residual is not None:
            raise ValueError("ConvLayer: built with has_residual=False, but a residual was passed")
        if residual is not None:
            _check_tensor(residual, "ConvLayer residual", out_shape, self.dtype, self.device)
        if out is None:
            out = torch.empty(out_shape, dtype=self.dtype, device=self.device)
        else:
            _check_tensor(out, "ConvLayer out", out_shape, self.dtype, self.device)
        if x.numel() >= _INT32_LIMIT or out.numel() >= _INT32_LIMIT:
            raise ValueError("ConvLayer: tensors of 2**31 elements or more need int64 indexing (unsupported)")
        args, constexprs, grid = self._kernel_args(x, residual, out, config)
        _conv_kernel[grid](**args, **constexprs, **config.launch_options())
        return out

    def aot_specs(self, input_shape_nhwc, arch: int, config: ConvConfig | None = None) -> list[KernelSpec]:
        """What `__call__` compiles for this input shape on compute capability `arch`, without launching."""
        shape = tuple(input_shape_nhwc)
        config = config or self.config_for(shape, arch)
        out_shape = self.output_shape(shape)
        x = _ShapeOnly(shape, self.dtype)
        out = _ShapeOnly(out_shape, self.dtype)
        residual = _ShapeOnly(out_shape, self.dtype) if self.has_residual else None
        args, constexprs, grid = self._kernel_args(x, residual, out, config)
        args = {k: (Pointer(v.dtype) if isinstance(v, _ShapeOnly) else v) for k, v in args.items()}
        r, s = self.kernel_size
        name = (
            f"conv{r}x{s}_s{self.stride}_{self.in_channels}to{self.out_channels}_g{self.groups}"
            f"_{'x'.join(map(str, shape))}_{str(self.dtype).replace('torch.', '')}"
        )
        spec = make_spec(
            _conv_kernel,
            args,
            constexprs,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
            maxnreg=config.maxnreg,
            name=name,
            config=str(config),
            grid=grid,
            k_steps=self.k_steps(config),
            flops=flops(self, shape),
            min_bytes=self.min_bytes(shape),
            l2_bytes=self.l2_bytes(shape, config),
        )
        return [spec]

    def k_steps(self, config: ConvConfig) -> int:
        """Main-loop iterations per program (the same in the three loop modes' terms)."""
        r, s = self.kernel_size
        if self.gather_cg:
            return triton.cdiv(r * s * self.gather_cg, config.block_k)
        return r * s * triton.cdiv(self.kernel_cg, config.block_k)

    def min_bytes(self, input_shape_nhwc) -> int:
        """Input, packed weights, bias, residual and output, each once: the least DRAM traffic."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        n, h, w, c = input_shape_nhwc
        out = math.prod(self.output_shape(input_shape_nhwc))
        bias = 0 if self.bias is None else 4 * self.out_channels
        acts = n * h * w * c + out * (2 if self.has_residual else 1)
        return elem * (acts + self.weight_packed.numel()) + bias

    def l2_bytes(self, input_shape_nhwc, config: ConvConfig) -> int:
        """Bytes all programs load and store: each A row once per output-channel tile of its group, the
        packed weights once per pixel tile, the output (and residual) once. Masked lanes move nothing."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        n, oh, ow, c_out = self.output_shape(input_shape_nhwc)
        m = n * oh * ow
        m_tiles = triton.cdiv(m, config.block_m)
        n_tiles = triton.cdiv(self.kernel_ng, config.block_n)
        k = self.weight_packed.shape[0]  # R*S*CG per (super-)group
        a = m * k * self.kernel_groups * n_tiles
        bias = 0 if self.bias is None else 4 * c_out * m_tiles
        return (
            elem * (a + self.weight_packed.numel() * m_tiles + m * c_out * (2 if self.has_residual else 1))
            + bias
        )


@dataclass(frozen=True)
class _ShapeOnly:
    """A tensor's shape and dtype, for building AOT specs without allocating."""

    shape: tuple
    dtype: torch.dtype


def flops(layer: ConvLayer, input_shape_nhwc) -> int:
    """Useful multiply-add FLOPs (2 per MAC) of the convolution, excluding super-group padding."""
    n, oh, ow, c_out = layer.output_shape(input_shape_nhwc)
    r, s = layer.kernel_size
    return 2 * n * oh * ow * c_out * r * s * (layer.in_channels // layer.groups)


__all__ = ["CONV_CONFIGS", "ConvConfig", "ConvLayer", "conv_out_shape", "device_arch", "flops"]
