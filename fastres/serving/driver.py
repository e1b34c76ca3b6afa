"""`fastres serve`: an Open Inference Protocol (KServe v2) HTTP endpoint on Ray Serve.

Ray Serve provides the HTTP proxy, replicas (one Engine each, one GPU each when the cluster has
GPUs), placement across machines and request batching; fastres provides the configuration
(fastres.serving.config), the deployment (fastres.serving.deployment) and the protocol
(fastres.serving.protocol); the configuration and the protocol import without Ray. This module is the
driver: it starts a local Ray instance or joins a cluster, deploys, waits until HTTP answers, and
shuts down what it started. It imports Ray and the deployment only when start() runs.

    from fastres.serving import ServeConfig, start
    server = start(ServeConfig("resnet50", weights="DEFAULT"), port=8000)
    ...  # POST server.url + "/v2/models/resnet50/infer"
    server.shutdown()
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import signal
import time
import urllib.request
from dataclasses import dataclass

from ..api import dtype_name, load, parse_dtype
from ..calibration import check_record, is_saved_calibration, read_record, weights_hash
from ..errors import BackendUnavailableError, ConfigError
from ..quantize import QUANTIZED_DTYPES
from .config import ServeConfig

# -- the driver: start Ray (or join a cluster), deploy, wait until HTTP answers, shut down ----------


SERVE_SHUTDOWN_TIMEOUT_S = 10.0  # replicas draining their requests; a local instance is killed after


def _health_app(name: str) -> str:
    return f"{name}-health"


@dataclass
class Server:
    """A running deployment. shutdown() removes it and stops the Ray instance start() started."""

    url: str
    name: str
    owns_serve: bool  # Serve was not running before start()
    connected_ray: bool  # start() called ray.init: it started a local instance or joined a cluster
    # The local Ray processes (GCS, raylet, monitors) and Serve's controller, when start() started them
    # on this machine: shutdown() watches them for a signal that reached them too.
    ray_pids: tuple[int, ...] = ()
    controller_pid: int | None = None

    def shutdown(self, timeout_s: float = SERVE_SHUTDOWN_TIMEOUT_S, settle_s: float = 0.0) -> None:
        """timeout_s bounds Serve's graceful shutdown (its own default is 30 s); settle_s is how long to
        watch for Ray's local processes stopping on their own (a signal to the whole process group)."""
        import ray
        from ray import serve

        try:
            if self.owns_serve:
                if _local_ray_intact((*self.ray_pids, self.controller_pid), settle_s):
                    _shutdown_serve(timeout_s)  # the HTTP proxy goes too: the port is free again
                # else Ray's processes got the signal too: no controller will answer a graceful
                # shutdown, and ray.shutdown below stops what is left of them (the proxy included).
            else:
                serve.delete(_health_app(self.name))
                serve.delete(self.name)
        finally:
            if self.connected_ray:  # stops a local instance this driver started; leaves a cluster running
                ray.shutdown()


def _local_ray_intact(pids: tuple, settle_s: float) -> bool:
    """False once one of `pids` (Ray processes this driver started, Serve's controller) has exited.
    Under systemd or Kubernetes SIGTERM reaches the whole process group: Ray's monitors and agents
    stop beside this one (GCS and raylet do not), and a graceful Serve shutdown then waits out its
    timeout. Watched for `settle_s`, since they exit a moment after the signal."""
    deadline = time.monotonic() + settle_s
    while True:
        if not all(_running(pid) for pid in pids):
            return False
        if time.monotonic() >= deadline:
            return True
        time.sleep(0.1)


def _running(pid: int | None) -> bool:
    if pid is None:  # not known: assume it runs
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return not os.path.isdir("/proc/self")  # gone, unless there is no /proc to look in


def _shutdown_serve(timeout_s: float) -> None:
    """serve.shutdown() with a bound: its controller call waits 30 s, not configurable in Ray 2.60."""
    from ray.serve import context

    client, had_cached = context._check_cached_client_alive()  # a 5 s health check of the controller
    if client is None:
        if had_cached:  # it was there and does not answer: the GCS is gone too, nothing to ask
            return
        try:
            client = context._get_global_client()
        except Exception:  # no Serve instance to shut down
            return
    client.shutdown(timeout_s=timeout_s)
    context._disconnect()


def start(
    config: ServeConfig,
    *,
    replicas: int = 1,
    gpus_per_replica: float = 1.0,
    cpus_per_replica: float | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    ready_timeout_s: float = 600.0,
    _after_ray_init=None,
) -> Server:
    """Deploy `config` on Ray Serve and return once GET /v2/health/ready answers over HTTP.

    address: a Ray cluster to join ("auto", "ray://...", "HOST:6379"); None starts a local instance.
    On GPUs each replica holds `gpus_per_replica` (at most 1: an Engine runs on one GPU; 0.5 packs
    two replicas per GPU); on CPUs each gets `cpus_per_replica` (default: the CPUs divided evenly).
    """
    ray, serve, deployment = _import_ray_serve()
    if replicas < 1 or not 0 < gpus_per_replica <= 1:
        raise ConfigError(
            "replicas must be at least 1 and gpus_per_replica in (0, 1]; add replicas for more GPUs"
        )
    if address is None:  # on a cluster the files need only exist on the nodes that run replicas
        _preflight(config)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network calls from a server
    connected_ray = not ray.is_initialized()
    if connected_ray:
        if address is None:  # a private instance: nothing joins it, so it listens on loopback only
            _start_local_ray(ray)
        else:
            ray.init(address=address)
    owns_serve = False
    # Ray's helper processes (monitors, dashboard) exit on a SIGTERM to the group; GCS and raylet don't.
    ray_pids = _local_ray_pids(ray) if connected_ray and address is None else ()
    try:
        if _after_ray_init is not None:
            _after_ray_init()
        gpus = ray.cluster_resources().get("GPU", 0)
        device = config.device or ("cuda" if gpus else "cpu")
        if device.startswith("cuda"):
            if not gpus:
                raise BackendUnavailableError(
                    "--device cuda, but the Ray cluster has no GPUs; use --device cpu"
                )
            actor = {"num_gpus": gpus_per_replica, "num_cpus": 1}
        else:
            actor = {"num_gpus": 0, "num_cpus": cpus_per_replica or _even_cpu_share(ray, replicas)}
        owns_serve = not _serve_running(ray)
        serve.start(http_options={"host": host, "port": port})
        app = deployment.ImageClassifier.options(
            num_replicas=replicas,
            ray_actor_options=actor,
            # Room for a full batch in flight and the next one queueing behind it.
            max_ongoing_requests=max(2 * config.max_batch, 8),
        ).bind(dataclasses.replace(config, device=device))
        # Per-request access logs cost more than a small model's inference on a loaded CPU.
        logging_config = {"enable_access_log": False}
        try:
            # Health first, as an application of its own: /v2/health/ready answers 503 promptly while
            # the classifier's replicas start (or whenever none is up) instead of queueing.
            health = deployment.Health.bind(config.model_name)
            serve.run(
                health,
                name=_health_app(config.model_name),
                route_prefix="/v2/health",
                logging_config=logging_config,
            )
            serve.run(app, name=config.model_name, route_prefix="/", logging_config=logging_config)
        except RuntimeError as exc:
            raise BackendUnavailableError(f"{exc} (the replicas' errors are in the log above)") from None
        loopback = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        server = Server(f"http://{loopback}:{port}", config.model_name, owns_serve, connected_ray, ray_pids)
        if owns_serve and address is None:  # a local controller: shutdown() can see whether it died
            server.controller_pid = _controller_pid(ray)
        _wait_ready(server.url + "/v2/health/ready", ready_timeout_s)
        return server
    except BaseException as exc:  # a signal (KeyboardInterrupt) may have reached Ray's processes too
        settle_s = 1.0 if isinstance(exc, KeyboardInterrupt) else 0.0
        Server("", config.model_name, owns_serve, connected_ray, ray_pids).shutdown(settle_s=settle_s)
        raise


def _start_local_ray(ray) -> None:
    """A local instance: nothing joins it, so no port of it should be reachable from the network, and
    every Ray RPC and HTTP endpoint wants a token. Environment variables, since Ray's processes (GCS,
    raylet, agents, workers) read them when they start; they stay set for the rest of this process, as
    Ray's own default token mode does."""
    from ray._private import ray_constants

    # On (the Linux default), ray.init "resolves" the node address 127.0.0.1 to the machine's network
    # address and the agents listen there. Off, every Ray listener is on loopback but the Serve
    # replicas' inter-deployment gRPC port, which Ray binds to [::] unconditionally (README: Serving).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # Ray read RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when it was imported (before start() ran, usually);
    # this process resolves its node address with the value read then.
    ray_constants.ENABLE_RAY_CLUSTER = os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] not in ("0", "false")
    if "RAY_AUTH_MODE" not in os.environ:  # set by the user (even to "disabled"): Ray's to honour
        _enable_ray_token_auth()
    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1")


def _enable_ray_token_auth() -> None:
    """RAY_AUTH_MODE=token for this process and the Ray processes it starts, with a token private to
    it unless the user set one (Ray would write one to ~/.ray/auth_token, shared by all their clusters)."""
    try:  # Ray >= 2.52; Ray's own switch, which also refreshes the config this process read at import
        from ray._private.authentication.authentication_token_setup import _enable_token_auth
        from ray._raylet import AuthenticationTokenLoader
    except ImportError:  # an older Ray has no token authentication
        return
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # 256 bits, as Ray's own tokens
    _enable_token_auth()
    AuthenticationTokenLoader.instance().reset_cache()  # the token may have been looked up before


def _preflight(config: ServeConfig) -> None:
    """Load the model once on this machine's CPU, so that a bad checkpoint, labels file or option
    fails here in one line before Ray starts, not as three replica tracebacks after it."""
    dtype = parse_dtype(config.dtype) if config.dtype is not None else None  # the replicas' dtype
    if (dtype in QUANTIZED_DTYPES) != bool(config.calibration):
        raise ConfigError(
            "--dtype int8 (or fp8) and --calibration go together (make the file with `fastres calibrate`)"
        )
    if config.calibration and not is_saved_calibration(config.calibration):
        raise ConfigError(
            f"--calibration must be a .json from `fastres calibrate`, got {config.calibration}: "
            "replicas read one saved calibration rather than each calibrating"
        )
    # This check loads in float32 on the CPU, whatever the replicas run.
    engine = load(
        config.model,
        config.weights,
        device="cpu",
        backend="torch",
        num_classes=config.num_classes,
        features=config.features,
        mean=config.mean,
        std=config.std,
        labels=config.labels,
    )
    if config.calibration:
        record = read_record(config.calibration)
        # The replicas' backend where the options say it (a GPU runs triton), else the record's own.
        by_device = {"cuda": "triton", "cpu": "openvino"}
        replica_backend = config.backend or by_device.get(config.device or "", record.backend)
        check_record(
            record,
            config.calibration,
            model=engine.architecture.name,
            weights_sha256=weights_hash(engine.state_dict()),
            backend=replica_backend,
            dtype=dtype_name(dtype),
        )


def _import_ray_serve():
    try:
        import ray
        from ray import serve

        from . import deployment
    except ImportError as exc:
        raise BackendUnavailableError(
            f"fastres serve needs Ray Serve: pip install 'fastres[serve]' ({exc})"
        ) from None
    return ray, serve, deployment


def _even_cpu_share(ray, replicas: int) -> float:
    nodes = [node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]]
    return max(1, min(max(nodes), sum(nodes) // replicas))


def _local_ray_pids(ray) -> tuple[int, ...]:
    node = getattr(ray._private.worker, "_global_node", None)
    return tuple(process.pid for _, process in node.live_processes()) if node is not None else ()


def _controller_pid(ray) -> int | None:
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return int(ray.get(controller.get_pid.remote(), timeout=10))
    except Exception:  # an older Serve without get_pid, or no answer: shutdown() assumes it runs
        return None


def _serve_running(ray) -> bool:
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return True
    except ValueError:
        return False


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, whatever http_proxy says


def _wait_ready(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with _NO_PROXY.open(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BackendUnavailableError(f"the deployment did not answer {url} within {timeout_s:.0f} s")
        time.sleep(0.2)


def _interrupt(signum, frame):
    # SIGTERM acts as Ctrl-C: unwinds start() or the wait below into a clean shutdown. Installed after
    # ray.init, whose own SIGTERM handlers would otherwise exit without stopping what it started.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)  # one shutdown, not interrupted by a second signal
    raise KeyboardInterrupt


def serve_forever(config: ServeConfig, **start_options) -> int:
    """`fastres serve`: deploy, print the URL, run until SIGTERM or Ctrl-C, then shut down cleanly."""

    def handle_signals():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _interrupt)

    try:
        server = start(config, _after_ray_init=handle_signals, **start_options)
    except KeyboardInterrupt:
        return 130  # start() has already shut down what it started
    name = config.model_name
    print(f"fastres: serving {name} at {server.url}/v2/models/{name} (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    print("fastres: shutting down", flush=True)
    server.shutdown(settle_s=1.0)
    return 0
