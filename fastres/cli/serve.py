"""`fastres serve`: an Open Inference Protocol (KServe v2) HTTP endpoint on Ray Serve."""

from __future__ import annotations

import ipaddress
import os
import sys

from .args import BACKENDS, DEVICES, ENGINE_DTYPES, add_command, examples


def add_parser(subparsers) -> None:
    p = add_command(
        subparsers,
        "serve",
        help="an HTTP endpoint (Open Inference Protocol, KServe v2) on Ray Serve, with dynamic batching",
        description="Serve MODEL over HTTP with the Open Inference Protocol (KServe v2: tritonclient and\n"
        "KServe clients work unchanged) plus POST /v1/classify for image files. Starts a local Ray\n"
        "instance, or joins a cluster with --address; one engine per replica, one GPU each when the\n"
        "cluster has GPUs. Concurrent requests are batched. A classifier also answers the output\n"
        "`embedding` (N x D pooled features) when a request lists it; --features serves a backbone's\n"
        "layers as outputs named after them. Needs: pip install 'fastres[serve]'.",
        epilog=examples(
            "fastres serve resnet50 --weights DEFAULT",
            "fastres serve resnet50 --weights ft.pth --labels labels.txt --name birds --port 8080",
            "fastres serve resnet50 --weights DEFAULT --address auto --replicas 8   # on a Ray cluster",
            "fastres serve resnet50 --weights DEFAULT --features layer2,layer3,layer4   # a backbone",
        ),
    )
    p.add_argument("model", help="a model name (resnet18 ... wide_resnet101_2) or a checkpoint path")
    p.add_argument("--weights", help="checkpoint path or torchvision weight name (IMAGENET1K_V2, DEFAULT)")
    p.add_argument("--name", help="the model name in URLs (default: MODEL)")
    p.add_argument("--device", choices=DEVICES, help="default: cuda when the cluster has GPUs")
    p.add_argument(
        "--dtype", choices=ENGINE_DTYPES, help="default: fp16 on GPUs; on CPUs OpenVINO's default, else fp32"
    )
    p.add_argument(
        "--backend", choices=BACKENDS, help="default: triton on GPUs, openvino on CPUs when installed"
    )
    p.add_argument("--calibration", metavar="FILE.json", help="--dtype int8: a file from `fastres calibrate`")
    p.add_argument(
        "--num-classes",
        type=int,
        help="classes of the checkpoint's head (default: inferred); 0 serves only the `embedding` output",
    )
    p.add_argument(
        "--features",
        metavar="NAMES",
        help="serve a backbone: comma-separated outputs (stem, layer1..layer4, pool), each an output of "
        "that name, no classifier",
    )
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
    p.add_argument(
        "--body-timeout-s", type=float, default=30.0, help="longest a request body may take to arrive (30)"
    )
    p.add_argument("--host", default="127.0.0.1", help="HTTP address (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--labels", help="text file with one class name per line (default: ImageNet names)")
    p.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"), help="uint8 normalisation mean")
    p.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"), help="uint8 normalisation std")
    p.add_argument("--resize", type=int, help="/v1/classify: short side (default: the weights' recipe)")
    p.add_argument("--crop", type=int, help="/v1/classify: centre crop (default: the weights' recipe, 224)")
    p.add_argument("--warmup-size", type=int, default=224, help="image size run before ready (default 224)")
    p.add_argument(
        "--tune",
        action="store_true",
        help="triton backend: tune each new batch size on first use and cache it (the first replica "
        "tunes, the others read the cache; see `fastres tune`)",
    )
    p.add_argument("--address", help="join this Ray cluster ('auto', HOST:6379) instead of starting one")
    p.add_argument(
        "--api-key",
        help="require 'Authorization: Bearer KEY' on all but the health routes (default: $FASTRES_API_KEY; "
        "the environment keeps the key out of `ps`)",
    )
    p.set_defaults(run=run)


def run(args) -> int:
    from .. import serving

    api_key = args.api_key or os.environ.get("FASTRES_API_KEY") or None
    if api_key is None and not _is_loopback(args.host):
        print(
            f"fastres: warning: serving on {args.host} without an API key: anyone who can reach the port "
            "can use the model (set FASTRES_API_KEY or --api-key)",
            file=sys.stderr,
            flush=True,
        )
    options = {} if args.mean is None else {"mean": tuple(args.mean)}
    options.update({} if args.std is None else {"std": tuple(args.std)})
    config = serving.ServeConfig(
        args.model,
        weights=args.weights,
        name=args.name,
        device=args.device,
        dtype=args.dtype,
        backend=args.backend,
        calibration=args.calibration,
        num_classes=args.num_classes,
        features=None if args.features is None else tuple(n.strip() for n in args.features.split(",")),
        labels=args.labels,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        max_body_bytes=int(args.max_body_mb * (1 << 20)),
        body_timeout_s=args.body_timeout_s,
        warmup_size=args.warmup_size,
        resize=args.resize,
        crop=args.crop,
        api_key=api_key,
        tune=args.tune,
        **options,
    )
    return serving.serve_forever(
        config,
        replicas=args.replicas,
        gpus_per_replica=args.gpus_per_replica,
        cpus_per_replica=args.cpus_per_replica,
        host=args.host,
        port=args.port,
        address=args.address,
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False
