"""Classifier head: global average pool, then fully connected + bias, fp32 logits. Two launches.

    pooled[b, c] = (1/HW) * sum_p x[b, p, c]                         p over the H*W pixels   (launch 1)
    logits[b, j] = bias[j] + sum_c pooled[b, c] * W[j, c]                                      (launch 2)

Launch 1 (`_head_pool_kernel`) spreads the pooling over the GPU: one program per (image, BLOCK_C
channels) sums its H*W pixels in fp32 with coalesced (BLOCK_P, BLOCK_C) loads and writes the fp32 mean
to a small scratch buffer `pooled` (N, C), cached on the layer per batch size (allocated on the first
call for that batch, never during a CUDA-graph replay).

Launch 2 (`_head_fc_kernel`) is a GEMM in the usual terms: M = batch, N = classes, K = C, A = pooled
(fp32), B = W^T. The weight is packed once as W^T (C, J_PAD) in the model dtype, with the class axis
zero-padded to J_PAD (a multiple of 64) so every weight row load is unmasked along classes and
vectorises (16-byte loads); the bias is padded likewise in fp32. The logits keep num_classes columns.
Two paths, chosen by batch (a constexpr, so each is its own binary):
* GEMV (BLOCK_B == 1, small batch): one image x BLOCK_J classes per program, fp32 FMAs and a fixed-order
  tree sum over K; many narrow class tiles fill the GPU while the 4 MB (ResNet-50, fp16) weight streams.
* tiled `tl.dot` (larger batch): fp32 models use an IEEE fp32 dot. 16-bit models run on tensor cores
  without rounding the pooled features to 16 bits: the fp32 pooled tile is split into 16-bit terms
  (hi = rn(p), lo = rn(p - hi), ...) and each term is multiplied by the (exact) 16-bit weight with fp32
  accumulation. Two fp16 terms keep 22 significant bits (absolute floor 2**-25 where the low term is
  subnormal, i.e. for |p| < 2**-3); three bf16 terms keep 24 (a full fp32 mantissa).

Every sum runs in a fixed order (no atomics, no split-K): the logits are bitwise identical run to run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .aot import KernelSpec, Pointer, ShapeOnly, interpreting, make_spec
from .launch import SUPPORTED_DTYPES, LaunchConfig, check_int32_indexing, check_launchable
from .pdl import pdl_enabled, pdl_for_arch, prefetch_bytes, prefetch_l2_tile

# The class axis of the packed weight is padded to this multiple: every fc class tile (BLOCK_J <= 64)
# then lies inside the padded rows, and a row stride divisible by 16 elements lets loads vectorise.
CLASS_PAD = 64


@dataclass(frozen=True)
class HeadPoolConfig(LaunchConfig):
    block_p: int
    block_c: int
    num_warps: int
    num_stages: int = 1  # one masked load round per pixel block: nothing to pipeline

    def tile_name(self) -> str:
        return f"BP{self.block_p}_BC{self.block_c}"


@dataclass(frozen=True)
class FcConfig(LaunchConfig):
    block_b: int
    block_j: int
    block_k: int
    num_warps: int
    num_stages: int

    def tile_name(self) -> str:
        return f"BB{self.block_b}_BJ{self.block_j}_BK{self.block_k}"


# Pooling: 64 pixels cover a 7x7 map in one masked load round; 32 channels give C/32 programs per
# image (64 at batch 1 for C=2048) so the pooling is spread out.
POOL_CONFIG = HeadPoolConfig(64, 32, 4)
POOL_INTERP_CONFIG = HeadPoolConfig(64, 256, 4)  # the interpreter pays per program: wide channel slices


# fc configs by batch: (max batch, FcConfig(BLOCK_B, BLOCK_J, BLOCK_K, num_warps, num_stages)). Each row keeps
# 64-128 programs on 1000 classes (J_PAD 1024), whatever the channel count. While the batch is tiny, a
# GEMV with 8-class tiles (one 16-byte load per fp16 weight row) and BLOCK_K 2048: ResNet's whole K in
# one round of loads per program (no pipelining needed; 80-127 registers, 256 threads). Then 16-row dot
# tiles (the smallest tl.dot takes), then wider ones, loaded by cp.async (16-byte copies), 3 stages.
FC_CONFIGS = (
    (4, FcConfig(1, 8, 2048, 8, 1)),
    (16, FcConfig(16, 16, 128, 4, 3)),
    (64, FcConfig(16, 32, 64, 4, 3)),  # BLOCK_K 128 takes 234 registers for the fp32 (FMA) dot on sm_80
    (128, FcConfig(32, 32, 64, 4, 3)),
    (None, FcConfig(64, 32, 32, 4, 3)),  # BLOCK_K 64 spills the fp32 (FMA) dot on sm_80
)
# The interpreter pays per program and per loop step: wide tiles, the same two paths.
FC_INTERP_CONFIGS = (
    (4, FcConfig(1, 64, 1024, 4, 1)),
    (None, FcConfig(16, 64, 256, 4, 1)),
)


# Batch and pixel count only bound loops and masks: not specialized, so one binary fits all shapes.
@triton.jit(do_not_specialize=["BATCH", "HW"])
def _head_pool_kernel(
    # pointers
    x_ptr,
    pooled_ptr,
    # sizes
    BATCH,
    HW,
    C,
    # compile-time
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    USE_PDL: tl.constexpr,  # programmatic dependent launch (kernels/pdl.py): no memory access before the wait
):
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    b = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    row = x_ptr + b * HW * C
    # A 2-d accumulator: one cross-thread reduction at the end instead of one per pixel block.
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()  # x is the last conv's output
    for p0 in range(0, HW, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask = (offs_p < HW)[:, None] & c_mask[None, :]
        acc += tl.load(row + offs_p[:, None] * C + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
    pooled = tl.sum(acc, axis=0) / HW
    tl.store(pooled_ptr + b * C + offs_c, pooled, mask=c_mask)


@triton.jit
def _split_dot(p, w, acc, TERMS: tl.constexpr):
    """acc + p @ w for fp32 `p` and 16-bit `w` on tensor cores: p split into TERMS 16-bit parts."""
    rest = p
    for _ in tl.static_range(TERMS):
        part = rest.to(w.dtype)
        acc = tl.dot(part, w, acc)
        rest = rest - part.to(tl.float32)  # exact in fp32: part is rest rounded to fewer bits
    return acc


@triton.jit(do_not_specialize=["BATCH"])
def _head_fc_kernel(
    # pointers
    pooled_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    # sizes
    BATCH,
    C,
    NUM_CLASSES,
    J_PAD,  # row stride of the packed weight, a multiple of CLASS_PAD
    # compile-time
    HAS_BIAS: tl.constexpr,
    SPLIT_TERMS: tl.constexpr,  # 0: fp32 weight, IEEE fp32 dot; else 16-bit terms per pooled value
    BLOCK_B: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr,  # kernels/pdl.py: only the weight and bias (constants) before gdc_wait
    PREFETCH_STEPS: tl.constexpr,  # USE_PDL: K-steps of weight rows prefetched into L2 before the wait
):
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        # The SHARE class tiles of one 128-byte weight line each prefetch 1/SHARE of the first steps' rows
        # (every line asked for once), and the bias; then wait for the pooled features.
        LINE: tl.constexpr = 1024 // w_ptr.dtype.element_ty.primitive_bitwidth  # elements per line
        SHARE: tl.constexpr = (LINE + BLOCK_J - 1) // BLOCK_J
        j0 = tl.program_id(1) * BLOCK_J
        for s in tl.static_range(PREFETCH_STEPS):
            row0 = s * BLOCK_K + (tl.program_id(1) % SHARE) * (BLOCK_K // SHARE)
            prefetch_l2_tile(w_ptr, row0, C, j0, J_PAD, J_PAD, BLOCK_K // SHARE, BLOCK_J)
        if HAS_BIAS:
            prefetch_l2_tile(bias_ptr, 0, 1, j0, J_PAD, 0, 1, BLOCK_J)
        tl.extra.cuda.gdc_wait()
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    b_mask = offs_b < BATCH
    if BLOCK_B == 1:
        b = tl.program_id(0)  # the grid has exactly BATCH rows on this path
        acc = tl.zeros((BLOCK_J,), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < C
        # Unmasked along classes (padded rows): the mask is constant along j, so loads stay vectorised.
        w = tl.load(w_ptr + offs_k[:, None] * J_PAD + offs_j[None, :], mask=k_mask[:, None], other=0.0)
        if BLOCK_B == 1:
            p = tl.load(pooled_ptr + b * C + offs_k, mask=k_mask, other=0.0)
            acc += tl.sum(p[:, None] * w.to(tl.float32), axis=0)
        else:
            p_mask = b_mask[:, None] & k_mask[None, :]
            p = tl.load(pooled_ptr + offs_b[:, None] * C + offs_k[None, :], mask=p_mask, other=0.0)
            if SPLIT_TERMS == 0:
                acc = tl.dot(p, w, acc, input_precision="ieee")
            else:
                acc = _split_dot(p, w, acc, SPLIT_TERMS)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_j)  # padded to J_PAD: no mask
    j_mask = offs_j < NUM_CLASSES
    if BLOCK_B == 1:
        tl.store(out_ptr + b * NUM_CLASSES + offs_j, acc, mask=j_mask)
    else:
        out_offs = offs_b[:, None] * NUM_CLASSES + offs_j[None, :]
        tl.store(out_ptr + out_offs, acc, mask=b_mask[:, None] & j_mask[None, :])


def fc_config(batch: int, interpreter: bool = False) -> FcConfig:
    """The fc launch's config for this batch size."""
    for max_batch, config in FC_INTERP_CONFIGS if interpreter else FC_CONFIGS:
        if max_batch is None or batch <= max_batch:
            return config
    raise AssertionError("the last config row takes every batch")


# Terms per fp32 pooled value for the 16-bit tensor-core dot (see the module docstring).
_SPLIT_TERMS = {torch.float32: 0, torch.float16: 2, torch.bfloat16: 3}


class HeadLayer:
    """Global average pool + fully connected + bias: NHWC (N, H, W, C) in `dtype` -> (N, num_classes) fp32."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, dtype: torch.dtype):
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"HeadLayer: dtype must be one of {SUPPORTED_DTYPES}, got {dtype}")
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or not weight.is_floating_point():
            raise ValueError("HeadLayer: weight must be a float tensor of shape (num_classes, C)")
        self.num_classes, self.in_channels = weight.shape
        if bias is not None and tuple(bias.shape) != (self.num_classes,):
            raise ValueError(
                f"HeadLayer: bias must have shape ({self.num_classes},), got {tuple(bias.shape)}"
            )
        self.dtype = dtype
        self.device = weight.device
        self.padded_classes = triton.cdiv(self.num_classes, CLASS_PAD) * CLASS_PAD
        # W^T (C, padded_classes) in the model dtype, zero columns past num_classes: packed once here.
        packed = torch.zeros(self.in_channels, self.padded_classes, dtype=dtype, device=self.device)
        packed[:, : self.num_classes] = weight.detach().t().to(dtype)
        self.weight_packed = packed
        self.bias = None
        if bias is not None:
            self.bias = torch.zeros(self.padded_classes, dtype=torch.float32, device=self.device)
            self.bias[: self.num_classes] = bias.detach().to(device=self.device, dtype=torch.float32)
        self._pooled: dict[int, torch.Tensor] = {}  # batch -> fp32 (batch, C) scratch, reused by every call

    def __repr__(self) -> str:
        return f"HeadLayer({self.in_channels}->{self.num_classes}, dtype={self.dtype})"

    def pooled_buffer(self, batch: int) -> torch.Tensor:
        """The fp32 (batch, C) pooled-feature scratch, allocated on first use for this batch, then reused.

        Shared by every call with this batch size: calls must not run concurrently on different streams.
        """
        buf = self._pooled.get(batch)
        if buf is None:
            buf = torch.empty(batch, self.in_channels, dtype=torch.float32, device=self.device)
            self._pooled[batch] = buf
        return buf

    def _launches(self, x, pooled, out, interpreter: bool, pdl: bool = False):
        """[(kernel, args, constexprs, grid, LaunchConfig, config string)], in launch order."""
        n, h, w, c = x.shape
        pool_config = POOL_INTERP_CONFIG if interpreter else POOL_CONFIG
        pool = (
            _head_pool_kernel,
            dict(x_ptr=x, pooled_ptr=pooled, BATCH=n, HW=h * w, C=c),
            dict(BLOCK_P=pool_config.block_p, BLOCK_C=pool_config.block_c, USE_PDL=pdl),
            (n, triton.cdiv(c, pool_config.block_c)),
            pool_config,
            str(pool_config),
        )
        fc_config_ = fc_config(n, interpreter)
        block_b, block_j, block_k = fc_config_.block_b, fc_config_.block_j, fc_config_.block_k
        has_bias = self.bias is not None
        fc_args = dict(
            pooled_ptr=pooled,
            w_ptr=self.weight_packed,
            bias_ptr=self.bias if has_bias else out,  # dummy when absent: HAS_BIAS is off
            out_ptr=out,
            BATCH=n,
            C=c,
            NUM_CLASSES=self.num_classes,
            J_PAD=self.padded_classes,
        )
        split = _SPLIT_TERMS[self.dtype]
        fc_constexprs = dict(
            HAS_BIAS=has_bias, SPLIT_TERMS=split, BLOCK_B=block_b, BLOCK_J=block_j, BLOCK_K=block_k,
            USE_PDL=pdl, PREFETCH_STEPS=min(fc_config_.num_stages, triton.cdiv(c, block_k)),
        )  # fmt: skip
        fc = (
            _head_fc_kernel,
            fc_args,
            fc_constexprs,
            (triton.cdiv(n, block_b), self.padded_classes // block_j),
            fc_config_,
            f"{fc_config_}_S{split}",
        )
        return [pool, fc]

    def grids(self, input_shape_nhwc, interpreter: bool = False) -> list[tuple[int, int]]:
        """The grid of each launch for this input shape (programs per launch = product)."""
        shape = tuple(input_shape_nhwc)
        return [launch[3] for launch in self._launches(*self._placeholders(shape), interpreter)]

    def _placeholders(self, shape: tuple) -> tuple[ShapeOnly, ShapeOnly, ShapeOnly]:
        """Input, pooled and logits as shapes only: the launch arguments without allocating."""
        pooled, logits = (shape[0], shape[3]), (shape[0], self.num_classes)
        return (
            ShapeOnly(shape, self.dtype),
            ShapeOnly(pooled, torch.float32),
            ShapeOnly(logits, torch.float32),
        )

    def __call__(
        self, x: torch.Tensor, out: torch.Tensor | None = None, pooled: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits for NHWC `x`. pooled: an fp32 (N, C) scratch the caller owns (e.g. one per CUDA graph);
        without it the layer's own per-batch buffer is used (not safe for concurrent streams)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"HeadLayer: x must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype != self.dtype:
            raise TypeError(f"HeadLayer: expected x dtype {self.dtype}, got {x.dtype}")
        if x.ndim != 4 or x.shape[3] != self.in_channels:
            raise ValueError(f"HeadLayer: expected NHWC (N, H, W, {self.in_channels}), got {tuple(x.shape)}")
        if x.device != self.device:
            raise ValueError(f"HeadLayer: expected x on {self.device}, got {x.device}")
        if not x.is_contiguous():
            raise ValueError(f"HeadLayer: expected a contiguous NHWC tensor, got strides {x.stride()}")
        check_launchable(x, "HeadLayer")
        check_int32_indexing(x.numel(), "HeadLayer")
        out_shape = (x.shape[0], self.num_classes)
        if out is None:
            out = torch.empty(out_shape, dtype=torch.float32, device=self.device)
        else:
            if not isinstance(out, torch.Tensor) or out.dtype != torch.float32:
                raise TypeError(f"HeadLayer: out must be a float32 tensor, got {getattr(out, 'dtype', out)}")
            if tuple(out.shape) != out_shape or out.device != self.device or not out.is_contiguous():
                raise ValueError(
                    f"HeadLayer: out must be a contiguous {out_shape} tensor on {self.device}, "
                    f"got {tuple(out.shape)} on {out.device}"
                )
        if pooled is None:
            pooled = self.pooled_buffer(x.shape[0])
        elif pooled.dtype != torch.float32 or tuple(pooled.shape) != (x.shape[0], self.in_channels):
            raise ValueError(f"HeadLayer: pooled must be fp32 ({x.shape[0]}, {self.in_channels})")
        pdl = pdl_enabled(x.device)
        for kernel, args, constexprs, grid, config, _ in self._launches(x, pooled, out, interpreting(), pdl):
            kernel[grid](**args, **constexprs, **config.launch_options(pdl))
        return out

    def aot_specs(self, input_shape_nhwc, arch: int) -> list[KernelSpec]:
        """What `__call__` compiles for this input shape on compute capability `arch`: one spec per launch
        (the same for all archs)."""
        shape = tuple(input_shape_nhwc)
        x, pooled, out = self._placeholders(shape)
        pointers = dict(
            x_ptr=Pointer(self.dtype),
            pooled_ptr=Pointer(torch.float32),
            out_ptr=Pointer(torch.float32),
            bias_ptr=Pointer(torch.float32),
        )
        dtype_name = str(self.dtype).replace("torch.", "")
        names = (
            f"head_pool_{'x'.join(map(str, shape))}_{dtype_name}",
            f"head_fc_{shape[0]}x{shape[3]}_to{self.num_classes}_{dtype_name}",
        )
        n, h, w, c = shape
        elem = torch.empty((), dtype=self.dtype).element_size()
        pool_bytes = elem * n * h * w * c + 4 * n * c
        bias_bytes = 0 if self.bias is None else 4 * self.num_classes
        fc_bytes = 4 * n * c + elem * self.weight_packed.numel() + bias_bytes + 4 * n * self.num_classes
        launches = self._launches(x, pooled, out, False, pdl_for_arch(arch))
        block_p, block_k = launches[0][2]["BLOCK_P"], launches[1][2]["BLOCK_K"]
        fc = launches[1][2]
        share = max(1, 128 // (elem * fc["BLOCK_J"]))  # the class tiles that split one line's rows
        fc_prefetch = prefetch_bytes(min(fc["PREFETCH_STEPS"] * block_k, c) // share, fc["BLOCK_J"], elem)
        facts = (  # per launch, for the estimator: k_steps, flops, min_bytes, prefetch bytes per CTA
            (triton.cdiv(h * w, block_p), n * h * w * c, pool_bytes, 0),
            (triton.cdiv(c, block_k), 2 * n * c * self.num_classes, fc_bytes, fc_prefetch),
        )
        specs = []
        for name, (kernel, args, constexprs, grid, launch_config, config), (
            k_steps,
            flops,
            nbytes,
            prefetched,
        ) in zip(names, launches, facts):
            args = {k: pointers.get(k, v) for k, v in args.items()}
            specs.append(
                make_spec(
                    kernel,
                    args,
                    constexprs,
                    num_warps=launch_config.num_warps,
                    num_stages=launch_config.num_stages,
                    name=name,
                    config=config,
                    grid=grid,
                    k_steps=k_steps,
                    flops=flops,
                    min_bytes=nbytes,
                    prefetch_bytes=prefetched,
                )
            )
        return specs


def global_avg_pool_nhwc(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 (N, C) means of a contiguous NHWC (N, H, W, C) tensor: the head's pooling launch on its own,
    for a plan that returns pooled features (an embedding) instead of logits."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_contiguous():
        raise ValueError(
            f"global_avg_pool_nhwc: expected a contiguous NHWC tensor, got {getattr(x, 'shape', x)}"
        )
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"global_avg_pool_nhwc: dtype must be one of {SUPPORTED_DTYPES}, got {x.dtype}")
    check_launchable(x, "global_avg_pool_nhwc")
    check_int32_indexing(x.numel(), "global_avg_pool_nhwc")
    n, h, w, c = x.shape
    if out is None:
        out = torch.empty(n, c, dtype=torch.float32, device=x.device)
    elif out.dtype != torch.float32 or tuple(out.shape) != (n, c) or not out.is_contiguous():
        raise ValueError(f"global_avg_pool_nhwc: out must be a contiguous fp32 ({n}, {c}) tensor")
    config = POOL_INTERP_CONFIG if interpreting() else POOL_CONFIG
    pdl = pdl_enabled(x.device)
    _head_pool_kernel[(n, triton.cdiv(c, config.block_c))](
        x, out, n, h * w, c, BLOCK_P=config.block_p, BLOCK_C=config.block_c, USE_PDL=pdl,
        **config.launch_options(pdl),
    )  # fmt: skip
    return out
