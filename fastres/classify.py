"""Image files in, top-k labels out: the work behind `fastres classify`.

Decoding and preprocessing (Pillow, then fastres.transforms on the CPU) run in a small thread pool
that stays a bounded number of images ahead of the engine, so the engine is not idle while JPEGs
decode; Pillow and torch release the GIL while they work. Preprocessed uint8 images are batched by
size (with a centre crop they all have one size) and run through engine.predict. Results come back
in the order of the files; a file that cannot be decoded becomes a result with an error and the
others still run.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConfigError
from .images import decode_image
from .transforms import ImageTransform

DEFAULT_WORKERS = min(8, os.cpu_count() or 1)


@dataclass
class Classified:
    """One file's outcome: its top-k predictions (best first), or why it could not be read."""

    path: Path
    predictions: list | None = None  # list[fastres.Prediction]
    error: str | None = None

    def to_json(self) -> str:
        topk = [{"label": p.label, "index": p.index, "prob": p.prob} for p in self.predictions or []]
        return json.dumps({"file": str(self.path), "topk": topk})


def _load(path: Path, transform: ImageTransform, device) -> torch.Tensor | Exception:
    try:
        return transform(decode_image(path), device=device)
    except (ValueError, OSError) as exc:  # ImageDecodeError (a ValueError), unreadable file
        return exc


def preprocessed(
    files: Sequence[Path],
    transform: ImageTransform,
    *,
    workers: int = DEFAULT_WORKERS,
    prefetch: int = 64,
    device: torch.device | str | None = None,
) -> Iterator[tuple[int, Path, torch.Tensor | Exception]]:
    """(index, path, uint8 3 x H x W or the error) per file, in order.

    workers > 0: decoded by that many threads, at most `prefetch` files in flight ahead of the
    consumer (bounded memory). workers = 0: decoded in the caller's thread, one at a time.
    device: where the resize and crop run (the decoded image is copied there first).
    """
    if workers <= 0:
        for i, path in enumerate(files):
            yield i, path, _load(path, transform, device)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fastres-decode") as pool:
        in_flight: deque = deque()
        upcoming = iter(enumerate(files))
        try:
            for i, path in upcoming:
                in_flight.append((i, path, pool.submit(_load, path, transform, device)))
                if len(in_flight) >= max(prefetch, 1):
                    i0, path0, future = in_flight.popleft()
                    yield i0, path0, future.result()
            while in_flight:
                i0, path0, future = in_flight.popleft()
                yield i0, path0, future.result()
        finally:  # the consumer stopped early (error, Ctrl-C): drop what has not started
            for _, _, future in in_flight:
                future.cancel()


def batched(
    files: Sequence[Path],
    transform: ImageTransform,
    run_batch: Callable[[torch.Tensor], Sequence],
    *,
    batch: int = 64,
    workers: int = DEFAULT_WORKERS,
    prefetch: int | None = None,
    device: torch.device | str | None = None,
) -> Iterator[tuple[int, Path, object, str | None]]:
    """(index, path, result, error) per file, in order: run_batch(uint8 N x 3 x H x W) gives N results.

    Images of one size are batched up to `batch`; when `batch` images are waiting in all, the size
    group holding the oldest is run, so results keep flowing when sizes vary (no crop). A file that
    cannot be decoded gives (index, path, None, why). Shared by classify_files and fastres.embedding.
    """
    if batch < 1:
        raise ConfigError(f"batch must be at least 1, got {batch}")
    prefetch = 2 * batch if prefetch is None else prefetch
    groups: dict[tuple[int, int], list[tuple[int, Path, torch.Tensor]]] = {}
    done: dict[int, tuple[int, Path, object, str | None]] = {}
    next_out = 0

    def run(size: tuple[int, int]) -> None:
        group = groups.pop(size)
        images = torch.stack([image for _, _, image in group])
        for (i, path, _), result in zip(group, run_batch(images)):
            done[i] = (i, path, result, None)

    def ready() -> Iterator[tuple[int, Path, object, str | None]]:
        nonlocal next_out
        while next_out in done:
            yield done.pop(next_out)
            next_out += 1

    for i, path, image in preprocessed(files, transform, workers=workers, prefetch=prefetch, device=device):
        if isinstance(image, Exception):
            done[i] = (i, path, None, str(image))
        else:
            size = tuple(image.shape[-2:])
            groups.setdefault(size, []).append((i, path, image))
            if len(groups[size]) >= batch:
                run(size)
            elif sum(map(len, groups.values())) >= batch:
                run(min(groups, key=lambda s: groups[s][0][0]))
        yield from ready()
    while groups:
        run(min(groups, key=lambda s: groups[s][0][0]))
        yield from ready()


def classify_files(
    engine,
    files: Sequence[Path],
    transform: ImageTransform,
    *,
    topk: int = 5,
    batch: int = 64,
    workers: int = DEFAULT_WORKERS,
    prefetch: int | None = None,
) -> Iterator[Classified]:
    """Classify `files` with `engine` (its mean/std must be the transform's); one result per file, in order.

    Batched by size as `batched` says. With a CUDA engine the resize and crop run on the GPU (decoded
    uint8 images are copied there), keeping the CPU threads for JPEG decoding, the usual bottleneck in
    front of a fast GPU.
    """
    if batch < 1 or topk < 1:
        raise ConfigError(f"batch and topk must be at least 1, got {batch} and {topk}")
    run = lambda images: engine.predict(images, topk=topk)
    device = engine.device if engine.device.type == "cuda" else None
    for _, path, predictions, error in batched(
        files, transform, run, batch=batch, workers=workers, prefetch=prefetch, device=device
    ):
        yield Classified(path, predictions, error)


# ---------------------------------------------------------------------------------------------
# Output


def format_predictions(predictions: list) -> str:
    return "  ".join(f"{p.label} ({p.prob:.1%})" for p in predictions)


def table_header(files: Sequence[Path], topk: int) -> tuple[str, int]:
    """The header line and the width of the file column (the longest path, at most 60)."""
    width = min(max(len(str(f)) for f in files), 60)
    return f"{'file':<{width}}  top-{topk} (probability)", width


def table_row(result: Classified, width: int) -> str:
    return f"{str(result.path):<{width}}  {format_predictions(result.predictions)}"


def run_classify(
    engine,
    files: Sequence[Path],
    transform: ImageTransform,
    *,
    topk: int,
    batch: int,
    workers: int,
    as_json: bool,
    progress: bool,
    out: Callable[[str], None],
    err: Callable[[str], None],
) -> tuple[int, int, float]:
    """Classify and print; returns (images classified, files failed, seconds)."""
    from .progress import Progress

    header, width = table_header(files, topk)
    if not as_json:
        out(header)
    bar = Progress(len(files), "classify", progress)
    ok = failed = 0
    start = time.perf_counter()
    try:
        for result in classify_files(engine, files, transform, topk=topk, batch=batch, workers=workers):
            bar.update()
            if result.error is not None:
                failed += 1
                where = "" if str(result.path) in result.error else f" {result.path}"
                err(f"fastres: skipped{where}: {result.error}")
                continue
            ok += 1
            out(result.to_json() if as_json else table_row(result, width))
    finally:
        bar.close()
    return ok, failed, time.perf_counter() - start


def summary(ok: int, failed: int, seconds: float) -> str:
    images = f"{ok} image{'' if ok == 1 else 's'}"
    line = f"classified {images} in {seconds:.2f} s ({ok / max(seconds, 1e-9):.1f} img/s)"
    return line + (
        f"; skipped {failed} file{'s' if failed != 1 else ''} that could not be read" if failed else ""
    )


def load_engine_and_transform(args, meaning: str, **load_options):
    """The engine and the preprocessing that --model, --weights, --device, --dtype, --backend, --resize,
    --crop, --mean and --std ask for (`fastres classify` and `fastres embed`). Without weights, a
    warning that the network's `meaning` (labels, embeddings) means nothing."""
    import fastres

    from .api import parse_dtype
    from .checkpoints import is_weight_name
    from .specs import MODEL_SPECS

    custom = {"resize": args.resize, "crop": args.crop, "mean": args.mean, "std": args.std}
    norm = fastres.transforms(**custom)  # bad options fail here, before the model loads
    with warnings.catch_warnings():  # said once below, without a Python warning's file and line
        warnings.filterwarnings("ignore", message=r"fastres\.load\(.*without weights")
        engine = fastres.load(
            args.model,
            args.weights,
            device=args.device,
            dtype=None if args.dtype is None else parse_dtype(args.dtype),
            backend=args.backend,
            mean=norm.mean,
            std=norm.std,
            **load_options,
        )
    if args.weights is None and args.model in MODEL_SPECS:
        print(
            f"fastres: warning: no --weights: {args.model} has random weights, its {meaning} mean nothing; "
            "pass --weights DEFAULT (torchvision's) or a checkpoint",
            file=sys.stderr,
        )
    weight_name = args.weights if args.weights is not None and is_weight_name(args.weights) else None
    return engine, fastres.transforms(weight_name, model=engine.architecture.spec.name, **custom)


def classify_command(args) -> int:
    """`fastres classify` after argument parsing (fastres.cli): exit status 0, or 1 if a file failed.

    Mistakes a user can fix raise a FastresError, which the CLI prints as one line (exit 2).
    """
    from .images import find_images

    workers = DEFAULT_WORKERS if args.workers is None else args.workers
    if args.topk < 1 or args.batch < 1 or workers < 0:
        raise ConfigError(
            f"need --topk >= 1, --batch >= 1, --workers >= 0; got {args.topk}, {args.batch}, {workers}"
        )
    files = find_images(args.paths)
    calibration = {"calibration": args.calibration} if args.calibration else {}
    engine, transform = load_engine_and_transform(args, "labels", labels=args.labels, **calibration)
    print(f"fastres: {engine!r}; {len(files)} files; preprocessing: {transform}", file=sys.stderr)
    ok, failed, seconds = run_classify(
        engine,
        files,
        transform,
        topk=min(args.topk, engine.num_classes),
        batch=args.batch,
        workers=workers,
        as_json=args.json,
        progress=not args.no_progress and not sys.stdout.isatty(),  # on a terminal the rows are progress
        out=lambda line: print(line, flush=True),
        err=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(f"fastres: {summary(ok, failed, seconds)}", file=sys.stderr)
    return 1 if failed else 0
