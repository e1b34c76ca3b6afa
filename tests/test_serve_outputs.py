"""fastres serve's outputs beyond logits: a classifier's `embedding`, a feature engine's layers by name.

Without a server: the outputs each kind of engine offers (the v2 metadata), what a request makes the
replica run, and the replica's batch path (built directly, as in tests/test_serve_deployment.py).
Over real HTTP with tritonclient: `fastres serve --features` in a subprocess. The classifier's
`embedding` over HTTP is tested on tests/test_serve.py's server. Every answer is checked against an
engine called in this process.
"""

import os

import numpy as np
import pytest
import torch

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'fastres[serve]'")

from serve_support import (  # noqa: E402
    Client,
    ServeProcess,
    descendants,
    free_port,
    infer_body,
    uint8,
    wait_gone,
)

import fastres  # noqa: E402
from fastres.numerics import LAYER_RTOL, assert_close  # noqa: E402
from fastres.serving import ServeConfig, protocol  # noqa: E402
from fastres.serving.deployment import ImageClassifier, _Item  # noqa: E402
from fastres.serving.outputs import (  # noqa: E402
    RUN_ALL,
    RUN_BOTH,
    RUN_EMBEDDING,
    RUN_LOGITS,
    ServedOutputs,
    served_outputs,
)
from fastres.testing import make_calibrated_model  # noqa: E402

RTOL = LAYER_RTOL[torch.float32]  # a merged batch rounds differently from a lone call
SIZE, CLASSES, WIDTH = 32, 10, 512  # resnet18: 512 pooled features
FEATURES = ("layer1", "pool")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("outputs") / "birds.pth"
    torch.save(make_calibrated_model("resnet18", CLASSES, image_size=SIZE).state_dict(), path)
    return str(path)


def _load(weights, **options):
    return fastres.load("resnet18", weights, device="cpu", backend="torch", **options)


def _replica(weights, **options):
    config = ServeConfig(
        "resnet18", weights=weights, device="cpu", backend="torch", max_batch=8, warmup_size=SIZE, **options
    )
    return ImageClassifier.func_or_class(config)


def _pixels(*shape, seed):
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_metadata_lists_every_output_with_datatype_and_shape(weights):
    classifier = served_outputs(_load(weights))
    assert classifier.metadata == (
        {"name": "logits", "datatype": "FP32", "shape": [-1, CLASSES]},
        {"name": "labels", "datatype": "BYTES", "shape": [-1, -1]},
        {"name": "probs", "datatype": "FP32", "shape": [-1, -1]},
        {"name": "embedding", "datatype": "FP32", "shape": [-1, WIDTH]},
    )
    assert classifier.default == ("logits",)
    embedder = served_outputs(_load(weights, num_classes=0))
    assert embedder.metadata == ({"name": "embedding", "datatype": "FP32", "shape": [-1, WIDTH]},)
    features = _load(weights, features=("layer2", "stem", "pool"))
    served = served_outputs(features)
    # channels as the engine computes them at any size; the spatial dims are dynamic
    got = features(_pixels(1, 3, 40, 24, seed=1))
    assert served.metadata == tuple(
        {"name": n, "datatype": "FP32", "shape": [-1, got[n].shape[1]] + [-1] * (got[n].dim() - 2)}
        for n in ("stem", "layer2", "pool")
    )
    assert served.default == ("stem", "layer2", "pool")  # every feature unless a request lists some
    meta = protocol.model_metadata("birds", 0, outputs=served.metadata)
    assert [o["name"] for o in meta["outputs"]] == ["stem", "layer2", "pool"]


def test_what_a_request_runs():
    classifier = protocol.classifier_outputs(CLASSES) + [{"name": "embedding"}]
    served = ServedOutputs(tuple(classifier), ("logits",), classifier=True)
    assert served.run_for(["logits"]) == served.run_for(["labels", "probs"]) == RUN_LOGITS
    assert served.run_for(["embedding"]) == RUN_EMBEDDING
    assert served.run_for(["embedding", "labels"]) == served.run_for(["logits", "embedding"]) == RUN_BOTH
    assert ServedOutputs((), ("pool",), classifier=False).run_for(["pool"]) == RUN_ALL


def test_unknown_outputs_are_refused_with_the_model_outputs():
    names = ("stem", "layer1", "pool")
    body = infer_body(uint8((1, 3, 8, 8), seed=2), outputs=[{"name": "logits"}])
    refused = "unknown output 'logits'; this model's outputs are stem, layer1, pool"
    with pytest.raises(protocol.OIPError, match=refused) as info:
        protocol.parse_infer_request(body, None, num_classes=0, max_batch=4, output_names=names)
    assert info.value.status == 400
    parsed = protocol.parse_infer_request(
        infer_body(uint8((1, 3, 8, 8), seed=2)),
        None,
        num_classes=0,
        max_batch=4,
        output_names=names,
        default_outputs=names,
    )
    assert [o.name for o in parsed.outputs] == list(names)


def test_extra_outputs_pass_through_beside_those_from_logits():
    rng = np.random.default_rng(9)
    computed = {
        "logits": rng.standard_normal((2, CLASSES)).astype(np.float32),
        "embedding": rng.standard_normal((2, WIDTH)).astype(np.float32),
    }
    listed = [{"name": "embedding", "parameters": {"binary_data": True}}, {"name": "labels"}]
    names = protocol.OUTPUT_NAMES + ("embedding",)
    parsed = protocol.parse_infer_request(
        infer_body(uint8((2, 3, 4, 4), seed=10), outputs=listed, topk=3),
        None,
        num_classes=CLASSES,
        max_batch=4,
        output_names=names,
    )
    labels = [f"bird {i}" for i in range(CLASSES)]
    embedding, top = protocol.build_outputs(parsed, computed, labels)
    assert (embedding.name, embedding.datatype, embedding.binary) == ("embedding", "FP32", True)
    assert np.array_equal(embedding.array, computed["embedding"])
    best = np.argsort(-computed["logits"], axis=1, kind="stable")[:, :3]
    assert top.array.tolist() == [[labels[j].encode() for j in row] for row in best]


def test_a_classifier_replica_answers_embedding_and_logits_in_one_forward(weights):
    replica = _replica(weights)
    engine = replica.engine
    x = [_pixels(2, 3, SIZE, SIZE, seed=s) for s in (3, 4, 5)]
    items = [_Item(images, "NCHW", run) for images, run in zip(x, (RUN_BOTH, RUN_EMBEDDING, RUN_LOGITS))]
    calls = []

    class Counting:  # the engine, counting full forwards (embed() runs the cut plan beside it)
        def __getattr__(self, name):
            return getattr(engine, name)

        def __call__(self, images, layout=None):
            calls.append(len(images))
            return engine(images, layout=layout)

    replica.engine = Counting()
    results = replica._run_batch(items)
    assert calls == [2], "only the logits-only request runs the whole network"
    assert set(results[0]) == {"embedding", "logits"} and set(results[1]) == {"embedding"}
    assert set(results[2]) == {"logits"}
    for item, result in zip(items, results):
        if "embedding" in result:
            assert_close(result["embedding"], engine.embed(item.images), RTOL, f"embedding, {item.run}")
        if "logits" in result:
            assert_close(result["logits"], engine(item.images), RTOL, f"logits, {item.run}")
    # merged requests with different needs never share an engine call
    (stats,) = replica.stats.triton_statistics("birds")["model_stats"]
    assert (stats["execution_count"], stats["merged_executions"]) == (3, 0)
    # Where embed() runs on other numerics than the engine (int8 OpenVINO), the logits are the engine's:
    # a second forward.
    replica._fc, calls[:] = None, []
    (result,) = replica._run_batch([items[0]])
    assert calls == [2] and set(result) == {"embedding", "logits"}
    assert_close(result["logits"], engine(items[0].images), RTOL, "logits from a second forward")


def test_a_feature_replica_answers_its_layers(weights):
    replica = _replica(weights, features=FEATURES)
    engine = _load(weights, features=FEATURES)
    items = [_Item(_pixels(n, 3, SIZE, SIZE, seed=5 + n), "NCHW", RUN_ALL) for n in (1, 2)]
    results = replica._run_batch(items)
    for item, result in zip(items, results):
        expected = engine(item.images)
        assert set(result) == set(FEATURES)
        for name in FEATURES:
            assert_close(result[name], expected[name], RTOL, name)
    embedder = _replica(weights, num_classes=0)
    (result,) = embedder._run_batch([items[1]])
    assert_close(result["embedding"], _load(weights).embed(items[1].images), RTOL, "embedder")


def test_unknown_feature_names_fail_at_configuration():
    with pytest.raises(fastres.ConfigError, match="unknown features"):
        ServeConfig("resnet18", features=("layer5",))


@pytest.mark.slow
def test_cli_serves_feature_layers_to_tritonclient(weights):
    http = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")
    port = free_port()
    args = ["resnet18", "--weights", weights, "--features", "layer1,pool", "--name", "backbone"]
    args += ["--device", "cpu", "--backend", "torch", "--dtype", "fp32", "--max-batch", "4"]
    server = ServeProcess(args + ["--warmup-size", str(SIZE)], port, env=dict(os.environ))
    children: set[int] = set()
    try:
        server.wait_serving()
        children = descendants(server.process.pid)
        client = http.InferenceServerClient(f"127.0.0.1:{port}")
        engine = _load(weights, features=FEATURES)
        try:
            outputs = client.get_model_metadata("backbone")["outputs"]
            assert outputs == [
                {"name": "layer1", "datatype": "FP32", "shape": [-1, 64, -1, -1]},
                {"name": "pool", "datatype": "FP32", "shape": [-1, WIDTH]},
            ]
            images = uint8((2, 3, SIZE, 40), seed=8)
            expected = engine(torch.from_numpy(images))
            for binary, listed in ((True, ["layer1"]), (False, ["pool"]), (True, None)):
                tensor = http.InferInput("input", list(images.shape), "UINT8")
                tensor.set_data_from_numpy(images, binary_data=binary)
                requested = listed and [http.InferRequestedOutput(n, binary_data=binary) for n in listed]
                result = client.infer("backbone", [tensor], outputs=requested)
                names = [o["name"] for o in result.get_response()["outputs"]]
                assert names == (listed or list(FEATURES)), names  # exactly what was asked, all by default
                for name in names:
                    got = torch.from_numpy(result.as_numpy(name).copy())
                    assert_close(got, expected[name], RTOL, f"{name} over HTTP (binary={binary})")
        finally:
            client.close()
        raw = Client(f"http://127.0.0.1:{port}")
        status, answer = raw.json(
            "POST", "/v2/models/backbone/infer", infer_body(images, outputs=[{"name": "embedding"}])
        )
        assert status == 400 and set(answer) == {"error"}, answer
        assert "unknown output 'embedding'" in answer["error"] and "layer1, pool" in answer["error"]
        status, answer = raw.json("POST", "/v1/classify", b"\x89PNG", {"Content-Type": "image/png"})
        assert status == 404 and "/v2/models/backbone/infer" in answer["error"], answer
    finally:
        code = server.stop()
    assert code == 0, server.tail()
    wait_gone(children, port)
