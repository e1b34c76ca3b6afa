"""Tile configs for the conv kernel (kernels/conv.py) and the rules that choose one per layer and shape.

Nothing here is autotuned: a layer's config is a pure function of (arch, dtype, layer kind, output tile
grid, K-steps, SM count), so the same binaries are built ahead of time (kernels/aot.py) and at launch.

Split-K: a layer whose output-tile grid cannot fill the GPU (batch 1, 7x7 and 14x14 maps: 8-64
programs on 132 SMs, 32-72 K-steps each) runs its K loop in `split_k` slices, one program per
(tile, slice); each slice writes fp32 partials and the tile's last program to finish (or a reduce
kernel, kernels/splitk.py) sums them in a fixed order and runs the epilogue once. `choose_split` picks
the slice count that minimises a cycle model of the shortened loop plus the reduction it adds.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import triton

from .aot import interpreting
from .launch import LaunchConfig
from .splitk import reduce_chunks


@dataclass(frozen=True)
class ConvConfig(LaunchConfig):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    maxnreg: int | None = None  # register cap for ptxas; None lets ptxas choose
    split_k: int = 1  # K-loop slices per output tile (> 1: fp32 partials, reduced in a fixed order)
    fused_reduce: bool = True  # split_k > 1: the tile's last program reduces (False: a reduce kernel)

    def tile_name(self) -> str:
        return f"BM{self.block_m}_BN{self.block_n}_BK{self.block_k}"

    def __str__(self) -> str:
        split = f"_k{self.split_k}{'' if self.fused_reduce else 'r'}" if self.split_k > 1 else ""
        return super().__str__() + split


# Config table: (arch family, operand width, layer kind) -> tile config. Chosen by rule, never autotuned.
# BLOCK_N and BLOCK_K are then clipped to the (super-)group's channel counts (next power of two, >= 16),
# num_stages to the K-steps a program runs, and split_k is set by `choose_split`.
# Kinds: "large" = enough 128x128 tiles to fill the GPU; "small_m" = too few of them (batch 1, late
#        stages), so 64x64 tiles for more programs; "gather" = the flattened-K (stem) loop.
# The 16-bit and fp32 configs keep num_warps = 4: Inductor's non-1x1 conv template miscompiled with
# num_warps = 8 (pytorch issue 173068) and 4 warps already form the one warpgroup that a 64/128-row wgmma
# needs. The sm_90 8-bit entry is the exception (it spills on one warpgroup); gpu_check.sh's int8 stage
# is its parity check on the device.
CONV_CONFIGS: dict[tuple[str, str, str], ConvConfig] = {
    # Hopper: wgmma with a 128x128 fp32 accumulator; 64-wide K steps, 3 stages = 96 KiB of smem (fp16).
    ("sm90", "16bit", "large"): ConvConfig(128, 128, 64, 4, 3),
    ("sm90", "16bit", "small_m"): ConvConfig(64, 64, 64, 4, 4),
    # The stem's per-element (r, s, c) decode costs registers: 128-row tiles sat at 255 (and spilled
    # on sm_80), 64-row tiles take about 165 with no spills.
    ("sm90", "16bit", "gather"): ConvConfig(64, 64, 32, 4, 3),
    # 8-bit operands (int8, fp8): the same 128x128 tile, but on two warpgroups. On one, the int32
    # accumulator (128 registers a thread) plus the dequantize / int8-residual / requantize epilogue
    # reached 255 registers and spilled 168-200 B in every 3x3 residual+ReLU conv at batch 256.
    ("sm90", "8bit", "large"): ConvConfig(128, 128, 64, 8, 3),
    # Ampere: mma.sync keeps operands in registers; 128x64 tiles stay near 160 registers (128x128 took
    # 251), K steps of 32 with 4 cp.async stages.
    ("sm80", "16bit", "large"): ConvConfig(128, 64, 32, 4, 4),
    ("sm80", "16bit", "small_m"): ConvConfig(64, 64, 64, 4, 3),
    ("sm80", "16bit", "gather"): ConvConfig(64, 64, 32, 4, 3),
    # fp32: IEEE fp32 `tl.dot` runs on FMA units with operands in registers (no tensor cores), so the
    # tile is small enough to stay below ~140 registers without spills on sm_80 and sm_90; one entry
    # for every layer kind but the stem. On sm_90 ptxas left these tiles at 96 registers with a few
    # spill stores (STL in the SASS); a cap of 128 lets it allocate 108-120 registers and no spills.
    ("sm90", "fp32", "any"): ConvConfig(64, 64, 16, 4, 3, maxnreg=128),
    ("sm80", "fp32", "any"): ConvConfig(64, 64, 16, 4, 3),
    # The stem's per-element (r, s, c) decode with runtime image sizes spilled at 3 stages on sm_80
    # (and on sm_90 under the 128-register cap, while uncapped it takes 156 registers and no spills).
    ("sm90", "fp32", "gather"): ConvConfig(64, 64, 16, 4, 2),
    ("sm80", "fp32", "gather"): ConvConfig(64, 64, 16, 4, 2),
    # Triton's interpreter pays per program instance and per loop step: the largest tiles, fewest steps.
    ("interp", "any", "any"): ConvConfig(128, 128, 64, 4, 1),
}

AOT_SM_COUNT = 132  # H100/H200 SXM; the SM count assumed when compiling ahead of time
SPLIT_MIN_STEPS = 4  # every split keeps at least this many K-steps, so its pipeline still fills
SPLIT_MAX = 16  # bounds the fp32 workspace (split * M * C_out * 4 bytes) and the reduce kernel's reads
# The split's cost model (cycles of one program, all estimates for an H100 at batch 1, from the sm_90
# SASS). A K-step costs the larger of its operand latency through the pipeline and its MACs at the
# SM's rate: 16-bit wgmma ~1024 MACs/clock, IEEE fp32 on the FMA units 128. The fused reduction costs a
# handshake (the partials' stores drained, a gpu-scope acq_rel atomic, a CTA barrier: about two L2
# round trips) plus, per chunk of `splitk.reduce_rows` rows, the chunk's loads -- about two L2 round
# trips, since ptxas issues a chunk's loads in one or two batches (kernels.sass.load_round_trips).
SPLIT_STEP_LATENCY_CYCLES = 250
SPLIT_MACS_PER_CYCLE = {"16bit": 1024, "fp32": 128}
SPLIT_HANDSHAKE_CYCLES = 800
SPLIT_CHUNK_CYCLES = 1000


@functools.cache
def _cuda_arch(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return major * 10 + minor


def device_arch(device: torch.device) -> int:
    """Compute capability as an int (90, 80, ...); 0 under the interpreter or on the CPU."""
    if interpreting() or device.type != "cuda":
        return 0
    return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def device_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def table_config(
    arch: int, fp32: bool, kind: str, pooled_read: bool = False, eight_bit: bool = False
) -> ConvConfig:
    """The table entry for compute capability `arch` (0 = interpreter) and layer kind; `pooled_read`: the
    layer averages 2x2 windows while loading A (ResNet-D), see `pooled_read_config`; `eight_bit`: int8
    or fp8 operands, whose own entries (where there are any) replace the 16-bit ones."""
    if arch == 0:
        return CONV_CONFIGS[("interp", "any", "any")]
    family = "sm90" if arch >= 90 else "sm80"
    if fp32:
        config = CONV_CONFIGS[(family, "fp32", "gather" if kind == "gather" else "any")]
    else:
        config = CONV_CONFIGS.get((family, "8bit", kind)) if eight_bit else None
        config = config or CONV_CONFIGS[(family, "16bit", kind)]
    return pooled_read_config(config) if pooled_read else config


def k_step_cycles(config: ConvConfig, fp32: bool) -> int:
    """Modelled cycles of one K-step of `config`'s tile (see SPLIT_STEP_LATENCY_CYCLES)."""
    macs = config.block_m * config.block_n * config.block_k
    return max(SPLIT_STEP_LATENCY_CYCLES, macs // SPLIT_MACS_PER_CYCLE["fp32" if fp32 else "16bit"])


def split_cycles(tiles: int, k_steps: int, sm_count: int, split: int, step_cycles: int, config,
                 fp32: bool = False) -> int:  # fmt: skip
    """Modelled cycles of a layer split `split` ways: waves of (K-steps of one slice + its reduction)."""
    waves = triton.cdiv(tiles * split, sm_count)
    loop = triton.cdiv(k_steps, split) * step_cycles
    if split == 1:
        return waves * loop
    chunks = reduce_chunks(config.block_m, config.block_n, split, config.num_warps, config.maxnreg, fp32)
    return waves * loop + SPLIT_HANDSHAKE_CYCLES + chunks * SPLIT_CHUNK_CYCLES


def choose_split(tiles: int, k_steps: int, sm_count: int, config: ConvConfig | None = None,
                 fp32: bool = False) -> int:  # fmt: skip
    """K-slices per output tile: the split with the fewest modelled cycles (`split_cycles`), among those
    that keep every slice >= SPLIT_MIN_STEPS steps, split at most SPLIT_MAX ways and fit in one wave.

    A grid that already fills the SMs (tiles >= sm_count) is never split (its partials would only add
    traffic). Splits are evened out so every slice has ceil(k_steps / split) steps but the last (no
    empty slice). Without a config, the sm_90 16-bit small-tile entry gives the reduction's chunks.
    """
    if tiles >= sm_count:
        return 1
    config = config or CONV_CONFIGS[("sm90", "16bit", "small_m")]
    step = k_step_cycles(config, fp32)
    most = min(triton.cdiv(sm_count, tiles), k_steps // SPLIT_MIN_STEPS, SPLIT_MAX)
    candidates = {triton.cdiv(k_steps, steps_per_split(k_steps, s)) for s in range(1, max(most, 1) + 1)}
    cost = lambda s: split_cycles(tiles, k_steps, sm_count, s, step, config, fp32)  # noqa: E731
    return min(sorted(candidates), key=cost)


def fused_reduce_trips(config: ConvConfig, fp32: bool = False) -> int | None:
    """Trips of the fused reduction's chunk loop (block_m / `splitk.reduce_rows`, both powers of two);
    None when the config runs no fused reduction."""
    if config.split_k == 1 or not config.fused_reduce:
        return None
    c = config
    return reduce_chunks(c.block_m, c.block_n, c.split_k, c.num_warps, c.maxnreg, fp32)


def steps_per_split(k_steps: int, split: int) -> int:
    return triton.cdiv(k_steps, split)


def pooled_read_config(config: ConvConfig) -> ConvConfig:
    """A layer that averages 2x2 windows while loading A (ResNet-D) holds four A tiles and their fp32 sum
    in registers: K steps of at most 32 on 128-row tiles (sm_90 fp16 at 128x128x64 took 255 registers and
    spilled 320 bytes) and no register cap (sm_90 fp32 capped at 128 spilled 16 bytes; uncapped: 139)."""
    block_k = min(config.block_k, 32) if config.block_m >= 128 else config.block_k
    return replace(config, block_k=block_k, maxnreg=None)


def finalize(config: ConvConfig, split: int, k_steps: int) -> ConvConfig:
    """Set the split and clip num_stages to the K-steps one program runs: a layer with a single K-step
    gets one stage (no 3-deep ring of shared memory that would never be filled)."""
    steps = steps_per_split(k_steps, split)
    return replace(config, split_k=split, num_stages=max(1, min(config.num_stages, steps)))




# Tile sizes are clipped to the (super-)group's channel counts: these give the clip.
def pow2_at_least_16(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def supergroup_factor(groups: int, cg_in: int, ng: int) -> int:
    """Smallest power of two P dividing `groups` with P*cg_in >= 16 and P*ng >= 16 (or P = groups)."""
    p = 1
    while p < groups and (p * cg_in < 16 or p * ng < 16) and groups % (2 * p) == 0:
        p *= 2
    return p


__all__ = [
    "AOT_SM_COUNT",
    "CONV_CONFIGS",
    "ConvConfig",
    "choose_split",
    "k_step_cycles",
    "split_cycles",
    "device_arch",
    "device_sm_count",
    "finalize",
    "fused_reduce_trips",
    "pow2_at_least_16",
    "steps_per_split",
    "supergroup_factor",
    "table_config",
]
