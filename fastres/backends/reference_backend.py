"""The unfolded, unfused PyTorch reference model as a backend: the yardstick for parity."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..graph import normalize
from .base import Backend, Observer


class ReferenceBackend(Backend):
    name = "reference"

    def __init__(self, plan, device, dtype, *, module: nn.Module):
        super().__init__(plan, device, dtype)
        self.module = module.to(device=self.device, dtype=dtype).eval()

    def run(self, x: Tensor, workspace: Any, observer: Observer | None = None) -> Tensor:
        with torch.inference_mode():
            if x.dtype == torch.uint8:  # unfused on purpose: normalise, then the plain model
                x = normalize(x, self.plan.mean, self.plan.std).to(self.dtype)
            return self.module(x).float()
