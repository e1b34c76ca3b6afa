"""The classifier head (global average pool + fc + bias): fastres's HeadLayer vs eager PyTorch (GPU only).

Per (channels, batch): ResNet-50's head (2048 channels) and ResNet-18's (512), 7x7 maps, 1000 classes, in
fp16. Timed with `triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])`; GB/s counts the minimum traffic
(activations + weight + fp32 logits), the same for both. PyTorch runs `x.mean((1, 2))` then `F.linear` in
the model dtype (what eager torchvision does, NHWC here); each row carries both outputs' relative error
against a float64 reference, and the grid (programs) of each of fastres's launches.

As a pytest-benchmark suite (skips without a GPU):  pytest benchmarks/bench_head.py --benchmark-only
As a script:  python benchmarks/bench_head.py [--dtype fp16]
"""

from __future__ import annotations

import argparse
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from fastres.tools import environment

QUANTILES = [0.5, 0.2, 0.8]
SHAPES = [(c, b) for c in (2048, 512) for b in (1, 64, 256)]  # (channels, batch)
NUM_CLASSES, HW = 1000, 7


def head_callables(channels: int, batch: int, dtype: torch.dtype, device: str = "cuda"):
    """(fastres fn, torch fn, {impl: relative error vs float64}, grids, bytes moved), inputs made once."""
    from fastres.kernels import HeadLayer

    g = torch.Generator(device="cpu").manual_seed(0)
    weight = (torch.randn(NUM_CLASSES, channels, generator=g) / channels**0.5).to(device)
    bias = torch.randn(NUM_CLASSES, generator=g).to(device)
    x = torch.randn(batch, HW, HW, channels, generator=g).relu().to(device, dtype)
    layer = HeadLayer(weight, bias, dtype=dtype)
    out = torch.empty(batch, NUM_CLASSES, device=device, dtype=torch.float32)
    w_dtype, b_dtype = weight.to(dtype), bias.to(dtype)

    def ours():
        return layer(x, out=out)

    def eager():
        return F.linear(x.mean(dim=(1, 2)), w_dtype, b_dtype)

    ref = x.double().mean(dim=(1, 2)) @ w_dtype.double().T + bias.double()
    with torch.inference_mode():
        errors = {
            name: ((fn().double() - ref).abs().max() / ref.abs().max()).item()
            for name, fn in (("fastres", ours), ("torch", eager))
        }
    elem = x.element_size()
    moved = x.numel() * elem + weight.numel() * elem + out.numel() * 4
    return ours, eager, errors, layer.grids(tuple(x.shape)), moved


def measure(channels: int, batch: int, dtype: torch.dtype) -> list[dict]:
    from triton.testing import do_bench

    ours, eager, errors, grids, moved = head_callables(channels, batch, dtype)
    rows = []
    with torch.inference_mode():
        for impl, fn in (("fastres", ours), ("torch", eager)):
            median, p20, p80 = do_bench(fn, quantiles=QUANTILES)
            rows.append(
                dict(
                    channels=channels,
                    batch=batch,
                    impl=impl,
                    median_us=median * 1e3,
                    p20_us=p20 * 1e3,
                    p80_us=p80 * 1e3,
                    gbps=moved / (median * 1e-3) / 1e9,
                    rel_error=errors[impl],
                    programs="+".join(str(math.prod(g)) for g in grids) if impl == "fastres" else "",
                )
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="fastres HeadLayer vs eager PyTorch (GPU)")
    parser.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_head: needs a CUDA GPU (none visible to torch); nothing measured", file=sys.stderr)
        return 2
    from fastres.api import parse_dtype

    env = environment.environment(torch.device("cuda"))
    print(", ".join(f"{k}={v}" for k, v in env.items()))
    print(f"{'C':>5} {'batch':>5} {'impl':<8} {'median us':>10} {'GB/s':>7} {'rel err':>9} programs")
    for channels, batch in SHAPES:
        for r in measure(channels, batch, parse_dtype(args.dtype)):
            print(
                f"{r['channels']:>5} {r['batch']:>5} {r['impl']:<8} {r['median_us']:>10.2f} "
                f"{r['gbps']:>7.0f} {r['rel_error']:>9.2e} {r['programs']}"
            )
    return 0


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["fastres", "torch"])
@pytest.mark.parametrize("channels, batch", [pytest.param(c, b, id=f"c{c}_b{b}") for c, b in SHAPES])
def test_head(benchmark, channels, batch, impl):
    ours, eager, errors, grids, moved = head_callables(channels, batch, torch.float16)
    fn = ours if impl == "fastres" else eager
    benchmark.group = f"head c{channels} b{batch}"
    benchmark.extra_info.update(environment.environment(torch.device("cuda")))
    benchmark.extra_info.update(rel_error_vs_float64=errors[impl], bytes_moved=moved, grids=str(grids))

    def call():
        fn()
        torch.cuda.synchronize()

    with torch.inference_mode():
        benchmark.pedantic(call, rounds=50, warmup_rounds=5)


if __name__ == "__main__":
    sys.exit(main())
