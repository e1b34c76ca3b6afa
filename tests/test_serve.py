"""fastres serve end to end: a local Ray instance on loopback, resnet18 at 32x32 on the CPU.

One module-scoped deployment serves every test (Ray starts slowly on a small CPU); the CLI test
runs first, with its own Ray instance, before that deployment starts. Every answer is checked
against the engine called directly in this process.
"""

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'fastres[serve]'")
Image = pytest.importorskip("PIL.Image", reason="Pillow is not installed: pip install 'fastres[serve]'")

from serve_support import (  # noqa: E402
    Client,
    answer_logits,
    descendants,
    free_port,
    infer_body,
    peak_rss,
    png,
    single_colour_png,
    uint8,
    wait_gone,
)

import fastres  # noqa: E402
from fastres.numerics import LAYER_RTOL, assert_close  # noqa: E402
from fastres.serving import ServeConfig, start  # noqa: E402
from fastres.testing import make_calibrated_model  # noqa: E402

pytestmark = pytest.mark.slow

CLASSES, SIZE, MAX_BATCH, MAX_BODY = 10, 32, 16, 1 << 20
MAX_PIXELS = 2 * MAX_BATCH * SIZE * SIZE
LABELS = [f"bird {i}" for i in range(CLASSES)]
RTOL = LAYER_RTOL[torch.float32]  # batching changes the batch size, hence CPU kernels' rounding


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "birds.pth"
    torch.save(make_calibrated_model("resnet18", CLASSES, image_size=SIZE).state_dict(), path)
    labels = path.with_name("labels.txt")
    labels.write_text("\n".join(LABELS) + "\n")
    return str(path), str(labels)


@pytest.fixture(scope="module")
def engine(checkpoint):
    """The reference: the same checkpoint called directly. One torch thread: this process shares the
    CPU with Ray's, and oversubscribed intra-op threads are several times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield fastres.load("resnet18", checkpoint[0], device="cpu", backend="torch", labels=checkpoint[1])
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(checkpoint):
    config = ServeConfig(
        "resnet18",
        weights=checkpoint[0],
        name="birds",
        labels=checkpoint[1],
        device="cpu",
        backend="torch",
        max_batch=MAX_BATCH,
        batch_wait_ms=5,
        max_body_bytes=MAX_BODY,
        max_pixels=MAX_PIXELS,
        warmup_size=SIZE,
        resize=38,
        crop=SIZE,
    )
    port = free_port()
    running = start(config, port=port, ready_timeout_s=240)
    ray_processes = descendants(os.getpid())
    assert ray_processes, "a local Ray instance runs as child processes of this one"
    yield running, Client(running.url)
    running.shutdown()
    wait_gone(ray_processes, port)


def test_cli_serves_and_stops_on_sigterm(checkpoint, engine):
    port = free_port()
    command = [sys.executable, "-m", "fastres", "serve", "resnet18", "--weights", checkpoint[0]]
    command += ["--port", str(port), "--device", "cpu", "--max-batch", "4", "--warmup-size", str(SIZE)]
    command += ["--dtype", "fp32"]  # the CPU default backend (openvino when installed) in IEEE fp32
    env = {**os.environ, "FASTRES_API_KEY": "cli-key"}  # the key from the environment, not argv
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
    reader.start()
    client = Client(f"http://127.0.0.1:{port}", {"Authorization": "Bearer cli-key"})
    children: set[int] = set()
    try:
        deadline = time.monotonic() + 150
        while not any("serving resnet18 at" in line for line in output):  # printed once it answers
            assert process.poll() is None, "fastres serve exited early:\n" + "".join(output[-30:])
            assert time.monotonic() < deadline, "not ready in 150 s:\n" + "".join(output[-30:])
            time.sleep(0.5)
        assert client.json("GET", "/v2/health/ready") == (200, {"ready": True})
        children = descendants(process.pid)
        images = uint8((1, 3, SIZE, SIZE), seed=1)
        status, answer = client.json("POST", "/v2/models/resnet18/infer", infer_body(images))
        assert status == 200, answer
        # The replica's backend is the CPU default: compare with a local engine of the same backend.
        local = fastres.load("resnet18", checkpoint[0], device="cpu", dtype="fp32")
        assert_close(answer_logits(answer), local(torch.from_numpy(images)), RTOL, "CLI server logits")
        wrong = {"Authorization": "Bearer other"}
        status, answer = client.json("POST", "/v2/models/resnet18/infer", infer_body(images), wrong)
        assert status == 401 and "Bearer KEY" in answer["error"], answer
        assert not any("without an API key" in line for line in output)  # on loopback: no warning
    finally:
        process.send_signal(signal.SIGTERM)  # also on failure: SIGKILL would orphan Ray's processes
        try:
            code = process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    reader.join(timeout=10)
    assert code == 0, "".join(output[-30:])
    assert any("shutting down" in line for line in output), "".join(output[-30:])
    wait_gone(children, port)


def test_health_metadata_and_unknown_model(server):
    _, client = server
    assert client.json("GET", "/v2/health/live") == (200, {"live": True})
    assert client.json("GET", "/v2/health/ready") == (200, {"ready": True})
    status, meta = client.json("GET", "/v2")
    assert status == 200 and "binary_tensor_data" in meta["extensions"]
    status, meta = client.json("GET", "/v2/models/birds")
    assert status == 200 and meta["name"] == "birds"
    assert meta["inputs"][0] == {"name": "input", "datatype": "UINT8", "shape": [-1, 3, -1, -1]}
    assert meta["outputs"][0] == {"name": "logits", "datatype": "FP32", "shape": [-1, CLASSES]}
    assert client.json("GET", "/v2/models/birds/versions/1/ready") == (200, {"name": "birds", "ready": True})
    for path in ("/v2/models/cats", "/v2/models/cats/infer", "/v2/models/birds/versions/2/ready"):
        status, body = client.json("GET" if "infer" not in path else "POST", path, b"{}")
        assert status == 404 and "unknown model" in body["error"], (path, body)


def test_json_infer_uint8_layouts_and_fp32_match_the_engine(server, engine):
    _, client = server
    images = uint8((3, 3, SIZE, SIZE), seed=2)
    expected = engine(torch.from_numpy(images))
    outputs = [{"name": "logits"}, {"name": "labels"}, {"name": "probs"}]
    status, answer = client.json(
        "POST", "/v2/models/birds/infer", infer_body(images, outputs=outputs, topk=3)
    )
    assert status == 200, answer
    assert_close(answer_logits(answer), expected, RTOL, "NCHW uint8 logits")
    top = engine.predict(torch.from_numpy(images), topk=3)
    out = {o["name"]: o for o in answer["outputs"]}
    assert out["labels"]["data"] == [p.label for row in top for p in row]
    np.testing.assert_allclose(out["probs"]["data"], [p.prob for row in top for p in row], rtol=1e-5)

    nhwc = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
    status, answer = client.json("POST", "/v2/models/birds/infer", infer_body(nhwc))
    assert status == 200, answer
    assert_close(answer_logits(answer), expected, RTOL, "NHWC uint8 logits")

    normalised = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(3))
    status, answer = client.json("POST", "/v2/models/birds/infer", infer_body(normalised.numpy(), "FP32"))
    assert status == 200, answer
    assert_close(answer_logits(answer), engine(normalised), RTOL, "FP32 logits")
    channels_last = normalised.permute(0, 2, 3, 1).contiguous().numpy()
    status, answer = client.json("POST", "/v2/models/birds/infer", infer_body(channels_last, "FP32"))
    assert status == 200, answer
    assert_close(answer_logits(answer), engine(normalised), RTOL, "FP32 NHWC logits")


def test_binary_infer_request_and_response(server, engine):
    _, client = server
    images = uint8((2, SIZE, SIZE, 3), seed=4)
    raw = images.tobytes()
    tensor = {"name": "input", "datatype": "UINT8", "shape": list(images.shape)}
    tensor["parameters"] = {"binary_data_size": len(raw)}
    outputs = [
        {"name": "logits", "parameters": {"binary_data": True}},
        {"name": "labels", "parameters": {"topk": 2}},
    ]
    header = json.dumps({"inputs": [tensor], "outputs": outputs, "id": "r1"}).encode()
    headers = {
        "Inference-Header-Content-Length": str(len(header)),
        "Content-Type": "application/octet-stream",
    }
    status, reply_headers, body = client.request("POST", "/v2/models/birds/infer", header + raw, headers)
    assert status == 200, body[:300]
    length = int(reply_headers["inference-header-content-length"])
    answer = json.loads(body[:length])
    assert answer["id"] == "r1" and answer["outputs"][0]["parameters"]["binary_data_size"] == 2 * CLASSES * 4
    logits = torch.from_numpy(np.frombuffer(body[length:], "<f4").copy()).view(2, CLASSES)
    assert_close(logits, engine(torch.from_numpy(images)), RTOL, "binary logits")
    top = engine.predict(torch.from_numpy(images), topk=2)
    assert answer["outputs"][1]["data"] == [p.label for row in top for p in row]


def test_tritonclient_works_unchanged(server, engine):
    http = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")
    running, _ = server
    client = http.InferenceServerClient(running.url.removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("birds")
        assert client.get_model_metadata("birds")["outputs"][0]["shape"] == [-1, CLASSES]
        images = uint8((2, 3, SIZE, SIZE), seed=5)
        expected = engine(torch.from_numpy(images))
        for binary in (True, False):
            tensor = http.InferInput("input", list(images.shape), "UINT8")
            tensor.set_data_from_numpy(images, binary_data=binary)
            outputs = [
                http.InferRequestedOutput("logits", binary_data=binary),
                http.InferRequestedOutput("labels", binary_data=binary),
            ]
            result = client.infer("birds", [tensor], outputs=outputs)
            assert_close(
                torch.from_numpy(result.as_numpy("logits").copy()), expected, RTOL, f"binary={binary}"
            )
            assert result.as_numpy("labels").shape == (2, 5)
        tensor = http.InferInput("input", list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images)
        classes = client.infer(
            "birds", [tensor], outputs=[http.InferRequestedOutput("logits", class_count=3)]
        )
        best = classes.as_numpy("logits")[:, 0]
        assert [int(b.decode().split(":")[1]) for b in best] == expected.argmax(1).tolist()
        stats = client.get_inference_statistics("birds")["model_stats"][0]
        assert stats["inference_count"] >= 6
    finally:
        client.close()


def test_embedding_on_request_through_tritonclient(server, engine):
    http = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")
    running, raw = server
    client = http.InferenceServerClient(running.url.removeprefix("http://"))
    images = uint8((3, 3, SIZE, SIZE), seed=14)
    x = torch.from_numpy(images)
    width = engine.architecture.spec.feature_channels
    try:
        outputs = client.get_model_metadata("birds")["outputs"]
        assert outputs[-1] == {"name": "embedding", "datatype": "FP32", "shape": [-1, width]}, outputs
        for binary, listed in ((True, ["embedding", "logits"]), (False, ["embedding"]), (True, None)):
            tensor = http.InferInput("input", list(images.shape), "UINT8")
            tensor.set_data_from_numpy(images, binary_data=binary)
            requested = listed and [http.InferRequestedOutput(n, binary_data=binary) for n in listed]
            result = client.infer("birds", [tensor], outputs=requested)
            names = [o["name"] for o in result.get_response()["outputs"]]
            assert names == (listed or ["logits"]), names  # the default stays the logits
            if "embedding" in names:
                got = torch.from_numpy(result.as_numpy("embedding").copy())
                assert_close(got, engine.embed(x), RTOL, f"embedding (binary={binary}, with {listed})")
            if "logits" in names:
                got = torch.from_numpy(result.as_numpy("logits").copy())
                assert_close(got, engine(x), RTOL, f"logits (binary={binary}, with {listed})")
    finally:
        client.close()
    unknown = infer_body(images, outputs=[{"name": "layer1"}])
    status, answer = raw.json("POST", "/v2/models/birds/infer", unknown)
    assert status == 400 and set(answer) == {"error"}, answer
    assert "unknown output 'layer1'" in answer["error"] and "embedding" in answer["error"], answer


def test_classify_raw_and_multipart(server, engine):
    _, client = server
    square = uint8((38, 38, 3), seed=6)
    tall = uint8((52, 38, 3), seed=7)
    # resize=38 leaves the shorter side as it is; the centre crop is then exact pixels
    crops = [square[3:35, 3:35], tall[10:42, 3:35]]
    expected = engine.predict(torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous(), topk=2)

    status, answer = client.json("POST", "/v1/classify?topk=2", png(square), {"Content-Type": "image/png"})
    assert status == 200, answer
    assert answer["model"] == "birds"
    assert [p["index"] for p in answer["predictions"][0]] == [p.index for p in expected[0]]
    assert answer["predictions"][0][0]["label"] == expected[0][0].label
    assert abs(answer["predictions"][0][0]["prob"] - expected[0][0].prob) < 1e-5

    boundary = "fastres-test-boundary"
    body = b""
    for name, image in (("a.png", square), ("b.png", tall)):
        body += f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'.encode()
        body += b"Content-Type: image/png\r\n\r\n" + png(image) + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    status, answer = client.json(
        "POST", "/v1/classify?topk=2", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    assert status == 200, answer
    assert [[p["index"] for p in row] for row in answer["predictions"]] == [
        [p.index for p in r] for r in expected
    ]


def test_a_decode_bomb_is_refused_before_decoding_and_the_replica_stays_small(server, engine):
    _, client = server
    bomb = single_colour_png(13000, 13000)  # 555 KB that would decode to 507 MB
    boundary = "fastres-bomb"
    multipart = b""
    for data in (png(uint8((38, 38, 3), seed=15)), bomb):  # a good image first: refused all the same
        multipart += f'--{boundary}\r\nContent-Disposition: form-data; name="file"\r\n\r\n'.encode()
        multipart += data + b"\r\n"
    multipart += f"--{boundary}--\r\n".encode()
    requests = [(bomb, "image/png")] * 3 + [(multipart, f"multipart/form-data; boundary={boundary}")]
    _, stats = client.json("GET", "/v2/models/birds/stats")
    pid = stats["model_stats"][0]["replica"]["pid"]
    assert pid in descendants(os.getpid()), "the replica is a process of the local Ray instance"
    before = peak_rss(pid)  # read from /proc here, not as the replica reports it

    def send(request):
        body, content_type = request
        started = time.monotonic()
        status, answer = client.json("POST", "/v1/classify", body, {"Content-Type": content_type})
        return status, answer, time.monotonic() - started

    for round_ in range(2):  # one at a time, then all at once
        with ThreadPoolExecutor(len(requests) if round_ else 1) as pool:
            answers = list(pool.map(send, requests, timeout=120))
        for status, answer, seconds in answers:
            assert status == 400 and set(answer) == {"error"}, answer
            assert "13000x13000 (169000000 pixels), over the limit" in answer["error"], answer
            assert seconds < 10, f"{seconds:.1f} s to refuse a bomb: was it decoded?"
    grown = peak_rss(pid) - before
    assert grown < 200 << 20, f"the replica's peak RSS grew by {grown >> 20} MB across the bombs"
    square = uint8((38, 38, 3), seed=16)
    status, answer = client.json("POST", "/v1/classify?topk=1", png(square), {"Content-Type": "image/png"})
    assert status == 200, answer
    crop = torch.from_numpy(np.ascontiguousarray(square[3:35, 3:35].transpose(2, 0, 1)))[None]
    assert answer["predictions"][0][0]["index"] == engine.predict(crop, topk=1)[0][0].index


def _header_beyond_body():
    header = infer_body(uint8((1, 3, 4, 4), seed=8))
    return header, {"Inference-Header-Content-Length": str(len(header) + 100)}


BAD = [
    pytest.param("/v2/models/birds/infer", b"{oops", {}, "not valid JSON", id="non-json"),
    pytest.param(
        "/v2/models/birds/infer",
        infer_body(np.ones((1, 3, 4, 4), np.float32), "FP64"),
        {},
        "datatype 'FP64'",
        id="datatype",
    ),
    pytest.param(
        "/v2/models/birds/infer", infer_body(uint8((1, 4, 4, 4), seed=9)), {}, "N x 3 x H x W", id="shape"
    ),
    pytest.param(
        "/v2/models/birds/infer",
        json.dumps(
            {"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 3, 4, 4], "data": [1] * 47}]}
        ),
        {},
        "47 values but the shape needs 48",
        id="data-length",
    ),
    pytest.param(
        "/v2/models/birds/infer", *_header_beyond_body(), "beyond the request body", id="header-length"
    ),
    pytest.param(
        "/v2/models/birds/infer",
        infer_body(uint8((MAX_BATCH + 1, 3, 2, 2), seed=10)),
        {},
        f"{MAX_BATCH + 1} images is over",
        id="batch-limit",
    ),
    pytest.param(  # refused from its Content-Length, before the body is read
        "/v2/models/birds/infer", b"1" * (MAX_BODY + 1), {}, f"limit of {MAX_BODY} bytes", id="body-size"
    ),
    pytest.param(
        "/v2/models/birds/infer",
        json.dumps({"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 3, 1, 1], "data": None}]})
        .replace("null", "[" * 100_000 + "1" + "]" * 100_000)
        .encode(),
        {},
        "nests JSON too deeply",
        id="nested-100000",
    ),
    pytest.param("/v1/classify?topk=%C2%B2", png(uint8((8, 8, 3), seed=11)), {}, "from 1 to 10", id="topk-²"),
    pytest.param(
        "/v2/models/birds/infer",
        infer_body(uint8((1, 3, 200, 200), seed=13)),
        {},
        f"limit of {MAX_PIXELS} pixels",
        id="pixels",
    ),
    pytest.param(
        "/v1/classify", b"not an image", {"Content-Type": "image/jpeg"}, "cannot decode", id="image"
    ),
    pytest.param("/v1/classify?topk=0", png(uint8((8, 8, 3), seed=11)), {}, "from 1 to 10", id="topk"),
]


@pytest.mark.parametrize("path, body, headers, message", BAD)
def test_bad_requests_get_4xx_and_the_replica_keeps_serving(server, engine, path, body, headers, message):
    _, client = server
    status, answer = client.json("POST", path, body, headers)
    assert status == (413 if message.endswith(" bytes") else 400), answer
    assert message in answer["error"], answer
    assert set(answer) == {"error"}
    images = uint8((1, 3, SIZE, SIZE), seed=12)
    status, answer = client.json("POST", "/v2/models/birds/infer", infer_body(images))
    assert status == 200, answer
    assert_close(answer_logits(answer), engine(torch.from_numpy(images)), RTOL, "after a bad request")


def test_concurrent_clients_are_batched_and_answered_exactly(server, engine):
    _, client = server
    _, before = client.json("GET", "/v2/models/birds/stats")
    clients, per_client = 32, 8
    # Mixed sizes and layouts: requests that differ must never share an engine call.
    shapes = [(1, 3, SIZE, SIZE), (2, 3, SIZE, SIZE), (1, SIZE, SIZE, 3), (1, 3, 24, 24)]

    def run_client(c: int) -> list[tuple[np.ndarray, torch.Tensor | str]]:
        conn = http.client.HTTPConnection(client.host, int(client.port), timeout=120)
        results = []
        try:
            for r in range(per_client):
                images = uint8(shapes[(c + r) % len(shapes)], seed=1000 + c * per_client + r)
                status, answer = client.json("POST", "/v2/models/birds/infer", infer_body(images), conn=conn)
                results.append((images, answer_logits(answer) if status == 200 else f"{status}: {answer}"))
        finally:
            conn.close()
        return results

    started = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        answers = [item for chunk in pool.map(run_client, range(clients), timeout=150) for item in chunk]
    assert time.monotonic() - started < 150
    assert len(answers) == clients * per_client
    errors = [a for _, a in answers if isinstance(a, str)]
    assert not errors, errors[:3]
    by_shape: dict[tuple, list] = {}
    for images, logits in answers:
        by_shape.setdefault(images.shape, []).append((images, logits))
    for shape, group in by_shape.items():  # one engine call per shape, then request by request
        expected = engine(torch.from_numpy(np.concatenate([images for images, _ in group])))
        for (_, logits), ref in zip(group, expected.split([len(images) for images, _ in group])):
            assert_close(logits, ref, RTOL, f"images of shape {shape}")

    _, after = client.json("GET", "/v2/models/birds/stats")
    now, then = after["model_stats"][0], before["model_stats"][0]
    requests = now["request_count"] - then["request_count"]
    executions = now["execution_count"] - then["execution_count"]
    assert requests == clients * per_client
    assert now["merged_executions"] > then["merged_executions"], now
    assert executions < requests, f"{executions} engine calls for {requests} requests: nothing was batched"
    assert max(s["batch_size"] for s in now["batch_stats"]) <= MAX_BATCH
