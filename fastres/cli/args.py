"""Argument helpers every command shares: the one-line-error parser, examples epilogs, common options."""

from __future__ import annotations

import argparse

DTYPES = ("fp16", "bf16", "fp32")
BACKENDS = ("triton", "torch", "openvino", "reference")
DEVICES = ("cuda", "cpu")


class UsageError(Exception):
    """A command line argparse (or a command) rejects: printed as one line, exit status 2."""


class CliParser(argparse.ArgumentParser):
    """argparse whose errors are one line (the caller prints them) instead of usage + message."""

    def error(self, message: str):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def add_command(subparsers, name: str, *, help: str, description: str, epilog: str):
    """One subcommand parser; its description and examples keep their line breaks."""
    return subparsers.add_parser(
        name,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help=help,
        description=description,
        epilog=epilog,
    )


def add_model_args(p: argparse.ArgumentParser, dtype_help: str) -> None:
    p.add_argument("model", help="a model name (resnet18 ... wide_resnet101_2) or a checkpoint path")
    p.add_argument("--dtype", choices=DTYPES, help=dtype_help)
    add_image_size(p)


def add_image_size(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--image-size", type=int, default=224, metavar="PX", help="square input size (default 224)"
    )


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=DEVICES, help="default cuda when available, else cpu")


def add_weights(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", metavar="W", help="checkpoint path or torchvision weight name")


def parse_dtype(name: str | None):
    """A --dtype value as a torch dtype; None keeps the engine's per-device default."""
    from ..api import parse_dtype as parse

    return None if name is None else parse(name)
