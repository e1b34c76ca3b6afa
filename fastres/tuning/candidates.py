"""The tactics worth timing for one conv layer and input shape: variants around its rule config.

The rule config (the table entry with `choose_split`'s split, kernels/conv_configs.py) comes first;
then variants that change one axis at a time, as the rule's own reasons name the axes that matter:
tile shape (BLOCK_M in 64/128 x BLOCK_N in 64/128), BLOCK_K, pipeline stages, warps (8 only for
tiles of 128x128 and more: 4 warps hold one wgmma warpgroup, and Inductor's conv template once
miscompiled at 8, which the parity gate would catch), split-K in {1, 2, 4, 8} with the fused or the
separate reduction, and the register cap where the rule sets one; then the cuDNN tactic. A full cross
product would be hundreds of compiles per layer: one axis at a time keeps it near twenty.

Each variant is clipped to the layer (`ConvLayer.clip_config`: BLOCK_N/BLOCK_K to the group's channels,
the split to one with no empty slice, stages to the steps one slice runs) and duplicates merged. Tiles
whose pipeline does not fit the arch's shared memory are dropped with a reason, fp32 tiles wider than
the FMA path holds in registers are never offered; the tuner drops those that fail to compile or
spill on the device (`compile_check`), and the parity gate those that compute wrong results.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..kernels import ConvConfig, ConvLayer
from .tactics import CUDNN_TACTIC, Tactic, triton_tactic

# No 256-wide tiles: on resnet50's 1x1 conv3 layers, 64x256 (4 warps) and 128x256 (8 warps) spilled
# 128-152 B on sm_90 (a --compile-for sweep), so the space would offer configs a GPU must drop anyway.
TILES_16BIT = ((64, 64), (64, 128), (128, 64), (128, 128))
# IEEE fp32 dots run on FMA units with the accumulator and operands in registers: 128x128 and wider
# need more than 255 registers per thread at 4 warps (the table's fp32 entry is 64x64 for that reason).
TILES_FP32 = ((64, 64), (64, 128), (128, 64))
BLOCK_KS_16BIT, BLOCK_KS_FP32 = (32, 64), (16, 32)
SPLITS = (1, 2, 4, 8)
# Opt-in shared memory per block, KiB: sm_80 (A100) 163, sm_86/89 99, sm_90 227. Interpreter: no limit.
SMEM_KIB = {80: 163, 86: 99, 87: 163, 89: 99, 90: 227}


@dataclass
class CandidateSpace:
    tactics: list[Tactic]  # rule first, then the variants, then cuDNN
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (label, why)

    @property
    def rule(self) -> Tactic:
        return self.tactics[0]


def smem_bytes(config: ConvConfig, elem: int) -> int:
    """Shared memory the pipeline's ring of A and B tiles takes (what Triton allocates for the dot)."""
    return config.num_stages * (config.block_m * config.block_k + config.block_k * config.block_n) * elem


def _tile(rule: ConvConfig, block_m: int, block_n: int) -> ConvConfig:
    """The rule config with another tile, and the warps and register cap that tile needs (compiled
    for a resnet50 3x3 layer: 128x256 at 4 warps spilled on sm_80 and sm_90, 8 warps did not; fp32
    64x128 and 128x64 under the 128-register cap spilled 80-104 B on sm_90)."""
    config = replace(rule, block_m=block_m, block_n=block_n)
    if block_m * block_n > 128 * 128:
        config = replace(config, num_warps=8)
    if block_m * block_n > 64 * 64 and rule.maxnreg is not None:
        config = replace(config, maxnreg=None)
    return config


def _variants(rule: ConvConfig, fp32: bool) -> list[ConvConfig]:
    tiles = TILES_FP32 if fp32 else TILES_16BIT
    block_ks = BLOCK_KS_FP32 if fp32 else BLOCK_KS_16BIT
    out = [_tile(rule, m, n) for m, n in tiles]
    out += [replace(rule, block_k=k) for k in block_ks]
    out += [replace(rule, num_stages=s) for s in (rule.num_stages - 1, rule.num_stages + 1) if 2 <= s <= 5]
    if rule.block_m * rule.block_n >= 128 * 128:
        out.append(replace(rule, num_warps=8 if rule.num_warps == 4 else 4))
    for split in SPLITS:
        out.append(replace(rule, split_k=split, fused_reduce=True))
        if split > 1:
            out.append(replace(rule, split_k=split, fused_reduce=False))
    if rule.split_k > 1:
        out.append(replace(rule, fused_reduce=not rule.fused_reduce))
    if rule.maxnreg is not None:
        out.append(replace(rule, maxnreg=None))
    elif fp32:
        out.append(replace(rule, maxnreg=128))
    return out


def candidate_space(
    layer: ConvLayer,
    input_shape_nhwc: tuple[int, int, int, int],
    arch: int,
    sm_count: int,
    *,
    max_candidates: int | None = None,
    cudnn: bool = True,
) -> CandidateSpace:
    """Tactics for `layer` on this input shape on compute capability `arch` (0: the interpreter).

    max_candidates caps the Triton variants after the rule (the interpreter runs each slowly);
    cuDNN is always offered when `cudnn`.
    """
    fp32 = layer.dtype == torch.float32
    rule = layer.config_for(input_shape_nhwc, arch, sm_count)
    space = CandidateSpace([triton_tactic(rule)])
    seen = {rule}
    elem = torch.empty((), dtype=layer.dtype).element_size()
    limit = SMEM_KIB.get(arch, 99 if arch else None)
    variants = 0
    for wanted in _variants(rule, fp32):
        config = layer.clip_config(wanted)  # a split the K-steps cannot take shrinks to one they can
        if config in seen:
            continue
        if limit is not None and smem_bytes(config, elem) > limit * 1024:
            kib = smem_bytes(config, elem) / 1024
            space.dropped.append(
                (str(config), f"needs {kib:.0f} KiB shared memory > {limit} KiB on sm_{arch}")
            )
            continue
        if max_candidates is not None and variants >= max_candidates:
            space.dropped.append((str(config), f"over the candidate cap ({max_candidates})"))
            continue
        seen.add(config)
        space.tactics.append(triton_tactic(config))
        variants += 1
    if cudnn:
        space.tactics.append(CUDNN_TACTIC)
    return space


def compile_problem(layer: ConvLayer, input_shape_nhwc, config: ConvConfig, arch: int) -> str | None:
    """Why this config cannot be used on sm_`arch` (fails to compile, spills), or None when it can.

    Compiles ahead of time (kernels/aot.py) exactly the binaries a launch builds, so it needs a process
    without TRITON_INTERPRET; under the interpreter nothing is compiled and None is returned.
    """
    from ..kernels import compile_spec
    from ..kernels.aot import interpreting

    if interpreting():
        return None
    for spec in layer.aot_specs(input_shape_nhwc, arch, config):
        stats = compile_spec(spec, arch)
        if not stats.compiled_ok:
            return f"fails to compile for sm_{arch}: {stats.error}"
        if stats.spill_bytes:
            return f"spills {stats.spill_bytes} B per thread on sm_{arch} ({stats.registers} registers)"
    return None
