"""An analytical performance model of fastres's kernel launches: an ESTIMATE, never a measurement.

Inputs per launch: the launch facts its launcher writes into the `KernelSpec` (grid, main-loop K-steps,
useful FLOPs, minimum bytes; see `fastres.kernels.aot.KernelSpec`) and what compiling it for the target
says (registers, shared memory, and from the SASS the main loop: warp instructions, MMA instructions and
bytes loaded per K-step; `fastres.kernels.sass`). Every number about the GPU is a field of `Gpu`, one
instance per card in `GPUS`, printed with every estimate and overridable (`--assume key=value`).

Per launch, on the busiest SM (it receives c = ceil(CTAs / SMs) CTAs, `resident` at a time):

    resident  = min(blocks, warps, registers, shared-memory limits per SM)
    waves     = ceil(CTAs / (SMs * resident)), each of r <= resident CTAs
    issue     = instructions * max(r * W / 4 warps per scheduler, warp_issue_interval_cycles): a
                scheduler issues one instruction per cycle, one warp at best one per interval
    per wave  = k * max(r * tensor cycles per step, issue cycles per step,
                        load latency / pipeline depth + barriers * barrier cost)
                + the same for the loop around the main loop (outer_steps iterations) and the rest
                + CTA overhead (launch, pipeline fill, epilogue drain; first loads at DRAM latency when
                  the weights are cold)
    reduction = split-K's fused reduction, from the SASS: handshake (2 L2 round trips) + reduce_trips *
                round trips per trip * L2 latency (kernels.sass.ReductionSummary), once per launch
    compute   = sum over waves (tensor, issue, latency: each term alone, summed the same way) + reduction
    L2        = max(all CTAs' bytes / L2 bandwidth, the busiest SM's bytes / its L2 port)
    DRAM      = minimum bytes / (HBM bandwidth * efficiency)
    time      = max(compute, L2, DRAM) + per-node gap; the bound is L2 or DRAM when one of them won,
                else whichever of tensor / issue / latency / reduction is largest alone.

Cycles convert to time at the sustained clock under tensor load (`sustained_clock_ghz`, ~1.7 GHz on an
H100 SXM), not the boost clock the tensor peak is quoted at. Weights are cold (read from DRAM at batch 1)
when the model's weights exceed the usable part of L2 (`l2_usable_fraction`): the first loads of every
launch and, in a single-wave launch, every K-step's load then take DRAM latency.

PDL (programmatic dependent launch), for a launch whose compiled code uses it (`KernelStats.uses_pdl`:
griddepcontrol in the PTX) while `pdl=1`: its first wave's pre-wait prologue -- CTA launch and setup
(`cta_overhead_cycles`) and, when it prefetches weights before the wait (`KernelSpec.prefetch_bytes`),
their first load (`first latency`) -- overlaps its predecessor's drain. The part hidden is
`pdl_overlap_fraction` of that prologue, never more than the predecessor's own busy time (the window it
can hide behind); later waves and the first activation load (after the wait, from L2) are paid in full,
and the node gap shrinks to `pdl_gap_us`. `pdl=0` models the same kernels launched without PDL
(FASTRES_PDL=0).

The forward pass adds the engine's copy of the input into the CUDA graph's static input (a launch
outside the graph), one graph launch, and the backend's non-Triton graph nodes (the NCHW -> NHWC copy).

Known blind spots (why this is a rough guide, not a prediction):
* Per K-step the max is taken, not a sum, and memory time overlaps compute completely: tensor work,
  issue, memory and latency are assumed to overlap perfectly. Real kernels overlap partly, so the
  estimate leans optimistic.
* Instruction counts are static: predicated-off instructions and masked lanes count as executed (the
  edges of a tile, the padding taps of a 3x3 conv), so issue and L2 terms lean pessimistic there.
* Only the main loop is multiplied by K-steps; other loops count once (the head's outer channel-slice
  loop and its dot, for instance, are undercounted).
* Load latency is one number (an L2 hit when the launch's data fits in half the L2, else a DRAM access),
  divided by the cp.async / TMA pipeline depth; bank conflicts, smem bandwidth, the wgmma wait chain,
  L2 partition crossings, clock throttling under load and DRAM page effects are not modelled.
* The prologue/epilogue (CTA overhead) is paid once per wave and never hidden behind co-resident CTAs:
  pessimistic for launches of many waves (the stem at batch 256).
* Inter-kernel overlap (PDL) is one fraction of the first wave's prologue for every launch, capped by the
  predecessor's busy time: whether the dependent's CTAs find room beside the predecessor's on each SM is
  not modelled; whether weights stay in L2 across forwards is all-or-nothing per model; the per-node gap
  is a constant.
* One number is an illusion: `fastres.tools.estimate_band` reruns the model under an optimistic and a
  pessimistic assumption set and says which assumptions dominate the spread.
* TMA loads carry no byte count in the SASS: a launcher using TMA must give `l2_bytes`.
* mma.sync (HMMA) on Hopper runs at an assumed fraction of the wgmma peak.
Calibrate against measurements (benchmarks/gpu_check.sh writes both side by side) before trusting it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields

from ..errors import InputError

ESTIMATE_BANNER = "ESTIMATE from an analytical model (fastres.estimate), not a measurement"


@dataclass(frozen=True)
class Gpu:
    """Every assumption about one card, in one place; each field can be overridden with --assume."""

    name: str
    arch: int  # compute capability the kernels are compiled for
    sms: int
    clock_ghz: float  # the clock NVIDIA quotes its dense tensor peak at
    tensor_flops_per_cycle_per_sm: float  # dense fp16/bf16 (wgmma on sm_90, mma.sync on sm_80)
    mma_sync_fraction: float  # mma.sync (HMMA) rate as a fraction of that peak on this card
    issue_per_cycle_per_sm: float  # warp instructions issued per cycle per SM (4 partitions x 1)
    dram_gbs: float  # HBM bandwidth, spec sheet
    dram_efficiency: float  # fraction of it a streaming kernel gets
    l2_gbs: float  # L2 bandwidth, all SMs together (measured figures vary widely)
    l2_bytes_per_cycle_per_sm: float  # one SM's port to L2
    l2_mib: float
    l2_latency_cycles: float  # a load that hits L2, under load
    dram_latency_cycles: float  # a load that misses L2
    barrier_cycles: float  # one __syncthreads in the main loop
    cta_overhead_cycles: float  # CTA launch, prologue and epilogue latency not in the SASS counts
    node_gap_us: float  # between two kernel nodes of a CUDA graph
    forward_overhead_us: float  # graph launch (the static-input copy is modelled as a launch)
    sustained_clock_ghz: float  # the clock cycles run at under sustained tensor load (below the boost)
    warp_issue_interval_cycles: float = 2.0  # one warp's average cycles between issues (dependencies)
    l2_usable_fraction: float = 0.5  # of L2, what keeps weights from one forward to the next
    pdl: int = 1  # 1: kernels whose compiled code uses PDL overlap their predecessor (0: launched without)
    pdl_gap_us: float = 0.5  # the node gap left under PDL (the wait's release after the predecessor ends)
    # Of a PDL launch's first-wave prologue (setup + prefetched first weight load), the part hidden behind
    # its predecessor's drain: less than 1 where the predecessor's CTAs leave no room on an SM.
    pdl_overlap_fraction: float = 0.75
    regs_per_sm: int = 65536
    smem_per_sm_kib: float = 228.0
    smem_reserved_per_cta_bytes: int = 1024  # the driver keeps 1 KiB per resident CTA
    max_ctas_per_sm: int = 32
    max_warps_per_sm: int = 64

    @property
    def peak_tflops(self) -> float:
        return self.sms * self.clock_ghz * self.tensor_flops_per_cycle_per_sm / 1e3


_H100 = Gpu(
    name="h100",  # H100 SXM5 80 GB
    arch=90,
    sms=132,
    clock_ghz=1.83,  # 132 SMs * 1.83 GHz * 4096 = 989 TFLOP/s dense fp16, NVIDIA's figure
    tensor_flops_per_cycle_per_sm=4096,
    mma_sync_fraction=0.6,  # a guess: Hopper runs the Ampere-style mma.sync well below wgmma peak
    issue_per_cycle_per_sm=4,
    dram_gbs=3350,
    dram_efficiency=0.85,
    # Published figures vary: ~5.5-7 TB/s measured on H100 PCIe (114 SMs, lower clock), ~12 TB/s quoted
    # for SXM; 128x128-tile fp16 GEMMs reaching ~650 TFLOP/s need ~10 TB/s (cp.async skips L1).
    l2_gbs=10000,
    l2_bytes_per_cycle_per_sm=64,
    l2_mib=50,
    l2_latency_cycles=300,
    dram_latency_cycles=800,
    barrier_cycles=20,
    cta_overhead_cycles=1000,
    node_gap_us=1.5,
    forward_overhead_us=4.0,
    sustained_clock_ghz=1.7,  # H100 SXM under sustained tensor load (1.98 boost, 1.83 at the quoted peak)
)
GPUS: dict[str, Gpu] = {
    "h100": _H100,
    "h200": dataclasses.replace(_H100, name="h200", dram_gbs=4800),  # same die, HBM3e
    "a100": dataclasses.replace(
        _H100,
        name="a100",  # A100 SXM4 80 GB
        arch=80,
        sms=108,
        clock_ghz=1.41,  # 108 * 1.41 GHz * 2048 = 312 TFLOP/s dense fp16
        tensor_flops_per_cycle_per_sm=2048,
        mma_sync_fraction=1.0,  # mma.sync is Ampere's native path
        dram_gbs=2039,
        l2_gbs=5000,  # 5120 B/clk on paper (7.2 TB/s); microbenchmarks see 4-5 TB/s
        l2_mib=40,
        l2_latency_cycles=250,
        dram_latency_cycles=650,
        smem_per_sm_kib=164.0,
        sustained_clock_ghz=1.35,
    ),
}


def get_gpu(name: str, assume: list[str] | tuple[str, ...] = ()) -> Gpu:
    """The named card's assumptions with `key=value` overrides applied."""
    gpu = GPUS.get(name.lower())
    if gpu is None:
        raise InputError(f"unknown --gpu {name!r}; choose one of {', '.join(GPUS)}")
    return apply_assumptions(gpu, assume)


_MAY_BE_ZERO = (
    "node_gap_us", "forward_overhead_us", "pdl", "pdl_gap_us", "pdl_overlap_fraction", "cta_overhead_cycles"
)  # fmt: skip


def apply_assumptions(gpu: Gpu, assume: list[str] | tuple[str, ...]) -> Gpu:
    types = {f.name: f.type for f in fields(Gpu) if f.name != "name"}
    changes = {}
    for item in assume:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in types:
            raise InputError(f"bad --assume {item!r}: expected key=value with key one of {', '.join(types)}")
        try:
            number = float(value)
        except ValueError:
            raise InputError(f"bad --assume {item!r}: {value!r} is not a number") from None
        if number < 0 or (number == 0 and key not in _MAY_BE_ZERO):
            raise InputError(f"bad --assume {item!r}: must be positive")
        changes[key] = int(number) if types[key] in ("int", int) else number
    return dataclasses.replace(gpu, **changes)


def assumption_lines(gpu: Gpu) -> list[str]:
    """Every assumption, one `key = value` per line, then the peak it implies."""
    lines = [f"  {f.name} = {getattr(gpu, f.name)}" for f in fields(Gpu)]
    lines.append(f"  (implied dense fp16 tensor peak: {gpu.peak_tflops:.0f} TFLOP/s)")
    return lines


def gpu_for_device_name(device_name: str) -> str | None:
    """The `GPUS` key for a torch device name (H100 SXM, H200, A100), or None when none fits."""
    upper = device_name.upper()
    if "H200" in upper:
        return "h200"
    if "H100" in upper and "PCIE" not in upper:
        return "h100"
    if "A100" in upper:
        return "a100"
    return None


@dataclass
class LaunchEstimate:
    name: str
    ctas: int | None
    resident: int | None  # CTAs per SM at once
    waves: int | None
    k_steps: int | None
    instr_per_step: int | None  # warp instructions in one main-loop iteration
    mma_per_step: int | None
    tensor_cycles_per_step: float | None  # per CTA, at the SM's full tensor rate
    issue_cycles_per_step: float | None  # per CTA
    latency_cycles_per_step: float | None
    flops: int | None
    min_bytes: int | None
    l2_bytes: int | None
    terms_us: dict[str, float]  # tensor, issue, latency (each alone), compute (combined), L2, DRAM
    time_us: float  # max(compute, L2, DRAM) + the node gap
    bound: str
    notes: list[str] = dataclasses.field(default_factory=list)
    pdl_hidden_us: float = 0.0  # prologue time hidden behind the predecessor (PDL), already taken off
    gap_us: float = 0.0  # the node gap included in time_us (pdl_gap_us for a PDL launch)


def resident_ctas(gpu: Gpu, registers: int, smem_bytes: int, num_warps: int) -> int:
    """CTAs one SM holds at once: the tightest of the block, warp, register and shared-memory limits."""
    # Registers are allocated per warp in units of 256 (8 per thread).
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_regs = gpu.regs_per_sm // (regs_per_warp * num_warps)
    by_warps = gpu.max_warps_per_sm // num_warps
    per_cta_smem = smem_bytes + gpu.smem_reserved_per_cta_bytes
    by_smem = int(gpu.smem_per_sm_kib * 1024 // per_cta_smem)
    return max(0, min(gpu.max_ctas_per_sm, by_warps, by_regs, by_smem))


def estimate_launch(spec, stats, gpu: Gpu, weights_cold: bool = False,
                    overlap_window_us: float = math.inf) -> LaunchEstimate:  # fmt: skip
    """The model above for one launch; `stats` is its `KernelStats` (compiled for `gpu.arch`);
    `weights_cold`: the model's weights do not stay in L2 between forwards (`weights_are_cold`);
    `overlap_window_us`: the predecessor's busy time, the most a PDL prologue can hide behind."""
    notes: list[str] = []
    cycle_us = 1e-3 / gpu.sustained_clock_ghz
    pdl = bool(gpu.pdl) and stats.compiled_ok and bool(getattr(stats, "uses_pdl", False))
    gap = gpu.pdl_gap_us if pdl else gpu.node_gap_us
    if not stats.compiled_ok or stats.sass is None:
        return LaunchEstimate(spec.name, spec.ctas, None, None, spec.k_steps, None, None, None, None,
                              None, spec.flops, spec.min_bytes, None, {}, gap, "?",
                              [f"not compiled: {stats.error}"], gap_us=gap)  # fmt: skip
    warps = spec.num_warps
    resident = resident_ctas(gpu, stats.registers or 0, stats.shared_mem_bytes or 0, warps)
    if resident == 0:
        notes.append("does not fit on one SM")
        resident = 1
    ctas = spec.ctas or 1
    if spec.ctas is None:
        notes.append("grid unknown: 1 CTA assumed")
    per_sm = math.ceil(ctas / gpu.sms)
    waves = math.ceil(ctas / (gpu.sms * resident))
    loop, outside = stats.sass.main_loop, stats.sass.outside
    k = spec.k_steps
    if loop is not None and k is None:
        notes.append("k_steps unknown: 1 assumed")
        k = 1
    k = k or 0
    if loop is not None and stats.sass.unroll > 1:  # k counts source iterations; the SASS loop does u
        k = math.ceil(k / stats.sass.unroll)
    data_bytes = spec.min_bytes or 0
    mem_latency = gpu.l2_latency_cycles if data_bytes <= gpu.l2_mib * 2**20 / 2 else gpu.dram_latency_cycles
    first_latency = gpu.dram_latency_cycles if weights_cold else mem_latency
    if weights_cold and ctas <= gpu.sms * resident:  # one wave: every weight tile is read once, cold
        mem_latency = gpu.dram_latency_cycles
    enclosing, outer = stats.sass.enclosing, spec.outer_steps
    if enclosing is not None and outer is None:
        notes.append("the loop around the main loop counts once (outer_steps not given)")
    # (ops per iteration, iterations per CTA, loads pipelined?) for the main loop, the loop around it
    # and the rest of the kernel; the rest's load latency is in `overhead`.
    segments = []
    for ops, trips, pipelined in ((loop, k, True), (enclosing, outer or 1, False), (outside, 1, None)):
        if ops is None:
            continue
        latency = ops.barriers * gpu.barrier_cycles
        if pipelined is not None and (ops.load_bytes or ops.async_copies):
            depth = max(1, (stats.num_stages or 1) - 1) if pipelined and ops.async_copies else 1
            latency += mem_latency / depth
        segments.append(
            (
                trips,
                _tensor_cycles(ops, gpu, warps),
                ops.instructions,
                latency if pipelined is not None else 0,
            )
        )
    # First loads in, last stores out. Under PDL the first wave's pre-wait part (setup, and the first
    # weight load when it is prefetched before the wait) overlaps the predecessor's drain.
    overhead = gpu.cta_overhead_cycles + first_latency + mem_latency
    hidden = 0.0
    if pdl:
        pre_wait = gpu.cta_overhead_cycles + (first_latency if spec.prefetch_bytes else 0.0)
        hidden = min(gpu.pdl_overlap_fraction * pre_wait, overlap_window_us / cycle_us)

    def issue(instructions: float, r: int) -> float:
        # r CTAs share the SM's schedulers; one warp issues at best once per interval (dependencies).
        return instructions * max(r * warps / gpu.issue_per_cycle_per_sm, gpu.warp_issue_interval_cycles)

    # The busiest SM runs its CTAs in waves of `resident`; within a wave every iteration takes the
    # slowest of the tensor cores, the issue slots and the load latency, then the CTAs drain.
    pure = {"tensor": 0.0, "issue": 0.0, "latency": 0.0, "reduction": reduction_cycles(spec, stats, gpu)}
    compute = pure["reduction"]
    wave_sizes = [resident] * (per_sm // resident) + ([per_sm % resident] if per_sm % resident else [])
    for wave, r in enumerate(wave_sizes):
        paid = overhead - (hidden if wave == 0 else 0.0)
        compute += paid
        pure["latency"] += paid
        for trips, tensor, instructions, latency in segments:
            t, i = r * tensor, issue(instructions, r)
            compute += trips * max(t, i, latency)
            pure["tensor"] += trips * t
            pure["issue"] += trips * i
            pure["latency"] += trips * latency
    thread_bytes = sum(
        trips * (ops.load_bytes + ops.store_bytes)
        for ops, trips in ((loop, k), (enclosing, outer or 1), (outside, 1))
        if ops is not None
    )
    l2_bytes = spec.l2_bytes if spec.l2_bytes is not None else thread_bytes * 32 * warps * ctas
    if spec.l2_bytes is None and (outside.tma_loads or (loop and loop.tma_loads)):
        notes.append("TMA loads not counted in L2 bytes")
    l2_port_bytes = (l2_bytes / ctas) * per_sm
    terms = {name: cycles * cycle_us for name, cycles in pure.items()}
    terms["compute"] = compute * cycle_us  # the three above combined per iteration, plus prologue/epilogue
    terms["L2"] = max(l2_bytes / (gpu.l2_gbs * 1e3), l2_port_bytes / gpu.l2_bytes_per_cycle_per_sm * cycle_us)
    terms["DRAM"] = data_bytes / (gpu.dram_gbs * gpu.dram_efficiency * 1e3)
    if spec.min_bytes is None:
        notes.append("min_bytes unknown: DRAM term is 0")
    winner = max(("compute", "L2", "DRAM"), key=terms.get)
    bound = max(pure, key=pure.get) if winner == "compute" else winner
    notes += stats.sass.notes
    return LaunchEstimate(
        name=spec.name,
        ctas=spec.ctas,
        resident=resident,
        waves=waves,
        k_steps=spec.k_steps,
        instr_per_step=loop.instructions if loop else None,
        mma_per_step=loop.mma if loop else None,
        tensor_cycles_per_step=segments[0][1] if loop else None,
        issue_cycles_per_step=issue(loop.instructions, 1) if loop else None,
        latency_cycles_per_step=segments[0][3] if loop else None,
        flops=spec.flops,
        min_bytes=spec.min_bytes,
        l2_bytes=int(l2_bytes),
        terms_us=terms,
        time_us=terms[winner] + gap,
        bound=bound,
        notes=notes,
        pdl_hidden_us=hidden * cycle_us,
        gap_us=gap,
    )


def reduction_cycles(spec, stats, gpu: Gpu) -> float:
    """The fused split-K reduction of the tile's last CTA, read from the SASS: the handshake (partials
    drained, acq_rel atomic: two L2 round trips), then each trip's dependent round trips."""
    red = stats.sass.reduction if stats.sass is not None else None
    if red is None:
        return 0.0
    trips = spec.reduce_trips if spec.reduce_trips is not None else 1
    trips = trips if red.looped else 1
    round_trips = 2 + trips * red.round_trips_per_trip + red.round_trips_outside_loop
    return round_trips * gpu.l2_latency_cycles


def weights_are_cold(weight_bytes: int, gpu: Gpu) -> bool:
    """Whether a model's weights miss L2 from one forward to the next (exceed its usable part)."""
    return weight_bytes > gpu.l2_usable_fraction * gpu.l2_mib * 2**20


def _tensor_cycles(ops, gpu: Gpu, warps: int) -> float:
    """Cycles the SM's tensor cores need for one CTA's MMAs in `ops`."""
    if not ops.mma:
        return 0.0
    rate = gpu.tensor_flops_per_cycle_per_sm
    if ops.mma_kind.startswith("HMMA") and gpu.arch >= 90:
        rate *= gpu.mma_sync_fraction
    if ops.mma_kind.endswith("TF32"):
        rate /= 2
    issuers = warps / 4 if ops.mma_kind.startswith("HGMMA") else warps  # wgmma: per warpgroup
    return ops.mma_flops * issuers / rate


def estimate_copy(name: str, nbytes: int, gpu: Gpu, gap_us: float) -> LaunchEstimate:
    """A plain device copy (no Triton kernel): DRAM-bound, never faster than one round trip to memory."""
    cycle_us = 1e-3 / gpu.sustained_clock_ghz
    terms = {
        "latency": (gpu.cta_overhead_cycles + 2 * gpu.dram_latency_cycles) * cycle_us,
        "DRAM": nbytes / (gpu.dram_gbs * gpu.dram_efficiency * 1e3),
    }
    bound = max(terms, key=terms.get)
    note = "torch copy, modelled as DRAM traffic"
    return LaunchEstimate(name, None, None, None, None, None, None, None, None, None, 0, nbytes, None,
                          terms, terms[bound] + gap_us, bound, [note], gap_us=gap_us)  # fmt: skip


__all__ = [
    "ESTIMATE_BANNER",
    "GPUS",
    "Gpu",
    "LaunchEstimate",
    "apply_assumptions",
    "assumption_lines",
    "estimate_copy",
    "estimate_launch",
    "get_gpu",
    "gpu_for_device_name",
    "reduction_cycles",
    "resident_ctas",
    "weights_are_cold",
]
