"""Classifier head: global average pool + fully connected + bias in one kernel, fp32 logits.

    logits[b, j] = bias[j] + sum_c W[j, c] * (1/HW) * sum_p x[b, p, c]        p over the H*W pixels

In GEMM terms: M = batch, N = num_classes, K = C, with the A operand (the pooled features) produced on the
fly: each program owns BLOCK_B images x BLOCK_J classes and, per BLOCK_C slice of channels, sums the H*W
pixels of its images in fp32, then does an fp32 `tl.dot` (IEEE) with the (BLOCK_C, BLOCK_J) weight tile.
The 1/HW scale is applied once to the accumulator (sum-then-scale, the same value as mean-then-matmul up
to fp32 rounding). Activations are contiguous NHWC in the model dtype; the weight is packed once as
W^T (C, num_classes) in the model dtype and upcast to fp32 in the kernel; the bias stays fp32.

Limitation: each class tile re-reads its images' activations (num_classes / BLOCK_J times, from L2), and a
program walks H*W pixels serially; the head is well under 1% of a ResNet's time, so it is kept simple.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .aot import KernelSpec, Pointer, make_spec

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# (BLOCK_B, BLOCK_J, BLOCK_C, num_warps). BLOCK_B = 16 is the smallest tile `tl.dot` takes; the fp32 dot
# runs on FMA units, so a 16x128 accumulator over 4 warps is 16 registers per thread.
HEAD_CONFIG = (16, 128, 64, 4)
HEAD_INTERP_CONFIG = (16, 128, 128, 4)  # the interpreter pays per loop step: wider channel slices
HEAD_NUM_STAGES = 2  # the pixel loop's loads are independent: let Triton prefetch one ahead


# Batch and pixel count only bound loops and masks: not specialized, so one binary fits all shapes.
@triton.jit(do_not_specialize=["BATCH", "HW"])
def _head_kernel(
    # pointers
    x_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    # sizes
    BATCH,
    HW,
    C,
    NUM_CLASSES,
    # compile-time
    HAS_BIAS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    b_mask = offs_b < BATCH
    j_mask = offs_j < NUM_CLASSES
    rows = x_ptr + offs_b * (HW * C)
    acc = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_mask = offs_c < C
        x_mask = b_mask[:, None] & c_mask[None, :]
        pooled = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
        for p in range(0, HW):
            pooled += tl.load(rows[:, None] + p * C + offs_c[None, :], mask=x_mask, other=0.0).to(tl.float32)
        w = tl.load(
            w_ptr + offs_c[:, None] * NUM_CLASSES + offs_j[None, :],
            mask=c_mask[:, None] & j_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(pooled, w.to(tl.float32), acc, input_precision="ieee")
    acc = acc / HW
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_j, mask=j_mask, other=0.0)[None, :]
    out_offs = offs_b[:, None] * NUM_CLASSES + offs_j[None, :]
    tl.store(out_ptr + out_offs, acc, mask=b_mask[:, None] & j_mask[None, :])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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
        self.weight_packed = weight.detach().t().to(dtype).contiguous()  # W^T: (C, num_classes)
        self.bias = None if bias is None else bias.detach().to(device=weight.device, dtype=torch.float32)
        if self.bias is not None:
            self.bias = self.bias.contiguous()

    def __repr__(self) -> str:
        return f"HeadLayer({self.in_channels}->{self.num_classes}, dtype={self.dtype})"

    def _kernel_args(self, x, out, config):
        n, h, w, c = x.shape
        block_b, block_j, block_c, _ = config
        has_bias = self.bias is not None
        args = dict(
            x_ptr=x,
            w_ptr=self.weight_packed,
            bias_ptr=self.bias if has_bias else out,  # dummy when absent: HAS_BIAS is off
            out_ptr=out,
            BATCH=n,
            HW=h * w,
            C=c,
            NUM_CLASSES=self.num_classes,
        )
        constexprs = dict(HAS_BIAS=has_bias, BLOCK_B=block_b, BLOCK_J=block_j, BLOCK_C=block_c)
        grid = (triton.cdiv(n, block_b), triton.cdiv(self.num_classes, block_j))
        return args, constexprs, grid

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
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
        if x.device.type != "cuda" and not _interpreting():
            raise ValueError(
                f"HeadLayer: expected a CUDA tensor, got {x.device} (CPU needs TRITON_INTERPRET=1)"
            )
        if x.numel() >= 2**31:
            raise ValueError("HeadLayer: tensors of 2**31 elements or more need int64 indexing (unsupported)")
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
        config = HEAD_INTERP_CONFIG if _interpreting() else HEAD_CONFIG
        args, constexprs, grid = self._kernel_args(x, out, config)
        _head_kernel[grid](**args, **constexprs, num_warps=config[3], num_stages=HEAD_NUM_STAGES)
        return out

    def aot_specs(self, input_shape_nhwc, arch: int) -> list[KernelSpec]:
        """What `__call__` compiles for this input shape on compute capability `arch` (same for all archs)."""
        shape = tuple(input_shape_nhwc)
        x, out = _Shaped(shape), _Shaped((shape[0], self.num_classes))
        args, constexprs, grid = self._kernel_args(x, out, HEAD_CONFIG)
        args.update(x_ptr=Pointer(self.dtype), out_ptr=Pointer(torch.float32))
        if self.bias is None:
            args["bias_ptr"] = Pointer(torch.float32)
        block_b, block_j, block_c, num_warps = HEAD_CONFIG
        dtype_name = str(self.dtype).replace("torch.", "")
        spec = make_spec(
            _head_kernel,
            args,
            constexprs,
            num_warps=num_warps,
            num_stages=HEAD_NUM_STAGES,
            name=f"head_{'x'.join(map(str, shape))}_to{self.num_classes}_{dtype_name}",
            config=f"BB{block_b}_BJ{block_j}_BC{block_c}_w{num_warps}",
            grid=grid,
            # The main loop is the pixel loop, nested in the channel-slice loop.
            k_steps=triton.cdiv(shape[3], block_c) * shape[1] * shape[2],
            outer_steps=triton.cdiv(shape[3], block_c),
            flops=self.flops(shape),
            min_bytes=self.min_bytes(shape),
        )
        return [spec]

    def flops(self, input_shape_nhwc) -> int:
        """The pooling sums and the matmul's multiply-adds (2 each)."""
        n, h, w, c = input_shape_nhwc
        return n * h * w * c + 2 * n * c * self.num_classes

    def min_bytes(self, input_shape_nhwc) -> int:
        """Activations, packed weight, bias and fp32 logits, each once."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        n, h, w, c = input_shape_nhwc
        bias = 0 if self.bias is None else 4 * self.num_classes
        return elem * (n * h * w * c + self.weight_packed.numel()) + bias + 4 * n * self.num_classes


class _Shaped:
    def __init__(self, shape):
        self.shape = shape
