"""What the engine needs from a backend."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ..planner import Plan

# Called after each op with (op name, its output converted to NCHW); used by per-layer drift reports.
Observer = Callable[[str, Tensor], None]


class Backend:
    """Runs a plan on one device in one dtype.

    `make_workspace` returns whatever per-input-shape state the backend keeps between calls
    (static activation buffers); the engine caches one per shape and never shares one between
    two calls at the same time. `run` must not allocate for weights or repack anything.
    """

    name = "base"
    # Whether `for_plan` may hand it a cut plan (features, embeddings): true of a backend that runs the
    # plan op by op from weights packed per op; one that compiles the whole plan at load cannot.
    runs_cut_plans = False
    # The dtype float input is handed over in; None: the engine's compute dtype.
    input_float_dtype: torch.dtype | None = None
    # Whether `run` can report every op's output to an observer (per-layer drift reports).
    observes_layers = True

    def __init__(self, plan: Plan, device: torch.device, dtype: torch.dtype):
        self.plan, self.device, self.dtype = plan, torch.device(device), dtype
        self.packed_plan = plan  # the whole plan the weights are packed for; for_plan keeps it

    def make_workspace(self, batch: int, height: int, width: int) -> Any:
        return None

    def for_plan(self, plan: Plan) -> Backend:
        """This backend running `plan`, a cut of its own (`planner.select_outputs`): the packed
        weights are shared, not packed again (an embedder beside a classifier costs no weights)."""
        if not self.runs_cut_plans:
            raise ConfigError(
                f"the {self.name} backend returns logits only (it compiles the whole plan at load); for "
                "features, num_classes=0 or embed() use backend='torch' (or 'triton' on a GPU)"
            )
        backend = copy.copy(self)
        backend.plan = plan
        return backend

    def run(self, x: Tensor, workspace: Any, observer: Observer | None = None) -> Tensor | dict[str, Tensor]:
        """x: N x 3 x H x W in the engine's dtype on its device; returns float32 logits N x classes, or
        for a plan with `outputs` a dict name -> fresh tensor (conv features N x C x H x W channels-last
        in the engine dtype, "pool" float32 N x C)."""
        raise NotImplementedError
