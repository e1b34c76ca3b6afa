"""The Ray Serve deployment behind `fastres serve`: one Engine per replica, dynamic batching.

Concurrent requests are merged by `@serve.batch` (up to `max_batch` images, waiting at most
`batch_wait_ms`) and split back per request; requests whose images differ in size, dtype or layout
run as separate engine calls. Every client error is a 4xx with an {"error": ...} body (fastres.serving.http
says which), and bodies are parsed off the event loop: nothing a client sends stops or stalls the replica.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

try:
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import Response
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("fastres serve needs Ray Serve: pip install 'fastres[serve]'") from exc

import fastres

from ..api import resolve_backend
from ..checkpoints import is_weight_name
from ..errors import InputError, RequestError
from ..images import decode_image
from . import http, protocol
from .config import ServeConfig
from .outputs import EMBEDDING, RUN_ALL, RUN_BOTH, RUN_EMBEDDING, RUN_LOGITS, served_outputs
from .protocol import OIPError

log = logging.getLogger("fastres.serve")

# Newer Ray Serve counts a batch with batch_size_fn: in images rather than requests (a request may
# carry several). Older versions count requests; the engine still runs at most max_batch at a time.
_COUNT_IMAGES = (
    {"batch_size_fn": lambda items: sum(item.batch for item in items)}
    if "batch_size_fn" in inspect.signature(serve.batch).parameters
    else {}
)


@dataclass
class _Item:
    """One request's images on their way through the batcher."""

    images: torch.Tensor
    layout: str
    run: str = RUN_LOGITS  # what the engine computes for it (fastres.serving.outputs)

    @property
    def batch(self) -> int:
        return int(self.images.shape[0])

    @property
    def key(self) -> tuple:  # requests with different keys never share an engine call
        return (self.images.dtype, self.layout, tuple(self.images.shape[1:]), self.run)


def _json(obj, status: int = 200) -> Response:
    return Response(json.dumps(obj).encode(), status_code=status, media_type="application/json")


def _error(message: str, status: int = 400, headers: dict[str, str] | None = None) -> Response:
    return Response(
        protocol.error_body(message), status_code=status, headers=headers, media_type="application/json"
    )


def replica_cpu_threads() -> int | None:
    """The CPUs Ray gave this replica, as OpenVINO's thread count (None outside a Ray actor).

    Torch follows the OMP_NUM_THREADS that Ray sets per actor; OpenVINO's own thread pool would
    otherwise take every core of the node, and replicas sharing a node would oversubscribe it.
    """
    try:
        import ray

        if not ray.is_initialized():  # get_runtime_context() would start a local Ray instance
            return None
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # not in a Ray worker
        return None
    return max(1, int(cpus)) if cpus else None


def replica_process() -> dict:
    """Which replica answered and what it holds: its Ray node, pid and memory (RSS now, and the peak).

    In the stats, so that a client sees which replicas share the load (on which nodes), and that a
    request did not take a replica's memory up (the peak is the high-water mark: a spike shows there
    even once it is freed)."""
    node_id = None
    try:
        import ray

        if ray.is_initialized():
            node_id = ray.get_runtime_context().get_node_id()
    except Exception:  # not in a Ray worker
        pass
    memory = {}
    try:  # Linux: VmRSS now, VmHWM its high-water mark, in kB
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    memory[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    rss, peak = memory.get("VmRSS"), memory.get("VmHWM")
    return {"node_id": node_id, "pid": os.getpid(), "rss_bytes": rss, "peak_rss_bytes": peak}


@serve.deployment(name="fastres", ray_actor_options={"num_cpus": 1})
class ImageClassifier:
    """One replica: an Engine, warmed up in __init__ (Serve reports ready only after it returns)."""

    def __init__(self, config: ServeConfig):
        self.config, self.name = config, config.model_name
        backend = resolve_backend(config.device, config.backend)
        self.engine = fastres.load(
            config.model,
            config.weights,
            device=config.device,
            dtype=config.dtype,
            backend=config.backend,
            num_classes=config.num_classes,
            features=config.features,
            mean=config.mean,
            std=config.std,
            labels=config.labels,
            max_batch=config.max_batch,
            max_cached_shapes=32,  # batch-size buckets x image sizes x layouts seen
            threads=replica_cpu_threads() if backend == "openvino" else None,
            **({"tune": True} if config.tune and backend == "triton" else {}),
            **({"calibration": config.calibration} if config.calibration else {}),
        )
        self.labels = list(self.engine.labels)
        self.outputs = served_outputs(self.engine)
        self._fc = self._fc_weights()
        # /v1/classify's preprocessing: torchvision's evaluation recipe for these weights, as `fastres
        # classify` uses (resize and crop overridable).
        weight_name = config.weights if config.weights and is_weight_name(config.weights) else None
        model = self.engine.architecture.spec.name
        self.transform = fastres.transforms(weight_name, model=model, resize=config.resize, crop=config.crop)
        self.stats = protocol.InferenceStats()
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

    def _fc_weights(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The fc in float32 on the engine's device, to take logits from an embedding (RUN_BOTH); None
        where the embedding runs on other numerics than the logits (int8 OpenVINO: embed() runs the
        torch backend in float32), so that logits come from the engine itself."""
        if not self.outputs.classifier or not self.engine.backend.runs_cut_plans:
            return None
        state = self.engine.state_dict()
        weight, bias = state["fc.weight"], state.get("fc.bias")
        bias = torch.zeros(weight.shape[0]) if bias is None else bias
        return weight.to(self.engine.device, torch.float32), bias.to(self.engine.device, torch.float32)

    def _warmup(self) -> None:
        size = self.config.warmup_size
        # The embedding path too: its cut plan is built (and on GPUs compiled, graphs captured) once.
        runs = (RUN_LOGITS, RUN_BOTH) if self.outputs.classifier else (RUN_ALL,)
        for batch in self._buckets or [1]:
            for run in runs:
                self._forward(torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8), "NCHW", run)

    # -- the batch path -------------------------------------------------------------------------

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002, **_COUNT_IMAGES)
    async def _infer_batch(self, items: list[_Item]) -> list[dict[str, torch.Tensor] | Exception]:
        return await asyncio.get_running_loop().run_in_executor(self._engine_thread, self._run_batch, items)

    def _run_batch(self, items: list[_Item]) -> list[dict[str, torch.Tensor] | Exception]:
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
            computed = self._forward(x, items[indices[0]].layout, items[indices[0]].run)
        except Exception as exc:
            if len(indices) > 1:  # find the culprit: one bad request must not fail the others
                for i in indices:
                    self._run_group(items, [i], results)
                return
            log.warning("engine call failed: %s", exc)
            results[indices[0]] = OIPError(str(exc)) if isinstance(exc, InputError) else exc
            self.stats.record_failure(time.perf_counter_ns() - start)
            return
        parts = {name: t.split([items[i].batch for i in indices]) for name, t in computed.items()}
        for j, i in enumerate(indices):
            results[i] = {name: split[j] for name, split in parts.items()}
        self.stats.record_execution(len(indices), x.shape[0], time.perf_counter_ns() - start)

    @torch.inference_mode()
    def _forward(self, x: torch.Tensor, layout: str, run: str = RUN_LOGITS) -> dict[str, torch.Tensor]:
        """What `run` computes for images `x`: name -> float32 CPU tensor, the batch in chunks."""
        outputs = []
        pixels = x.shape[1] * x.shape[2] if layout == "NHWC" else x.shape[2] * x.shape[3]
        for chunk in x.split(max(1, min(self.config.max_batch, self.config.max_pixels // pixels))):
            n = chunk.shape[0]
            if self._buckets is not None:
                padded = next(b for b in self._buckets if b >= n)
                if padded > n:
                    chunk = torch.cat([chunk, chunk.new_zeros((padded - n, *chunk.shape[1:]))])
            computed = self._compute(chunk, layout, run)
            outputs.append({name: t[:n].float().cpu() for name, t in computed.items()})
        if len(outputs) == 1:
            return outputs[0]
        return {name: torch.cat([o[name] for o in outputs]) for name in outputs[0]}  # keeps channels-last

    def _compute(self, x: torch.Tensor, layout: str, run: str) -> dict[str, torch.Tensor]:
        if run == RUN_LOGITS:
            return {"logits": self.engine(x, layout=layout)}
        if run == RUN_ALL:  # an embedder's N x D, or a feature engine's dict
            out = self.engine(x, layout=layout)
            return dict(out) if isinstance(out, dict) else {EMBEDDING: out}
        embedding = self.engine.embed(x, layout=layout)
        if run == RUN_EMBEDDING:
            return {EMBEDDING: embedding}
        if self._fc is None:  # a second forward: int8 logits come from the int8 engine
            return {EMBEDDING: embedding, "logits": self.engine(x, layout=layout)}
        weight, bias = self._fc
        return {EMBEDDING: embedding, "logits": torch.addmm(bias, embedding, weight.t())}

    async def _submit(self, images: torch.Tensor, layout: str, run: str = RUN_LOGITS) -> dict:
        result = await self._infer_batch(_Item(images, layout, run))
        if isinstance(result, Exception):
            raise result
        return result

    # -- HTTP -----------------------------------------------------------------------------------

    async def __call__(self, request: Request) -> Response:
        try:
            return await self._route(request)
        except RequestError as exc:  # OIPError included
            return _error(str(exc), exc.status, exc.headers)
        except Exception as exc:  # a bug, not the client's fault; the replica stays up
            log.exception("request failed")
            return _error(f"internal error: {type(exc).__name__}: {exc}", 500)

    async def ready(self) -> bool:
        """The health deployment's probe: answers once __init__ (the warm-up) has returned."""
        return True

    async def _route(self, request: Request) -> Response:
        route = http.resolve(
            request.method,
            request.url.path,
            self.name,
            api_key=self.config.api_key,
            authorization=request.headers.get("authorization"),
        )
        action = route.action
        if action in ("live", "ready"):  # reached only without the health application in front
            return _json({"live": True} if action == "live" else {"ready": True})
        if action == "server":
            return _json(
                {"name": "fastres", "version": fastres.__version__, "extensions": protocol.EXTENSIONS}
            )
        if action == "model":
            return _json(protocol.model_metadata(self.name, len(self.labels), outputs=self.outputs.metadata))
        if action == "model_ready":
            return _json({"name": self.name, "ready": True})
        if action == "stats":
            return _json(self.stats.triton_statistics(self.name, replica=replica_process()))
        if action == "infer":
            return await self._infer(request)
        return await self._classify(request)

    async def _body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        http.check_content_length(request.headers.get("content-length"), limit)

        async def read() -> bytes:
            chunks, total = [], 0
            async for chunk in request.stream():  # chunked bodies declare no length: count as they come
                total += len(chunk)
                if total > limit:
                    raise http.too_large(limit)
                chunks.append(chunk)
            return b"".join(chunks)

        # Serve's proxy (uvicorn) has no body timeout; the proxy streams the body here as it comes.
        try:
            return await asyncio.wait_for(read(), self.config.body_timeout_s)
        except asyncio.TimeoutError:
            raise http.too_slow(self.config.body_timeout_s) from None

    async def _infer(self, request: Request) -> Response:
        body = await self._body(request)
        # In a thread: a large JSON body takes a while to parse, and the event loop must keep
        # answering (and batching) the other requests meanwhile.
        parsed = await asyncio.to_thread(
            protocol.parse_infer_request,
            body,
            request.headers.get("inference-header-content-length"),
            num_classes=len(self.labels),
            max_batch=self.config.max_batch,
            max_pixels=self.config.max_pixels,
            output_names=self.outputs.names,
            default_outputs=self.outputs.default,
        )
        images = torch.from_numpy(np.array(parsed.images))  # a writable copy: frombuffer is read-only
        run = self.outputs.run_for(o.name for o in parsed.outputs)
        computed = await self._submit(images, parsed.layout, run)
        outputs = protocol.build_outputs(parsed, {k: v.numpy() for k, v in computed.items()}, self.labels)
        payload, headers = protocol.encode_infer_response(self.name, outputs, parsed.id)
        return Response(payload, headers=headers)

    async def _classify(self, request: Request) -> Response:
        if not self.outputs.classifier:
            raise RequestError(
                f"this server serves {', '.join(self.outputs.names)}, not classes: POST image tensors to "
                f"/v2/models/{self.name}/infer",
                404,
            )
        topk = request.query_params.get("topk", str(min(protocol.DEFAULT_TOPK, len(self.labels))))
        k = protocol.parse_topk(http.query_int(topk), len(self.labels), "query parameter 'topk'")
        body = await self._body(request)
        content_type = request.headers.get("content-type", "")
        files = await asyncio.to_thread(http.split_multipart, body, content_type, self.config.max_batch)
        images = await asyncio.to_thread(lambda: [self._preprocess(f) for f in files])
        pixels = sum(image.shape[1] * image.shape[2] for image in images)
        if pixels > self.config.max_pixels:  # only without a crop: --crop 0
            raise OIPError(f"{pixels} pixels are over this server's limit of {self.config.max_pixels}")
        # One batcher item per image: same-size images share engine calls (with other requests' too),
        # images of different sizes (no crop) run apart.
        answers = await asyncio.gather(*(self._submit(x.unsqueeze(0), "NCHW") for x in images))
        logits = torch.cat([answer["logits"] for answer in answers])
        return _json(
            {"model": self.name, "predictions": protocol.top_predictions(logits.numpy(), self.labels, k)}
        )

    def _preprocess(self, data: bytes) -> torch.Tensor:
        try:
            # Refused from the header, before decoding: one image may not exceed the whole batch's limit.
            return self.transform(decode_image(data, max_pixels=self.config.max_pixels))
        except InputError as exc:  # ImageDecodeError included
            raise OIPError(str(exc)) from None


READY_TIMEOUT_S = 2.0  # a replica's event loop answers in milliseconds; seconds mean none can


@serve.deployment(name="fastres-health", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
class Health:
    """GET /v2/health/live and /v2/health/ready, an application of its own (route prefix /v2/health).

    Apart from the classifier so that it answers when no classifier replica is up: a request for the
    classifier would wait in Serve's queue until one is. Readiness asks a replica through a handle with
    a deadline, so it is a prompt 503 when none is ready (starting, dead, or too busy to answer).
    """

    def __init__(self, app_name: str, timeout_s: float = READY_TIMEOUT_S):
        self.app_name, self.timeout_s = app_name, timeout_s
        self._handle = None

    async def __call__(self, request: Request) -> Response:
        path = request.url.path.rstrip("/")
        if not path.endswith(("/v2/health/live", "/v2/health/ready")):
            return _error(f"no route {request.method} {path}", 404)
        if request.method != "GET":
            return _error(f"use GET for {path}, not {request.method}", 405, {"allow": "GET"})
        if path.endswith("/live"):
            return _json({"live": True})
        if await self._replica_ready():
            return _json({"ready": True})
        message = f"no replica of {self.app_name!r} answered within {self.timeout_s:g} s"
        return _json({"ready": False, "error": message}, 503)

    async def _replica_ready(self) -> bool:
        try:
            if self._handle is None:  # looked up on first use: the classifier is deployed after this
                self._handle = serve.get_deployment_handle("fastres", app_name=self.app_name)
            response = self._handle.ready.remote()
        except Exception as exc:  # no such application (yet): not ready
            log.info("readiness: %s", exc)
            return False
        try:
            return bool(await asyncio.wait_for(_awaited(response), self.timeout_s))
        except asyncio.TimeoutError:
            response.cancel()  # do not leave the probe queued behind real requests
            return False
        except Exception as exc:  # the replica died under the probe
            log.info("readiness: %s", exc)
            return False


async def _awaited(response):
    return await response
