"""fastres serve under a process manager: SIGTERM to its whole process group (what systemd and
Kubernetes do) or to its pid alone stops it within seconds and frees the port.

With the group signalled, Ray's own processes (GCS, raylet, workers, all in fastres serve's group)
get SIGTERM at the same moment as the driver; a graceful Serve shutdown through them then waited out
Serve's 30 s controller timeout.
"""

import http.client
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'fastres[serve]'")
pytest.importorskip("PIL.Image", reason="Pillow is not installed: pip install 'fastres[serve]'")

from serve_support import Client, descendants, free_port, wait_gone  # noqa: E402

from fastres.testing import make_calibrated_model  # noqa: E402

pytestmark = pytest.mark.slow

SIZE = 32
STOP_S = 15  # a few seconds on a loaded 2-CPU machine; the bug took 32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("shutdown") / "r18.pth"
    torch.save(make_calibrated_model("resnet18", 10, image_size=SIZE).state_dict(), path)
    return str(path)


@pytest.mark.parametrize("target", ["group", "pid"])
def test_sigterm_stops_within_seconds(checkpoint, target):
    port = free_port()
    command = [sys.executable, "-m", "fastres", "serve", "resnet18", "--weights", checkpoint]
    command += ["--port", str(port), "--device", "cpu", "--backend", "torch", "--warmup-size", str(SIZE)]
    # Its own process group, as under systemd: killpg reaches it and every Ray process it starts.
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
    reader.start()
    client = Client(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, "fastres serve exited early:\n" + "".join(output[-30:])
            assert time.monotonic() < deadline, "not ready in 180 s:\n" + "".join(output[-30:])
            try:
                # Both: the proxy may answer before start() returns, and this test is about serve_forever.
                ready = client.request("GET", "/v2/health/ready")[0] == 200
                if ready and any("fastres: serving" in line for line in output):
                    break
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(0.5)
        children = descendants(process.pid)
        started = time.monotonic()
        if target == "group":
            os.killpg(process.pid, signal.SIGTERM)
        else:
            process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
        seconds = time.monotonic() - started
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # its group: Ray's processes too
            process.wait()
    reader.join(timeout=10)
    log = "".join(output[-30:])
    assert seconds < STOP_S, f"SIGTERM to the {target} took {seconds:.1f} s to stop it:\n{log}"
    assert code == 0, log
    assert not any("failed to shut down" in line for line in output), log
    wait_gone(children, port, timeout_s=STOP_S)
