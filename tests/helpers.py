"""Numerical helpers shared by the tests: relative-error checks against a float64 reference."""

import torch

# Per-layer relative error bounds (max |out - ref| / max |ref|), by dtype.
LAYER_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, computed in float64 on the CPU."""
    out64 = out.detach().to("cpu", torch.float64)
    ref64 = ref.detach().to("cpu", torch.float64)
    scale = ref64.abs().max().item()
    return (out64 - ref64).abs().max().item() / max(scale, 1e-30)


def assert_close(out: torch.Tensor, ref: torch.Tensor, rtol: float, what: str = "output") -> None:
    """Assert out matches the float64 reference to `rtol` relative; say where and how it fails."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    out64 = out.detach().to("cpu", torch.float64)
    ref64 = ref.detach().to("cpu", torch.float64)
    bad = ~torch.isfinite(out64)
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} non-finite values, first at {idx} = {out64[idx].item()}"
        )
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


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill an output buffer with NaN so a kernel that skips any element fails the comparison."""
    return t.fill_(float("nan"))


# Every `fastres bench` result row names where and how it was measured, next to the timings.
BENCH_ROW_COLUMNS = (
    "device_name", "torch", "triton", "fastres", "git_rev", "date_utc", "dtype", "device", "backend",
    "median_ms", "p90_ms", "throughput_img_s", "peak_mem_mb",
)  # fmt: skip
