"""What every result row carries: the device, driver, versions, git revision, date and machine load."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch


def _run(cmd: list[str], cwd: str | None = None) -> str | None:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_revision() -> str | None:
    """Short hash of the checkout fastres runs from ('+dirty' with uncommitted changes). Outside git (a
    copy of the tree, as on a lent GPU machine) `$FASTRES_GIT_REV` as given, else None."""
    where = str(Path(__file__).resolve().parent)
    rev = _run(["git", "rev-parse", "--short", "HEAD"], cwd=where)
    if rev and _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where):
        rev += "+dirty"
    return rev or os.environ.get("FASTRES_GIT_REV", "").strip() or None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


# The ISA extensions that decide CPU inference speed (bf16 and int8 dot products, AMX tiles).
_ISA_FLAGS = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


def cpu_isa() -> str:
    """The relevant ISA flags of this CPU, space-separated ('' where /proc/cpuinfo is not readable)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return ""
    return " ".join(flag for flag in _ISA_FLAGS if flag in flags)


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def environment(device: torch.device) -> dict[str, Any]:
    from .. import __version__

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    on_gpu = device.type == "cuda"
    driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) if on_gpu else None
    return {
        "device_name": torch.cuda.get_device_name(device) if on_gpu else cpu_name(),
        "driver": driver.splitlines()[0] if driver else None,
        "cuda": torch.version.cuda if on_gpu else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "cpu_isa": None if on_gpu else cpu_isa(),
        "openvino": None if on_gpu else _version("openvino"),
        "fastres": __version__,
        "python": platform.python_version(),
        "git_rev": git_revision(),
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        # Other processes on the machine skew CPU timings; the 1-minute load average says how much.
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
