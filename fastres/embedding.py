"""Image files in, an N x D embedding matrix out: the work behind `fastres embed`.

Decoding, preprocessing and batching are `fastres classify`'s (`classify.batched`), so a file's row
is exactly `engine.embed` of the image `fastres classify` would label. The matrix (float32, one row
per readable file, in the order of the files) goes to .npy or .safetensors; beside it a JSONL index,
one {"index": row, "path": file} per line in the same order, names each row's file.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .classify import DEFAULT_WORKERS, batched, load_engine_and_transform
from .errors import ConfigError
from .transforms import ImageTransform

FORMATS = ("npy", "safetensors")
SAFETENSORS_KEY = "embeddings"  # the tensor's name in a .safetensors file


def embed_files(
    engine,
    files: Sequence[Path],
    transform: ImageTransform,
    *,
    normalize: bool = False,
    batch: int = 64,
    workers: int = DEFAULT_WORKERS,
    on_error: Callable[[Path, str], None] | None = None,
    on_done: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, list[Path]]:
    """(float32 CPU N x D embeddings, the N files they are of), in the order of `files`.

    A file that cannot be decoded gets no row; on_error(path, why) hears of it.
    """
    device = engine.device if engine.device.type == "cuda" else None
    run = lambda images: engine.embed(images, normalize=normalize).cpu()
    rows, paths = [], []
    for _, path, row, error in batched(files, transform, run, batch=batch, workers=workers, device=device):
        if on_done is not None:
            on_done()
        if error is not None:
            if on_error is not None:
                on_error(path, error)
            continue
        rows.append(row)
        paths.append(path)
    width = engine.architecture.spec.feature_channels
    return (torch.stack(rows) if rows else torch.empty(0, width)), paths


def index_path(out: Path) -> Path:
    """The JSONL index beside the matrix: embeddings.npy -> embeddings.jsonl."""
    return out.with_suffix(".jsonl")


def output_format(out: Path, fmt: str | None) -> str:
    """--format, else the file's suffix (.safetensors), else npy."""
    if fmt is None:
        fmt = "safetensors" if out.suffix == ".safetensors" else "npy"
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt


def _safetensors_save_file():
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ConfigError(
            "--format safetensors needs the optional safetensors package: pip install fastres[safetensors]; "
            "or write --format npy"
        ) from None
    return save_file


def write_embeddings(out: Path, embeddings: torch.Tensor, paths: Sequence[Path], fmt: str) -> Path:
    """Write the matrix to `out` and the index beside it; returns the index's path."""
    embeddings = embeddings.detach().to("cpu", torch.float32).contiguous()
    if fmt == "safetensors":
        _safetensors_save_file()({SAFETENSORS_KEY: embeddings}, str(out))
    else:
        import numpy as np

        with open(out, "wb") as f:  # a file object: np.save would append .npy to another suffix
            np.save(f, embeddings.numpy())
    index = index_path(out)
    with open(index, "w") as f:
        for i, path in enumerate(paths):
            f.write(json.dumps({"index": i, "path": str(path)}) + "\n")
    return index


def embed_command(args) -> int:
    """`fastres embed` after argument parsing: exit status 0, or 1 if a file could not be read."""
    from .images import find_images
    from .progress import Progress

    workers = DEFAULT_WORKERS if args.workers is None else args.workers
    if args.batch < 1 or workers < 0:
        raise ConfigError(f"need --batch >= 1 and --workers >= 0; got {args.batch} and {workers}")
    out = Path(args.out)
    fmt = output_format(out, args.format)
    if fmt == "safetensors":
        _safetensors_save_file()  # a missing package fails before the embedding, not after
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: folder {out.parent} does not exist")
    files = find_images(args.paths)
    engine, transform = load_engine_and_transform(args, "embeddings", num_classes=0)
    print(f"fastres: {engine!r}; {len(files)} files; preprocessing: {transform}", file=sys.stderr)
    bar = Progress(len(files), "embed", not args.no_progress)
    failed = []

    def skipped(path: Path, why: str) -> None:
        failed.append(path)
        print(f"fastres: skipped{'' if str(path) in why else f' {path}'}: {why}", file=sys.stderr, flush=True)

    start = time.perf_counter()
    try:
        embeddings, paths = embed_files(
            engine,
            files,
            transform,
            normalize=args.normalize,
            batch=args.batch,
            workers=workers,
            on_error=skipped,
            on_done=bar.update,
        )
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    index = write_embeddings(out, embeddings, paths, fmt)
    n, d = embeddings.shape
    print(
        f"fastres: embedded {n} image{'' if n == 1 else 's'} in {seconds:.2f} s -> {out} ({n} x {d} float32"
        f"{', L2-normalised' if args.normalize else ''}) and {index}"
        + (f"; skipped {len(failed)} that could not be read" if failed else ""),
        file=sys.stderr,
    )
    return 1 if failed else 0
