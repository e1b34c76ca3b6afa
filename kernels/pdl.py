"""Programmatic dependent launch (PDL, sm_90+): when it is on, and the L2 prefetch kernels issue before it.

Launched with `launch_pdl=True`, a kernel may start while the kernel before it on the stream drains:
as soon as every program of that predecessor has executed `gdc_launch_dependents` (the plan's kernels
do so first thing). Its programs then run their prologue (index math, an L2 prefetch of their first
weight tiles and of the bias) and stop at `gdc_wait` until the predecessor has completed and its writes
are visible. Each kernel's `USE_PDL` constexpr adds both calls; without it (sm_80, the interpreter,
FASTRES_PDL=0) the kernels compile exactly as before, with no griddepcontrol instruction.

Hazard rule (every kernel keeps its prologue within it): nothing before `gdc_wait` may read or write
memory that an earlier kernel of the plan writes -- activations (the ping-pong buffers of
`assign_buffers`), the split-K workspace and its arrival counters, the head's pooled features. Only
constants (weights, biases, scales) and index math may be touched there. Every program executes
`gdc_wait` unconditionally, so a kernel completes only after its predecessor has, and the chain of
waits orders each kernel after every earlier one, not only after the one before it.

Off switch: FASTRES_PDL=0 in the environment (read at each launch; a captured CUDA graph keeps what
it captured).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .aot import interpreting

PDL_ENV = "FASTRES_PDL"
L2_LINE_BYTES = 128  # one prefetch.global.L2 request brings one line


@functools.cache
def triton_supports_pdl() -> bool:
    """Whether this Triton has the GDC intrinsics and the `launch_pdl` launch option (3.4 and later)."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    has_intrinsics = hasattr(tl.extra.cuda, "gdc_wait") and hasattr(tl.extra.cuda, "gdc_launch_dependents")
    return has_intrinsics and "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


def pdl_switched_off() -> bool:
    return os.environ.get(PDL_ENV, "1").strip().lower() in ("0", "off", "false", "no")


def pdl_for_arch(arch: int) -> bool:
    """Whether kernels compiled for compute capability `arch` (90, 80; 0 = interpreter) use PDL."""
    return arch >= 90 and not pdl_switched_off() and triton_supports_pdl()


@functools.cache
def _capability(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return major * 10 + minor


def pdl_enabled(device: torch.device) -> bool:
    """Whether a launch on `device` uses PDL: a CUDA device of compute capability 9.0 or later, compiled
    (not interpreted) kernels, a Triton that supports it, and FASTRES_PDL not 0."""
    if interpreting() or device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return pdl_for_arch(_capability(index))


def prefetch_bytes(rows: int, cols: int, element_bytes: int) -> int:
    """Bytes `prefetch_l2_tile` asks L2 for on a full (rows, cols) tile: whole 128-byte lines per row."""
    return rows * triton.cdiv(cols * element_bytes, L2_LINE_BYTES) * L2_LINE_BYTES


@triton.jit
def prefetch_l2_tile(base, row0, row_end, col0, col_end, ROW_STRIDE, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Ask L2 for rows [row0, row0 + ROWS) x columns [col0, col0 + COLS) of the row-major matrix at
    `base` (ROW_STRIDE elements per row), clipped to rows < row_end and columns < col_end: one
    `prefetch.global.L2` per 128-byte line. A hint with no result: no register outlives it, and a
    clipped element asks for `base` again instead of an address past the tensor."""
    LINE: tl.constexpr = 1024 // base.dtype.element_ty.primitive_bitwidth  # elements per 128-byte line
    LINES: tl.constexpr = (COLS + LINE - 1) // LINE
    rows = row0 + tl.arange(0, ROWS)
    cols = col0 + tl.arange(0, LINES) * LINE
    inside = (rows < row_end)[:, None] & (cols < col_end)[None, :]
    offsets = tl.where(inside, rows[:, None] * ROW_STRIDE + cols[None, :], 0)
    tl.inline_asm_elementwise(
        "prefetch.global.L2 [$1]; // $0", "=r,l", [base + offsets], dtype=tl.int32, is_pure=False, pack=1
    )



@triton.jit
def prefetch_then_wait(
    w_ptr, rows, col0, cols, ROW_STRIDE, bias_ptr,
    HAS_BIAS: tl.constexpr, STEPS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The PDL prologue of a kernel whose K-step s reads rows [s*BLOCK_K, (s+1)*BLOCK_K) x columns
    [col0, col0 + BLOCK_N) of a row-major weight (rows x cols, ROW_STRIDE elements per row): those of
    its first STEPS steps and its bias columns (fp32) into L2, then `gdc_wait`. Constants only."""
    for s in tl.static_range(STEPS):
        prefetch_l2_tile(w_ptr, s * BLOCK_K, rows, col0, cols, ROW_STRIDE, BLOCK_K, BLOCK_N)
    if HAS_BIAS:
        prefetch_l2_tile(bias_ptr, 0, 1, col0, cols, 0, 1, BLOCK_N)
    tl.extra.cuda.gdc_wait()


__all__ = [
    "PDL_ENV",
    "pdl_enabled",
    "pdl_for_arch",
    "prefetch_bytes",
    "prefetch_l2_tile",
    "prefetch_then_wait",
    "triton_supports_pdl",
]
