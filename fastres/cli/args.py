"""Argument helpers every command shares: the one-line-error parser, examples epilogs, common options."""

from __future__ import annotations

import argparse

DTYPES = ("fp16", "bf16", "fp32")
ENGINE_DTYPES = (*DTYPES, "int8", "fp8")  # with --calibration; fp8: the triton backend on sm_89+
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


def add_model_args(p: argparse.ArgumentParser, dtype_help: str, dtypes=DTYPES) -> None:
    p.add_argument("model", help="a model name (resnet18 ... wide_resnet101_2) or a checkpoint path")
    p.add_argument("--dtype", choices=dtypes, help=dtype_help)
    add_image_size(p)


def add_calibration(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--calibration",
        metavar="PATH",
        help="for --dtype int8: a calibration file saved by `fastres calibrate` (.json), or a folder of "
        "representative images (about 300) to calibrate on now",
    )
    add_calibration_method(p)


def add_calibration_method(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--calibration-method",
        choices=("percentile", "entropy", "mse", "max"),  # fastres.quantize.METHODS (no torch import here)
        help="int8 activation ranges on the triton backend (default percentile, 99.99); OpenVINO "
        "uses NNCF's own preset",
    )


def add_image_size(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--image-size", type=int, default=224, metavar="PX", help="square input size (default 224)"
    )


def add_output_stride(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--output-stride",
        type=int,
        choices=(8, 16, 32),
        default=32,
        help="32 (default) or a dilated net: 16 dilates layer4, 8 layer3 and layer4 (Bottleneck models)",
    )


def add_batches(p: argparse.ArgumentParser) -> None:
    """--batch N [N ...]: the batch sizes a timing command runs (bench, tune)."""
    p.add_argument(
        "--batch", type=int, nargs="+", default=[1, 8, 64, 256], metavar="N",
        help="batch sizes (default 1 8 64 256)",
    )  # fmt: skip


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=DEVICES, help="default cuda when available, else cpu")


def add_weights(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", metavar="W", help="checkpoint path or torchvision weight name")


def parse_dtype(name: str | None):
    """A --dtype value as a torch dtype; None keeps the engine's per-device default."""
    from ..api import parse_dtype as parse

    return None if name is None else parse(name)


def add_image_file_args(
    p: argparse.ArgumentParser, dtypes=DTYPES, dtype_help: str = "default fp16 on CUDA, fp32 on the CPU"
) -> None:
    """Image files through a model, as `fastres classify` and `fastres embed` take them."""
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files and folders")
    p.add_argument("--model", default="resnet50", help="model name or checkpoint path (default resnet50)")
    add_weights(p)
    add_device(p)
    p.add_argument("--dtype", choices=dtypes, help=dtype_help)
    p.add_argument("--backend", choices=BACKENDS, help="fastres backend")
    p.add_argument("--batch", type=int, default=64, metavar="N", help="images per batch (default 64)")
    p.add_argument(
        "--resize", type=int, metavar="PX", help="short side before the crop (default: the weights'; 0: none)"
    )
    p.add_argument("--crop", type=int, metavar="PX", help="centre crop size (default: the weights'; 0: none)")
    p.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"), help="default ImageNet's")
    p.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"), help="default ImageNet's")
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="decoding threads (default min(8, CPUs)); 0 decodes in the main thread, no prefetch",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
