"""Per layer: fastres's ConvLayer against cuDNN on every distinct ResNet-50 conv shape (GPU only).

Two comparisons, each timed with `triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])` and reported
as time, TFLOP/s and GB/s:

* conv: `ConvLayer` (bias epilogue) vs `F.conv2d` with bias on channels-last tensors, cudnn.benchmark on;
* fused epilogue, on the layers that end a residual block: one `ConvLayer` launch doing
  conv + bias + residual add + ReLU vs cuDNN's conv followed by a separate `add_` and `relu_`.

Each fastres row also carries the performance model's estimate for that launch (`est_ms`, from
`fastres.tools.estimate`, GPU model picked from the device name with the real SM count, kernel time
without the CUDA-graph node gap) and `est_over_measured`; the script prints the model's median error per
layer kind, so the first GPU run calibrates the estimator. The estimates (an AOT compile and a SASS read
each) are made after all the timing, and the script appends every row to a .jsonl file as it is
measured (every estimate to a .estimates.jsonl), so a run stopped by a time limit keeps what it measured.

FLOPs are the useful 2*MACs of the convolution; bytes are the minimum traffic, input + weights + output
(+ residual), in the compute dtype -- the same count for both implementations, so GB/s compares like
with like (cuDNN's unfused path really moves more). Each row also carries the relative error of the two
outputs, so a fast but wrong kernel does not go unnoticed.

As a pytest-benchmark suite (skips without a GPU):  pytest benchmarks/bench_layers.py --benchmark-only
As a script (writes CSV and JSON):  python benchmarks/bench_layers.py --batch 64 --dtype fp16 --out DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastres.graph import ConvOp
from fastres.planner import plan_resnet
from fastres.progress import Progress
from fastres.reference import build_resnet
from fastres.specs import get_spec
from fastres.tools import bench, bench_report, environment

QUANTILES = [0.5, 0.2, 0.8]


@dataclass(frozen=True)
class ConvShape:
    """One distinct conv of a plan at a given input size (NCHW sizes), and the first op that has it."""

    name: str
    count: int
    batch: int
    c_in: int
    c_out: int
    kernel: int
    stride: int
    padding: int
    groups: int
    height: int
    width: int
    fused_residual: bool

    @property
    def label(self) -> str:
        return (
            f"{self.kernel}x{self.kernel}s{self.stride}_{self.c_in}to{self.c_out}_{self.height}x{self.width}"
            + (f"_g{self.groups}" if self.groups > 1 else "")
        )

    def flops(self) -> int:
        oh = (self.height + 2 * self.padding - self.kernel) // self.stride + 1
        ow = (self.width + 2 * self.padding - self.kernel) // self.stride + 1
        return 2 * self.batch * oh * ow * self.c_out * self.kernel**2 * (self.c_in // self.groups)

    def bytes_moved(self, elem: int, residual: bool) -> int:
        oh = (self.height + 2 * self.padding - self.kernel) // self.stride + 1
        ow = (self.width + 2 * self.padding - self.kernel) // self.stride + 1
        out = self.batch * oh * ow * self.c_out
        weights = self.c_out * (self.c_in // self.groups) * self.kernel**2
        return elem * (
            self.batch * self.height * self.width * self.c_in + weights + out * (2 if residual else 1)
        )


def distinct_convs(
    model: str = "resnet50", batch: int = 64, image_size: int = 224, residual_only: bool = False
) -> list[ConvShape]:
    """Distinct conv shapes of the model's plan (built on the meta device: shapes only)."""
    spec = get_spec(model)
    with torch.device("meta"):
        # One conv per layer as the kernel runs it alone: projections stay convs of their own.
        plan = plan_resnet(spec, 1000, build_resnet(spec).state_dict(), fuse_shortcuts=False)
    shapes = plan.shapes(batch, image_size, image_size)
    found: dict[tuple, list] = {}
    for op in plan.ops:
        if not isinstance(op, ConvOp) or (residual_only and op.residual is None):
            continue
        n, c, h, w = shapes[op.inputs[0]]
        k = op.weight.shape[-1]
        key = (c, op.weight.shape[0], k, op.stride, op.padding, op.groups, h, w)
        found.setdefault(key, [op.name, 0])[1] += 1
    return [
        ConvShape(name, count, batch, *key, fused_residual=residual_only)
        for key, (name, count) in found.items()
    ]


def layer_callables(shape: ConvShape, dtype: torch.dtype, fused: bool, device: str = "cuda"):
    """(fastres fn, cuDNN fn, relative error between their outputs) for one shape, inputs allocated once."""
    from fastres.kernels import ConvLayer

    g = torch.Generator(device="cpu").manual_seed(0)
    fan_in = shape.c_in // shape.groups * shape.kernel**2
    weight = torch.randn(shape.c_out, shape.c_in // shape.groups, shape.kernel, shape.kernel, generator=g)
    weight = (weight * (2 / fan_in) ** 0.5).to(device)
    bias = (torch.randn(shape.c_out, generator=g) * 0.1).to(device)
    x_nhwc = torch.randn(shape.batch, shape.height, shape.width, shape.c_in, generator=g).to(device, dtype)
    layer = ConvLayer(
        weight,
        bias,
        stride=shape.stride,
        padding=shape.padding,
        groups=shape.groups,
        relu=fused,
        has_residual=fused,
        dtype=dtype,
    )
    out_shape = layer.output_shape(tuple(x_nhwc.shape))
    residual = torch.randn(out_shape, generator=g).to(device, dtype) if fused else None
    out = torch.empty(out_shape, device=device, dtype=dtype)
    # The NHWC tensors viewed as NCHW are exactly channels-last NCHW tensors: cuDNN reads the same bytes.
    x_cl, res_cl = x_nhwc.permute(0, 3, 1, 2), None if residual is None else residual.permute(0, 3, 1, 2)
    w_cl = weight.to(dtype).contiguous(memory_format=torch.channels_last)
    b_cl = bias.to(dtype)

    def ours():
        return layer(x_nhwc, residual, out=out)

    def cudnn():
        y = F.conv2d(x_cl, w_cl, b_cl, shape.stride, shape.padding, 1, shape.groups)
        return y.add_(res_cl).relu_() if fused else y

    with torch.inference_mode():
        a, b = ours().permute(0, 3, 1, 2).double(), cudnn().double()
    error = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
    return ours, cudnn, error


def gpu_model(name: str | None = None, sms: int | None = None):
    """The estimator's assumptions for a GPU model by name, with its real SM count; by default the
    visible GPU's (name and SM count from the device itself)."""
    from fastres.tools.estimate import GPUS, apply_assumptions, gpu_for_device_name

    if name is None:
        props = torch.cuda.get_device_properties(0)
        name = gpu_for_device_name(props.name) or ("h100" if props.major >= 9 else "a100")
        sms = props.multi_processor_count
    return apply_assumptions(GPUS[name], [f"sms={sms}"] if sms else [])


def estimate_ms(shape: ConvShape, dtype: torch.dtype, fused: bool, gpu) -> float | None:
    """The model's time for this layer's one launch, without the graph node gap; None if it cannot."""
    from fastres.kernels import ConvLayer

    from fastres.tools.estimate_report import estimate_specs

    try:
        weight = torch.randn(shape.c_out, shape.c_in // shape.groups, shape.kernel, shape.kernel)
        layer = ConvLayer(weight, torch.randn(shape.c_out), stride=shape.stride, padding=shape.padding,
                          groups=shape.groups, relu=fused, has_residual=fused, dtype=dtype)  # fmt: skip
        specs = layer.aot_specs((shape.batch, shape.height, shape.width, shape.c_in), gpu.arch)
        return sum(e.time_us - gpu.node_gap_us for e in estimate_specs(specs, gpu)) / 1e3
    except Exception as exc:  # the measurement matters more than its estimate
        print(f"bench_layers: no estimate for {shape.label}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def layer_work(model: str, batch: int, image_size: int) -> list[tuple[str, ConvShape]]:
    """(comparison, shape) for both comparisons, in the order they are measured."""
    work = [("conv", s) for s in distinct_convs(model, batch, image_size)]
    return work + [
        ("conv+residual+relu", s) for s in distinct_convs(model, batch, image_size, residual_only=True)
    ]


def time_layers(
    model: str = "resnet50",
    batch: int = 64,
    dtype: torch.dtype = torch.float16,
    image_size: int = 224,
    progress: bool = True,
    rep_ms: int = 100,
    on_row=None,
) -> list[dict]:
    """Both comparisons on every distinct shape, timed; one row per (comparison, shape, implementation).
    `on_row(row)` sees each row as soon as it is measured; the estimate columns are filled in later. A
    layer that raises is printed as FAILED and has no rows."""
    from triton.testing import do_bench

    env = environment.environment(torch.device("cuda"))
    elem = torch.empty((), dtype=dtype).element_size()
    work = layer_work(model, batch, image_size)
    rows, failed = [], []
    bar = Progress(len(work), f"{model} layers", progress)
    try:
        for comparison, shape in work:
            fused = comparison != "conv"
            bar.update()
            try:
                ours, cudnn, error = layer_callables(shape, dtype, fused)
                timings = {}
                with torch.inference_mode(), bench.cudnn_benchmark(True):
                    for impl, fn in (("fastres", ours), ("cudnn", cudnn)):
                        timings[impl] = do_bench(fn, rep=rep_ms, quantiles=QUANTILES)
            except Exception as exc:  # one layer that fails to build or run: said, and the others go on
                print(f"bench_layers: FAILED {comparison} {shape.label}: {bench.one_line(exc)}", flush=True)
                failed.append(shape.label)
                continue
            for impl, (median, p20, p80) in timings.items():
                row = {
                    **env,
                    "model": model,
                    "dtype": str(dtype).replace("torch.", ""),
                    "comparison": comparison,
                    "layer": shape.label,
                    "first_op": shape.name,
                    "uses": shape.count,
                    "batch": batch,
                    "impl": impl,
                    "median_ms": median,
                    "p20_ms": p20,
                    "p80_ms": p80,
                    "tflops": shape.flops() / (median * 1e-3) / 1e12,
                    "gbps": shape.bytes_moved(elem, fused) / (median * 1e-3) / 1e9,
                    "speedup_vs_cudnn": timings["cudnn"][0] / median,
                    "rel_error_vs_cudnn": error,
                    "est_ms": None,
                    "est_over_measured": None,
                    "est_gpu_model": None,
                }
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    finally:
        bar.close()
    return rows


def add_estimates(rows: list[dict], image_size: int = 224, on_estimate=None, gpu=None) -> None:
    """The performance model's estimate beside each fastres row (an AOT compile and a SASS read per
    layer: after the timing, so that a run out of time still has every measurement; or offline, on
    the CPU, from the rows a GPU run saved, with `gpu` the model of its card)."""
    gpu, shapes = gpu or gpu_model(), {}
    for row in rows:
        if row["impl"] != "fastres":
            continue
        fused, at = row["comparison"] != "conv", (row["model"], row["batch"])
        if at not in shapes:
            shapes[at] = {(c, s.label): s for c, s in layer_work(*at, image_size)}
        shape = shapes[at][row["comparison"], row["layer"]]
        est = estimate_ms(shape, getattr(torch, row["dtype"]), fused, gpu)
        if est is not None:
            row.update(est_ms=est, est_over_measured=est / row["median_ms"], est_gpu_model=gpu.name)
        if on_estimate is not None:
            on_estimate(row)


def format_row(r: dict) -> str:
    est, ratio = r.get("est_ms"), r.get("est_over_measured")
    return (
        f"{r['comparison']:<20} {r['layer']:<28} {r['impl']:<8} {r['median_ms']:>10.4f} "
        f"{r['tflops']:>8.1f} {r['gbps']:>8.0f} {r['speedup_vs_cudnn']:>8.2f} "
        f"{_opt(est, '.4f'):>8} {_opt(ratio, '.2f'):>8}"
    )


def table_header() -> str:
    columns = ("median ms", "TFLOP/s", "GB/s", "x cuDNN", "est ms", "est/meas")
    header = f"{'comparison':<20} {'layer':<28} {'impl':<8} {columns[0]:>10} " + " ".join(
        f"{c:>8}" for c in columns[1:]
    )
    return f"{header}\n{'-' * len(header)}"


def format_rows(rows: list[dict]) -> str:
    lines = [table_header(), *map(format_row, rows)]
    for title, key in (
        ("fastres speed-up over cuDNN (cuDNN ms / fastres ms)", "speedup_vs_cudnn"),
        ("estimate (fastres.tools.estimate) / measured (1.00 = exact)", "est_over_measured"),
    ):
        lines += ["", f"{title}, median per layer kind:"]
        lines += [f"  {kind}: {v:.2f} over {n} layers" for kind, (v, n) in median_by_kind(rows, key).items()]
    return "\n".join(lines)


def _opt(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def median_by_kind(rows: list[dict], key: str) -> dict[str, tuple[float, int]]:
    """Median of `key` over the fastres rows that have it, per (comparison, kernel size) kind."""
    groups: dict[str, list[float]] = {}
    for r in rows:
        if r.get(key) is not None and r.get("impl", "fastres") == "fastres":
            kind = f"{r['comparison']} {r['layer'].split('_')[0]}"
            groups.setdefault(kind, []).append(r[key])
    return {k: (statistics.median(v), len(v)) for k, v in sorted(groups.items())}


def estimate_error_by_kind(rows: list[dict]) -> dict[str, tuple[float, int]]:
    """Median estimate/measured ratio of the fastres rows, per (comparison, kernel size) kind."""
    return median_by_kind(rows, "est_over_measured")


def estimate_saved_rows(path: Path, gpu_name: str | None, sms: int | None, image_size: int) -> int:
    """The estimates beside a GPU run's saved rows, made here (an AOT compile, no GPU): ROWS.est.jsonl."""
    from fastres.tools.estimate import GPUS

    if gpu_name not in GPUS:
        print(f"bench_layers: --estimate-from needs --gpu, one of {', '.join(GPUS)}", file=sys.stderr)
        return 2
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    add_estimates(rows, image_size, gpu=gpu_model(gpu_name, sms))
    out = path.with_suffix(".est.jsonl")
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(format_rows(rows))
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="fastres ConvLayer vs cuDNN per distinct conv shape (GPU)")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rep-ms", type=int, default=100, help="do_bench's timing window per call (ms)")
    parser.add_argument("--no-estimate", action="store_true", help="measurements only, no model estimate")
    parser.add_argument("--out", default="fastres-results")
    parser.add_argument(
        "--estimate-from",
        metavar="ROWS.jsonl",
        help="no timing: add the model's estimates to the rows a GPU run measured (runs on the CPU); "
        "with --gpu and --sms of the card that measured them",
    )
    parser.add_argument("--gpu", help="with --estimate-from: the estimator's GPU model (h100, h200, a100)")
    parser.add_argument("--sms", type=int, help="with --estimate-from: the card's SM count")
    args = parser.parse_args(argv)
    if args.estimate_from:
        return estimate_saved_rows(Path(args.estimate_from), args.gpu, args.sms, args.image_size)
    if not torch.cuda.is_available():
        print("bench_layers: needs a CUDA GPU (none visible to torch); nothing measured", file=sys.stderr)
        return 2
    from fastres.api import parse_dtype

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    stem = f"layers_{args.model}_b{args.batch}_{args.dtype}_{stamp}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Each row is appended (and printed) as it is measured, each estimate as it is made: a run stopped
    # by a time limit leaves all it measured in the .jsonl files; CSV and JSON come at the end.
    with (
        open(out / f"{stem}.jsonl", "a") as measured,
        open(out / f"{stem}.estimates.jsonl", "a") as estimated,
    ):

        def append(file, row, keys=None):
            file.write(json.dumps(row if keys is None else {k: row[k] for k in keys}) + "\n")
            file.flush()

        def measured_row(row):
            append(measured, row)
            print(format_row(row), flush=True)

        print(table_header(), flush=True)
        dtype = parse_dtype(args.dtype)
        rows = time_layers(args.model, args.batch, dtype, args.image_size, False, args.rep_ms, measured_row)
        if not args.no_estimate:
            keys = (
                "comparison",
                "layer",
                "impl",
                "median_ms",
                "est_ms",
                "est_over_measured",
                "est_gpu_model",
            )
            add_estimates(rows, args.image_size, on_estimate=lambda row: append(estimated, row, keys))
    print(format_rows(rows))
    paths, _ = bench_report.write_results(rows, out, stem, plot=False)
    print("wrote " + ", ".join(map(str, paths)))
    return 0 if len(rows) == 2 * len(layer_work(args.model, args.batch, args.image_size)) else 1


# ---------------------------------------------------------------------------------------------
# pytest-benchmark suite

_DTYPE = torch.float16
_CONV = distinct_convs("resnet50", 64)
_FUSED = distinct_convs("resnet50", 64, residual_only=True)


def _bench(benchmark, shape: ConvShape, impl: str, fused: bool) -> None:
    from triton.testing import do_bench

    ours, cudnn, error = layer_callables(shape, _DTYPE, fused)
    fn = ours if impl == "fastres" else cudnn
    median, p20, p80 = do_bench(fn, quantiles=QUANTILES)
    elem = torch.empty((), dtype=_DTYPE).element_size()
    benchmark.group = f"{'fused ' if fused else ''}{shape.label}"
    benchmark.extra_info.update(environment.environment(torch.device("cuda")))
    benchmark.extra_info.update(
        do_bench_median_ms=median,
        do_bench_p20_ms=p20,
        do_bench_p80_ms=p80,
        tflops=shape.flops() / (median * 1e-3) / 1e12,
        gbps=shape.bytes_moved(elem, fused) / (median * 1e-3) / 1e9,
        rel_error_vs_cudnn=error,
    )

    def call():
        fn()
        torch.cuda.synchronize()

    with torch.inference_mode():
        benchmark.pedantic(call, rounds=50, warmup_rounds=5)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["fastres", "cudnn"])
@pytest.mark.parametrize("shape", [pytest.param(s, id=s.label) for s in _CONV])
def test_conv_layer(benchmark, shape, impl):
    with bench.cudnn_benchmark(True):
        _bench(benchmark, shape, impl, fused=False)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["fastres", "cudnn"])
@pytest.mark.parametrize("shape", [pytest.param(s, id=s.label) for s in _FUSED])
def test_fused_epilogue(benchmark, shape, impl):
    with bench.cudnn_benchmark(True):
        _bench(benchmark, shape, impl, fused=True)


if __name__ == "__main__":
    sys.exit(main())
