"""The timing harness behind `fastres bench`: fastres and its anchors measured side by side in one run.

Every candidate (fastres, eager PyTorch in NCHW and channels-last, optionally torch.compile) runs the
same random-normal batch. Per batch size each candidate gets its first call timed on its own (for
torch.compile that is the compile time, reported apart from steady state as gpt-fast does), a few
untimed warm-up calls, then `repeats` timed calls *interleaved* round-robin: repeat r runs every
candidate once, starting at candidate r mod k, so clock or thermal drift and cache state left by the
previous candidate hit all of them alike.

Timing: on CUDA each call is bracketed by CUDA events on the current stream (one call per sample, no L2
flush: a served model runs back to back as well); on the CPU by `time.perf_counter`. Statistics are the
median and the 90th percentile (linear interpolation between order statistics, numpy's default).

Memory: on CUDA `torch.cuda.max_memory_allocated` over one call after `reset_peak_memory_stats`; every
candidate's weights and fastres's cached workspaces are resident then, so it is the process's peak while
that candidate runs. On the CPU there is no per-allocation counter that sees oneDNN's scratch memory;
rows carry the process's `ru_maxrss` high-water mark after that candidate ran (it only rises).
`mem_method` in every row says which of the two was used.

Load times (fastres only): `cold_load_s` is the first `fastres.optimize`/`fastres.load` in the process up
to its first result (planning, BN folding, weight packing, Triton JIT, CUDA-graph capture); `warm_load_s`
is a second load of the same model (in-process kernel caches warm). Triton's on-disk cache survives
between processes, so a "cold" load in a fresh process may still find compiled kernels there.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..backends.torch_backend import tf32_during
from ..errors import ConfigError
from ..progress import Progress
from ..quantize import QUANTIZED_DTYPES
from .bench_candidates import (  # noqa: F401  (re-exported: benchmarks/ use them through this module)
    ANCHORS,
    Candidate,
    anchor_candidates,
    check_compile_modes,
    cudnn_benchmark,
    one_line,
)
from .bench_timing import (  # noqa: F401  (re-exported: the tests and benchmarks/ use them from here)
    CudaEventTimer,
    Stats,
    TimingInterrupted,
    cpu_timer,
    interleaved_order,
    measure_interleaved,
    percentile,
    summarize,
)
from .environment import environment


def openvino_available() -> bool:
    from ..backends.openvino_backend import openvino_available as available

    return available()


# ---------------------------------------------------------------------------------------------
# The benchmark run


@dataclass
class BenchConfig:
    model: str
    batches: Sequence[int] = (1, 8, 64, 256)
    dtype: torch.dtype | None = None  # fp16 on CUDA, fp32 on the CPU
    device: str | torch.device | None = None
    image_size: int = 224
    compare: Sequence[str] | None = None  # eager, and on the CPU OpenVINO too when it is installed
    weights: Any = None
    backend: str | None = None
    repeats: int | None = None  # 50 on CUDA, 10 on the CPU
    warmup: int | None = None  # 5 on CUDA, 2 on the CPU
    compile_budget_s: float | None = None  # skip further torch.compile work once exceeded
    compile_modes: Sequence[str] | None = None  # torch.compile modes (default: reduce-overhead and
    # max-autotune-no-cudagraphs on CUDA, default on the CPU)
    seed: int = 0
    progress: bool = True


@dataclass
class BenchResult:
    rows: list[dict[str, Any]]
    env: dict[str, Any]
    candidates: list[str] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max_memory_allocated during one call"
    fn()
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024, "process ru_maxrss high-water mark (cpu)"


def resolve_device_dtype(config: BenchConfig) -> tuple[torch.device, torch.dtype]:
    from ..api import parse_dtype
    from ..errors import BackendUnavailableError

    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(
            "--device cuda was requested but torch sees no CUDA GPU; use --device cpu"
        )
    dtype = (
        parse_dtype(config.dtype)
        if config.dtype is not None
        else (torch.float16 if device.type == "cuda" else torch.float32)
    )
    if config.compare is None:
        config.compare = ["eager", *(["openvino"] if device.type == "cpu" and openvino_available() else [])]
    unknown = set(config.compare) - set(ANCHORS)
    if unknown:
        raise ConfigError(
            f"--compare takes {', '.join(ANCHORS)} (comma-separated), got {', '.join(sorted(unknown))}"
        )
    check_compile_modes(config.compile_modes, config.compare)
    if not config.batches or any(b < 1 for b in config.batches):
        raise ConfigError(f"batch sizes must be at least 1, got {list(config.batches)}")
    if config.image_size < 32:
        raise ConfigError(f"--image-size must be at least 32 (five stride-2 stages), got {config.image_size}")
    return device, dtype


def load_timed(
    config: BenchConfig,
    device: torch.device,
    dtype: torch.dtype,
    first_x: torch.Tensor,
    calibration: torch.Tensor | None = None,
) -> tuple[Any, torch.nn.Module, list[float]]:
    """Load fastres twice, timing each load to its first result: (engine, float32 module, [cold, warm]).

    Without weights the model is `make_calibrated_model` (realistic random weights; building it is not
    timed, it plays the checkpoint) and the engine comes from `fastres.optimize` of that module, which
    is also what the eager anchors run. With weights the anchors run `engine.reference()`.
    """
    import fastres

    from ..specs import MODEL_SPECS
    from ..testing import make_calibrated_model

    int8 = {"calibration": calibration} if calibration is not None else {}
    if config.weights is None and config.model in MODEL_SPECS:
        module = make_calibrated_model(config.model, seed=config.seed)
        load = lambda: fastres.optimize(module, device=device, dtype=dtype, backend=config.backend, **int8)
    else:
        module = None
        load = lambda: fastres.load(
            config.model, config.weights, device=device, dtype=dtype, backend=config.backend, **int8
        )
    load_times = []
    with torch.inference_mode():
        for _ in range(2):  # cold (first in this process), then warm
            engine = None  # the first engine is freed before the second load
            start = time.perf_counter()
            engine = load()
            engine(first_x)
            _sync(device)
            load_times.append(time.perf_counter() - start)
    return engine, (engine.reference() if module is None else module), load_times


def int8_calibration_images(x: torch.Tensor, count: int = 32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(count, *x.shape[1:], generator=gen)


def other_backend_candidates(config: BenchConfig, engine, module, device, dtype) -> list[Candidate]:
    """On the CPU without --backend, fastres on its other CPU backend too ("fastres-torch" beside
    the default openvino), so that one run shows what each backend gives."""
    import fastres

    if (
        device.type != "cpu"
        or config.backend is not None
        or engine.backend_name == "torch"
        or dtype in QUANTIZED_DTYPES
    ):
        return []
    try:
        other = fastres.optimize(module, device=device, dtype=dtype, backend="torch")
    except Exception as exc:  # e.g. a dtype the torch backend cannot run here: a row that says so
        return [Candidate("fastres-torch", lambda x: None, error=one_line(exc))]
    return [Candidate("fastres-torch", other)]


def tuned_candidates(config: BenchConfig, engine, module, device, dtype) -> list[Candidate]:
    """A Triton engine with tuned choices cached for this plan (`fastres tune`): "fastres (rules)", the
    rule table alone, beside "fastres (tuned)", the engine as loaded (tune="cached", as "fastres")."""
    import fastres

    backend = engine.backend
    if engine.backend_name != "triton" or not getattr(backend, "tuned", None):  # int8 / fp8: never tuned
        return []
    from ..tuning.keys import batch_bucket

    size = config.image_size
    wanted = {
        (signature, batch_bucket(b))
        for b in config.batches
        for signature, _ in backend.conv_inputs(b, size, size).values()
    }
    if not wanted & backend.tuned.keys():
        return []
    options = dict(device=device, dtype=dtype, backend="triton", tune=False, self_check=False)
    rules = fastres.optimize(module, **options)
    return [Candidate("fastres (rules)", rules), Candidate("fastres (tuned)", engine)]


# The error of a provisional row: on_rows saw it after the candidate's first call, before the timing.
PENDING = "not timed: the run stopped after this candidate's first call"


def run_benchmark(config: BenchConfig, on_rows: Callable[[list[dict]], None] | None = None) -> BenchResult:
    """Measure fastres against its anchors. `on_rows` gets all rows so far after each batch size, and
    after each candidate's first call the finished rows plus provisional ones for the batch under way
    (error PENDING, `first_result_s` set: for torch.compile, its compile time)."""
    from ..specs import MODEL_SPECS, get_spec

    device, dtype = resolve_device_dtype(config)
    if not os.path.exists(config.model):
        get_spec(config.model)  # an unknown name fails here, listing the valid ones, before any work
    on_gpu = device.type == "cuda"
    repeats = config.repeats or (50 if on_gpu else 10)
    warmup = config.warmup if config.warmup is not None else (5 if on_gpu else 2)
    if repeats < 1:
        raise ConfigError(f"--repeats must be at least 1, got {repeats}")
    if on_gpu:
        torch.cuda.init()
        torch.empty(1, device=device)  # CUDA context up front: the cold load should not pay for it
    size, batches = config.image_size, list(config.batches)
    gen = torch.Generator().manual_seed(config.seed)
    # int8 engines take float input, and the float anchors then run in float32 (eager has no int8).
    input_dtype = torch.float32 if dtype in QUANTIZED_DTYPES else dtype
    first_x = torch.randn(batches[0], 3, size, size, generator=gen).to(device, input_dtype)

    # int8: calibrated on random images (the load time includes it); timing does not depend on them.
    calibration = int8_calibration_images(first_x) if dtype in QUANTIZED_DTYPES else None
    engine, module, load_times = load_timed(config, device, dtype, first_x, calibration)
    candidates = [
        Candidate("fastres", engine),
        *other_backend_candidates(config, engine, module, device, dtype),
        *tuned_candidates(config, engine, module, device, dtype),
        *anchor_candidates(module, device, dtype, config.compare, calibration, config.compile_modes),
    ]
    backend_of = {c.name: c.fn.backend_name for c in candidates if c.name.startswith("fastres")}
    names = [c.name for c in candidates]
    anchors = names[1:]

    env = environment(device)
    anchor_tf32 = bool(getattr(engine.backend, "allow_tf32", False))
    weights = (
        config.weights
        if config.weights is not None
        else ("random-calibrated" if config.model in MODEL_SPECS else config.model)
    )
    base = {
        **env,
        "model": engine.architecture.name,
        "weights": str(weights),
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "image_size": size,
        # The float32 anchors' arithmetic: fastres's (IEEE unless allow_tf32). PyTorch's own default
        # runs cuDNN convs in TF32, which would compare fastres's IEEE fp32 with 10-bit-mantissa convs.
        "tf32": anchor_tf32,
    }
    timer = CudaEventTimer(device) if on_gpu else cpu_timer
    compile_spent = 0.0
    errors = {c.name: c.error for c in candidates if c.error}
    rows: list[dict[str, Any]] = []
    progress = Progress(
        len(batches) * len(candidates) * (repeats + warmup + 1), f"bench {config.model}", config.progress
    )

    def batch_rows(batch, stats, first, memory, batch_errors) -> list[dict[str, Any]]:
        out = []
        for name in names:
            row = {**base, "candidate": name, "batch": batch, "backend": backend_of.get(name)}
            st = stats.get(name)
            row.update(
                {
                    "median_ms": st.median_ms if st else None,
                    "p90_ms": st.p90_ms if st else None,
                    "min_ms": st.min_ms if st else None,
                    "samples": st.samples if st else 0,
                    "throughput_img_s": batch / (st.median_ms / 1e3) if st else None,
                    "first_result_s": first.get(name),
                    "peak_mem_mb": memory[name][0] if name in memory else None,
                    "mem_method": memory[name][1] if name in memory else None,
                    "cold_load_s": load_times[0] if name == "fastres" else None,
                    "warm_load_s": load_times[1] if name == "fastres" else None,
                }
            )
            ours = stats.get("fastres")
            # fastres_speedup: this row's median / fastres's median (how much faster fastres is than it).
            row["fastres_speedup"] = st.median_ms / ours.median_ms if st and ours else None
            for anchor in anchors:
                other = stats.get(anchor)
                row[f"speedup_vs_{anchor}"] = (
                    other.median_ms / ours.median_ms if name == "fastres" and other and ours else None
                )
            row["error"] = batch_errors.get(name)
            out.append(row)
        return out

    def provisional(batch, first) -> None:
        """Rows so far, and this batch's candidates reached so far: a killed run leaves what it measured."""
        if on_rows is not None:
            pending = {n: PENDING for n in first if n not in errors}
            reached = [r for r in batch_rows(batch, {}, first, {}, {**errors, **pending}) if r["error"]]
            on_rows(rows + reached)

    tf32 = tf32_during(anchor_tf32)
    tf32.__enter__()
    try:
        for batch in batches:
            x = (
                first_x
                if batch == batches[0]
                else torch.randn(batch, 3, size, size, generator=gen).to(device, input_dtype)
            )
            first: dict[str, float] = {}
            with torch.inference_mode():
                for cand in candidates:
                    if cand.name in errors:
                        progress.update(warmup + 1)
                        continue
                    if (
                        cand.is_compile
                        and config.compile_budget_s is not None
                        and compile_spent > config.compile_budget_s
                    ):
                        errors[cand.name] = (
                            f"skipped: torch.compile budget of {config.compile_budget_s:g} s spent"
                        )
                        progress.update(warmup + 1)
                        continue
                    try:
                        start = time.perf_counter()
                        cand.fn(x)
                        _sync(device)
                        first[cand.name] = time.perf_counter() - start
                        if cand.is_compile:
                            compile_spent += first[cand.name]
                        for _ in range(warmup):
                            cand.fn(x)
                        _sync(device)
                    except Exception as exc:  # torch.compile failures and the like: a row, not a crash
                        errors[cand.name] = one_line(exc)
                    progress.update(warmup + 1)
                    provisional(batch, first)
                live = {c.name: (lambda c=c, x=x: c.fn(x)) for c in candidates if c.name not in errors}
                stopped = None
                try:
                    samples, failed = measure_interleaved(live, repeats, timer, progress.update)
                except TimingInterrupted as stop:  # rows from the samples taken (their count says so)
                    samples, failed, stopped = stop.samples, stop.errors, stop
                memory = {}
                for cand in candidates:
                    if cand.name in live and cand.name not in failed and stopped is None:
                        memory[cand.name] = _peak_memory_mb(live[cand.name], device)
            batch_errors = {**errors, **failed}
            stats = {n: summarize(s) for n, s in samples.items() if s and n not in batch_errors}
            rows += batch_rows(batch, stats, first, memory, batch_errors)
            if on_rows is not None:
                on_rows(rows)
            if stopped is not None:
                raise stopped
    finally:
        tf32.__exit__(None, None, None)
        progress.close()
    return BenchResult(rows, env, names)


# ---------------------------------------------------------------------------------------------
# Output: table, CSV, JSON, plot
