"""Test-only constants; the numerics (tolerances, assert_close, poison_) live in fastres.numerics."""

# Every `fastres bench` result row names where and how it was measured, next to the timings.
BENCH_ROW_COLUMNS = (
    "device_name", "torch", "triton", "fastres", "git_rev", "date_utc", "dtype", "device", "backend",
    "median_ms", "p90_ms", "throughput_img_s", "peak_mem_mb",
)  # fmt: skip
