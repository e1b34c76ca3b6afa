"""fastres serve on a Ray cluster: `fastres serve --address` joins a two-node cluster, as a user runs it.

The cluster is Ray's own test cluster (ray.cluster_utils.Cluster): a head and a worker node on this
machine, each a raylet of its own with one CPU, on loopback, with token authentication on (the token
in a file, RAY_AUTH_TOKEN_PATH, as README's cluster section sets it up). This process is a driver of
the cluster too: it deploys an application of its own first, so that stopping `fastres serve` can be
seen to remove only fastres's, and it reads the replicas' placement from the GCS actor table.
"""

import ipaddress
import os
import secrets
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'fastres[serve]'")

from serve_support import (  # noqa: E402
    Client,
    ServeProcess,
    alive,
    answer_logits,
    descendants,
    free_port,
    infer_body,
    listening_sockets,
    uint8,
)

import fastres  # noqa: E402
from fastres.numerics import LAYER_RTOL, assert_close  # noqa: E402
from fastres.testing import make_calibrated_model  # noqa: E402

pytestmark = pytest.mark.slow

CLASSES, SIZE = 10, 32
RTOL = LAYER_RTOL[torch.float32]
NAME = "birds"
# Token authentication and loopback for every process of the cluster and its drivers: Ray's processes
# read these when they start, and `fastres serve` inherits them from this process.
CLUSTER_ENV = {
    "RAY_AUTH_MODE": "token",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # node address 127.0.0.1 stays loopback
}


def _set_token_auth(env: dict[str, str | None]) -> None:
    """Set (or, for None, remove) these variables, and make this process's Ray read them again."""
    from ray._private import ray_constants
    from ray._raylet import AuthenticationTokenLoader, Config

    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    # read at import too; unset, Linux's default is on
    cluster_mode = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    ray_constants.ENABLE_RAY_CLUSTER = cluster_mode not in ("0", "false")
    Config.initialize("")  # Ray's config (the auth mode among it) was read at import
    AuthenticationTokenLoader.instance().reset_cache()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import ray
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized()
    token = tmp_path_factory.mktemp("cluster") / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {**CLUSTER_ENV, "RAY_AUTH_TOKEN_PATH": str(token), "RAY_AUTH_TOKEN": None}
    saved = {key: os.environ.get(key) for key in env}
    _set_token_auth(env)
    node = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        cluster.add_node(**node)
        cluster.wait_for_nodes(timeout=60)
        ray.init(address=cluster.address)
        yield cluster
    finally:
        try:
            from ray import serve

            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()
            _set_token_auth(saved)
    left = [p for p in descendants(os.getpid()) if _is_ray_process(p)]
    assert not left, f"Ray processes left after the cluster's shutdown: {left}"


def _is_ray_process(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"ray" in f.read()
    except OSError:
        return False


def _is_replica_grpc(socket) -> bool:
    address, _, _, name = socket
    return name.startswith("ray::ServeReplica") and address in ("::", "0.0.0.0")


def _alive_nodes(ray) -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def _replica_nodes(ray, app: str) -> dict[int, str]:
    """pid -> node id of each live replica of application `app` (Serve names its actors by app)."""
    from ray._private import state

    return {
        actor["Pid"]: actor["Address"]["NodeID"]
        for actor in state.actors().values()
        if actor["State"] == "ALIVE" and actor["Name"].startswith(f"SERVE_REPLICA::{app}#")
    }


def _deploy_other_app(port: int) -> Client:
    """An application that is not fastres's, on the same Serve instance (route /other)."""
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    def other(request):
        return "other app"

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(other.bind(), name="other", route_prefix="/other")
    return Client(f"http://127.0.0.1:{port}")


def test_token_authentication_refuses_a_driver_without_the_token(cluster):
    code = "import ray, sys; ray.init(address=sys.argv[1]); print('connected')"
    env = {**os.environ, "RAY_AUTH_TOKEN": secrets.token_hex(32)}  # a wrong token wins over the file
    env.pop("RAY_AUTH_TOKEN_PATH")
    wrong = subprocess.run(
        [sys.executable, "-c", code, cluster.address], env=env, capture_output=True, text=True, timeout=120
    )
    assert wrong.returncode != 0 and "connected" not in wrong.stdout, wrong.stdout + wrong.stderr[-2000:]
    assert "AuthenticationError" in wrong.stderr and "InvalidAuthToken" in wrong.stderr, wrong.stderr[-2000:]


def test_serve_joins_places_a_replica_per_node_and_leaves_the_cluster(cluster, tmp_path):
    import ray

    nodes = _alive_nodes(ray)
    assert len(nodes) == 2
    weights = tmp_path / "birds.pth"
    torch.save(make_calibrated_model("resnet18", CLASSES, image_size=SIZE).state_dict(), weights)
    port = free_port()
    other = _deploy_other_app(port)
    assert other.request("GET", "/other")[::2] == (200, b"other app")

    # One CPU per replica on one-CPU nodes: Ray must put one replica on each node.
    args = ["resnet18", "--weights", str(weights), "--name", NAME, "--address", cluster.address]
    args += ["--replicas", "2", "--cpus-per-replica", "1", "--device", "cpu", "--backend", "torch"]
    args += ["--dtype", "fp32", "--max-batch", "4", "--warmup-size", str(SIZE)]
    server = ServeProcess(args, port)
    children: set[int] = set()
    try:
        server.wait_serving(timeout_s=300)
        children = descendants(server.process.pid)
        replicas = _replica_nodes(ray, NAME)
        assert sorted(replicas.values()) == sorted(nodes), (replicas, nodes)
        # Both nodes' processes are this one's children: none listens beyond loopback, but for the
        # one named exception (tests/test_serve_security.py): each Serve replica's gRPC port on [::].
        sockets = listening_sockets(descendants(os.getpid()))
        names = " ".join(name for *_, name in sockets)
        assert "gcs_server" in names and names.count("raylet") >= 2, sockets
        exposed = [s for s in sockets if not ipaddress.ip_address(s[0]).is_loopback]
        replica_grpc = [s for s in exposed if _is_replica_grpc(s)]
        assert exposed == replica_grpc, f"listening beyond loopback: {exposed}"

        client = Client(f"http://127.0.0.1:{port}")
        engine = fastres.load("resnet18", str(weights), device="cpu", backend="torch")
        clients, per_client = 8, 4

        def run_client(c: int):
            answers = []
            for r in range(per_client):
                images = uint8((1, 3, SIZE, SIZE), seed=100 + c * per_client + r)
                status, answer = client.json("POST", f"/v2/models/{NAME}/infer", infer_body(images))
                answers.append((images, answer_logits(answer) if status == 200 else f"{status}: {answer}"))
            return answers

        with ThreadPoolExecutor(clients) as pool:
            answers = [a for chunk in pool.map(run_client, range(clients), timeout=240) for a in chunk]
        assert not [a for _, a in answers if isinstance(a, str)], answers[:3]
        for images, logits in answers:
            assert_close(logits, engine(torch.from_numpy(images)), RTOL, "a replica's logits")

        # Each replica counts its own requests: ask until both have answered the stats route (Serve's
        # router picks a replica per request), a bounded number of times.
        seen: dict[int, dict] = {}
        for _ in range(60):
            status, stats = client.json("GET", f"/v2/models/{NAME}/stats")
            assert status == 200, stats
            (model,) = stats["model_stats"]
            seen[model["replica"]["pid"]] = model
            if len(seen) == 2:
                break
        assert set(seen) == set(replicas), f"the stats route was answered by {sorted(seen)}, not {replicas}"
        assert {m["replica"]["node_id"] for m in seen.values()} == nodes
        counts = [m["request_count"] for m in seen.values()]
        assert min(counts) > 0 and sum(counts) == clients * per_client, counts
    finally:
        code = server.stop()
    assert code == 0, server.tail()
    deadline = time.monotonic() + 30  # a driver only: it started no Ray process that should outlive it
    while alive(children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(children), f"processes of `fastres serve` left running: {sorted(alive(children))}"

    # Only fastres's applications went: the other app, the nodes and the scheduler are all still up.
    deadline = time.monotonic() + 60
    while _replica_nodes(ray, NAME) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _replica_nodes(ray, NAME), "fastres's replicas outlived `fastres serve`"
    assert other.request("GET", "/other")[::2] == (200, b"other app")
    assert other.request("GET", "/v2/health/ready")[0] == 404  # fastres's health app is gone too
    assert _alive_nodes(ray) == nodes

    @ray.remote(num_cpus=1)
    def square(x):
        return x * x

    assert ray.get([square.remote(i) for i in range(4)], timeout=120) == [0, 1, 4, 9]
