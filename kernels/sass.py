"""Static facts from a kernel's SASS (the text `cuobjdump -sass` prints): its main loop and memory ops.

A loop is a backward branch: `BRA target` at address a with target < a; its body is every instruction
from target to a inclusive. The *main loop* is the innermost loop whose body holds a tensor-core MMA
(HGMMA = wgmma on sm_90, HMMA = mma.sync on sm_80+; IGMMA and IMMA are their int8 forms, QGMMA and
QMMA their fp8 forms on sm_90 and sm_89); in a kernel
with no MMA in any loop (fp32 dots on FMA units, pooling, the head) it is the innermost loop with the
most instructions. Per main-loop iteration
("K-step") this module counts warp instructions, MMA instructions and their FLOPs, barriers,
and the bytes each thread asks of global memory (LDG / LDGSTS / STG widths); the same per iteration of
the innermost loop around the main loop, if any (`enclosing`, main loop excluded); outside both, once.
These are static counts: predicated-off instructions and masked lanes still count, a TMA load (UTMALDG)
moves an unknown number of bytes (it is reported, never guessed), and other loops count once per
iteration of whatever encloses them. A loop without MMA that ptxas unrolled u times (with a one-copy
remainder loop beside it) is recognised and reported as `unroll`.

Works on any SASS text with one kernel (Triton's cubins hold one); imports nothing but the standard library.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# "/*31d0*/    @!P4 HGMMA.64x64x16.F32 R24, gdesc[UR12].tnspB, R24 ;"
_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")
_BRANCH_TARGET = re.compile(r"(0x[0-9a-f]+)")
_HGMMA_SHAPE = re.compile(r"[HIQ]GMMA\.(\d+)x(\d+)x(\d+)")
# HMMA.16816 = m16n8k16, HMMA.1688 = m16n8k8, HMMA.1684 = m16n8k4 (tf32), IMMA.16832 = int8 m16n8k32.
_HMMA_SHAPE = re.compile(r"[HIQ]MMA\.(16)(8)(32|16|8|4)\b")
_WIDTH = re.compile(r"\.(128|64|U16|S16|U8|S8)\b")
_WIDTH_BYTES = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


@dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # with modifiers, e.g. "LDGSTS.E.BYPASS.128"
    operands: str


@dataclass
class OpCounts:
    """What a stretch of SASS asks of the machine, per warp (instructions) or per thread (bytes)."""

    instructions: int = 0
    mma: int = 0  # HGMMA or HMMA instructions
    mma_flops: int = 0  # 2*M*N*K summed: per warpgroup for HGMMA, per warp for HMMA
    mma_kind: str = ""  # "HGMMA", "HMMA", "IGMMA", "IMMA" or "" (none); tf32 adds ".TF32"
    barriers: int = 0  # BAR.SYNC / BAR.RED: the CTA's warps wait for each other
    load_bytes: int = 0  # global loads (LDG, LDGSTS) per thread
    store_bytes: int = 0  # global stores (STG) per thread
    async_copies: int = 0  # LDGSTS (cp.async) and UTMALDG (TMA): loads that a pipeline can run ahead
    tma_loads: int = 0  # UTMALDG: bytes not visible in the SASS


@dataclass(frozen=True)
class ReductionSummary:
    """The split-K reduction: the code after the kernel's first global atomic (its arrival counter).

    Per trip of its loop (the whole stretch once when it has no loop): global loads, and the dependent
    round trips they take in issue order (`load_round_trips`): 1 when every load issues before the first
    use. `looped` says whether a backward branch repeats it; the trip count is a launch fact
    (`KernelSpec.reduce_trips`), not in the SASS."""

    loads_per_trip: int
    round_trips_per_trip: int
    looped: bool
    loads_outside_loop: int = 0
    round_trips_outside_loop: int = 0


@dataclass
class SassSummary:
    main_loop: OpCounts | None  # per iteration; None when the kernel has no loop
    outside: OpCounts  # everything not in the main loop nor the loop enclosing it, once per CTA
    loops: int  # backward branches found
    main_loop_span: tuple[int, int] | None = None  # first and last address of the main loop body
    notes: list[str] = field(default_factory=list)
    unroll: int = 1  # source iterations per main-loop iteration (ptxas unrolled a loop without MMA)
    # The innermost loop around the main loop, without the main loop's body (per iteration); None if none.
    enclosing: OpCounts | None = None
    reduction: ReductionSummary | None = None  # split-K's fused reduction, when the kernel has one
    # PDL: ACQBULK is griddepcontrol.wait; CCTL.E.PF2 (prefetch.global.L2) issued before it, per thread.
    gdc_wait: bool = False
    l2_prefetches_before_wait: int = 0
    # Global loads, stores and atomics issued before that wait (PDL's hazard rule allows only constants).
    memory_ops_before_wait: tuple[str, ...] = ()


def parse_instructions(sass: str) -> list[Instruction]:
    out = []
    for match in _LINE.finditer(sass):
        out.append(Instruction(int(match.group(1), 16), match.group(2), match.group(3).strip()))
    return out


def _is_mma(opcode: str) -> bool:
    return opcode.startswith(("HGMMA", "HMMA", "IGMMA", "IMMA", "QGMMA", "QMMA"))


def _mma_flops(opcode: str) -> int:
    shape = _HGMMA_SHAPE.match(opcode) or _HMMA_SHAPE.match(opcode)
    if shape is None:
        return 0
    m, n, k = (int(g) for g in shape.groups())
    return 2 * m * n * k


def _width(opcode: str) -> int:
    match = _WIDTH.search(opcode)
    return _WIDTH_BYTES[match.group(1)] if match else 4


def count_ops(instructions: list[Instruction]) -> OpCounts:
    c = OpCounts()
    for ins in instructions:
        op = ins.opcode
        c.instructions += 1
        if _is_mma(op):
            c.mma += 1
            c.mma_flops += _mma_flops(op)
            kind = op.split(".")[0] + (".TF32" if "TF32" in op else "")
            c.mma_kind = c.mma_kind or kind
        elif op.startswith(("BAR.SYNC", "BAR.RED")):
            c.barriers += 1
        elif op.startswith("LDGSTS"):
            c.load_bytes += _width(op)
            c.async_copies += 1
        elif op.startswith("LDG"):  # not LDGDEPBAR: that is a fence, not a load
            if not op.startswith("LDGDEPBAR"):
                c.load_bytes += _width(op)
        elif op.startswith("UTMALDG"):
            c.async_copies += 1
            c.tma_loads += 1
        elif op.startswith("STG"):
            c.store_bytes += _width(op)
    return c


def find_loops(instructions: list[Instruction]) -> list[tuple[int, int]]:
    """(first, last) index pairs of every backward branch's body, in program order of the branch."""
    index = {ins.address: i for i, ins in enumerate(instructions)}
    loops = []
    for i, ins in enumerate(instructions):
        if not ins.opcode.startswith("BRA"):
            continue
        target = _BRANCH_TARGET.search(ins.operands)
        if target is None:
            continue
        start = index.get(int(target.group(1), 16))
        if start is not None and start < i:  # `BRA self` (the trap at the end) is not a loop
            loops.append((start, i))
    return loops


def summarize(sass: str) -> SassSummary:
    """The main loop (per iteration) and everything else (once) of the one kernel in `sass`."""
    instructions = parse_instructions(sass)
    if not instructions:
        raise ValueError("no SASS instructions found (is this `cuobjdump -sass` output?)")
    loops = find_loops(instructions)
    summary = _summarize(instructions, loops)
    summary.reduction = summarize_reduction(instructions, loops)
    wait = next((i for i, ins in enumerate(instructions) if ins.opcode.startswith("ACQBULK")), None)
    if wait is not None:
        summary.gdc_wait = True
        summary.l2_prefetches_before_wait = sum(
            ins.opcode.startswith("CCTL") and ".PF2" in ins.opcode for ins in instructions[:wait]
        )
        summary.memory_ops_before_wait = tuple(
            ins.opcode for ins in instructions[:wait] if ins.opcode.startswith(_GLOBAL_MEMORY_OPS)
        )
    return summary


def summarize_reduction(
    instructions: list[Instruction], loops: list[tuple[int, int]]
) -> ReductionSummary | None:
    """The stretch after the first global atomic (split-K's arrival counter), or None without one."""
    start = next((i for i, ins in enumerate(instructions) if ins.opcode.startswith("ATOMG")), None)
    if start is None:
        return None
    after = [(a, b) for a, b in loops if a > start]
    if not after:
        loads, trips = load_round_trips(instructions[start:])
        return ReductionSummary(loads, trips, False)
    a, b = min(after)  # the chunk loop: the first loop after the atomic
    loads, trips = load_round_trips(instructions[a : b + 1])
    outside = load_round_trips(instructions[start:a] + instructions[b + 1 :])
    return ReductionSummary(loads, trips, True, *outside)


def _summarize(instructions: list[Instruction], loops: list[tuple[int, int]]) -> SassSummary:
    innermost = [
        (a, b) for a, b in loops if not any((a, b) != (c, d) and a <= c and d <= b for c, d in loops)
    ]
    with_mma = [(a, b) for a, b in loops if any(_is_mma(i.opcode) for i in instructions[a : b + 1])]
    notes = []
    unroll = 1
    if with_mma:
        main = min(with_mma, key=lambda span: span[1] - span[0])  # the innermost loop holding MMAs
    elif innermost:
        main = max(innermost, key=lambda span: span[1] - span[0])
        notes.append("no MMA in any loop: main loop = largest innermost loop")
        unroll = _unroll_factor(instructions, main, innermost)
        if unroll > 1:
            notes.append(f"ptxas unrolled it x{unroll} (a remainder loop has 1/{unroll} of its loads)")
    else:
        main = None
    if main is None:
        return SassSummary(None, count_ops(instructions), len(loops), None, ["no loop"])
    a, b = main
    around = [(c, d) for c, d in loops if c <= a and b <= d and (c, d) != (a, b) and d - c > b - a]
    enclosing = None
    if around:
        c, d = min(around, key=lambda span: span[1] - span[0])
        enclosing = count_ops(instructions[c:a] + instructions[b + 1 : d + 1])
        outside = count_ops(instructions[:c] + instructions[d + 1 :])
    else:
        outside = count_ops(instructions[:a] + instructions[b + 1 :])
    others = len({start for start, _ in loops}) - 1 - bool(around)
    if others > 0:
        notes.append(f"{others} other loop(s) count once per enclosing iteration")
    if outside.mma:
        notes.append(f"{outside.mma} MMA outside the main loop count once")
    span = (instructions[a].address, instructions[b].address)
    return SassSummary(
        count_ops(instructions[a : b + 1]), outside, len(loops), span, notes, unroll, enclosing
    )


_REGISTER = re.compile(r"\bR(\d+)\b")
# Global memory: loads (incl. cp.async), stores, atomics and reductions, TMA; LDGDEPBAR is a fence.
_GLOBAL_MEMORY_OPS = ("LDG.", "LDGSTS", "STG", "ATOMG", "ATOM.", "RED.", "UTMALDG", "UTMASTG", "LD.", "ST.")


def _is_global_load(opcode: str) -> bool:
    return opcode.startswith("LDG") and not opcode.startswith("LDGDEPBAR")


def load_round_trips(instructions: list[Instruction]) -> tuple[int, int]:
    """(global loads, dependent round trips) of a straight-line stretch of SASS, in issue order.

    Issue is in order: the first instruction that reads a register a still-pending LDG writes stalls
    until that load (and, approximately, every load issued before it) has returned -- one round trip,
    after which nothing is pending. A stretch whose loads all issue before the first use costs one round
    trip; ptxas interleaving uses between the loads (to save registers) costs one per batch."""
    pending: set[int] = set()
    loads = trips = 0
    for ins in instructions:
        regs = [int(r) for r in _REGISTER.findall(ins.operands)]
        writes_first = not ins.opcode.startswith(("STG", "ST.", "RED", "BRA", "ISETP", "FSETP"))
        sources = regs[1:] if writes_first and regs else regs
        if pending and any(r in pending for r in sources):
            trips += 1
            pending.clear()
        if _is_global_load(ins.opcode) and regs:
            loads += 1
            width = {16: 4, 8: 2}.get(_width(ins.opcode), 1)
            pending.update(range(regs[0], regs[0] + width))
    return loads, trips + bool(pending)


def _loads(instructions: list[Instruction]) -> list[str]:
    return sorted(i.opcode for i in instructions if i.opcode.startswith("LDG") and i.opcode != "LDGDEPBAR")


def _unroll_factor(instructions, main: tuple[int, int], innermost: list[tuple[int, int]]) -> int:
    """u when ptxas unrolled a runtime-trip-count loop u times and left a remainder loop of one copy:
    another innermost loop whose loads, repeated u times, are exactly the main loop's."""
    main_loads = _loads(instructions[main[0] : main[1] + 1])
    best = 1
    for a, b in innermost:
        loads = _loads(instructions[a : b + 1])
        if (a, b) == main or not loads or len(main_loads) % len(loads):
            continue
        u = len(main_loads) // len(loads)
        if u > 1 and sorted(loads * u) == main_loads:
            best = max(best, u)
    return best


__all__ = [
    "Instruction",
    "OpCounts",
    "ReductionSummary",
    "SassSummary",
    "count_ops",
    "find_loops",
    "load_round_trips",
    "parse_instructions",
    "summarize",
    "summarize_reduction",
]
