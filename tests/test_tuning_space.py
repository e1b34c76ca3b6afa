"""Interpreter parity for every config the tuner's candidate space can produce for the ten models.

As `test_every_shipped_config` does for the table. The space is enumerated for every conv of the ten
models (planned on the meta device: shapes only), at batches 1, 8, 64 and 256 at 224 px, for sm_90 and
sm_80, in fp16 (bf16 gets the same configs) and fp32. The interpreter ignores warps, stages and the
register cap (those are the compile report's and the on-device compile check's business), so the pairs
are grouped by what it does execute: the kernel path (3x3 dense, 3x3 grouped, 1x1, 1x1 with a merged
shortcut), the tile (BLOCK_M/N/K), the split and the reduction. Each group runs once on a small layer of
its path whose channels make that exact config legal (clip_config leaves it unchanged), against float64.
"""

from __future__ import annotations

import functools

import pytest
import torch
from test_conv import Case, _build, _check, _shortcut_case

from fastres.numerics import LAYER_RTOL, assert_close, poison_

DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.float32, id="fp32")]
PATHS = ("3x3", "3x3_grouped", "1x1", "1x1_shortcut")


@functools.cache
def candidate_configs() -> dict[tuple[str, torch.dtype], set]:
    """{(kernel path, dtype): {(block_m, block_n, block_k, split_k, fused_reduce)}} over the ten models."""
    from fastres.backends.triton_backend import TritonBackend
    from fastres.planner import plan_resnet
    from fastres.reference import build_resnet
    from fastres.specs import MODEL_SPECS, get_spec
    from fastres.tuning.candidates import candidate_space

    found: dict = {}
    for name in MODEL_SPECS:
        with torch.device("meta"):  # shapes only: no weights allocated or initialised
            state = build_resnet(get_spec(name), 10).state_dict()
        plan = plan_resnet(get_spec(name), 10, state)
        for dtype in (torch.float16, torch.float32):
            backend, seen = TritonBackend(plan, "meta", dtype), set()
            for batch in (1, 8, 64, 256):
                for op, (signature, shape) in backend.conv_inputs(batch, 224, 224).items():
                    if (signature, batch) in seen:
                        continue
                    seen.add((signature, batch))
                    layer = backend.layers[op]
                    path = "1x1" if layer.kernel_size == (1, 1) else "3x3"
                    if layer.shortcut_channels:
                        path += "_shortcut"
                    elif layer.kernel_groups > 1:
                        path += "_grouped"
                    for arch in (90, 80):
                        for tactic in candidate_space(layer, shape, arch, 132).tactics[:-1]:
                            c = tactic.config
                            key = (c.block_m, c.block_n, c.block_k, c.split_k, c.fused_reduce)
                            found.setdefault((path, dtype), set()).add(key)
    return found


def _case(path: str, block_n: int, block_k: int, kc: int, index: int) -> Case:
    """A small layer on `path`: N a little over BLOCK_N (a masked edge), K = kc steps per tap."""
    stride = 1 + index % 2  # both strides, alternately
    if path == "3x3_grouped":
        return Case(1, 5, 4, 2 * block_k * kc, 2 * block_n, 3, stride, 1, groups=2, residual=index % 3 == 0)
    k, pad = (3, 1) if path == "3x3" else (1, 0)
    return Case(1, 5, 4, block_k * kc, block_n + 8, k, stride, pad, residual=index % 3 == 0 and k == 3)


@pytest.mark.interpreter
@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", PATHS)
def test_every_candidate_config_matches_the_reference(path, dtype):
    from fastres.kernels import ConvConfig

    configs = sorted(candidate_configs().get((path, dtype), ()))
    assert configs, f"the candidate space produced no {path} configs in {dtype}"
    for index, (bm, bn, bk, split, fused) in enumerate(configs):
        config = ConvConfig(bm, bn, bk, 4, 1, split_k=split, fused_reduce=fused)
        for kc in range(1, 2 * split + 2):  # the fewest K-steps that keep this split exactly
            if path == "1x1_shortcut":
                stride2 = 1 + index % 2
                layer, x, x2, ref = _shortcut_case(1, 4, 5, bk * kc, bk * kc, bn + 8, stride2, dtype)
            else:
                case = _case(path, bn, bk, kc, index)
                layer = _build(case, dtype)[0]
            if layer.clip_config(config) == config:
                break
        else:
            pytest.fail(f"{path}: no small layer takes {config} unchanged")
        if path == "1x1_shortcut":
            out = poison_(torch.empty(ref.shape, dtype=dtype))
            layer.launch(x, None, out, config=config, shortcut_input=x2)
            assert_close(out, ref, LAYER_RTOL[dtype], what=f"{layer!r} {config}")
        else:
            _check(case, dtype, config=config)
