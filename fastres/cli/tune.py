"""`fastres tune`: choose each conv layer's tactic on this GPU, gate it, time it, cache it."""

from __future__ import annotations

import os

from ..errors import ConfigError
from .args import (
    DTYPES,
    UsageError,
    add_batches,
    add_command,
    add_device,
    add_image_size,
    examples,
    parse_dtype,
)


def add_parser(subparsers) -> None:
    p = add_command(
        subparsers,
        "tune",
        help="time tactics per conv layer on this GPU (parity-gated) and cache the fastest",
        description="For each distinct conv layer and batch size: offer variants around the rule config\n"
        "(tiles, BLOCK_K, stages, warps, split-K) and cuDNN, discard any whose output fails the parity\n"
        "gate against cuDNN, time the rest (CUDA events, median), keep the fastest, check the whole\n"
        "network end to end (CUDA graph), and cache the choices in $FASTRES_CACHE (default\n"
        "~/.cache/fastres), which fastres.load then applies. Prints rule vs chosen per layer.",
        epilog=examples(
            "fastres tune resnet50 --batch 1 8 64 256 --dtype fp16",
            "fastres tune resnet50 --batch 1 --budget-s 20",
            "TRITON_INTERPRET=1 fastres tune resnet18 --device cpu --image-size 32 --batch 1 --budget-s 120",
            "fastres tune resnet50 --compile-for sm_80 --batch 1 256   # no GPU: what would spill",
            "fastres tune --clear   # remove the tuning cache",
        ),
    )
    p.add_argument(
        "model", nargs="?", help="a model name (resnet18 ... wide_resnet101_2) or a checkpoint path"
    )
    p.add_argument("--dtype", choices=DTYPES, help="compute dtype (default fp16 on CUDA, fp32 on the CPU)")
    add_image_size(p)
    add_batches(p)
    add_device(p)
    p.add_argument(
        "--budget-s",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds for the per-layer search, all batches together (default 60)",
    )
    p.add_argument(
        "--max-candidates",
        type=int,
        metavar="N",
        help="Triton variants per layer besides the rule config (default: all)",
    )
    p.add_argument("--retune", action="store_true", help="search again layers the cache already has")
    p.add_argument("--clear", action="store_true", help="remove the tuning cache and exit")
    p.add_argument(
        "--compile-for",
        metavar="ARCH",
        help="instead of tuning: compile the model's whole candidate space for sm_90 or sm_80 (no GPU "
        "needed) and list what fails or spills; exit status 1 if anything does",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..tuning import cache as tuning_cache

    if args.clear:
        removed = tuning_cache.clear()
        print(f"removed {len(removed)} tuning cache files from {tuning_cache.cache_root()}")
        return 0
    if args.model is None:
        raise UsageError("tune needs MODEL (or --clear)")
    if min(args.batch) < 1 or args.image_size < 32 or args.budget_s < 0:
        raise ConfigError("need --batch >= 1, --image-size >= 32 and --budget-s >= 0")
    if args.max_candidates is not None and args.max_candidates < 0:
        raise ConfigError("--max-candidates must be >= 0")
    if args.compile_for:
        return _compile_for(args)
    engine = _engine(args)
    from ..tuning.report import format_layer_line, format_report
    from ..tuning.use import tune_and_cache

    cache = tuning_cache.TuneCache(engine.device)
    size = args.image_size
    print(
        f"{engine!r}; input {size}x{size}, batches {' '.join(map(str, args.batch))}; cache {cache.path}",
        flush=True,
    )
    report = tune_and_cache(
        engine.backend,
        args.batch,
        size,
        size,
        budget_s=args.budget_s,
        cache=cache,
        retune=args.retune,
        max_candidates=args.max_candidates,
        progress=not args.no_progress,
        on_layer=lambda r: print(format_layer_line(r), flush=True) if args.no_progress else None,
        return_interrupted=True,
    )
    print(format_report(report))
    if report.interrupted:
        print("tune: interrupted: the layers above were chosen and cached; the rest keep the rules")
        return 130
    stored = {(r.signature, tuning_cache.batch_bucket(r.batch)): r.chosen for r in report.layers if r.tuned}
    read_back = cache.tactics()
    agree = sum(read_back.get(key) == tactic for key, tactic in stored.items())
    print(f"cache: {agree} of {len(stored)} choices read back from {cache.path}")
    return 0 if agree == len(stored) or not cache.writable() else 1


def _compile_for(args) -> int:
    import torch

    from ..tools import compile_report
    from ..tuning import compile_check

    arch = compile_report.parse_arch(args.compile_for)
    if compile_report.interpreter_enabled():
        return compile_report.rerun_without_interpreter(args.argv)
    dtype = parse_dtype(args.dtype) or torch.float16
    return compile_check.run(
        args.model,
        dtype,
        arch,
        args.batch,
        args.image_size,
        args.max_candidates,
        progress=not args.no_progress,
    )


def _engine(args):
    import fastres

    from ..specs import MODEL_SPECS
    from ..testing import make_calibrated_model

    options = dict(device=args.device, dtype=parse_dtype(args.dtype), backend="triton", tune=False)
    if args.model in MODEL_SPECS:  # tuning needs shapes, not trained weights: a calibrated random net
        return fastres.optimize(make_calibrated_model(args.model), **options)
    if not os.path.exists(args.model):
        fastres.get_spec(args.model)  # one-line UnknownModelError listing the names
    return fastres.load(args.model, **options)
