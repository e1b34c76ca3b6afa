"""The parity gate: a tactic's output on the layer's real input shape, against the cuDNN tactic's.

The reference is the cuDNN tactic (F.conv2d on the same rounded weights and inputs), an implementation
independent of fastres's kernel, so the rule config is gated too: on a GPU, driver or Triton version
where the kernel computes wrong results, every Triton tactic fails and the layer runs on cuDNN. Each
side is within `LAYER_RTOL` of float64 (the bound the kernel tests hold every config to), so two correct
results differ by at most twice that; a larger difference, or any NaN or Inf in the output (buffers
are NaN-poisoned first, so an element a tactic never wrote shows up), discards the tactic.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..numerics import LAYER_RTOL, TF32_LAYER_RTOL

GATE_FACTOR = 2.0


def gate_bound(dtype: torch.dtype, tf32: bool = False) -> float:
    """tf32: both sides ran float32 on TF32 tensor cores (allow_tf32), each within TF32's own bound."""
    return GATE_FACTOR * (TF32_LAYER_RTOL if tf32 and dtype == torch.float32 else LAYER_RTOL[dtype])


def parity_problem(out: Tensor, reference: Tensor, dtype: torch.dtype, tf32: bool = False) -> str | None:
    """Why `out` fails the gate against `reference` (same shape), or None when it passes."""
    bad = int((~torch.isfinite(out)).sum())
    if bad:
        return f"parity: {bad} non-finite values (NaN/Inf) in the output"
    # On the device, in fp32 (a batch-256 layer is 200M values: no float64 copy to the host). The
    # difference of two nearby fp32 values is exact, so this measures fp32 and 16-bit outputs alike.
    diff = (out.float() - reference.float()).abs().max().item()
    error, bound = diff / max(reference.float().abs().max().item(), 1e-30), gate_bound(dtype, tf32)
    if not error <= bound:
        return f"parity: relative error {error:.2e} > {bound:.1e} against cuDNN"
    return None
