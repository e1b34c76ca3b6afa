"""The first minutes on a GPU: the CUDA-graph path's known failure modes, answered before any benchmark.

Each check prints PASS or FAIL with its reason; the exit status is 1 when any failed. Run by
benchmarks/gpu_check.sh as its first GPU stage (issue 19's smoke list):
- a runner first used inside torch.inference_mode(), then outside it (and the reverse);
- ResNet-50 fp16 at batch 1: 200 graph replays equal to each other and to the un-graphed triton run,
  close to the torch backend, and the split-K counters all zero afterwards;
- warm-up captures runners under (shape, dtype, stride) keys;
- a 2-byte-offset input view against an aligned copy of it;
- two engines capturing concurrently from two threads on their own streams (two devices when present),
  last: the threads are daemons joined for at most 30 s, so a capture deadlock fails the check (and the
  process exits at once) instead of hanging the stage past its time limit.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback

import torch

import fastres
from fastres.numerics import LAYER_RTOL, relative_error
from fastres.testing import make_calibrated_model, random_images

RESULTS: list[tuple[str, bool, str]] = []
JOIN_S = 30  # a concurrent capture that takes longer is taken for a deadlock


def check(fn):
    t0 = time.perf_counter()
    try:
        detail = fn() or ""
        ok = True
    except Exception as exc:  # a smoke test reports every failure and goes on to the next check
        ok, detail = False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"
    RESULTS.append((fn.__name__, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'} {fn.__name__} ({time.perf_counter() - t0:.1f} s) {detail}", flush=True)


RESNET18 = make_calibrated_model("resnet18", 10, image_size=64)


def inference_mode_then_outside():
    for first_inside in (True, False):
        engine = fastres.optimize(RESNET18, device="cuda")
        x = random_images(2, 64, 64, seed=1).cuda()
        mode = torch.inference_mode() if first_inside else torch.enable_grad()
        with mode:
            first = engine(x)
        second = engine(x)  # the runner's static input, updated in the other mode
        engine.predict(x)
        with torch.inference_mode(first_inside is False):
            third = engine(x)
        assert torch.equal(first, second) and torch.equal(second, third), "replays differ"
    return "both orders"


def resnet50_replays_and_counters():
    model = make_calibrated_model("resnet50", 1000)
    x = random_images(1, 224, 224, seed=2).cuda()
    graphed = fastres.optimize(model, device="cuda", dtype="fp16", cuda_graphs=True)
    plain = fastres.optimize(model, device="cuda", dtype="fp16", cuda_graphs=False)
    torch_backend = fastres.optimize(model, device="cuda", dtype="fp16", backend="torch")
    first = graphed(x)
    replays = [graphed(x) for _ in range(200)]
    unequal = sum(not torch.equal(first, r) for r in replays)
    assert unequal == 0, f"{unequal} of 200 replays differ from the first"
    assert torch.equal(first, plain(x)), "graph and no-graph triton runs differ"
    err = relative_error(first, torch_backend(x))
    assert err <= 10 * LAYER_RTOL[torch.float16], f"triton vs torch backend relative error {err:.2e}"
    counters = [r.workspace.split_scratch[1] for r in graphed._runners.values()]
    nonzero = sum(int((c != 0).sum()) for c in counters)
    assert nonzero == 0, f"{nonzero} split-K counters left non-zero"
    return f"200 replays equal; vs torch backend {err:.2e}; counters zero"


def warmup_keys():
    engine = fastres.optimize(RESNET18, device="cuda")
    engine.warmup(batch_sizes=(1, 4), image_size=64)
    keys = set(engine._runners)
    want = {((n, 3, 64, 64), torch.float16, (3 * 64 * 64, 64 * 64, 64, 1)) for n in (1, 4)}
    assert keys == want, f"runner keys {keys}"


def offset_view_matches_aligned_copy():
    engine = fastres.optimize(RESNET18, device="cuda", cuda_graphs=False)
    aligned = random_images(2, 64, 64, seed=3).cuda().half()
    storage = torch.empty(aligned.numel() + 1, device="cuda", dtype=torch.float16)
    view = storage[1:].view_as(aligned)  # 2 bytes past a 16-byte boundary
    view.copy_(aligned)
    assert view.data_ptr() % 16 == 2
    assert torch.equal(engine(view), engine(aligned)), "offset view and aligned copy differ"


def concurrent_captures():
    devices = [torch.device("cuda", i % torch.cuda.device_count()) for i in range(2)]
    engines = [fastres.optimize(RESNET18, device=d) for d in devices]
    inputs = [random_images(3, 48 + 16 * i, 64, seed=4 + i).to(d) for i, d in enumerate(devices)]
    barrier, results, errors = threading.Barrier(2), [None, None], []

    def work(i):
        try:
            barrier.wait()
            with torch.cuda.device(devices[i]), torch.cuda.stream(torch.cuda.Stream(devices[i])):
                results[i] = engines[i](inputs[i])
                torch.cuda.current_stream().synchronize()
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + JOIN_S
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    stuck = [i for i, t in enumerate(threads) if t.is_alive()]
    assert not stuck, f"engines {stuck} still capturing after {JOIN_S} s: a capture deadlock?"
    assert not errors, errors
    for i in range(2):
        again = engines[i](inputs[i])
        assert torch.equal(results[i], again), f"engine {i}: concurrent capture differs from a later replay"
    return f"devices {[str(d) for d in devices]}"


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA GPU", file=sys.stderr)
        return 2
    print(f"gpu_smoke on {torch.cuda.get_device_name(0)} (torch {torch.__version__})", flush=True)
    for fn in (
        inference_mode_then_outside,
        warmup_keys,
        offset_view_matches_aligned_copy,
        resnet50_replays_and_counters,
        concurrent_captures,  # last: a deadlock here leaves threads that may hold the GPU
    ):
        check(fn)
    failed = [name for name, ok, _ in RESULTS if not ok]
    print(f"gpu_smoke: {len(RESULTS) - len(failed)} passed, {len(failed)} failed {failed or ''}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    code = main()
    if any(t.daemon and t.is_alive() for t in threading.enumerate()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # a thread stuck in a capture: no interpreter shutdown (CUDA teardown may hang)
    sys.exit(code)
