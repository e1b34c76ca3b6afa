"""`fastres check`: parity against a float64 reference, with a per-layer drift report."""

from __future__ import annotations

import math
import os

import torch

from ..errors import ConfigError, InputError
from ..numerics import DRIFT_FACTOR, PARITY_FACTOR, PARITY_FLOOR, parity_bound
from ..quantize import QUANTIZED_DTYPES
from .args import (
    BACKENDS,
    ENGINE_DTYPES,
    add_calibration,
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
        "check",
        help="parity against a float64 reference, with a per-layer drift report",
        description="Compare fastres's logits with the reference run in float64, beside eager PyTorch's\n"
        "own error in the same dtype, and show per layer where the error grows. Exit status 1 when\n"
        f"fastres's relative error exceeds {PARITY_FACTOR:g}x eager's (and {PARITY_FLOOR:g}); for int8,\n"
        "when its top-1 agreement with the float32 reference is below --min-top1.",
        epilog=examples(
            "fastres check resnet50",
            "fastres check resnet18 --device cpu --batch 2 --image-size 64",
            "fastres check resnet50 --weights resnet50.pth --images batch.pt --dtype bf16",
            "fastres check resnet50 --weights W.pth --dtype int8 --calibration calib.json --images val/",
        ),
    )
    add_model_args(p, "compute dtype (default fp16 on CUDA, fp32 on the CPU)", ENGINE_DTYPES)
    add_calibration(p)
    p.add_argument(
        "--min-top1",
        type=float,
        metavar="F",
        help="fail below this top-1 agreement with the reference (default 0.99 for int8, else unchecked)",
    )
    p.add_argument("--batch", type=int, default=4, metavar="N", help="random images (default 4)")
    add_device(p)
    add_weights(p)
    p.add_argument("--backend", choices=BACKENDS, help="fastres backend")
    p.add_argument(
        "--images",
        metavar="PATH",
        help="a saved N x 3 x H x W float tensor (normalised, .pt) or a folder of image files "
        "(preprocessed as `fastres classify` does) instead of random images",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and images")
    p.set_defaults(run=run)


def _load_images(path: str) -> torch.Tensor:
    if not os.path.exists(path):
        raise FileNotFoundError(f"--images file not found: {path}")
    if os.path.isdir(path):
        from ..calibration import decode_files

        return decode_files(path)  # uint8 pixels: the engine normalises them
    data = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(data, dict):
        tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
        data = data.get("images", tensors[0] if len(tensors) == 1 else None)
    if not isinstance(data, torch.Tensor):
        raise InputError(f"{path} must hold one tensor of images N x 3 x H x W (or a dict with key 'images')")
    return data


def format_layer_report(layers, width: int = 30, sqnr: bool = False) -> str:
    """One line per op: its relative error and a log-scale bar; marks where drift starts. sqnr: a column
    with each op's signal-to-quantization-noise ratio (dB) against the float64 plan (int8 engines)."""
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
        + ("; SQNR in dB (signal over quantization noise: about 6 dB per bit)" if sqnr else "")
    ]
    for i, e in enumerate(layers):
        n = (
            0
            if e.relative_error <= 0
            else 1 + round((width - 1) * (math.log10(e.relative_error) - lo) / max(hi - lo, 1e-9))
        )
        mark = f"  <- drift starts ({e.relative_error / baseline:.0f}x {layers[0].op})" if i == start else ""
        bar = "#" * n
        db = f"  SQNR {e.sqnr_db:5.1f} dB" if sqnr else ""
        line = f"  {e.op:<{name_w}}  {e.kind:<{kind_w}}  {e.relative_error:9.2e}{db}  {bar:<{width}}{mark}"
        out.append(line.rstrip())
    if start is None:
        out.append(f"  no op exceeds {DRIFT_FACTOR}x the first op's error: no drift")
    return "\n".join(out)


def run(args) -> int:
    import fastres

    from ..specs import MODEL_SPECS
    from ..testing import make_calibrated_model, random_images

    dtype = parse_dtype(args.dtype)
    int8 = dtype in QUANTIZED_DTYPES  # int8 or fp8: judged by agreement and SQNR
    if int8 and args.calibration is None:
        raise ConfigError(
            f"--dtype {args.dtype} needs --calibration (a file from `fastres calibrate`, or an image folder)"
        )
    options = {"calibration": args.calibration} if int8 else {}
    if int8 and args.calibration_method:
        options["calibration_method"] = args.calibration_method
    if args.weights is None and args.model in MODEL_SPECS:
        module = make_calibrated_model(args.model, seed=args.seed)
        engine = fastres.optimize(module, device=args.device, dtype=dtype, backend=args.backend, **options)
        source = "random weights with calibrated BatchNorm"
    else:
        if args.model not in MODEL_SPECS and not os.path.exists(args.model):
            fastres.get_spec(args.model)  # one-line UnknownModelError listing the names
        engine = fastres.load(
            args.model, args.weights, device=args.device, dtype=dtype, backend=args.backend, **options
        )
        source = f"weights {args.weights or args.model}"
    if args.images:
        x = _load_images(args.images)
    else:
        if args.batch < 1 or args.image_size < 32:
            raise ConfigError(
                f"need --batch >= 1 and --image-size >= 32, got {args.batch} and {args.image_size}"
            )
        x = random_images(args.batch, args.image_size, args.image_size, seed=args.seed)
    print(f"{engine!r}; {source}; input {'x'.join(map(str, x.shape))}")
    result = engine.check(x)
    print(result)
    if engine.backend.observes_layers:
        print(format_layer_report(engine.layer_errors(x), sqnr=int8))
    elif int8:
        print(
            f"per-layer SQNR: not available on the {engine.backend_name} backend (it runs the quantized "
            "model whole); the triton backend's int8 engine reports it per layer"
        )
    else:
        print(f"per-layer report: not available on the {engine.backend_name} backend; --backend torch has it")
    min_top1 = args.min_top1 if args.min_top1 is not None else (0.99 if int8 else None)
    if int8:  # quantization error is judged by agreement: eager PyTorch has no int8 to compare with
        ok = True
    else:
        bound = parity_bound(result.eager_relative_error)
        ok = result.relative_error <= bound
        print(
            f"{'PASS' if ok else 'FAIL'}: fastres relative error {result.relative_error:.3e} "
            f"{'<=' if ok else '>'} {bound:.3e} (max of {PARITY_FACTOR:g}x eager's, {PARITY_FLOOR:g})"
        )
    if min_top1 is not None:
        agrees = result.top1_agreement >= min_top1
        ok = ok and agrees
        print(
            f"{'PASS' if agrees else 'FAIL'}: top-1 agreement {result.top1_agreement:.1%} "
            f"{'>=' if agrees else '<'} {min_top1:.1%} (--min-top1)"
        )
    return 0 if ok else 1
