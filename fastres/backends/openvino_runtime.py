"""OpenVINO itself, imported only when used: the shared Core, the CPU's capabilities and default precision."""

from __future__ import annotations

import threading

import torch

from ..errors import BackendUnavailableError

INSTALL_HINT = "install it with pip install 'fastres[openvino]' (or use backend='torch')"
# OpenVINO element types of the precisions its CPU plugin runs; fp16 needs AVX512-FP16 or AMX-FP16.
PRECISIONS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
CAPABILITY = {torch.float32: "FP32", torch.bfloat16: "BF16", torch.float16: "FP16", torch.int8: "INT8"}


def import_openvino():
    try:
        import openvino
    except ImportError as error:
        raise BackendUnavailableError(f"the openvino backend needs OpenVINO; {INSTALL_HINT}") from error
    return openvino


def openvino_available() -> bool:
    try:
        import_openvino()
    except BackendUnavailableError:
        return False
    return True


_CORE = None
_CORE_LOCK = threading.Lock()


def core():
    """One OpenVINO Core per process: it owns the plugins and their thread pools."""
    global _CORE
    with _CORE_LOCK:
        if _CORE is None:
            _CORE = import_openvino().Core()
        return _CORE


def cpu_capabilities() -> tuple[str, ...]:
    return tuple(core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def default_precision() -> torch.dtype:
    """What OpenVINO's CPU plugin runs by default here: bf16 where the CPU has it, else fp32."""
    ov = import_openvino()
    hint = core().get_property("CPU", "INFERENCE_PRECISION_HINT")
    return {ov.Type.bf16: torch.bfloat16, ov.Type.f16: torch.float16}.get(hint, torch.float32)
