"""The serve replica's batch path without a running Ray: grouping, padding, chunking, isolation.

The deployment class is built directly (Ray Serve's decorator keeps it as `func_or_class`), so the
merged batches are constructed by hand: every result is checked against the engine called alone.
"""

import asyncio
import json
import time

import pytest
import torch

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'fastres[serve]'")

from fastres.numerics import LAYER_RTOL, assert_close  # noqa: E402
from fastres.serving import ServeConfig, protocol  # noqa: E402
from fastres.serving.deployment import Health, ImageClassifier, _Item  # noqa: E402
from fastres.serving.protocol import OIPError  # noqa: E402
from fastres.testing import make_calibrated_model  # noqa: E402

RTOL = LAYER_RTOL[torch.float32]  # a merged or padded batch rounds differently from a lone call
SIZE = 32


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("replica") / "birds.pth"
    torch.save(make_calibrated_model("resnet18", 10, image_size=SIZE).state_dict(), path)
    return str(path)


def _replica(weights, **options):
    config = ServeConfig(
        "resnet18", weights=weights, device="cpu", backend="torch", max_batch=8, warmup_size=SIZE, **options
    )
    replica = ImageClassifier.func_or_class(config)
    calls = []
    engine = replica.engine

    class Recording:  # the engine, recording the batch of every call
        def __getattr__(self, name):
            return getattr(engine, name)

        def __call__(self, x, layout=None):
            calls.append(tuple(x.shape))
            return engine(x, layout=layout)

    replica.engine = Recording()
    return replica, engine, calls


def _pixels(*shape, seed):
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_merged_requests_are_grouped_by_size_dtype_and_layout(weights):
    replica, engine, calls = _replica(weights)
    nchw = _pixels(3, 3, SIZE, SIZE, seed=1)
    small = _pixels(2, 3, 24, 24, seed=2)
    nhwc = nchw.permute(0, 2, 3, 1).contiguous()
    floats = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    items = [
        _Item(nchw[:1], "NCHW"),
        _Item(small, "NCHW"),
        _Item(nhwc, "NHWC"),
        _Item(nchw[1:], "NCHW"),
        _Item(floats, "NCHW"),
    ]
    results = replica._run_batch(items)
    for item, result in zip(items, results):
        assert_close(result["logits"], engine(item.images, layout=item.layout), RTOL, f"{item.key}")
    # four distinct (dtype, layout, size) keys: four engine calls, the two NCHW 32px requests merged
    assert sorted(calls) == sorted(
        [(3, 3, SIZE, SIZE), (2, 3, 24, 24), (3, SIZE, SIZE, 3), (2, 3, SIZE, SIZE)]
    )
    (stats,) = replica.stats.triton_statistics("birds")["model_stats"]
    assert (stats["request_count"], stats["execution_count"], stats["merged_executions"]) == (5, 4, 1)


def test_a_failing_request_does_not_fail_the_requests_merged_with_it(weights):
    replica, engine, calls = _replica(weights)
    poisoned = torch.full((1, 3, SIZE, SIZE), 7, dtype=torch.uint8)

    def refuse_sevens(x, layout=None):  # an unexpected engine failure, for one request only
        if (x == 7).flatten(1).all(1).any():
            raise RuntimeError("engine failure")
        return engine(x, layout=layout)

    replica.engine = refuse_sevens
    good = [_pixels(1, 3, SIZE, SIZE, seed=s) for s in (4, 5)]
    items = [_Item(good[0], "NCHW"), _Item(poisoned, "NCHW"), _Item(good[1], "NCHW")]
    results = replica._run_batch(items)
    assert isinstance(results[1], RuntimeError)
    for i in (0, 2):
        assert_close(results[i]["logits"], engine(items[i].images), RTOL, f"request {i}")
    wrong_layout = _Item(torch.randn(1, SIZE, SIZE, 3), "NCHW")  # an InputError: the client's fault
    (result,) = replica._run_batch([wrong_layout])
    assert isinstance(result, OIPError) and result.status == 400


def test_cuda_graph_buckets_pad_batches_and_slice_the_padding_off(weights):
    replica, engine, calls = _replica(weights)
    replica._buckets = [1, 2, 4, 8]  # as with CUDA graphs (not on the CPU): a few batch sizes only
    for batch in (1, 3, 5, 8):
        x = _pixels(batch, 3, SIZE, SIZE, seed=10 + batch)
        calls.clear()
        assert_close(replica._forward(x, "NCHW")["logits"], engine(x), RTOL, f"batch {batch}")
        assert calls == [({1: 1, 3: 4, 5: 8, 8: 8}[batch], 3, SIZE, SIZE)]


def test_large_images_run_in_chunks_within_the_pixel_limit(weights):
    replica, engine, calls = _replica(weights, max_pixels=2 * SIZE * SIZE)
    x = _pixels(5, SIZE, SIZE, 3, seed=20)
    assert_close(replica._forward(x, "NHWC")["logits"], engine(x), RTOL, "chunked")
    assert [c[0] for c in calls] == [2, 2, 1]


def test_an_openvino_replica_takes_the_cpus_ray_gave_it(weights, monkeypatch):
    pytest.importorskip("openvino", reason="OpenVINO is absent (pip install 'fastres[openvino]')")
    from fastres.serving import deployment

    monkeypatch.setattr(deployment, "replica_cpu_threads", lambda: 1)
    config = ServeConfig(
        "resnet18", weights=weights, device="cpu", backend="openvino", dtype="fp32", max_batch=2
    )
    replica = ImageClassifier.func_or_class(config)
    assert replica.engine.backend_name == "openvino"
    assert replica.engine.backend.config["INFERENCE_NUM_THREADS"] == 1


class _Probe:
    """A deployment handle's `ready` method: answers, never answers, or fails."""

    def __init__(self, behaviour):
        self.behaviour, self.cancelled = behaviour, 0

    @property
    def ready(self):
        return self

    def remote(self):
        probe = self

        class Response:
            def __await__(self):
                if probe.behaviour == "hang":
                    yield from asyncio.sleep(3600).__await__()
                if probe.behaviour == "dead":
                    raise RuntimeError("ActorDiedError")
                return True

            def cancel(self):
                probe.cancelled += 1

        return Response()


def _get(app, path, method="GET"):
    from starlette.requests import Request

    scope = {"type": "http", "method": method, "path": path, "headers": [], "query_string": b""}
    return asyncio.run(app(Request(scope)))


@pytest.mark.parametrize("behaviour, status", [("answer", 200), ("hang", 503), ("dead", 503)])
def test_readiness_answers_promptly_and_truthfully(behaviour, status):
    health = Health.func_or_class("birds", timeout_s=0.3)
    health._handle = probe = _Probe(behaviour)
    started = time.monotonic()
    response = _get(health, "/v2/health/ready")
    assert time.monotonic() - started < 2, "readiness waited for the replica"
    assert response.status_code == status, response.body
    body = json.loads(response.body)
    assert body["ready"] is (status == 200) and (status == 200 or "within 0.3 s" in body["error"])
    assert probe.cancelled == (behaviour == "hang")
    assert json.loads(_get(health, "/v2/health/live").body) == {"live": True}
    refused = _get(health, "/v2/health/live", "DELETE")
    assert refused.status_code == 405 and refused.headers["allow"] == "GET"


def test_replica_threads_outside_ray_neither_guess_nor_start_ray():
    import ray

    from fastres.serving.deployment import replica_cpu_threads

    assert not ray.is_initialized()
    assert replica_cpu_threads() is None
    assert not ray.is_initialized()  # asking must not start a local instance (on every interface)


def test_the_stats_name_the_replica_and_its_memory():
    import mmap
    import os

    from fastres.serving.deployment import replica_process

    before = replica_process()
    held = mmap.mmap(-1, 64 << 20)  # fresh pages (not memory the allocator keeps), resident once written
    for offset in range(0, len(held), mmap.PAGESIZE):
        held[offset] = 1
    after = replica_process()
    assert before["node_id"] is None and before["pid"] == os.getpid()  # outside Ray: no node
    assert after["rss_bytes"] - before["rss_bytes"] > 60 << 20, (before, after)
    assert after["peak_rss_bytes"] >= after["rss_bytes"] > 0
    stats = protocol.InferenceStats().triton_statistics("birds", replica=after)
    assert stats["model_stats"][0]["replica"] == after
    held.close()


def test_tune_reaches_each_replicas_load_on_the_triton_backend_only(monkeypatch):
    import fastres

    class Stop(Exception):
        pass

    seen = []

    def load(*args, **options):  # what the replica asks for; stops it before any model is built
        seen.append(options)
        raise Stop

    monkeypatch.setattr(fastres, "load", load)
    for backend in ("triton", "torch"):
        with pytest.raises(Stop):
            ImageClassifier.func_or_class(ServeConfig("resnet18", device="cpu", backend=backend, tune=True))
    assert seen[0]["tune"] is True and "tune" not in seen[1]  # torch: no tuning, the default load
