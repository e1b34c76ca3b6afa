"""Load generator for `fastres serve`: closed loop, C concurrent clients, fixed duration, on loopback.

    python benchmarks/bench_serve.py --model resnet18 --image-size 64 --clients 64 --duration 60 \\
        --batch-wait-ms 2 10

For each --batch-wait-ms setting it deploys the model with fastres.serving.start (a local Ray instance
on 127.0.0.1; random calibrated weights unless --weights), runs a short warm-up, then C client threads
that each send one OIP infer request (one uint8 image, binary tensor data) and wait for the answer
before sending the next, for --duration seconds. Requests in flight at the deadline are waited for.
Reported per setting: answered requests per second and images per second, latency p50/p90/p99,
errors (a non-200 answer or a malformed one) and lost requests (sent, never answered: a timeout or a
dropped connection), plus how many engine calls served them (the deployment's statistics). With
--url it loads an already running server instead (one row, its own batch-wait setting); the API key
of one started with FASTRES_API_KEY is read from that variable here too. --hostile N runs each setting
twice on the same server, without and then with N bad clients beside the good ones (malformed bodies,
250,000-part multipart bodies, slow senders), and reports the good clients' latency for both.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone

import numpy as np


def _request_body(image_size: int, seed: int) -> tuple[bytes, dict]:
    pixels = np.random.default_rng(seed).integers(0, 256, (1, 3, image_size, image_size), dtype=np.uint8)
    raw = pixels.tobytes()
    tensor = {"name": "input", "datatype": "UINT8", "shape": list(pixels.shape)}
    tensor["parameters"] = {"binary_data_size": len(raw)}
    header = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}}).encode()
    return header + raw, {"Inference-Header-Content-Length": str(len(header)), **_auth()}


def _auth() -> dict[str, str]:
    key = os.environ.get("FASTRES_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


class _Client(threading.Thread):
    """One closed-loop client: a keep-alive connection, one request at a time until the deadline."""

    def __init__(self, host, port, path, bodies, deadline, expected_bytes, timeout_s):
        super().__init__(daemon=True)
        self.args = host, port, path, bodies, deadline, expected_bytes, timeout_s
        self.latencies: list[float] = []
        self.sent = self.errors = self.lost = 0
        self.first_error = ""

    def run(self):
        host, port, path, bodies, deadline, expected_bytes, timeout_s = self.args
        conn = None
        i = 0
        while time.monotonic() < deadline:
            body, headers = bodies[i % len(bodies)]
            i += 1
            self.sent += 1
            start = time.perf_counter()
            try:
                conn = conn or http.client.HTTPConnection(host, port, timeout=timeout_s)
                conn.request("POST", path, body=body, headers=headers)
                response = conn.getresponse()
                payload = response.read()
            except (OSError, http.client.HTTPException) as exc:
                self.lost += 1
                self.first_error = self.first_error or f"{type(exc).__name__}: {exc}"
                conn = None
                continue
            elapsed = time.perf_counter() - start
            length = response.getheader("Inference-Header-Content-Length")
            if response.status != 200 or length is None or len(payload) - int(length) != expected_bytes:
                self.errors += 1
                self.first_error = self.first_error or f"HTTP {response.status}: {payload[:200]!r}"
            else:
                self.latencies.append(elapsed)
        if conn is not None:
            conn.close()


class _BadClient(threading.Thread):
    """--hostile: a client that sends what a server must refuse, in turn: a malformed JSON body, a
    multipart body of 250,000 tiny parts (2.5 MB), and a slow sender trickling a body a byte at a
    time (slowloris) until the server cuts it off or `slow_s` passes. Counts each by its answer."""

    def __init__(self, host, port, path, deadline, slow_s=5.0):
        super().__init__(daemon=True)
        self.host, self.port, self.path, self.deadline, self.slow_s = host, port, path, deadline, slow_s
        self.sent = {"malformed": 0, "parts": 0, "slow": 0}
        self.answers: dict[str, int] = {}

    def run(self):
        parts = b"--b\r\n\r\nx\r\n" * 250_000 + b"--b--\r\n"
        kinds = [
            ("malformed", self.path, b'{"inputs": [{"name": "input", "data": [1, 2', {}),
            ("parts", "/v1/classify", parts, {"Content-Type": "multipart/form-data; boundary=b"}),
        ]
        i = 0
        while time.monotonic() < self.deadline:
            i += 1
            if i % 3 == 0:
                self._slow()
                continue
            kind, path, body, headers = kinds[i % 3 - 1]
            self.sent[kind] += 1
            try:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
                conn.request("POST", path, body=body, headers={**headers, **_auth()})
                status = conn.getresponse().status
                conn.close()
            except (OSError, http.client.HTTPException):
                status = "lost"
            self.answers[f"{kind} {status}"] = self.answers.get(f"{kind} {status}", 0) + 1

    def _slow(self):
        self.sent["slow"] += 1
        head = f"POST {self.path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in _auth().items()) + "\r\n"
        status, ends = "open", time.monotonic() + self.slow_s
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as sock:
                sock.sendall(head.encode())
                while time.monotonic() < min(ends, self.deadline):
                    sock.sendall(b" ")
                    try:
                        reply = sock.recv(64)
                    except TimeoutError:
                        continue
                    status = reply.split(b" ")[1].decode() if reply else "closed"
                    break
        except OSError:
            status = "closed"
        self.answers[f"slow {status}"] = self.answers.get(f"slow {status}", 0) + 1


def _stats(host, port, name) -> dict:
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request("GET", f"/v2/models/{name}/stats", headers=_auth())
        return json.loads(conn.getresponse().read())["model_stats"][0]
    finally:
        conn.close()


def run_load(
    url: str, name: str, image_size: int, classes: int, clients: int, duration: float, hostile: int = 0
) -> dict:
    host, port = url.removeprefix("http://").split(":")
    port = int(port)
    path = f"/v2/models/{name}/infer"
    bodies = [_request_body(image_size, seed) for seed in range(16)]
    warm = _Client(host, port, path, bodies, time.monotonic() + 3, classes * 4, 60)
    warm.run()  # a few sequential requests first: first-call costs stay out of the timed window
    before = _stats(host, port, name)
    deadline = time.monotonic() + duration
    threads = [_Client(host, port, path, bodies, deadline, classes * 4, 60) for _ in range(clients)]
    bad = [_BadClient(host, port, path, deadline) for _ in range(hostile)]
    started = time.monotonic()
    for t in threads + bad:
        t.start()
    for t in threads + bad:
        t.join(timeout=duration + 120)
    wall = time.monotonic() - started
    after = _stats(host, port, name)
    latencies = np.array([x for t in threads for x in t.latencies]) * 1000
    hung = sum(t.is_alive() for t in threads)
    answered = len(latencies)
    executions = after["execution_count"] - before["execution_count"]
    bad_answers: dict[str, int] = {}
    for t in bad:
        for key, count in t.answers.items():
            bad_answers[key] = bad_answers.get(key, 0) + count
    return {
        "clients": clients,
        "hostile": hostile,
        "hostile_answers": bad_answers,
        "seconds": round(wall, 1),
        "sent": sum(t.sent for t in threads),
        "answered": answered,
        "req_per_s": answered / wall,
        "img_per_s": answered / wall,  # one image per request
        "p50_ms": float(np.percentile(latencies, 50)) if answered else float("nan"),
        "p90_ms": float(np.percentile(latencies, 90)) if answered else float("nan"),
        "p99_ms": float(np.percentile(latencies, 99)) if answered else float("nan"),
        "errors": sum(t.errors for t in threads),
        "lost": sum(t.lost for t in threads) + hung,
        "engine_calls": executions,
        "mean_batch": (after["inference_count"] - before["inference_count"]) / max(executions, 1),
        "first_error": next((t.first_error for t in threads if t.first_error), ""),
    }


def _git_rev() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        rev = subprocess.run(
            ["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "-C", here, "status", "--porcelain", "-uno"], capture_output=True, text=True
        )
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--weights", help="checkpoint (default: random calibrated weights, 1000 classes)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load per setting")
    parser.add_argument("--batch-wait-ms", type=float, nargs="+", default=[2.0])
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--device", help="cuda or cpu (default: cuda when there is a GPU)")
    parser.add_argument("--dtype")
    parser.add_argument("--cpus-per-replica", type=float)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--url", help="load this running server (http://HOST:PORT) instead of starting one")
    parser.add_argument("--name", help="model name in URLs (with --url)")
    parser.add_argument("--classes", type=int, default=1000, help="the served model's classes (with --url)")
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument(
        "--hostile",
        type=int,
        default=0,
        metavar="N",
        help="also run each setting with N bad clients beside the good ones (malformed bodies, "
        "250,000-part bodies, slow senders): good-client latency without and with them",
    )
    args = parser.parse_args(argv)

    import torch

    cpu = platform.processor() or platform.machine()
    print(
        f"bench_serve: {args.model} {args.image_size}px, {args.clients} clients x {args.duration:g} s "
        f"closed loop, 1 image per request (binary), max batch {args.max_batch}; {cpu} ({os.cpu_count()} "
        f"cores), torch {torch.__version__}, git {_git_rev()}, "
        f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}",
        flush=True,
    )
    rows = []
    if args.url:
        name = args.name or args.model
        for hostile in sorted({0, args.hostile}):
            rows.append({"batch_wait_ms": None, "load_avg_1m": os.getloadavg()[0]})
            load = (args.url, name, args.image_size, args.classes, args.clients, args.duration, hostile)
            rows[-1].update(run_load(*load))
    else:
        from fastres.serving import ServeConfig, start
        from fastres.testing import make_calibrated_model

        weights = args.weights
        if weights is None:
            weights = os.path.join(tempfile.mkdtemp(prefix="bench_serve_"), f"{args.model}.pth")
            model = make_calibrated_model(args.model, 1000, image_size=args.image_size)
            torch.save(model.state_dict(), weights)
        for wait in args.batch_wait_ms:
            config = ServeConfig(
                args.model,
                weights=weights,
                device=args.device,
                dtype=args.dtype,
                max_batch=args.max_batch,
                batch_wait_ms=wait,
                warmup_size=args.image_size,
            )
            options = {"replicas": args.replicas, "cpus_per_replica": args.cpus_per_replica}
            server = start(config, port=_free_port(), **options)
            try:
                for hostile in sorted({0, args.hostile}):  # the same server: only the bad clients differ
                    load = os.getloadavg()[0]
                    row = run_load(
                        server.url,
                        config.model_name,
                        args.image_size,
                        1000,
                        args.clients,
                        args.duration,
                        hostile,
                    )
                    rows.append({"batch_wait_ms": wait, "load_avg_1m": load, **row})
            finally:
                server.shutdown()
    print(
        "\nwait ms  clients  hostile  seconds   sent  answered  req/s  p50 ms  p90 ms  p99 ms  errors  lost  "
        "engine calls  mean batch  load 1m"
    )
    for r in rows:
        wait = "server" if r["batch_wait_ms"] is None else f"{r['batch_wait_ms']:g}"
        print(
            f"{wait:>7}  {r['clients']:>7}  {r['hostile']:>7}  {r['seconds']:>7}  {r['sent']:>5}  "
            f"{r['answered']:>8}  "
            f"{r['req_per_s']:>5.1f}  {r['p50_ms']:>6.1f}  {r['p90_ms']:>6.1f}  {r['p99_ms']:>6.1f}  "
            f"{r['errors']:>6}  {r['lost']:>4}  {r['engine_calls']:>12}  {r['mean_batch']:>10.1f}  "
            f"{r['load_avg_1m']:>7.2f}"
        )
        if r["first_error"]:
            print(f"  first error: {r['first_error']}")
        if r["hostile_answers"]:  # what the bad clients got: status codes, "open" = never cut off
            print(f"  bad clients' answers: {r['hostile_answers']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if any(r["errors"] or r["lost"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
