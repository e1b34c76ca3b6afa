"""`fastres compile-report`: compile every kernel ahead of time for a GPU that is not here (or estimate)."""

from __future__ import annotations

from .args import DTYPES, UsageError, add_command, add_image_size, add_output_stride, examples, parse_dtype


def add_parser(subparsers) -> None:
    p = add_command(
        subparsers,
        "compile-report",
        help="compile every kernel for a GPU that is not here; registers, spills, shared memory",
        description="Compile ahead of time, without a GPU, every distinct Triton kernel the model launches\n"
        "for one input size, and report registers, spill bytes, shared memory and (sm_90) wgmma use.\n"
        "Exit status 1 if any kernel fails to compile or spills. Runs without TRITON_INTERPRET.",
        epilog=examples(
            "fastres compile-report resnet50 --arch sm_90 --dtype fp16",
            "fastres compile-report resnext50_32x4d --arch sm_80 --dtype bf16 --batch 1",
            "fastres compile-report resnet50 --arch sm_90 --dtype fp16 --output-stride 8   # dilated",
            "fastres compile-report resnet50 --batch 256 --estimate --gpu h100 --assume node_gap_us=1",
        ),
    )
    p.add_argument("model", help="a model name")
    p.add_argument("--arch", help="sm_90 or sm_80 (also sm_86, sm_89); with --estimate, the GPU's")
    p.add_argument(
        "--dtype", choices=(*DTYPES, "int8", "fp8"), help="compute dtype (required; fp16 with --estimate)"
    )
    p.add_argument("--batch", type=int, default=8, metavar="N", help="batch size (default 8)")
    add_image_size(p)
    add_output_stride(p)
    p.add_argument("--out", metavar="DIR", help="also write the report as JSON into DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--estimate",
        action="store_true",
        help="instead: estimate each launch's time on --gpu with an analytical model (not a measurement)",
    )
    p.add_argument("--gpu", default="h100", help="with --estimate: h100, h200 or a100 (default h100)")
    p.add_argument(
        "--assume",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --estimate: override one GPU assumption (repeatable; the output lists the keys)",
    )
    p.set_defaults(run=run)


def run(args) -> int:
    from ..tools import compile_report

    if args.estimate:
        from ..tools.estimate_report import estimate_command

        if args.output_stride != 32:
            raise UsageError("--output-stride is not modelled by --estimate yet; compile without --estimate")
        return estimate_command(args, args.argv)
    if args.arch is None or args.dtype is None:
        raise UsageError("compile-report needs --arch and --dtype (or --estimate)")
    compile_report.parse_arch(args.arch)  # bad input fails here, in this process, as one line
    if compile_report.interpreter_enabled():
        return compile_report.rerun_without_interpreter(args.argv)
    return compile_report.run(
        args.model,
        args.arch,
        parse_dtype(args.dtype),
        args.batch,
        args.image_size,
        args.out,
        progress=not args.no_progress,
        output_stride=args.output_stride,
    )
