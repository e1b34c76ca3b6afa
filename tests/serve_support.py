"""What the serve tests that start a real server share: ports, processes, an HTTP client, requests.

Linux /proc is read directly (no psutil): the processes below a pid, and the sockets they listen on.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import torch
from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Free for a new server: nothing listens. SO_REUSEADDR, as servers set it, so that connections
    in TIME_WAIT (the server closed them first, as when it is killed) do not count."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def descendants(pid: int) -> set[int]:
    """Live (non-zombie) processes below `pid`: Ray's GCS, raylet, agents and actor workers."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
        except OSError:
            continue
        if state != "Z":
            children.setdefault(int(ppid), []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.add(pid)
        except OSError:
            pass
    return alive


def wait_gone(pids: set[int], port: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while (alive(pids) or not port_is_free(port)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(pids), f"processes left running after shutdown: {sorted(alive(pids))}"
    assert port_is_free(port), f"port {port} still taken after shutdown"


class Client:
    """HTTP/1.1 on loopback; `headers` go with every request (an Authorization header, say)."""

    def __init__(self, url: str, headers: dict[str, str] | None = None):
        self.host, self.port = url.removeprefix("http://").split(":")
        self.headers = dict(headers or {})

    def request(self, method, path, body=None, headers=None, conn=None):
        own = conn is None
        conn = conn or http.client.HTTPConnection(self.host, int(self.port), timeout=120)
        try:
            conn.request(method, path, body=body, headers={**self.headers, **(headers or {})})
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            if own:
                conn.close()

    def json(self, method, path, body=None, headers=None, conn=None):
        status, _, payload = self.request(method, path, body, headers, conn)
        return status, json.loads(payload)


def infer_body(images: np.ndarray, datatype="UINT8", outputs=None, **params) -> bytes:
    tensor = {
        "name": "input",
        "datatype": datatype,
        "shape": list(images.shape),
        "data": images.ravel().tolist(),
    }
    request = {"inputs": [tensor], "parameters": params}
    if outputs is not None:
        request["outputs"] = outputs
    return json.dumps(request).encode()


def uint8(shape, seed):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def png(array_hwc: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array_hwc).save(buffer, format="PNG")
    return buffer.getvalue()


def single_colour_png(width: int, height: int, rgb=(40, 90, 200)) -> bytes:
    """An RGB PNG of one colour, written row by row without the image in memory: at 13000 x 13000 a
    few hundred KB that decode to 507 MB, a decompression bomb below Pillow's own limit (179 MP)."""
    # PNG's Sub filter: each byte minus the one a pixel before, so every row after its first pixel is
    # zeros, and the same row compressed 13000 times is fast.
    row = b"\x01" + bytes(rgb) + bytes(3 * (width - 1))
    z = zlib.compressobj(6)
    data = b"".join(z.compress(row) for _ in range(height)) + z.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + payload))
        return struct.pack(">I", len(payload)) + kind + payload + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, not interlaced
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def peak_rss(pid: int) -> int:
    """The high-water mark of a process's resident memory (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def answer_logits(answer) -> torch.Tensor:
    out = next(o for o in answer["outputs"] if o["name"] == "logits")
    return torch.tensor(out["data"], dtype=torch.float32).view(out["shape"])


def listening_sockets(pids: set[int]) -> list[tuple[str, int, int, str]]:
    """(address, port, pid, process name) of every TCP socket in LISTEN state that `pids` hold."""
    listening = {}
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/net/{table}") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            ip = ipaddress.ip_address(raw)
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
                ip = ip.ipv4_mapped
            listening[int(fields[9])] = (str(ip), int(port, 16))
    found = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                name = f.read().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and int(link[8:-1]) in listening:
                found.add((*listening[int(link[8:-1])], pid, name))
    return sorted(found)


class ServeProcess:
    """`fastres serve ARGS --port PORT` run as a user runs it, in a subprocess of its own.

    The constructor starts it; wait_serving() returns once it prints that it serves (HTTP answers
    then); stop() sends SIGTERM, as Ctrl-C or a process manager would (SIGKILL would orphan Ray's
    processes), and returns the exit status. The output is kept in `output` for failure messages.
    """

    def __init__(self, args: list[str], port: int, env: dict[str, str] | None = None):
        self.port, self.output = port, []
        command = [sys.executable, "-m", "fastres", "serve", *args, "--port", str(port)]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        self._reader = threading.Thread(target=lambda: self.output.extend(self.process.stdout), daemon=True)
        self._reader.start()

    def tail(self, lines: int = 30) -> str:
        return "".join(self.output[-lines:])

    def wait_serving(self, timeout_s: float = 150) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(" at http://" in line and "serving" in line for line in self.output):
            assert self.process.poll() is None, "fastres serve exited early:\n" + self.tail()
            assert time.monotonic() < deadline, f"not serving in {timeout_s:.0f} s:\n" + self.tail()
            time.sleep(0.5)

    def stop(self, timeout_s: float = 90) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
            message = f"fastres serve did not stop within {timeout_s} s of SIGTERM:\n{self.tail()}"
            raise AssertionError(message) from None
        self._reader.join(timeout=10)
        return code
