"""The `fastres` command line (also `python -m fastres`): bench, info, check, compile-report, tune,
classify, calibrate, embed, serve.

Argument parsing only, one module per command (add_parser(subparsers) and run(args)); the work lives
in fastres.tools (bench, compile_report, estimate), fastres.classify, fastres.serving and the engine.
Errors a user can fix (unknown model, bad dtype, missing file, no GPU) are one line on stderr and exit
status 2; a failed parity check or compile report exits 1. Any other exception is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib import metadata

import torch

from .. import __version__
from ..errors import FastresError
from . import bench, calibrate, check, classify, compile_report, embed, info, serve, tune
from .args import CliParser, UsageError, examples

COMMANDS = (bench, info, check, compile_report, tune, classify, embed, calibrate, serve)


def _version() -> str:
    try:
        triton = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton = "not installed"
    return f"fastres {__version__} (torch {torch.__version__}, triton {triton})"


def build_parser() -> CliParser:
    parser = CliParser(
        prog="fastres",
        description="Torchvision ResNets through fused Triton kernels: benchmark, inspect, check, compile,\n"
        "classify or embed image files and serve them over HTTP.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=examples(
            "fastres bench resnet50 --batch 1 8 64 256 --dtype fp16 --compare eager,compile",
            "fastres info resnet50 --batch 8",
            "fastres check resnet50 --weights resnet50.pth",
            "fastres compile-report resnet50 --arch sm_90 --dtype fp16",
            "fastres tune resnet50 --batch 1 8 64 256 --dtype fp16",
            "fastres classify photos/ --weights DEFAULT",
            "fastres embed photos/ --weights DEFAULT --out embeddings.npy",
            "fastres serve resnet50 --weights DEFAULT",
            "run 'fastres COMMAND --help' for each command's options",
        ),
    )
    parser.add_argument("--version", action="version", version=_version())
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:  # --help and --version
            return int(exc.code or 0)
        args.argv = argv  # compile-report re-runs itself in a subprocess with the same arguments
        return args.run(args)
    # Only errors raised on purpose for the user (and a missing file) become one line; anything else,
    # a bare ValueError included, is a bug and keeps its traceback.
    except (UsageError, FastresError, FileNotFoundError) as exc:
        message = str(exc).strip().splitlines() or [type(exc).__name__]
        print(f"fastres: error: {message[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastres: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `fastres info ... | head` closed the pipe: not an error worth a traceback. Point stdout at
        # /dev/null so that the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a writer killed by a closed pipe
