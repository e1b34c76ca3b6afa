"""`fastres bench`: time fastres against eager PyTorch (and torch.compile) in one interleaved run."""

from __future__ import annotations

import sys

from .args import (
    BACKENDS,
    ENGINE_DTYPES,
    add_batches,
    add_command,
    add_device,
    add_model_args,
    add_weights,
    examples,
    parse_dtype,
)


def add_parser(subparsers) -> None:
    p = add_command(
        subparsers,
        "bench",
        help="time fastres against eager PyTorch (and torch.compile) in one interleaved run",
        description="Time fastres against its anchors in one run, measurements interleaved round-robin:\n"
        "eager PyTorch in the same dtype (NCHW, and channels-last with cudnn.benchmark on), on the CPU\n"
        "OpenVINO run directly on the same module (when installed) and, with --compare ...,compile,\n"
        "torch.compile. Without --weights the network has realistic random\n"
        "weights (calibrated BatchNorm). Writes a table to stdout and CSV, JSON and a PNG plot to --out.",
        epilog=examples(
            "fastres bench resnet50 --batch 1 8 64 256 --dtype fp16 --compare eager,compile",
            "fastres bench resnet18 --device cpu --batch 1 4",
            "fastres bench resnet50 --weights resnet50.pth --batch 64 --repeats 100 --out results/",
        ),
    )
    add_model_args(p, "compute dtype (default fp16 on CUDA, fp32 on the CPU)", ENGINE_DTYPES)
    add_batches(p)
    add_device(p)
    p.add_argument(
        "--compare",
        metavar="LIST",
        help="anchors, comma-separated: eager, compile, openvino (the CPU), or none "
        "(default eager, plus openvino on the CPU when it is installed)",
    )
    add_weights(p)
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        help="fastres backend (default triton on CUDA; on the CPU openvino when installed, else torch; "
        "without --backend the CPU run also shows fastres-torch)",
    )
    p.add_argument(
        "--repeats", type=int, metavar="N", help="timed calls per candidate (default 50 CUDA, 10 CPU)"
    )
    p.add_argument(
        "--warmup", type=int, metavar="N", help="untimed calls per candidate (default 5 CUDA, 2 CPU)"
    )
    p.add_argument(
        "--compile-budget",
        type=float,
        metavar="S",
        help="stop starting torch.compile work once it has taken S seconds in all",
    )
    p.add_argument(
        "--compile-modes",
        metavar="LIST",
        help="with --compare ...,compile: torch.compile modes, comma-separated (default on CUDA "
        "reduce-overhead,max-autotune-no-cudagraphs, on the CPU default)",
    )
    p.add_argument(
        "--out",
        default="fastres-results",
        metavar="DIR",
        help="where CSV, JSON and the plot go (default ./fastres-results/)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..tools.bench import BenchConfig, run_benchmark
    from ..tools.bench_report import describe_run, format_table, result_stem, write_results

    compare, modes = (
        None if text is None else [c.strip() for c in text.split(",") if c.strip() and c.strip() != "none"]
        for text in (args.compare, args.compile_modes)
    )
    config = BenchConfig(
        model=args.model,
        batches=args.batch,
        dtype=parse_dtype(args.dtype),
        device=args.device,
        image_size=args.image_size,
        compare=compare,
        weights=args.weights,
        backend=args.backend,
        repeats=args.repeats,
        warmup=args.warmup,
        compile_budget_s=args.compile_budget,
        compile_modes=modes,
        progress=not args.no_progress,
    )
    stem: list[str] = []
    latest: list[dict] = []

    def save_partial(rows) -> None:  # after every candidate and batch: a killed run leaves its results
        if not stem:
            stem.append(result_stem(rows[0]["model"], rows[0]["device"], rows[0]["dtype"]))
        write_results(rows, args.out, stem[0], plot=False)
        latest[:] = rows

    try:
        rows = run_benchmark(config, on_rows=save_partial).rows
    except KeyboardInterrupt:  # SIGINT from a time limit: what was measured, before exit status 130
        if latest:
            print(format_table(latest), flush=True)
            print(f"saved the rows so far in {args.out}/{stem[0]}.csv and .json", flush=True)
        raise
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
