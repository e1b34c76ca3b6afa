"""`fastres classify`: image files or folders in, top-k labels out."""

from __future__ import annotations

from .args import ENGINE_DTYPES, UsageError, add_calibration, add_command, add_image_file_args, examples


def add_parser(subparsers) -> None:
    p = add_command(
        subparsers,
        "classify",
        help="image files or folders in, top-k labels out",
        description="Classify image files (JPEG, PNG, WebP, BMP; folders searched recursively) with\n"
        "torchvision's evaluation preprocessing for the weights (resize, centre crop), decoded with\n"
        "Pillow in a thread pool ahead of the engine. One table row, or with --json one JSON object,\n"
        "per file on stdout. A file that cannot be decoded is reported on stderr and skipped; the\n"
        "exit status is then 1. Without --weights the network is random (a warning says so).",
        epilog=examples(
            "fastres classify photos/ --weights DEFAULT",
            "fastres classify cat.jpg dog.png --model resnet18 --weights IMAGENET1K_V1 --topk 3",
            "fastres classify data/ --weights finetune.pth --labels classes.txt --json > preds.jsonl",
            "fastres classify data/ --model resnet50 --weights best.pt --resize 160 --crop 144",
        ),
    )
    add_image_file_args(p, ENGINE_DTYPES, "fp16 on CUDA; on the CPU OpenVINO's default, else fp32")
    add_calibration(p)
    p.add_argument("--topk", type=int, default=5, metavar="K", help="labels per image (default 5)")
    p.add_argument(
        "--labels", metavar="FILE", help="class names, one per line (default: ImageNet's for 1000 classes)"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..classify import classify_command
    from ..images import require_pillow

    try:
        require_pillow()
    except ImportError as exc:
        raise UsageError(str(exc)) from None
    return classify_command(args)
