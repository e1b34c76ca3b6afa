"""fastres's numerics standard in one place: per-dtype tolerances, relative error, parity bounds.

The engine's `check`, `fastres check`, the benchmarks and the tests all read these, and users can
hold their own fine-tunes to the same standard with `assert_close`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Per-layer relative error bounds (max |out - ref| / max |ref| against float64), by dtype.
LAYER_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# float32 with allow_tf32: the operands are rounded to TF32's 10-bit mantissa (fp16's) and the products
# accumulate in fp32, so a layer is held to fp16's bound.
TF32_LAYER_RTOL = LAYER_RTOL[torch.float16]

# End to end: fastres's error on the logits may be at most PARITY_FACTOR x eager PyTorch's own error in
# the same dtype, or PARITY_FLOOR where eager's is tiny (fp32 rounding differences of a reordered sum).
PARITY_FACTOR, PARITY_FLOOR = 2.0, 5e-6

# In a per-layer drift report, the first layer whose error exceeds this multiple of the first layer's is
# where the drift starts.
DRIFT_FACTOR = 10


def _float64_cpu(t: Tensor) -> Tensor:
    return t.detach().to("cpu", torch.float64)


def relative_error(out: Tensor, ref: Tensor) -> float:
    """max |out - ref| / max |ref|, computed in float64 on the CPU."""
    out64, ref64 = _float64_cpu(out), _float64_cpu(ref)
    return (out64 - ref64).abs().max().item() / max(ref64.abs().max().item(), 1e-300)


def sqnr_db(out: Tensor, ref: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB, 10 log10(sum ref^2 / sum (out - ref)^2), in float64
    on the CPU (inf when out equals ref; about 6 dB per bit of a well-used quantizer)."""
    out64, ref64 = _float64_cpu(out), _float64_cpu(ref)
    noise, signal = (out64 - ref64).square().sum().item(), ref64.square().sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def parity_bound(eager_relative_error: float) -> float:
    """The largest relative error fastres may have where eager PyTorch has `eager_relative_error`."""
    return max(PARITY_FACTOR * eager_relative_error, PARITY_FLOOR)


def assert_close(out: Tensor, ref: Tensor, rtol: float, what: str = "output") -> None:
    """Assert `out` matches the reference to `rtol` relative; say where and how it fails.

    Non-finite values in `out` fail (a NaN-poisoned buffer the kernel never wrote shows up here).
    """
    if out.shape != ref.shape:
        raise AssertionError(f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    out64, ref64 = _float64_cpu(out), _float64_cpu(ref)
    bad = ~torch.isfinite(out64)
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        first = out64[idx].item()
        raise AssertionError(f"{what}: {int(bad.sum())} non-finite values, first at {idx} = {first}")
    err = (out64 - ref64).abs()
    scale = max(ref64.abs().max().item(), 1e-30)
    rel = err.max().item() / scale
    if rel > rtol:
        flat = int(err.argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), err.shape))
        raise AssertionError(
            f"{what}: relative error {rel:.3e} > {rtol:.1e}; worst at {idx}: "
            f"got {out64[idx].item():.6g}, expected {ref64[idx].item():.6g} (scale {scale:.3g})"
        )


def poison_(t: Tensor) -> Tensor:
    """Fill an output buffer with NaN so that a kernel which skips any element fails the comparison."""
    return t.fill_(float("nan"))
