"""`fastres calibrate`: int8 calibration from a folder of images, saved for every later load and replica."""

from __future__ import annotations

from .args import BACKENDS, add_calibration_method, add_command, add_device, add_weights, examples


def add_parser(subparsers) -> None:
    p = add_command(
        subparsers,
        "calibrate",
        help="calibrate int8 (or fp8) on representative images and save the result",
        description="Quantize MODEL to int8 (--dtype fp8: e4m3, triton on sm_89+) with calibration\n"
        "images (decoded and preprocessed as `fastres classify` does; about 300 is the usual budget)\n"
        "and save the calibration, so that\n"
        "`fastres.load(..., dtype='int8', calibration=OUT)`, `fastres serve --dtype int8 --calibration OUT`\n"
        "and `fastres check` reuse it instead of calibrating again. The file names the model, the\n"
        "weights' hash, the method and the image count; it is refused for other weights.",
        epilog=examples(
            "fastres calibrate resnet50 --weights IMAGENET1K_V2 --images calib/ --out calib.json",
            "fastres check resnet50 --weights W.pth --dtype int8 --calibration calib.json --images val/",
        ),
    )
    p.add_argument("model", help="a model name (resnet18 ... wide_resnet101_2) or a checkpoint path")
    add_weights(p)
    p.add_argument("--images", required=True, metavar="DIR", help="calibration image files or a folder")
    p.add_argument("--out", required=True, metavar="FILE.json", help="where to write the calibration")
    p.add_argument("--limit", type=int, default=300, metavar="N", help="use at most N images (default 300)")
    add_device(p)
    p.add_argument("--backend", choices=BACKENDS, help="default: openvino on the CPU, triton on a GPU")
    p.add_argument("--dtype", choices=("int8", "fp8"), default="int8", help="quantized format (default int8)")
    add_calibration_method(p)
    p.set_defaults(run=run)


def run(args) -> int:
    import time

    import fastres

    from ..calibration import decode_files
    from ..errors import ConfigError
    from ..images import find_images

    if args.limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {args.limit}")
    files = find_images(args.images)[: args.limit]
    start = time.perf_counter()
    engine = fastres.load(
        args.model,
        args.weights,
        device=args.device,
        backend=args.backend,
        dtype=args.dtype,
        calibration=decode_files(files),
        save_calibration=args.out,
        **({"calibration_method": args.calibration_method} if args.calibration_method else {}),
    )
    record = engine.backend.calibration
    print(
        f"calibrated {record.model} {record.dtype} ({record.method}) on {record.images} "
        f"image{'s' if record.images != 1 else ''} "
        f"in {time.perf_counter() - start:.1f} s; wrote {args.out}"
        + (f" and {record.artifact}" if record.artifact else " (scales for the triton backend)")
    )
    return 0
