"""`fastres compile-report MODEL --estimate`: the estimate (fastres.estimate) for every launch of a forward.

Compiles each distinct kernel of the plan for the card's architecture (as the compile report does),
estimates every launch in plan order, adds the non-Triton nodes, and prints the assumptions, one row per
launch, subtotals per kernel kind and per bound, and the totals: estimated latency, images/s and graph
nodes. Every line of output that carries a time says it is an estimate.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .estimate import (
    ESTIMATE_BANNER,
    Gpu,
    LaunchEstimate,
    assumption_lines,
    estimate_copy,
    estimate_launch,
    weights_are_cold,
)


def compile_stats(specs: list, arch: int, progress: bool = False) -> dict[tuple, object]:
    """`KernelStats` per distinct compile key (each binary compiled once)."""
    from ..kernels import compile_spec
    from ..progress import Progress

    distinct = {}
    for spec in specs:
        distinct.setdefault(spec.compile_key(), spec)
    stats = {}
    bar = Progress(len(distinct), f"compiling for sm_{arch}", progress)
    try:
        for key, spec in distinct.items():
            stats[key] = compile_spec(spec, arch)
            bar.update()
    finally:
        bar.close()
    return stats


def estimate_specs(
    specs: list, gpu: Gpu, stats: dict | None = None, weights_cold: bool = False
) -> list[LaunchEstimate]:
    """One estimate per spec, in order (compiling what `stats` does not hold yet). Under PDL each launch's
    prologue may hide behind its predecessor's busy time; the first has no kernel before it (the
    split-K counters' memset and the input copy are not kernels that let it start early)."""
    stats = stats if stats is not None else compile_stats(specs, gpu.arch)
    missing = [s for s in specs if s.compile_key() not in stats]
    if missing:
        stats.update(compile_stats(missing, gpu.arch))
    rows, window = [], 0.0
    for s in specs:
        row = estimate_launch(s, stats[s.compile_key()], gpu, weights_cold, overlap_window_us=window)
        rows.append(row)
        window = row.time_us - row.gap_us
    return rows


def plan_weight_bytes(plan, dtype: torch.dtype) -> int:
    """Bytes of every conv and fc weight of the plan in the compute dtype (what one forward reads)."""
    elem = torch.empty((), dtype=dtype).element_size()
    names = ("weight", "shortcut_weight")
    tensors = [getattr(op, name, None) for op in plan.ops for name in names]
    return elem * sum(t.numel() for t in tensors if t is not None)


class ModelLaunches:
    """A model's launches compiled once for `arch`, estimated under any assumption set (`estimate`)."""

    def __init__(self, model: str, dtype: torch.dtype, batch: int, image_size: int, arch: int,
                 progress: bool = False):  # fmt: skip
        from ..backends.triton_backend import TritonBackend
        from ..planner import plan_resnet
        from ..reference import build_resnet
        from ..specs import get_spec

        spec = get_spec(model)
        torch.manual_seed(0)
        plan = plan_resnet(spec, 1000, build_resnet(spec, 1000).state_dict())
        backend = TritonBackend(plan, "cpu", dtype)  # builds specs only: no GPU touched
        self.batch, self.image_size, self.dtype = batch, image_size, dtype
        self.weight_bytes = plan_weight_bytes(plan, dtype)
        self.specs = backend.kernel_specs(batch, image_size, image_size, arch)
        self.stats = compile_stats(self.specs, arch, progress)
        self.copy_nodes = backend.copy_nodes(batch, image_size, image_size)

    def estimate(self, gpu: Gpu) -> tuple[list[LaunchEstimate], int]:
        """Every node of one forward pass, in order, and how many of them are CUDA-graph nodes."""
        launches = estimate_specs(self.specs, gpu, self.stats, weights_are_cold(self.weight_bytes, gpu))
        # Graph nodes that are not Triton kernels launch without PDL: the full node gap.
        copies = [estimate_copy(name, nbytes, gpu, gpu.node_gap_us) for name, nbytes in self.copy_nodes]
        elem = torch.empty((), dtype=self.dtype).element_size()
        # The engine copies each call's input into the graph's static input: a launch before the replay.
        static = estimate_copy(
            "engine: input -> static graph input", 2 * self.batch * 3 * self.image_size**2 * elem, gpu, 0.0
        )
        return [static, *copies, *launches], len(copies) + len(launches)


def estimate_model(
    model: str, dtype: torch.dtype, batch: int, image_size: int, gpu: Gpu, progress: bool = False
) -> tuple[list[LaunchEstimate], int]:
    """Every node of one forward pass, in order, and how many of them are CUDA-graph nodes."""
    return ModelLaunches(model, dtype, batch, image_size, gpu.arch, progress).estimate(gpu)


def pdl_line(rows: list[LaunchEstimate], stats: dict, gpu: Gpu) -> str:
    """How many launches use PDL (from their compiled code) and what the model hides behind predecessors."""
    uses = sum(st.uses_pdl for st in stats.values())
    hidden = sum(r.pdl_hidden_us for r in rows)
    compiled = f"{uses} of {len(stats)} distinct kernels use it (griddepcontrol in the PTX)"
    if not gpu.pdl:
        return f"PDL: modelled off (pdl=0, as launched with FASTRES_PDL=0); {compiled}"
    return (f"PDL: {compiled}; estimated {hidden:.1f} us of prologue hidden behind predecessors "
            f"(pdl_overlap_fraction={gpu.pdl_overlap_fraction}), node gap {gpu.pdl_gap_us} us; "
            "--assume pdl=0 for without")  # fmt: skip


def _short(name: str) -> str:
    return re.sub(r"_(float16|bfloat16|float32)$", "", name).replace("_g1_", "_")


def _kind(name: str) -> str:
    if name.startswith("conv"):
        return name.split("_")[0]
    return re.split(r"[_:\d]", name, maxsplit=1)[0] or name


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def format_estimate(rows: list[LaunchEstimate], graph_nodes: int, gpu: Gpu, batch: int) -> str:
    header = ["#", "launch", "CTAs", "res/SM", "waves", "K-steps", "instr/K", "MMA/K", "TC cyc/K",
              "issue cyc/K", "lat cyc/K", "GFLOP", "min MB", "L2 MB", "est us", "bound"]  # fmt: skip
    table = []
    for i, r in enumerate(rows):
        table.append([
            str(i), _short(r.name), _f(r.ctas, "d"), _f(r.resident, "d"), _f(r.waves, "d"),
            _f(r.k_steps, "d"), _f(r.instr_per_step, "d"), _f(r.mma_per_step, "d"),
            _f(r.tensor_cycles_per_step, ".0f"), _f(r.issue_cycles_per_step, ".0f"),
            _f(r.latency_cycles_per_step, ".0f"), _f(r.flops and r.flops / 1e9, ".3f"),
            _f(r.min_bytes and r.min_bytes / 1e6, ".2f"), _f(r.l2_bytes and r.l2_bytes / 1e6, ".1f"),
            f"{r.time_us:.1f}", r.bound + (" !" if r.notes and r.bound == "?" else ""),
        ])  # fmt: skip
    widths = [max(len(x[i]) for x in [header, *table]) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 1 or i == 15 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()  # fmt: skip

    total_us = gpu.forward_overhead_us + sum(r.time_us for r in rows)
    out = [f"{ESTIMATE_BANNER}; GPU model '{gpu.name}' (sm_{gpu.arch}). Assumptions (--assume key=value):"]
    out += assumption_lines(gpu)
    out += ["", line(header), line(["-" * w for w in widths]), *map(line, table), ""]
    out.append("estimated time by kernel kind and by bound (us, incl. node gaps):")
    for label, key in (("kind", lambda r: _kind(r.name)), ("bound", lambda r: r.bound)):
        sums: dict[str, list] = {}
        for r in rows:
            acc = sums.setdefault(key(r), [0, 0.0])
            acc[0] += 1
            acc[1] += r.time_us
        ranked = sorted(sums.items(), key=lambda kv: -kv[1][1])
        out.append(f"  by {label}: " + ", ".join(f"{k} {v[1]:.1f} ({v[0]}x)" for k, v in ranked))
    flagged = [f"  #{i} {_short(r.name)}: {'; '.join(r.notes)}" for i, r in enumerate(rows) if r.notes]
    if flagged:
        out += ["notes:", *flagged]
    out.append(
        f"ESTIMATE total: {total_us / 1e3:.3f} ms per forward at batch {batch} = "
        f"{batch / total_us * 1e6:,.0f} img/s; {graph_nodes} CUDA-graph nodes "
        f"({len(rows) - graph_nodes} launch outside the graph, graph launch {gpu.forward_overhead_us} us)"
    )
    return "\n".join(out)


def run_estimate(
    model: str,
    dtype: torch.dtype,
    batch: int,
    image_size: int,
    gpu: Gpu,
    out_dir: str | None = None,
    progress: bool = True,
    fixed: set[str] = frozenset(),
) -> int:
    """Print the central estimate's table and total, then the band; `fixed`: keys set with --assume."""
    from .estimate_band import compute_band, format_band

    dtype_name = str(dtype).replace("torch.", "")
    print(f"{model} {dtype_name}, input {batch}x3x{image_size}x{image_size}, {ESTIMATE_BANNER}", flush=True)
    start = time.perf_counter()
    launches = ModelLaunches(model, dtype, batch, image_size, gpu.arch, progress)
    rows, graph_nodes = launches.estimate(gpu)
    text = format_estimate(rows, graph_nodes, gpu, batch)
    band = compute_band(lambda g: g.forward_overhead_us + sum(r.time_us for r in launches.estimate(g)[0]),
                        gpu, fixed)  # fmt: skip
    cold = weights_are_cold(launches.weight_bytes, gpu)
    text += (f"\nweights: {launches.weight_bytes / 1e6:.1f} MB, {'cold (DRAM)' if cold else 'warm (L2)'} "
             f"at l2_usable_fraction={gpu.l2_usable_fraction}")  # fmt: skip
    text += "\n" + pdl_line(rows, launches.stats, gpu)
    text += "\n" + "\n".join(format_band(band, batch))
    if out_dir is not None:
        from .environment import environment

        path = Path(out_dir)
        path.mkdir(parents=True, exist_ok=True)
        file = path / f"estimate_{model}_{gpu.name}_{dtype_name}_b{batch}.json"
        total_us = gpu.forward_overhead_us + sum(r.time_us for r in rows)
        record = {
            "kind": "ESTIMATE (analytical model, not a measurement)",
            **environment(torch.device("cpu")),
            "model": model,
            "dtype": dtype_name,
            "batch": batch,
            "image_size": image_size,
            "gpu_assumptions": asdict(gpu),
            "estimated_latency_ms": total_us / 1e3,
            "estimated_img_per_s": batch / total_us * 1e6,
            "graph_nodes": graph_nodes,
            "band_ms": {k: v / 1e3 for k, v in band.totals_us.items()},
            "band_assumptions": band.assumptions,
            "band_drivers_ms": {k: v / 1e3 for k, v in band.drivers},
            "launches": [asdict(r) for r in rows],
        }
        file.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {file}")
    print(text)
    print(f"(compiling and estimating took {time.perf_counter() - start:.1f} s)")
    return 0


def estimate_command(args, argv: list[str]) -> int:
    """`fastres compile-report MODEL --estimate ...` (parsed by fastres.cli): check, then run in a child
    process without TRITON_INTERPRET when it is set."""
    from ..api import parse_dtype
    from ..errors import InputError
    from . import compile_report
    from .estimate import get_gpu

    gpu = get_gpu(args.gpu, args.assume)  # bad --gpu / --assume fail here, as one line
    if args.arch is not None and compile_report.parse_arch(args.arch) != gpu.arch:
        raise InputError(f"--arch {args.arch} does not match --gpu {gpu.name} (sm_{gpu.arch}); drop --arch")
    if args.batch < 1 or args.image_size < 32:
        raise InputError(f"need --batch >= 1 and --image-size >= 32, got {args.batch} and {args.image_size}")
    if compile_report.interpreter_enabled():
        return compile_report.rerun_without_interpreter(argv)
    dtype = parse_dtype(args.dtype or "fp16")
    fixed = {item.partition("=")[0].strip() for item in args.assume or ()}
    return run_estimate(
        args.model, dtype, args.batch, args.image_size, gpu, args.out, not args.no_progress, fixed
    )
