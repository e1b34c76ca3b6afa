"""End to end `fastres classify` throughput: JPEG files in, top-5 labels out, with and without prefetch.

    python benchmarks/bench_classify.py [--model resnet50] [--images 96] [--batch 32] [--workers N]

Writes a folder of generated JPEGs (smooth colour fields plus noise, like photos in size and decode
cost), loads the model with realistic random weights (calibrated BatchNorm), and times
fastres.classify.classify_files over the whole folder: decode + resize + crop + engine.predict, in
images per second. "no prefetch" decodes in the main thread between batches (workers=0); "prefetch"
decodes in a thread pool that runs ahead of the engine. Also times the two halves alone for context.
Rounds alternate between the modes and the median is reported. A script, not a pytest suite.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import fastres
from fastres.classify import DEFAULT_WORKERS, classify_files, preprocessed
from fastres.testing import make_calibrated_model, write_sample_images


def git_rev() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True)
        return rev + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--images", type=int, default=96, help="JPEG files (default 96)")
    p.add_argument("--size", default="375x500", help="HxW of the JPEGs (default 375x500, ImageNet-like)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="decode threads with prefetch")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per mode (default 3)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    height, width = map(int, args.size.split("x"))

    module = make_calibrated_model(args.model)
    engine = fastres.optimize(module, device=args.device)
    transform = fastres.transforms(model=args.model)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    device_name = (
        torch.cuda.get_device_name() if engine.device.type == "cuda" else platform.processor() or "cpu"
    )
    print(
        f"bench_classify: {args.model} on {engine.device} [{device_name}, {os.cpu_count()} CPUs, "
        f"torch threads {torch.get_num_threads()}], {engine.dtype}, backend {engine.backend_name}; "
        f"{args.images} JPEGs {height}x{width}, preprocessing {transform}; batch {args.batch}; "
        f"torch {torch.__version__}, fastres {fastres.__version__} ({git_rev()}), "
        f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}, load_avg_1m {load:.2f}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        files = write_sample_images(Path(tmp), args.images, height, width)
        modes = {"no prefetch (workers=0)": 0, f"prefetch (workers={args.workers})": args.workers}

        def classify(workers: int) -> None:
            for r in classify_files(engine, files, transform, batch=args.batch, workers=workers):
                assert r.error is None, r.error

        classify(args.workers)  # warm-up: kernels, allocator, page cache
        seconds: dict[str, list[float]] = {name: [] for name in modes}
        for _ in range(args.rounds):
            for name, workers in modes.items():
                seconds[name].append(timed(lambda w=workers: classify(w)))
        decode_s = timed(lambda: list(preprocessed(files, transform, workers=0)))
        batch = torch.stack([image for _, _, image in preprocessed(files[: args.batch], transform)])
        engine_s = timed(lambda: [engine.predict(batch) for _ in range(max(1, args.images // args.batch))])
        engine_images = max(1, args.images // args.batch) * args.batch

    print(f"{'mode':<28}  {'median s':>8}  {'img/s':>7}  rounds (s)")
    for name, values in seconds.items():
        median = statistics.median(values)
        rounds = ", ".join(f"{v:.2f}" for v in values)
        print(f"{name:<28}  {median:8.2f}  {args.images / median:7.1f}  {rounds}")
    print(f"{'decode + preprocess only':<28}  {decode_s:8.2f}  {args.images / decode_s:7.1f}  (1 thread)")
    print(f"{'engine.predict only':<28}  {engine_s:8.2f}  {engine_images / engine_s:7.1f}  (uint8 batches)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
