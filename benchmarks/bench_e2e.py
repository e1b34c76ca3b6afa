"""End to end: fastres against eager PyTorch per model, dtype and batch (pytest-benchmark).

    pytest benchmarks/bench_e2e.py --benchmark-only [--benchmark-json out.json]

Candidates come from the `fastres bench` harness (fastres.tools.bench): the same realistic random weights
(calibrated BatchNorm) for fastres and eager, eager in NCHW and channels-last. Each benchmark group is
one (model, dtype, batch) so pytest-benchmark prints the candidates side by side; every result carries
the machine, versions, git revision and date in `extra_info`. On the CPU it runs the torch backend at
small sizes. For interleaved measurements with percentiles and load times use `fastres bench`; this
suite is for pytest-benchmark's storage and `--benchmark-compare` between revisions.
"""

import pytest
import torch

from fastres.tools import bench, environment

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
if HAS_CUDA:
    IMAGE_SIZE = 224
    CASES = [(m, d, b) for m in ("resnet18", "resnet50") for d in ("fp16", "bf16") for b in (1, 64)]
    CASES += [("resnet50", "fp32", 8)]
else:
    IMAGE_SIZE = 64
    CASES = [("resnet18", "fp32", 1), ("resnet18", "fp32", 4)]
CANDIDATES = ("fastres", "eager", "eager-channels-last")

_LOADED: dict = {}


def _candidates(model: str, dtype_name: str) -> dict:
    key = (model, dtype_name)
    if key not in _LOADED:
        _LOADED.clear()  # one model at a time in memory
        config = bench.BenchConfig(model, batches=[1], dtype=dtype_name, device=DEVICE, image_size=IMAGE_SIZE)
        device, dtype = bench.resolve_device_dtype(config)
        first = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE).to(device, dtype)
        engine, module, load_times = bench.load_timed(config, device, dtype, first)
        cands = [
            bench.Candidate("fastres", engine),
            *bench.anchor_candidates(module, device, dtype, ["eager"]),
        ]
        _LOADED[key] = {"dtype": dtype, "load_times": load_times, **{c.name: c.fn for c in cands}}
    return _LOADED[key]


@pytest.fixture(scope="module")
def env():
    return environment.environment(DEVICE)


@pytest.mark.parametrize("candidate", CANDIDATES)
@pytest.mark.parametrize(
    "model, dtype_name, batch", [pytest.param(*c, id=f"{c[0]}-{c[1]}-b{c[2]}") for c in CASES]
)
def test_e2e(benchmark, env, model, dtype_name, batch, candidate):
    loaded = _candidates(model, dtype_name)
    fn = loaded[candidate]
    x = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    x = x.to(DEVICE, loaded["dtype"])

    def call():
        fn(x)
        if HAS_CUDA:
            torch.cuda.synchronize()

    benchmark.group = f"{model} {dtype_name} batch {batch} ({IMAGE_SIZE}px, {DEVICE.type})"
    benchmark.extra_info.update(env)
    benchmark.extra_info.update(
        model=model,
        dtype=dtype_name,
        batch=batch,
        image_size=IMAGE_SIZE,
        candidate=candidate,
        device=DEVICE.type,
    )
    if candidate == "fastres":
        benchmark.extra_info.update(cold_load_s=loaded["load_times"][0], warm_load_s=loaded["load_times"][1])
    with torch.inference_mode():
        call()  # first call (compile, capture, cudnn.benchmark search) is not steady state
        benchmark.pedantic(call, rounds=20 if HAS_CUDA else 5, warmup_rounds=3 if HAS_CUDA else 1)
