"""The estimate as a band: optimistic / central / pessimistic, each an explicit assumption set.

One number from an analytical model hides how much it rests on guesses (the clock under load, L2 and DRAM
latency and bandwidth, how often one warp can issue, the gap between graph nodes, whether weights stay in
L2, how much of a PDL launch's prologue hides behind its predecessor). The band
reruns the same compiled launches (fastres.tools.estimate_report.ModelLaunches) under a set of optimistic
and a set of pessimistic values, and then moves one assumption at a time from its optimistic to its
pessimistic value with the rest central: the assumptions that move the total most dominate the spread.
Keys fixed with `--assume` stay at the given value in every set. Still an ESTIMATE, never a measurement.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from .estimate import Gpu

# key -> (optimistic, pessimistic) value, as functions of the card's central assumptions.
BAND: dict[str, tuple[Callable[[Gpu], float], Callable[[Gpu], float]]] = {
    # Optimistic: the clock of the quoted tensor peak holds; pessimistic: power-throttled below sustained.
    "sustained_clock_ghz": (lambda g: g.clock_ghz, lambda g: 0.94 * g.sustained_clock_ghz),
    "l2_latency_cycles": (lambda g: 0.8 * g.l2_latency_cycles, lambda g: 1.35 * g.l2_latency_cycles),
    "dram_latency_cycles": (lambda g: 0.8 * g.dram_latency_cycles, lambda g: 1.25 * g.dram_latency_cycles),
    # A lone warp issuing every cycle (the old model's assumption) vs. one stalled on dependencies at
    # every other instruction.
    "warp_issue_interval_cycles": (lambda g: 1.0, lambda g: 4.0),
    "node_gap_us": (lambda g: 0.67 * g.node_gap_us, lambda g: 1.67 * g.node_gap_us),
    "cta_overhead_cycles": (lambda g: 0.7 * g.cta_overhead_cycles, lambda g: 1.5 * g.cta_overhead_cycles),
    # Bandwidth bounds the large batches: published L2 figures vary widely, HBM efficiency somewhat.
    "l2_gbs": (lambda g: 1.2 * g.l2_gbs, lambda g: 0.7 * g.l2_gbs),
    "dram_efficiency": (lambda g: min(0.95, 1.1 * g.dram_efficiency), lambda g: 0.85 * g.dram_efficiency),
    # Optimistic: all of L2 keeps the weights between forwards; pessimistic: a third of it.
    "l2_usable_fraction": (lambda g: 1.0, lambda g: 0.33),
    # PDL (for the launches compiled with it): optimistic, every first-wave prologue (setup and the
    # prefetched first weight load) hides behind its predecessor and the wait releases fast; pessimistic,
    # a quarter of it hides (the predecessor's CTAs leave little room on the SMs) and the node gap is
    # what it is without PDL.
    "pdl_overlap_fraction": (lambda g: 1.0, lambda g: 0.25),
    "pdl_gap_us": (lambda g: 0.6 * g.pdl_gap_us, lambda g: g.node_gap_us),
}


@dataclasses.dataclass
class Band:
    totals_us: dict[str, float]  # optimistic, central, pessimistic
    assumptions: dict[str, dict[str, float]]  # the values each set changes from central
    drivers: list[tuple[str, float]]  # (assumption, us it moves the total alone), largest first


def assumption_set(gpu: Gpu, which: str, fixed: set[str]) -> Gpu:
    """`gpu` with the optimistic (0) or pessimistic (1) value of every band key not in `fixed`."""
    side = {"optimistic": 0, "pessimistic": 1}[which]
    return dataclasses.replace(gpu, **{k: v[side](gpu) for k, v in BAND.items() if k not in fixed})


def compute_band(total_us: Callable[[Gpu], float], gpu: Gpu, fixed: set[str] = frozenset()) -> Band:
    """The band of `total_us(gpu)` (a forward's estimated time under one assumption set)."""
    sets = {"optimistic": assumption_set(gpu, "optimistic", fixed), "central": gpu,
            "pessimistic": assumption_set(gpu, "pessimistic", fixed)}  # fmt: skip
    totals = {name: total_us(g) for name, g in sets.items()}
    changed = {
        name: {k: getattr(g, k) for k in BAND if getattr(g, k) != getattr(gpu, k)} for name, g in sets.items()
    }
    drivers = []
    for key, (opt, pess) in BAND.items():
        if key in fixed:
            continue
        low = total_us(dataclasses.replace(gpu, **{key: opt(gpu)}))
        high = total_us(dataclasses.replace(gpu, **{key: pess(gpu)}))
        drivers.append((key, high - low))
    drivers.sort(key=lambda kv: -abs(kv[1]))
    return Band(totals, changed, drivers)


def format_band(band: Band, batch: int) -> list[str]:
    t = band.totals_us
    lines = [
        f"ESTIMATE band at batch {batch}: optimistic {t['optimistic'] / 1e3:.3f} ms, "
        f"central {t['central'] / 1e3:.3f} ms, pessimistic {t['pessimistic'] / 1e3:.3f} ms per forward"
    ]
    for name in ("optimistic", "pessimistic"):
        values = ", ".join(f"{k}={round(v, 3):g}" for k, v in band.assumptions[name].items())
        lines.append(f"  {name} assumptions: {values or '(none: all fixed by --assume)'}")
    spread = sum(abs(d) for _, d in band.drivers) or 1.0
    top = ", ".join(f"{k} {d / 1e3:+.3f} ms ({abs(d) / spread:.0%})" for k, d in band.drivers[:4])
    lines.append(f"  spread dominated by (each alone, optimistic -> pessimistic, the rest central): {top}")
    return lines


__all__ = ["BAND", "Band", "assumption_set", "compute_band", "format_band"]
