"""The unfolded, unfused PyTorch reference model as a backend: the yardstick for parity."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..graph import normalize
from .base import Backend, Observer


class ReferenceBackend(Backend):
    name = "reference"
    runs_cut_plans = True

    def __init__(self, plan, device, dtype, *, module: nn.Module):
        super().__init__(plan, device, dtype)
        self.module = module.to(device=self.device, dtype=dtype).eval()
        # On the device once: a per-call host-to-device copy is not allowed during CUDA-graph capture.
        self.mean, self.std = (
            torch.tensor(v, dtype=torch.float64, device=self.device).view(1, 3, 1, 1)
            for v in (plan.mean, plan.std)
        )

    def run(self, x: Tensor, workspace: Any, observer: Observer | None = None) -> Tensor | dict[str, Tensor]:
        with torch.inference_mode():
            if x.dtype == torch.uint8:  # unfused on purpose: normalise, then the plain model
                x = normalize(x, self.mean, self.std).to(self.dtype)
            if self.plan.outputs is None:
                return self.module(x).float()
            return self._features(x, self.plan.outputs)

    def _features(self, x: Tensor, wanted) -> dict[str, Tensor]:
        """The module's own intermediate outputs (its forward, step by step), up to the last one wanted."""
        m, found = self.module, {}
        steps = [("stem", lambda t: m.relu(m.bn1(m.conv1(t))))]
        steps += [(f"layer{i}", getattr(m, f"layer{i}")) for i in range(1, 5)]
        steps.append(("pool", lambda t: torch.flatten(m.avgpool(t), 1).float()))
        for name, step in steps:
            if name == "layer1":
                x = m.maxpool(x)
            x = step(x)
            if name in wanted:
                # Channels-last like the other backends' features (a copy here: this path is NCHW).
                found[name] = x if x.dim() == 2 else x.contiguous(memory_format=torch.channels_last)
            if len(found) == len(wanted):
                break
        return {name: found[name] for name in wanted}
