"""`fastres serve`: an Open Inference Protocol (KServe v2) HTTP endpoint on Ray Serve.

Ray Serve provides the HTTP proxy, replicas (one Engine each, one GPU each when the cluster has
GPUs), placement across machines and request batching; this module is the deployment. Concurrent
requests are merged by `@serve.batch` (up to `max_batch` images, waiting at most `batch_wait_ms`)
and split back per request; requests whose images differ in size, dtype or layout run as separate
engine calls. Protocol parsing lives in fastres.oip (testable without Ray).

    from fastres.serve import ServeConfig, start
    server = start(ServeConfig("resnet50", weights="DEFAULT"), port=8000)
    ...  # POST server.url + "/v2/models/resnet50/infer"
    server.shutdown()
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import logging
import os
import re
import signal
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

try:
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import Response
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("fastres.serve needs Ray Serve: pip install 'fastres[serve]'") from exc

import fastres

from . import oip
from .errors import BackendUnavailableError, InputError
from .oip import OIPError

log = logging.getLogger("fastres.serve")

# Ray >= 2.50 can count a batch in images rather than requests (a request may carry several).
_COUNT_IMAGES = (
    {"batch_size_fn": lambda items: sum(item.batch for item in items)}
    if "batch_size_fn" in inspect.signature(serve.batch).parameters
    else {}
)
_MODEL_ROUTE = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<action>/\w+)?$")


@dataclass(frozen=True)
class ServeConfig:
    """What each replica serves; the arguments of `fastres serve` that replicas need."""

    model: str
    weights: str | None = None
    name: str | None = None  # the model name in URLs; MODEL's stem by default
    device: str | None = None  # "cuda" or "cpu"; start() picks cuda when the cluster has GPUs
    dtype: str | None = None
    backend: str | None = None
    num_classes: int | None = None
    labels: str | None = None  # a text file, one class name per line
    mean: tuple[float, float, float] = fastres.IMAGENET_MEAN  # uint8 input is normalised in the stem
    std: tuple[float, float, float] = fastres.IMAGENET_STD
    max_batch: int = 64
    batch_wait_ms: float = 2.0
    max_body_bytes: int = 128 << 20
    # Pixels per request and per engine call (a full batch of 512x512 images): bounds a replica's
    # memory whatever the image size; larger merged batches run in chunks.
    max_pixels: int = 64 * 512 * 512
    warmup_size: int = 224  # image size the replica runs once before it reports ready
    resize: int | None = None  # /v1/classify preprocessing: shorter side to `resize`, centre crop `crop`
    crop: int | None = None

    @property
    def model_name(self) -> str:
        if self.name:
            return self.name
        return os.path.splitext(os.path.basename(str(self.model)))[0]

    def __post_init__(self):
        if min(self.max_batch, self.max_body_bytes, self.max_pixels) < 1 or self.batch_wait_ms < 0:
            raise ValueError("max_batch, max_body_bytes and max_pixels must be positive, batch_wait_ms >= 0")
        if not re.fullmatch(r"[\w.\-]+", self.model_name):
            raise ValueError(
                f"model name {self.model_name!r} must be letters, digits, '_', '-' or '.'; use --name"
            )


@dataclass
class _Item:
    """One request's images on their way through the batcher."""

    images: torch.Tensor
    layout: str

    @property
    def batch(self) -> int:
        return int(self.images.shape[0])

    @property
    def key(self) -> tuple:  # requests with different keys never share an engine call
        return (self.images.dtype, self.layout, tuple(self.images.shape[1:]))


def _json(obj, status: int = 200) -> Response:
    return Response(json.dumps(obj).encode(), status_code=status, media_type="application/json")


def _error(message: str, status: int = 400) -> Response:
    return Response(oip.error_body(message), status_code=status, media_type="application/json")


@serve.deployment(name="fastres", ray_actor_options={"num_cpus": 1})
class ImageClassifier:
    """One replica: an Engine, warmed up in __init__ (Serve reports ready only after it returns)."""

    def __init__(self, config: ServeConfig):
        self.config, self.name = config, config.model_name
        self.engine = fastres.load(
            config.model,
            config.weights,
            device=config.device,
            dtype=config.dtype,
            backend=config.backend,
            num_classes=config.num_classes,
            mean=config.mean,
            std=config.std,
            labels=config.labels,
            max_batch=config.max_batch,
            max_cached_shapes=32,  # batch-size buckets x image sizes x layouts seen
        )
        self.labels = list(self.engine.labels)
        self.stats = oip.InferenceStats()
        # One engine thread: the event loop keeps parsing requests (and queueing the next batch)
        # while a batch runs.
        self._engine_thread = ThreadPoolExecutor(1, thread_name_prefix="fastres-engine")
        self._infer_batch.set_max_batch_size(config.max_batch)
        self._infer_batch.set_batch_wait_timeout_s(config.batch_wait_ms / 1000)
        # CUDA graphs are captured per batch size: pad batches to a few sizes so that dynamic
        # batching does not capture a new graph for every size it happens to merge.
        sizes = {config.max_batch} | {
            1 << i for i in range(config.max_batch.bit_length()) if 1 << i < config.max_batch
        }
        self._buckets = sorted(sizes) if self.engine.cuda_graphs else None
        self._warmup()

    def _warmup(self) -> None:
        size = self.config.warmup_size
        for batch in self._buckets or [1]:
            self._forward(torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8), "NCHW")

    # -- the batch path -------------------------------------------------------------------------

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002, **_COUNT_IMAGES)
    async def _infer_batch(self, items: list[_Item]) -> list[torch.Tensor | Exception]:
        return await asyncio.get_running_loop().run_in_executor(self._engine_thread, self._run_batch, items)

    def _run_batch(self, items: list[_Item]) -> list[torch.Tensor | Exception]:
        groups: dict[tuple, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(item.key, []).append(i)
        results: list = [None] * len(items)
        for indices in groups.values():
            self._run_group(items, indices, results)
        return results

    def _run_group(self, items: list[_Item], indices: list[int], results: list) -> None:
        start = time.perf_counter_ns()
        try:
            x = torch.cat([items[i].images for i in indices])
            logits = self._forward(x, items[indices[0]].layout)
        except Exception as exc:
            if len(indices) > 1:  # find the culprit: one bad request must not fail the others
                for i in indices:
                    self._run_group(items, [i], results)
                return
            log.warning("engine call failed: %s", exc)
            results[indices[0]] = OIPError(str(exc)) if isinstance(exc, InputError) else exc
            self.stats.record_failure(time.perf_counter_ns() - start)
            return
        for i, part in zip(indices, logits.split([items[i].batch for i in indices])):
            results[i] = part
        self.stats.record_execution(len(indices), x.shape[0], time.perf_counter_ns() - start)

    @torch.inference_mode()
    def _forward(self, x: torch.Tensor, layout: str) -> torch.Tensor:
        outputs = []
        pixels = x.shape[1] * x.shape[2] if layout == "NHWC" else x.shape[2] * x.shape[3]
        for chunk in x.split(max(1, min(self.config.max_batch, self.config.max_pixels // pixels))):
            n = chunk.shape[0]
            if self._buckets is not None:
                padded = next(b for b in self._buckets if b >= n)
                if padded > n:
                    chunk = torch.cat([chunk, chunk.new_zeros((padded - n, *chunk.shape[1:]))])
            outputs.append(self.engine(chunk, layout=layout)[:n].float().cpu())
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    async def _submit(self, images: torch.Tensor, layout: str) -> torch.Tensor:
        result = await self._infer_batch(_Item(images, layout))
        if isinstance(result, Exception):
            raise result
        return result

    # -- HTTP -----------------------------------------------------------------------------------

    async def __call__(self, request: Request) -> Response:
        try:
            return await self._route(request)
        except OIPError as exc:
            return _error(str(exc), exc.status)
        except Exception as exc:  # a bug, not the client's fault; the replica stays up
            log.exception("request failed")
            return _error(f"internal error: {type(exc).__name__}: {exc}", 500)

    async def _route(self, request: Request) -> Response:
        path, method = request.url.path.rstrip("/") or "/", request.method
        if path in ("/v2/health/live", "/v2/health/ready"):
            return _json({"live": True} if path.endswith("live") else {"ready": True})
        if path == "/v2":
            return _json({"name": "fastres", "version": fastres.__version__, "extensions": oip.EXTENSIONS})
        if path == "/v1/classify":
            self._expect(method, "POST")
            return await self._classify(request)
        match = _MODEL_ROUTE.match(path)
        if match is None:
            raise OIPError(f"no route {method} {path}; see GET /v2/models/{self.name}", 404)
        if match["name"] != self.name or match["version"] not in (None, "1"):
            raise OIPError(
                f"unknown model {match['name']!r} (version {match['version'] or 'any'}); "
                f"this server serves {self.name!r} version 1",
                404,
            )
        action = match["action"]
        if action is None:
            self._expect(method, "GET")
            return _json(oip.model_metadata(self.name, len(self.labels)))
        if action == "/ready":
            return _json({"name": self.name, "ready": True})
        if action == "/stats":
            return _json(self.stats.triton_statistics(self.name))
        if action == "/infer":
            self._expect(method, "POST")
            return await self._infer(request)
        raise OIPError(f"no route {method} {path}", 404)

    @staticmethod
    def _expect(method: str, allowed: str) -> None:
        if method != allowed:
            raise OIPError(f"use {allowed} here, not {method}", 405)

    async def _body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length", "")
        too_big = (
            f"request body is over this server's limit of {limit} bytes (--max-body-mb); split the batch"
        )
        if declared.isdigit() and int(declared) > limit:
            raise OIPError(too_big)
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise OIPError(too_big)
            chunks.append(chunk)
        return b"".join(chunks)

    async def _infer(self, request: Request) -> Response:
        body = await self._body(request)
        parsed = oip.parse_infer_request(
            body,
            request.headers.get("inference-header-content-length"),
            num_classes=len(self.labels),
            max_batch=self.config.max_batch,
            max_pixels=self.config.max_pixels,
        )
        images = torch.from_numpy(np.array(parsed.images))  # a writable copy: frombuffer is read-only
        logits = await self._submit(images, parsed.layout)
        outputs = oip.build_outputs(parsed, logits.numpy(), self.labels)
        payload, headers = oip.encode_infer_response(self.name, outputs, parsed.id)
        return Response(payload, headers=headers)

    async def _classify(self, request: Request) -> Response:
        topk = request.query_params.get("topk", str(min(oip.DEFAULT_TOPK, len(self.labels))))
        k = oip.parse_topk(int(topk) if topk.isdigit() else topk, len(self.labels), "query parameter 'topk'")
        body = await self._body(request)
        files = oip.split_multipart(body, request.headers.get("content-type", ""))
        if len(files) > self.config.max_batch:
            raise OIPError(f"{len(files)} images are over this server's limit of {self.config.max_batch}")
        loop = asyncio.get_running_loop()
        images = await loop.run_in_executor(None, lambda: torch.stack([self._preprocess(f) for f in files]))
        logits = await self._submit(images, "NCHW")
        return _json({"model": self.name, "predictions": oip.top_predictions(logits.numpy(), self.labels, k)})

    def _preprocess(self, data: bytes) -> torch.Tensor:
        try:
            return _decode_resize_crop(data, self.config.resize, self.config.crop)
        except InputError as exc:
            raise OIPError(str(exc)) from None


def _decode_resize_crop(data: bytes, resize: int | None, crop: int | None) -> torch.Tensor:
    """uint8 3 x crop x crop RGB: shorter side resized to `resize`, centre crop (torchvision's eval recipe).

    Private stand-in until fastres.images / fastres.transforms are on main.
    """
    import io

    from PIL import Image, UnidentifiedImageError

    crop = crop or 224
    resize = resize or round(crop * 256 / 224)
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(
            f"the image does not decode ({exc}); send a JPEG, PNG or other Pillow-readable file"
        ) from None
    w, h = img.size
    scale = resize / min(w, h)
    img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - crop) // 2, (h - crop) // 2
    img = img.crop((left, top, left + crop, top + crop))
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()


# -- the driver: start Ray (or join a cluster), deploy, wait until HTTP answers, shut down ----------


@dataclass
class Server:
    """A running deployment. shutdown() removes it and stops the Ray instance start() started."""

    url: str
    name: str
    owns_ray: bool  # start() started this Ray instance (not one it joined)
    owns_serve: bool  # Serve was not running before start()

    def shutdown(self) -> None:
        import ray

        try:
            if self.owns_serve:
                serve.shutdown()  # the HTTP proxy goes too: the port is free again
            else:
                serve.delete(self.name)
        finally:
            ray.shutdown()  # stops the processes of an instance this driver started; else disconnects


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
    import ray

    if replicas < 1 or not 0 < gpus_per_replica <= 1:
        raise ValueError(
            "replicas must be at least 1 and gpus_per_replica in (0, 1]; add replicas for more GPUs"
        )
    if address is None:  # on a cluster the files need only exist on the nodes that run replicas
        _preflight(config)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network calls from a server
    owns_ray = address is None and not ray.is_initialized()
    if not ray.is_initialized():
        if address is None:  # a private instance: nothing joins it, so it listens on loopback only
            ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1")
        else:
            ray.init(address=address)
    owns_serve = False
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
        app = ImageClassifier.options(
            num_replicas=replicas,
            ray_actor_options=actor,
            # Room for a full batch in flight and the next one queueing behind it.
            max_ongoing_requests=max(2 * config.max_batch, 8),
        ).bind(dataclasses.replace(config, device=device))
        # Per-request access logs cost more than a small model's inference on a loaded CPU.
        try:
            serve.run(
                app, name=config.model_name, route_prefix="/", logging_config={"enable_access_log": False}
            )
        except RuntimeError as exc:
            raise BackendUnavailableError(f"{exc} (the replicas' errors are in the log above)") from None
        loopback = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        server = Server(f"http://{loopback}:{port}", config.model_name, owns_ray, owns_serve)
        _wait_ready(server.url + "/v2/health/ready", ready_timeout_s)
        return server
    except BaseException:
        Server("", config.model_name, owns_ray, owns_serve).shutdown()
        raise


def _preflight(config: ServeConfig) -> None:
    """Load the model once on this machine's CPU, so that a bad checkpoint, labels file or option
    fails here in one line before Ray starts, not as three replica tracebacks after it."""
    fastres.load(
        config.model,
        config.weights,
        device="cpu",
        backend="torch",
        num_classes=config.num_classes,
        mean=config.mean,
        std=config.std,
        labels=config.labels,
    )


def _even_cpu_share(ray, replicas: int) -> float:
    nodes = [node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]]
    return max(1, min(max(nodes), sum(nodes) // replicas))


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
    server.shutdown()
    return 0
