"""fastres serve against bad clients, over real HTTP: a server with an API key, refusals that are 4xx
and fast, a parse that does not stall the others, readiness that answers, Ray on loopback only.

One module-scoped server (Ray starts slowly on a small CPU); the readiness test kills its replica, so
it runs last. tests/test_serve_http.py covers each refusal case by case without a server.
"""

import ipaddress
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'fastres[serve]'")
pytest.importorskip("PIL.Image", reason="Pillow is not installed: pip install 'fastres[serve]'")

from serve_support import (  # noqa: E402
    Client,
    descendants,
    free_port,
    infer_body,
    listening_sockets,
    uint8,
    wait_gone,
)

from fastres.serving import ServeConfig, start  # noqa: E402
from fastres.testing import make_calibrated_model  # noqa: E402

pytestmark = pytest.mark.slow

CLASSES, SIZE, MAX_BATCH = 10, 32, 16
KEY = "k3y-for-tests"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY_TIMEOUT_S = 3
ANSWER_S = 5  # a bound on any answer here: seconds on a loaded 2-CPU machine, never tens


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("security") / "birds.pth"
    torch.save(make_calibrated_model("resnet18", CLASSES, image_size=SIZE).state_dict(), path)
    config = ServeConfig(
        "resnet18",
        weights=str(path),
        name="birds",
        device="cpu",
        backend="torch",
        max_batch=MAX_BATCH,
        batch_wait_ms=5,
        max_body_bytes=4 << 20,  # room for the 2.5 MB many-part body: refused for its parts, not its size
        warmup_size=SIZE,
        body_timeout_s=BODY_TIMEOUT_S,
        api_key=KEY,
    )
    port = free_port()
    running = start(config, port=port, ready_timeout_s=240)
    yield running, Client(running.url, AUTH)
    processes = descendants(os.getpid())
    running.shutdown()
    wait_gone(processes, port)


def _image_request():
    return infer_body(uint8((1, 3, SIZE, SIZE), seed=1))


def test_ray_listens_on_loopback_only_and_wants_a_token(server):
    from ray._raylet import AuthenticationMode, get_authentication_mode

    running, _ = server
    sockets = listening_sockets(descendants(os.getpid()) | {os.getpid()})
    names = {name for *_, name in sockets}
    assert any(n.startswith("ray::ProxyActor") for n in names) and any("gcs_server" in n for n in names), (
        names
    )
    assert any(port == int(running.url.rsplit(":", 1)[1]) for _, port, _, _ in sockets), sockets
    exposed = [s for s in sockets if not ipaddress.ip_address(s[0]).is_loopback]
    # The exception, named: Ray Serve binds each replica's inter-deployment gRPC server to [::]:0,
    # hard-coded (ray/serve/_private/replica.py, Ray 2.60); it takes the token like the rest. One per
    # replica process (the classifier's and the health application's), nothing else.
    replica_grpc = [s for s in exposed if s[3].startswith("ray::ServeReplica") and s[0] in ("::", "0.0.0.0")]
    assert exposed == replica_grpc, f"listening beyond loopback: {exposed}"
    pids = [pid for *_, pid, _ in replica_grpc]
    assert len(pids) == len(set(pids)) <= 2, replica_grpc
    assert get_authentication_mode() == AuthenticationMode.TOKEN


@pytest.mark.parametrize(
    "method, path, allow",
    [
        ("POST", "/v2/models/birds/ready", "GET"),  # the classifier application
        ("DELETE", "/v2/health/live", "GET"),  # the health application
        ("GET", "/v2/models/birds/infer", "POST"),
    ],
)
def test_wrong_methods_get_405_with_allow(server, method, path, allow):
    _, client = server
    status, headers, body = client.request(method, path, b"{}" if method != "GET" else None)
    assert status == 405 and headers["allow"] == allow, (status, headers, body)
    assert b'"error"' in body


def test_the_api_key_guards_all_but_health(server):
    _, client = server
    for method, path, body in [
        ("POST", "/v2/models/birds/infer", _image_request()),
        ("POST", "/v1/classify", b"\x89PNG"),
        ("GET", "/v2/models/birds", None),
        ("GET", "/v2/models/birds/stats", None),
        ("GET", "/v2", None),
    ]:
        for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            status, answer = client.json(method, path, body, headers)
            assert status == 401 and "Authorization: Bearer KEY" in answer["error"], (path, headers, answer)
    assert client.json("POST", "/v2/models/birds/infer", _image_request())[0] == 200
    bare = Client(server[0].url)
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/birds/ready"):
        assert bare.json("GET", path)[0] == 200, path


def test_tritonclient_sends_the_key_with_headers(server):
    http = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")
    from tritonclient.utils import InferenceServerException

    client = http.InferenceServerClient(server[0].url.removeprefix("http://"))
    try:
        assert client.is_server_ready() and client.is_model_ready("birds")  # health: no key
        with pytest.raises(InferenceServerException, match="API key"):
            client.get_model_metadata("birds")
        assert client.get_model_metadata("birds", headers=AUTH)["name"] == "birds"
        images = uint8((2, 3, SIZE, SIZE), seed=2)
        tensor = http.InferInput("input", list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images)
        with pytest.raises(InferenceServerException, match="API key"):
            client.infer("birds", [tensor])
        result = client.infer("birds", [tensor], headers=AUTH)
        assert result.as_numpy("logits").shape == (2, CLASSES)
    finally:
        client.close()


def test_a_250000_part_body_is_refused_fast_and_others_are_answered_meanwhile(server):
    _, client = server
    body = b"--b\r\n\r\nx\r\n" * 250_000 + b"--b--\r\n"  # 2.5 MB; the email parser took ~20 s on it
    multipart = {"Content-Type": "multipart/form-data; boundary=b"}
    refusals, answers, attacking = [], [], threading.Event()

    def attack():
        attacking.set()
        try:
            for _ in range(3):
                started = time.monotonic()
                status, answer = client.json("POST", "/v1/classify", body, multipart)
                refusals.append((status, answer, time.monotonic() - started))
        finally:
            attacking.clear()

    def serve_meanwhile():
        attacking.wait(10)
        deadline = time.monotonic() + 120
        while (attacking.is_set() or not answers) and time.monotonic() < deadline:
            started = time.monotonic()
            status, _ = client.json("POST", "/v2/models/birds/infer", _image_request())
            answers.append((status, time.monotonic() - started))

    with ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(attack), pool.submit(serve_meanwhile)]:
            future.result(timeout=180)
    for status, answer, seconds in refusals:
        assert status == 413 and "250000 parts" in answer["error"], answer
        assert seconds < 2 * ANSWER_S, f"a refusal took {seconds:.1f} s"
    assert answers and all(status == 200 for status, _ in answers), answers
    assert max(seconds for _, seconds in answers) < ANSWER_S, answers


def test_a_slowly_trickled_body_is_cut_off_with_408_and_others_are_answered(server):
    running, client = server
    host, port = running.url.removeprefix("http://").split(":")
    head = (
        "POST /v2/models/birds/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
        f"Authorization: Bearer {KEY}\r\n\r\n"
    )
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=3 * ANSWER_S) as sock:
        sock.sendall(head.encode() + b"{")
        reply = b""
        while b"\r\n\r\n" not in reply and time.monotonic() - started < 2 * ANSWER_S + BODY_TIMEOUT_S:
            assert client.json("POST", "/v2/models/birds/infer", _image_request())[0] == 200
            try:
                sock.sendall(b" ")  # one byte a second: the slowloris pattern, never done
                sock.settimeout(1)
                reply += sock.recv(4096)
            except TimeoutError:
                pass
            except OSError:  # the server closed first: what it sent is in reply
                break
        sock.settimeout(ANSWER_S)
        while b"\r\n\r\n" in reply and not reply.endswith(b"}"):  # the body may come in a later read
            try:
                more = sock.recv(4096)
            except OSError:
                break
            if not more:
                break
            reply += more
    seconds = time.monotonic() - started
    assert reply.startswith(b"HTTP/1.1 408"), reply[:300]
    assert b"did not arrive within 3 s" in reply, reply[:500]
    assert BODY_TIMEOUT_S - 1 < seconds < BODY_TIMEOUT_S + ANSWER_S, seconds


def test_readiness_is_prompt_and_503_while_no_replica_is_up(server):
    """Last: kills the classifier's replica. Serve replaces it; meanwhile ready must say 503, fast."""
    import ray

    _, client = server
    bare = Client(server[0].url)

    def ready() -> int:
        started = time.monotonic()
        status, _ = bare.json("GET", "/v2/health/ready")
        assert time.monotonic() - started < ANSWER_S, "readiness did not answer promptly"
        return status

    assert ready() == 200
    (replica,) = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::birds#")
    ]
    ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
    seen, deadline = [], time.monotonic() + 180
    while not (503 in seen and seen[-1] == 200) and time.monotonic() < deadline:
        seen.append(ready())
        time.sleep(0.1)
    assert 503 in seen, f"never not ready after the replica died: {seen[:20]}"
    assert seen[-1] == 200, "the replacement replica never became ready"
    assert client.json("POST", "/v2/models/birds/infer", _image_request())[0] == 200
