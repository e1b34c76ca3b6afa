"""The `fastres` command line (also `python -m fastres`): bench, info, check, compile-report.

Argument parsing only; the work lives in fastres.tools (bench, compile_report, estimate) and the engine.
Errors a user can fix (unknown model, bad dtype, missing file, no GPU) are one line on stderr and exit
status 2; a failed parity check or compile report exits 1.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from importlib import metadata

import torch

from . import __version__
from .errors import FastresError
from .numerics import DRIFT_FACTOR, PARITY_FACTOR, PARITY_FLOOR, parity_bound

DTYPES = ("fp16", "bf16", "fp32")


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (the caller prints them) instead of usage + message."""

    def error(self, message: str):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _version() -> str:
    try:
        triton = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton = "not installed"
    return f"fastres {__version__} (torch {torch.__version__}, triton {triton})"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fastres",
        description="Torchvision ResNets through fused Triton kernels: benchmark, inspect, check, compile.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_examples(
            "fastres bench resnet50 --batch 1 8 64 256 --dtype fp16 --compare eager,compile",
            "fastres info resnet50 --batch 8",
            "fastres check resnet50 --weights resnet50.pth",
            "fastres compile-report resnet50 --arch sm_90 --dtype fp16",
            "run 'fastres COMMAND --help' for each command's options",
        ),
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    def common(p: argparse.ArgumentParser, batch_default, dtype_help: str) -> None:
        p.add_argument("model", help="a model name (resnet18 ... wide_resnet101_2) or a checkpoint path")
        p.add_argument("--dtype", choices=DTYPES, help=dtype_help)
        p.add_argument(
            "--image-size", type=int, default=224, metavar="PX", help="square input size (default 224)"
        )

    bench = sub.add_parser(
        "bench",
        formatter_class=fmt,
        help="time fastres against eager PyTorch (and torch.compile) in one interleaved run",
        description="Time fastres against its anchors in one run, measurements interleaved round-robin:\n"
        "eager PyTorch in the same dtype (NCHW, and channels-last with cudnn.benchmark on) and, with\n"
        "--compare ...,compile, torch.compile. Without --weights the network has realistic random\n"
        "weights (calibrated BatchNorm). Writes a table to stdout and CSV, JSON and a PNG plot to --out.",
        epilog=_examples(
            "fastres bench resnet50 --batch 1 8 64 256 --dtype fp16 --compare eager,compile",
            "fastres bench resnet18 --device cpu --batch 1 4",
            "fastres bench resnet50 --weights resnet50.pth --batch 64 --repeats 100 --out results/",
        ),
    )
    common(bench, None, "compute dtype (default fp16 on CUDA, fp32 on the CPU)")
    bench.add_argument(
        "--batch",
        type=int,
        nargs="+",
        default=[1, 8, 64, 256],
        metavar="N",
        help="batch sizes (default 1 8 64 256)",
    )
    bench.add_argument("--device", choices=("cuda", "cpu"), help="default cuda when available, else cpu")
    bench.add_argument(
        "--compare",
        default="eager",
        metavar="LIST",
        help="anchors, comma-separated: eager, compile, or none (default eager)",
    )
    bench.add_argument("--weights", metavar="W", help="checkpoint path or torchvision weight name")
    bench.add_argument(
        "--backend",
        choices=("triton", "torch", "reference"),
        help="fastres backend (default triton on CUDA, torch on the CPU)",
    )
    bench.add_argument(
        "--repeats", type=int, metavar="N", help="timed calls per candidate (default 50 CUDA, 10 CPU)"
    )
    bench.add_argument(
        "--warmup", type=int, metavar="N", help="untimed calls per candidate (default 5 CUDA, 2 CPU)"
    )
    bench.add_argument(
        "--compile-budget",
        type=float,
        metavar="S",
        help="stop starting torch.compile work once it has taken S seconds in all",
    )
    bench.add_argument(
        "--out",
        default="fastres-results",
        metavar="DIR",
        help="where CSV, JSON and the plot go (default ./fastres-results/)",
    )
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")

    info = sub.add_parser(
        "info",
        formatter_class=fmt,
        help="print the fused-op plan with FLOPs and memory traffic",
        description="Print the fused-op table of a model for one input size, with FLOPs and bytes per op\n"
        "and the totals against eager execution. Needs only shapes: no weights are read for a name.",
        epilog=_examples(
            "fastres info resnet50",
            "fastres info resnext50_32x4d --batch 64 --dtype bf16",
            "fastres info checkpoints/best.pt   # architecture inferred from the checkpoint",
        ),
    )
    common(info, 1, "element size for the byte counts (default fp16)")
    info.add_argument("--batch", type=int, default=1, metavar="N", help="batch size (default 1)")
    info.add_argument("--num-classes", type=int, default=1000, metavar="K", help="classifier size for a name")

    check = sub.add_parser(
        "check",
        formatter_class=fmt,
        help="parity against a float64 reference, with a per-layer drift report",
        description="Compare fastres's logits with the reference run in float64, beside eager PyTorch's\n"
        "own error in the same dtype, and show per layer where the error grows. Exit status 1 when\n"
        f"fastres's relative error exceeds {PARITY_FACTOR:g}x eager's (and {PARITY_FLOOR:g}).",
        epilog=_examples(
            "fastres check resnet50",
            "fastres check resnet18 --device cpu --batch 2 --image-size 64",
            "fastres check resnet50 --weights resnet50.pth --images batch.pt --dtype bf16",
        ),
    )
    common(check, 4, "compute dtype (default fp16 on CUDA, fp32 on the CPU)")
    check.add_argument("--batch", type=int, default=4, metavar="N", help="random images (default 4)")
    check.add_argument("--device", choices=("cuda", "cpu"), help="default cuda when available, else cpu")
    check.add_argument("--weights", metavar="W", help="checkpoint path or torchvision weight name")
    check.add_argument("--backend", choices=("triton", "torch", "reference"), help="fastres backend")
    check.add_argument(
        "--images",
        metavar="FILE.pt",
        help="a saved N x 3 x H x W float tensor (normalised) instead of random images",
    )
    check.add_argument("--seed", type=int, default=0, help="seed of the random weights and images")

    report = sub.add_parser(
        "compile-report",
        formatter_class=fmt,
        help="compile every kernel for a GPU that is not here; registers, spills, shared memory",
        description="Compile ahead of time, without a GPU, every distinct Triton kernel the model launches\n"
        "for one input size, and report registers, spill bytes, shared memory and (sm_90) wgmma use.\n"
        "Exit status 1 if any kernel fails to compile or spills. Runs without TRITON_INTERPRET.",
        epilog=_examples(
            "fastres compile-report resnet50 --arch sm_90 --dtype fp16",
            "fastres compile-report resnext50_32x4d --arch sm_80 --dtype bf16 --batch 1",
            "fastres compile-report resnet50 --batch 256 --estimate --gpu h100 --assume node_gap_us=1",
        ),
    )
    report.add_argument("model", help="a model name")
    report.add_argument("--arch", help="sm_90 or sm_80 (also sm_86, sm_89); with --estimate, the GPU's")
    report.add_argument("--dtype", choices=DTYPES, help="compute dtype (required; fp16 with --estimate)")
    report.add_argument("--batch", type=int, default=8, metavar="N", help="batch size (default 8)")
    report.add_argument(
        "--image-size", type=int, default=224, metavar="PX", help="square input size (default 224)"
    )
    report.add_argument("--out", metavar="DIR", help="also write the report as JSON into DIR")
    report.add_argument("--no-progress", action="store_true", help="no progress bar")
    report.add_argument(
        "--estimate",
        action="store_true",
        help="instead: estimate each launch's time on --gpu with an analytical model (not a measurement)",
    )
    report.add_argument("--gpu", default="h100", help="with --estimate: h100, h200 or a100 (default h100)")
    report.add_argument(
        "--assume",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --estimate: override one GPU assumption (repeatable; the output lists the keys)",
    )
    _add_classify_parser(sub)
    _add_serve_parser(sub)
    return parser


def _add_classify_parser(sub) -> None:
    classify = sub.add_parser(
        "classify",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="image files or folders in, top-k labels out",
        description="Classify image files (JPEG, PNG, WebP, BMP; folders searched recursively) with\n"
        "torchvision's evaluation preprocessing for the weights (resize, centre crop), decoded with\n"
        "Pillow in a thread pool ahead of the engine. One table row, or with --json one JSON object,\n"
        "per file on stdout. A file that cannot be decoded is reported on stderr and skipped; the\n"
        "exit status is then 1. Without --weights the network is random (a warning says so).",
        epilog=_examples(
            "fastres classify photos/ --weights DEFAULT",
            "fastres classify cat.jpg dog.png --model resnet18 --weights IMAGENET1K_V1 --topk 3",
            "fastres classify data/ --weights finetune.pth --labels classes.txt --json > preds.jsonl",
            "fastres classify data/ --model resnet50 --weights best.pt --resize 160 --crop 144",
        ),
    )
    classify.add_argument("paths", nargs="+", metavar="PATH", help="image files and folders")
    classify.add_argument(
        "--model", default="resnet50", help="model name or checkpoint path (default resnet50)"
    )
    classify.add_argument("--weights", metavar="W", help="checkpoint path or torchvision weight name")
    classify.add_argument("--device", choices=("cuda", "cpu"), help="default cuda when available, else cpu")
    classify.add_argument("--dtype", choices=DTYPES, help="default fp16 on CUDA, fp32 on the CPU")
    classify.add_argument("--backend", choices=("triton", "torch", "reference"), help="fastres backend")
    classify.add_argument("--topk", type=int, default=5, metavar="K", help="labels per image (default 5)")
    classify.add_argument("--batch", type=int, default=64, metavar="N", help="images per batch (default 64)")
    classify.add_argument(
        "--labels", metavar="FILE", help="class names, one per line (default: ImageNet's for 1000 classes)"
    )
    classify.add_argument(
        "--resize", type=int, metavar="PX", help="short side before the crop (default: the weights'; 0: none)"
    )
    classify.add_argument(
        "--crop", type=int, metavar="PX", help="centre crop size (default: the weights'; 0: none)"
    )
    classify.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"), help="default ImageNet's")
    classify.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"), help="default ImageNet's")
    classify.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="decoding threads (default min(8, CPUs)); 0 decodes in the main thread, no prefetch",
    )
    classify.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    classify.add_argument("--no-progress", action="store_true", help="no progress bar")


# ---------------------------------------------------------------------------------------------
# Commands


def _dtype(name: str | None):
    from .api import parse_dtype

    return None if name is None else parse_dtype(name)


def cmd_bench(args) -> int:
    from .tools.bench import BenchConfig, run_benchmark
    from .tools.bench_report import describe_run, format_table, result_stem, write_results

    compare = [c.strip() for c in args.compare.split(",") if c.strip() and c.strip() != "none"]
    config = BenchConfig(
        model=args.model,
        batches=args.batch,
        dtype=_dtype(args.dtype),
        device=args.device,
        image_size=args.image_size,
        compare=compare,
        weights=args.weights,
        backend=args.backend,
        repeats=args.repeats,
        warmup=args.warmup,
        compile_budget_s=args.compile_budget,
        progress=not args.no_progress,
    )
    stem: list[str] = []

    def save_partial(rows) -> None:  # after every batch size: a killed run still leaves its results
        if not stem:
            stem.append(result_stem(rows[0]["model"], rows[0]["device"], rows[0]["dtype"]))
        write_results(rows, args.out, stem[0], plot=False)

    rows = run_benchmark(config, on_rows=save_partial).rows
    print(describe_run(rows))
    print(format_table(rows))
    paths, note = write_results(rows, args.out, stem[0])
    print("wrote " + ", ".join(map(str, paths)))
    if note:
        print(note)
    failed = [r for r in rows if r["candidate"] == "fastres" and r["error"]]
    for r in failed:
        print(f"fastres: error: fastres failed at batch {r['batch']}: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


def cmd_info(args) -> int:
    from .checkpoints import resolve_model
    from .planner import plan_resnet
    from .reference import build_resnet
    from .specs import MODEL_SPECS, get_spec

    if args.batch < 1 or args.image_size < 1:
        raise ValueError(
            f"--batch and --image-size must be at least 1, got {args.batch} and {args.image_size}"
        )
    if args.model not in MODEL_SPECS and os.path.exists(args.model):
        arch, state_dict = resolve_model(args.model)
        spec, num_classes = arch.spec, arch.num_classes
    else:
        spec, num_classes = get_spec(args.model), args.num_classes
        with torch.device("meta"):  # shapes only: nothing allocated, nothing initialised
            state_dict = build_resnet(spec, num_classes).state_dict()
    plan = plan_resnet(spec, num_classes, state_dict)
    print(plan.describe(args.batch, args.image_size, args.image_size, _dtype(args.dtype or "fp16")))
    return 0


def _load_images(path: str) -> torch.Tensor:
    if not os.path.exists(path):
        raise FileNotFoundError(f"--images file not found: {path}")
    data = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(data, dict):
        tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
        data = data.get("images", tensors[0] if len(tensors) == 1 else None)
    if not isinstance(data, torch.Tensor):
        raise ValueError(f"{path} must hold one tensor of images N x 3 x H x W (or a dict with key 'images')")
    return data


def format_layer_report(layers, width: int = 30) -> str:
    """One line per op: its relative error and a log-scale bar; marks where drift starts."""
    errors = [e.relative_error for e in layers]
    positive = [e for e in errors if e > 0]
    if not positive:
        return "per-layer relative error: every op matches the float64 plan exactly"
    lo, hi = math.log10(min(positive)), math.log10(max(positive))
    baseline = next(e for e in errors if e > 0)
    start = next((i for i, e in enumerate(errors) if e > DRIFT_FACTOR * baseline), None)
    name_w = max(len(e.op) for e in layers)
    kind_w = max(len(e.kind) for e in layers)
    out = [
        f"per-layer relative error vs the same plan in float64 (bar: log scale {min(positive):.1e} .. "
        f"{max(positive):.1e}; drift starts at the first op above {DRIFT_FACTOR}x the first op's error)"
    ]
    for i, e in enumerate(layers):
        n = (
            0
            if e.relative_error <= 0
            else 1 + round((width - 1) * (math.log10(e.relative_error) - lo) / max(hi - lo, 1e-9))
        )
        mark = f"  <- drift starts ({e.relative_error / baseline:.0f}x {layers[0].op})" if i == start else ""
        bar = "#" * n
        out.append(
            f"  {e.op:<{name_w}}  {e.kind:<{kind_w}}  {e.relative_error:9.2e}  {bar:<{width}}{mark}".rstrip()
        )
    if start is None:
        out.append(f"  no op exceeds {DRIFT_FACTOR}x the first op's error: no drift")
    return "\n".join(out)


def cmd_check(args) -> int:
    import fastres

    from .specs import MODEL_SPECS
    from .testing import make_calibrated_model, random_images

    dtype = _dtype(args.dtype)
    if args.weights is None and args.model in MODEL_SPECS:
        module = make_calibrated_model(args.model, seed=args.seed)
        engine = fastres.optimize(module, device=args.device, dtype=dtype, backend=args.backend)
        source = "random weights with calibrated BatchNorm"
    else:
        if args.model not in MODEL_SPECS and not os.path.exists(args.model):
            fastres.get_spec(args.model)  # one-line UnknownModelError listing the names
        engine = fastres.load(args.model, args.weights, device=args.device, dtype=dtype, backend=args.backend)
        source = f"weights {args.weights or args.model}"
    if args.images:
        x = _load_images(args.images)
    else:
        if args.batch < 1 or args.image_size < 32:
            raise ValueError(
                f"need --batch >= 1 and --image-size >= 32, got {args.batch} and {args.image_size}"
            )
        x = random_images(args.batch, args.image_size, args.image_size, seed=args.seed)
    print(f"{engine!r}; {source}; input {'x'.join(map(str, x.shape))}")
    result = engine.check(x)
    print(result)
    print(format_layer_report(engine.layer_errors(x)))
    bound = parity_bound(result.eager_relative_error)
    ok = result.relative_error <= bound
    print(
        f"{'PASS' if ok else 'FAIL'}: fastres relative error {result.relative_error:.3e} "
        f"{'<=' if ok else '>'} {bound:.3e} (max of {PARITY_FACTOR:g}x eager's, {PARITY_FLOOR:g})"
    )
    return 0 if ok else 1


def cmd_classify(args) -> int:
    from .classify import classify_command
    from .images import require_pillow

    try:
        require_pillow()
    except ImportError as exc:
        raise UsageError(str(exc)) from None
    return classify_command(args)


def cmd_compile_report(args, argv: list[str]) -> int:
    from .tools import compile_report

    if args.estimate:
        from .tools.estimate_report import estimate_command

        return estimate_command(args, argv)
    if args.arch is None or args.dtype is None:
        raise UsageError("compile-report needs --arch and --dtype (or --estimate)")
    compile_report.parse_arch(args.arch)  # bad input fails here, in this process, as one line
    if compile_report.interpreter_enabled():
        return compile_report.rerun_without_interpreter(argv)
    return compile_report.run(
        args.model,
        args.arch,
        _dtype(args.dtype),
        args.batch,
        args.image_size,
        args.out,
        progress=not args.no_progress,
    )


def _add_serve_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="an HTTP endpoint (Open Inference Protocol, KServe v2) on Ray Serve, with dynamic batching",
        description="Serve MODEL over HTTP with the Open Inference Protocol (KServe v2: tritonclient and\n"
        "KServe clients work unchanged) plus POST /v1/classify for image files. Starts a local Ray\n"
        "instance, or joins a cluster with --address; one engine per replica, one GPU each when the\n"
        "cluster has GPUs. Concurrent requests are batched. Needs: pip install 'fastres[serve]'.",
        epilog=_examples(
            "fastres serve resnet50 --weights DEFAULT",
            "fastres serve resnet50 --weights ft.pth --labels labels.txt --name birds --port 8080",
            "fastres serve resnet50 --weights DEFAULT --address auto --replicas 8   # on a Ray cluster",
        ),
    )
    p.add_argument("model", help="a model name (resnet18 ... wide_resnet101_2) or a checkpoint path")
    p.add_argument("--weights", help="checkpoint path or torchvision weight name (IMAGENET1K_V2, DEFAULT)")
    p.add_argument("--name", help="the model name in URLs (default: MODEL)")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when the cluster has GPUs")
    p.add_argument("--dtype", choices=DTYPES, help="default: fp16 on GPUs, fp32 on CPUs")
    p.add_argument("--backend", choices=("triton", "torch", "reference"), help="default: triton on GPUs")
    p.add_argument("--num-classes", type=int, help="classes of the checkpoint's head (default: inferred)")
    p.add_argument("--replicas", type=int, default=1, help="engines to run (default 1)")
    p.add_argument(
        "--gpus-per-replica", type=float, default=1.0, help="GPU share per replica, <= 1 (default 1)"
    )
    p.add_argument("--cpus-per-replica", type=float, help="on CPUs; default: the CPUs divided evenly")
    p.add_argument("--max-batch", type=int, default=64, help="most images per engine call (default 64)")
    p.add_argument(
        "--batch-wait-ms", type=float, default=2.0, help="longest wait to fill a batch (default 2)"
    )
    p.add_argument("--max-body-mb", type=float, default=128.0, help="largest request body (default 128)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP address (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--labels", help="text file with one class name per line (default: ImageNet names)")
    p.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"), help="uint8 normalisation mean")
    p.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"), help="uint8 normalisation std")
    p.add_argument("--resize", type=int, help="/v1/classify: short side (default: the weights' recipe)")
    p.add_argument("--crop", type=int, help="/v1/classify: centre crop (default: the weights' recipe, 224)")
    p.add_argument("--warmup-size", type=int, default=224, help="image size run before ready (default 224)")
    p.add_argument("--address", help="join this Ray cluster ('auto', HOST:6379) instead of starting one")


def cmd_serve(args) -> int:
    from . import serving as serve

    options = {} if args.mean is None else {"mean": tuple(args.mean)}
    options.update({} if args.std is None else {"std": tuple(args.std)})
    config = serve.ServeConfig(
        args.model,
        weights=args.weights,
        name=args.name,
        device=args.device,
        dtype=args.dtype,
        backend=args.backend,
        num_classes=args.num_classes,
        labels=args.labels,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        max_body_bytes=int(args.max_body_mb * (1 << 20)),
        warmup_size=args.warmup_size,
        resize=args.resize,
        crop=args.crop,
        **options,
    )
    return serve.serve_forever(
        config,
        replicas=args.replicas,
        gpus_per_replica=args.gpus_per_replica,
        cpus_per_replica=args.cpus_per_replica,
        host=args.host,
        port=args.port,
        address=args.address,
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:  # --help and --version
            return int(exc.code or 0)
        if args.command == "bench":
            return cmd_bench(args)
        if args.command == "info":
            return cmd_info(args)
        if args.command == "check":
            return cmd_check(args)
        if args.command == "classify":
            return cmd_classify(args)
        if args.command == "serve":
            return cmd_serve(args)
        return cmd_compile_report(args, argv)
    except (UsageError, FastresError, ValueError, FileNotFoundError) as exc:
        message = str(exc).strip().splitlines() or [type(exc).__name__]
        print(f"fastres: error: {message[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastres: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
