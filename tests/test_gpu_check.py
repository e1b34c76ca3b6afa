"""benchmarks/gpu_check.sh in dry-run mode: its control flow, stage list and time budget."""

import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
GPU_STAGES = (
    "smoke", "pytest-gpu", "bench-resnet50", "bench-resnet18", "int8-resnet18", "layers-resnet50",
    "estimate-resnet50", "tune-resnet50",
)  # fmt: skip


def test_dry_run_skips_gpu_stages_and_fits_the_budget(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=env, timeout=240
    )
    assert done.returncode == 0, done.stdout + done.stderr
    budget = re.search(r"= (\d+) s \(limit 480 s\)", done.stdout)
    assert budget and int(budget.group(1)) <= 480, done.stdout
    summary = done.stdout.split("=== summary")[1]
    for stage in GPU_STAGES:
        assert re.search(rf"^{stage}\s+skip\b", summary, re.M), summary
    for stage in ("install", "versions"):
        assert re.search(rf"^{stage}\s+ok\b", summary, re.M), summary
    assert (tmp_path / "versions.log").read_text().strip()


def test_unknown_argument_is_refused():
    done = subprocess.run(["bash", str(SCRIPT), "--fast"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "unknown argument" in done.stderr
