"""`fastres info`: the fused-op plan of a model, with FLOPs and memory traffic."""

from __future__ import annotations

import os

import torch

from ..errors import ConfigError
from .args import add_command, add_model_args, add_output_stride, examples, parse_dtype


def add_parser(subparsers) -> None:
    p = add_command(
        subparsers,
        "info",
        help="print the fused-op plan with FLOPs and memory traffic",
        description="Print the fused-op table of a model for one input size, with FLOPs and bytes per op\n"
        "and the totals against eager execution. Needs only shapes: no weights are read for a name.",
        epilog=examples(
            "fastres info resnet50",
            "fastres info resnext50_32x4d --batch 64 --dtype bf16",
            "fastres info checkpoints/best.pt   # architecture inferred from the checkpoint",
            "fastres info resnet50 --features layer1,layer2,layer3,layer4   # a backbone's cut plan",
            "fastres info resnet101 --output-stride 8 --image-size 513   # DeepLabV3's dilated backbone",
        ),
    )
    add_model_args(p, "element size for the byte counts (default fp16)")
    p.add_argument("--batch", type=int, default=1, metavar="N", help="batch size (default 1)")
    p.add_argument(
        "--num-classes",
        type=int,
        default=1000,
        metavar="K",
        help="classifier size for a name (0: embeddings)",
    )
    p.add_argument(
        "--features",
        metavar="NAMES",
        help="comma-separated outputs (stem, layer1..layer4, pool): the cut plan",
    )
    add_output_stride(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..checkpoints import resolve_model
    from ..planner import plan_resnet, select_outputs
    from ..reference import build_resnet
    from ..specs import MODEL_SPECS, get_spec

    if args.batch < 1 or args.image_size < 1:
        raise ConfigError(
            f"--batch and --image-size must be at least 1, got {args.batch} and {args.image_size}"
        )
    # num_classes 0 (timm's convention): the pooled features, as fastres.load(..., num_classes=0) gives.
    features = args.features.split(",") if args.features else ["pool"] if args.num_classes == 0 else None
    if args.model not in MODEL_SPECS and os.path.exists(args.model):
        arch, state_dict = resolve_model(args.model)
        spec, num_classes = arch.spec, arch.num_classes
    else:
        spec, num_classes = get_spec(args.model), args.num_classes or 1000
        with torch.device("meta"):  # shapes only: nothing allocated, nothing initialised
            state_dict = build_resnet(spec, num_classes).state_dict()
    plan = plan_resnet(spec.with_dilation(output_stride=args.output_stride), num_classes, state_dict)
    if features is not None:
        plan = select_outputs(plan, [name.strip() for name in features])
    print(plan.describe(args.batch, args.image_size, args.image_size, parse_dtype(args.dtype or "fp16")))
    return 0
