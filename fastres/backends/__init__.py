"""Backends execute a Plan. Each packs the plan's folded weights once, at load time, into its own layout."""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .base import Backend, Observer
from .reference_backend import ReferenceBackend
from .torch_backend import TorchBackend

BACKENDS = ("triton", "torch", "openvino", "reference")


def create_backend(name: str, plan, device, dtype, **options) -> Backend:
    if name == "torch":
        return TorchBackend(plan, device, dtype, **options)
    if name == "reference":
        return ReferenceBackend(plan, device, dtype, **options)
    if name == "openvino":
        from .openvino_backend import OpenVinoBackend  # imports openvino: only when asked for

        return OpenVinoBackend(plan, device, dtype, **options)
    if name == "triton" and dtype in (torch.int8, torch.float8_e4m3fn):
        from .triton_int8 import TritonInt8Backend  # calibrated int8 / fp8 convs (fastres/quantize.py)

        return TritonInt8Backend(plan, device, dtype, **options)
    if name == "triton":
        from .triton_backend import TritonBackend  # imports triton: only when asked for

        return TritonBackend(plan, device, dtype, **options)
    raise ConfigError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "Backend", "Observer", "create_backend"]
