"""The performance estimator: SASS main-loop parsing, occupancy, the model's terms, and the CLI.

Compiling needs a process without TRITON_INTERPRET (the test session sets it), so real kernels are
compiled in a child process, as tests/test_compile_report.py does; the rest runs in-process on numbers.
"""

import json
import os
import re
import subprocess
import sys
from dataclasses import fields

import pytest
from fastres.kernels.aot import KernelStats
from fastres.kernels.sass import (
    OpCounts,
    ReductionSummary,
    SassSummary,
    find_loops,
    parse_instructions,
    summarize,
)

from fastres.cli import main
from fastres.tools.estimate import (
    GPUS,
    Gpu,
    apply_assumptions,
    estimate_launch,
    get_gpu,
    reduction_cycles,
    resident_ctas,
    weights_are_cold,
)
from fastres.tools.estimate_band import BAND, compute_band, format_band


def _env_without_interpreter():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


# ---------------------------------------------------------------------------------------------
# SASS parsing

_SYNTHETIC = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   IADD3 R8, R8, 0x1, RZ ;
        /*0030*/                   FADD R9, R9, R4 ;
        /*0040*/               @P0 BRA 0x20 ;
        /*0050*/                   HMMA.16816.F32 R12, R16, R20, R12 ;
        /*0060*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R6.64] ;
        /*0070*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0080*/               @!P1 BRA 0x10 ;
        /*0090*/                   STG.E.U16 desc[UR4][R2.64], R9 ;
        /*00a0*/                   EXIT ;
        /*00b0*/                   BRA 0xb0;
"""


def test_synthetic_sass_nested_loops_and_the_mma_loop():
    instructions = parse_instructions(_SYNTHETIC)
    assert len(instructions) == 12
    # Two backward branches; `BRA self` (the trap after EXIT) is not a loop.
    assert find_loops(instructions) == [(2, 4), (1, 8)]
    s = summarize(_SYNTHETIC)
    # The main loop is the one holding the MMA (the outer one), not the innermost one.
    assert s.main_loop_span == (0x10, 0x80)
    loop = s.main_loop
    assert (loop.instructions, loop.mma, loop.mma_flops, loop.mma_kind) == (8, 1, 2 * 16 * 8 * 16, "HMMA")
    assert (loop.load_bytes, loop.async_copies, loop.barriers, loop.store_bytes) == (32, 1, 1, 0)
    assert (s.outside.instructions, s.outside.store_bytes) == (4, 2)


_UNROLLED = """
        /*0000*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0010*/                   LDG.E.128 R8, desc[UR4][R2.64+0x10] ;
        /*0020*/                   LDG.E.128 R12, desc[UR4][R2.64+0x20] ;
        /*0030*/                   LDG.E.128 R16, desc[UR4][R2.64+0x30] ;
        /*0040*/                   FADD R9, R9, R4 ;
        /*0050*/               @P0 BRA 0x0 ;
        /*0060*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0070*/                   FADD R9, R9, R4 ;
        /*0080*/               @P1 BRA 0x60 ;
        /*0090*/                   EXIT ;
"""


def test_a_loop_unrolled_by_ptxas_is_recognised_by_its_remainder_loop():
    s = summarize(_UNROLLED)
    assert s.unroll == 4 and s.main_loop.load_bytes == 64 and s.main_loop_span == (0x0, 0x50)
    # Without the remainder loop there is nothing to compare with: no unrolling assumed.
    assert summarize(_UNROLLED.split("/*0060*/")[0]).unroll == 1


def test_the_loop_around_the_main_loop_is_counted_apart():
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E R4, desc[UR4][R2.64] ;
        /*0020*/                   HMMA.16816.F32 R12, R16, R20, R12 ;
        /*0030*/               @P0 BRA 0x20 ;
        /*0040*/                   STG.E desc[UR4][R2.64], R9 ;
        /*0050*/               @P1 BRA 0x10 ;
        /*0060*/                   EXIT ;
    """
    s = summarize(sass)
    assert s.main_loop_span == (0x20, 0x30) and s.main_loop.instructions == 2
    assert (s.enclosing.instructions, s.enclosing.load_bytes, s.enclosing.store_bytes) == (3, 4, 4)
    assert s.outside.instructions == 2


def test_summarize_refuses_text_without_sass():
    with pytest.raises(ValueError, match="no SASS"):
        summarize("not a disassembly")


_COMPILE_SCRIPT = r"""
import json, sys, torch
from fastres.kernels import ConvLayer, compile_spec
arch = int(sys.argv[1])
torch.manual_seed(0)
out = []
# Many K-steps each (ptxas turns a few constant K-steps into straight-line code with no loop), and enough
# output tiles that the split-K rule leaves the 1x1 unsplit.
for (c_in, c_out, k, hw) in [(1024, 64, 1, 66), (64, 64, 3, 8)]:
    layer = ConvLayer(torch.randn(c_out, c_in, k, k), torch.randn(c_out), stride=1, padding=k // 2,
                      relu=True, dtype=torch.float16)
    spec = layer.aot_specs((2, hw, hw, c_in), arch)[0]
    st = compile_spec(spec, arch)
    cfg = dict(spec.constexprs)
    loop = st.sass.main_loop
    out.append(dict(ok=st.compiled_ok, error=st.error, warps=spec.num_warps, k_steps=spec.k_steps,
                    bm=cfg["BLOCK_M"], bn=cfg["BLOCK_N"], bk=cfg["BLOCK_K"], loop=loop.__dict__,
                    outside=st.sass.outside.__dict__, grid=list(spec.grid), ctas=spec.ctas, hw=hw))
print(json.dumps(out))
"""


@pytest.mark.parametrize(
    "arch, kind", [pytest.param(90, "HGMMA", id="sm_90"), pytest.param(80, "HMMA", id="sm_80")]
)
def test_main_loop_of_a_real_conv_is_one_k_step(arch, kind):
    """The MMAs found in the main loop compute exactly one BLOCK_M x BLOCK_N x BLOCK_K tile, and the loop
    loads exactly one A and one B tile: so the loop found is the K loop, counted once per step."""
    done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, str(arch)], capture_output=True, text=True,
                          env=_env_without_interpreter(), timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    for r in json.loads(done.stdout.strip().splitlines()[-1]):
        assert r["ok"], r["error"]
        loop, warps = r["loop"], r["warps"]
        assert loop["mma_kind"] == kind and loop["mma"] > 0
        issuers = warps // 4 if kind == "HGMMA" else warps  # wgmma is per warpgroup, mma.sync per warp
        assert loop["mma_flops"] * issuers == 2 * r["bm"] * r["bn"] * r["bk"]
        if kind == "HGMMA":  # sm_90 operands come through cp.async into shared memory: 16 B per copy
            assert loop["load_bytes"] * 32 * warps == 2 * (r["bm"] * r["bk"] + r["bk"] * r["bn"])
            assert loop["async_copies"] > 0
        assert loop["instructions"] > loop["mma"] and r["outside"]["store_bytes"] > 0
        assert r["ctas"] == r["grid"][0] == -(-2 * r["hw"] ** 2 // r["bm"]) * (64 // r["bn"])


# ---------------------------------------------------------------------------------------------
# Occupancy and the model's terms


@pytest.mark.parametrize(
    "gpu, regs, smem_kib, warps, expected",
    [
        pytest.param("h100", 128, 96, 4, 2, id="smem-bound-h100"),  # 228 KiB // 97 KiB
        pytest.param("h100", 128, 0, 4, 4, id="regs-bound"),  # 65536 // (128 * 128)
        pytest.param("h100", 255, 0, 4, 2, id="regs-rounded-to-256"),  # 256 regs/thread after rounding
        pytest.param("h100", 168, 64, 4, 3, id="h100-64KiB"),  # regs: 65536 // 21504 = 3; smem 3
        pytest.param("a100", 168, 96, 4, 1, id="a100-smaller-smem"),  # 164 KiB // 97 KiB
        pytest.param("h100", 16, 0, 1, 32, id="block-limit"),
        pytest.param("h100", 16, 0, 8, 8, id="warp-limit"),  # 64 warps // 8
        pytest.param("h100", 32, 240, 4, 0, id="does-not-fit"),
    ],
)
def test_resident_ctas(gpu, regs, smem_kib, warps, expected):
    assert resident_ctas(GPUS[gpu], regs, smem_kib * 1024, warps) == expected


class _Spec:
    """The launch facts of a KernelSpec, without a kernel."""

    def __init__(self, grid, k_steps, flops, min_bytes, num_warps=4, l2_bytes=None):
        self.name, self.grid, self.k_steps, self.flops = "synthetic", grid, k_steps, flops
        self.outer_steps, self.reduce_trips, self.prefetch_bytes = None, None, 0
        self.min_bytes, self.num_warps, self.l2_bytes = min_bytes, num_warps, l2_bytes
        self.ctas = grid[0]


def _stats(instructions, mma_flops, stages=4, regs=128, smem=64 * 1024):
    loop = OpCounts(instructions=instructions, mma=4, mma_flops=mma_flops, mma_kind="HGMMA", barriers=1,
                    load_bytes=128, async_copies=8)  # fmt: skip
    outside = OpCounts(instructions=500, load_bytes=64, store_bytes=64)
    return KernelStats(name="synthetic", config="cfg", registers=regs, spill_bytes=0, shared_mem_bytes=smem,
                       uses_wgmma=True, compiled_ok=True, sass=SassSummary(loop, outside, 1), num_warps=4,
                       num_stages=stages)  # fmt: skip


def test_tensor_bound_launch_scales_with_work_and_clock():
    gpu = GPUS["h100"]
    # 128x128x64 per step = 2 Mi FLOP per CTA-step: 512 tensor cycles, far above 100 issue cycles.
    spec = _Spec((132 * 8,), 64, 10**9, 10**6)
    est = estimate_launch(spec, _stats(100, 2 * 128 * 128 * 64), gpu)
    assert est.bound == "tensor"
    assert est.tensor_cycles_per_step == pytest.approx(2 * 128 * 128 * 64 / 4096)
    assert est.terms_us["tensor"] == pytest.approx(8 * 64 * 512 / (gpu.sustained_clock_ghz * 1e3))
    # The combined time adds the prologue/epilogue and the rest of the kernel to the tensor time.
    assert est.terms_us["tensor"] < est.terms_us["compute"] < 1.2 * est.terms_us["tensor"]
    assert est.time_us == pytest.approx(est.terms_us["compute"] + gpu.node_gap_us)
    twice = estimate_launch(_Spec((132 * 16,), 64, 2 * 10**9, 10**6), _stats(100, 2 * 128 * 128 * 64), gpu)
    assert twice.terms_us["tensor"] == pytest.approx(2 * est.terms_us["tensor"])
    faster = apply_assumptions(gpu, [f"sustained_clock_ghz={2 * gpu.sustained_clock_ghz}"])
    assert estimate_launch(spec, _stats(100, 2 * 128 * 128 * 64), faster).terms_us["tensor"] == pytest.approx(
        est.terms_us["tensor"] / 2
    )


def test_issue_and_dram_bound_launches():
    gpu = GPUS["h100"]
    issue = estimate_launch(_Spec((132,), 64, 10**9, 10**6), _stats(600, 2 * 64 * 64 * 16), gpu)
    # One CTA of 4 warps: one warp per scheduler, issuing once per warp_issue_interval_cycles.
    assert issue.bound == "issue" and issue.issue_cycles_per_step == 600 * gpu.warp_issue_interval_cycles
    lone = apply_assumptions(gpu, ["warp_issue_interval_cycles=1"])
    alone = estimate_launch(_Spec((132,), 64, 10**9, 10**6), _stats(600, 2 * 64 * 64 * 16), lone)
    assert alone.issue_cycles_per_step == 600
    dram = estimate_launch(_Spec((132,), 1, 10**6, 10**9), _stats(100, 2 * 64 * 64 * 16), gpu)
    assert dram.bound == "DRAM"
    assert dram.terms_us["DRAM"] == pytest.approx(10**9 / (gpu.dram_gbs * gpu.dram_efficiency * 1e3))
    h200 = estimate_launch(_Spec((132,), 1, 10**6, 10**9), _stats(100, 2 * 64 * 64 * 16), GPUS["h200"])
    assert h200.terms_us["DRAM"] < dram.terms_us["DRAM"]


def _reduction_stats(round_trips: int, looped: bool = True):
    stats = _stats(100, 2 * 64 * 64 * 16)
    stats.sass.reduction = ReductionSummary(16, round_trips_per_trip=round_trips, looped=looped)
    return stats


def test_split_k_reduction_is_charged_from_the_sass():
    """Handshake (2 L2 round trips) plus trips x round trips per trip, at L2 latency, once per launch."""
    gpu = GPUS["h100"]
    spec = _Spec((64,), 5, 10**8, 10**6)
    spec.reduce_trips = 4
    assert reduction_cycles(spec, _reduction_stats(2), gpu) == (2 + 4 * 2) * gpu.l2_latency_cycles
    assert reduction_cycles(spec, _reduction_stats(2, looped=False), gpu) == 4 * gpu.l2_latency_cycles
    plain = estimate_launch(spec, _stats(100, 2 * 64 * 64 * 16), gpu)
    split = estimate_launch(spec, _reduction_stats(2), gpu)
    assert plain.terms_us["reduction"] == 0
    assert split.terms_us["compute"] - plain.terms_us["compute"] == pytest.approx(
        split.terms_us["reduction"]
    )


def test_cold_weights():
    """Weights beyond the usable L2 make a one-wave launch's loads DRAM loads."""
    gpu = GPUS["h100"]
    assert weights_are_cold(51_000_000, gpu) and not weights_are_cold(51_000_000, apply_assumptions(
        gpu, ["l2_usable_fraction=1"]))  # fmt: skip
    spec, stats = _Spec((64,), 16, 10**8, 10**6), _stats(100, 2 * 64 * 64 * 16)
    warm, cold = estimate_launch(spec, stats, gpu), estimate_launch(spec, stats, gpu, weights_cold=True)
    assert cold.latency_cycles_per_step > warm.latency_cycles_per_step
    assert cold.terms_us["latency"] > warm.terms_us["latency"]


def test_pdl_hides_part_of_the_first_waves_prologue_of_kernels_compiled_with_it():
    """A launch whose PTX has griddepcontrol hides pdl_overlap_fraction of its first wave's setup (and,
    when it prefetches weights before the wait, of their cold first load), never more than its
    predecessor's busy time; later waves pay in full; the node gap is pdl_gap_us. Without griddepcontrol,
    or with pdl=0, nothing changes."""
    gpu, cycle_us = GPUS["h100"], 1e-3 / GPUS["h100"].sustained_clock_ghz
    spec, plain = _Spec((64,), 16, 10**8, 10**6), _stats(100, 2 * 64 * 64 * 16)
    pdl_stats = _stats(100, 2 * 64 * 64 * 16)
    pdl_stats.griddepcontrol = ("launch_dependents", "wait")
    without = estimate_launch(spec, plain, gpu, weights_cold=True)
    assert without.pdl_hidden_us == 0 and without.time_us - without.terms_us["compute"] == pytest.approx(
        gpu.node_gap_us)  # fmt: skip
    setup_only = estimate_launch(spec, pdl_stats, gpu, weights_cold=True)
    setup = gpu.cta_overhead_cycles * cycle_us
    assert setup_only.pdl_hidden_us == pytest.approx(gpu.pdl_overlap_fraction * setup)
    spec.prefetch_bytes = 32768
    prefetched = estimate_launch(spec, pdl_stats, gpu, weights_cold=True)
    pre_wait = gpu.cta_overhead_cycles + gpu.dram_latency_cycles
    assert prefetched.pdl_hidden_us == pytest.approx(gpu.pdl_overlap_fraction * pre_wait * cycle_us)
    saved = without.terms_us["compute"] - prefetched.terms_us["compute"]
    assert saved == pytest.approx(prefetched.pdl_hidden_us)
    assert prefetched.time_us - prefetched.terms_us["compute"] == pytest.approx(gpu.pdl_gap_us)
    capped = estimate_launch(spec, pdl_stats, gpu, weights_cold=True, overlap_window_us=0.1)
    assert capped.pdl_hidden_us == pytest.approx(0.1)
    off = estimate_launch(spec, pdl_stats, apply_assumptions(gpu, ["pdl=0"]), weights_cold=True)
    assert off.pdl_hidden_us == 0 and off.time_us == pytest.approx(without.time_us)
    # Three waves on the busiest SM: only the first one's prologue overlaps the predecessor.
    many = _Spec((132 * 3 * 8,), 16, 10**8, 10**6)
    many.prefetch_bytes = 32768
    waves = estimate_launch(many, pdl_stats, gpu, weights_cold=True)
    assert waves.waves > 1 and waves.pdl_hidden_us == pytest.approx(prefetched.pdl_hidden_us)


def test_band_orders_its_sets_and_ranks_the_drivers():
    gpu = GPUS["h100"]
    spec, stats = _Spec((64,), 16, 10**8, 10**6), _reduction_stats(2)
    spec.reduce_trips = 2
    total = lambda g: estimate_launch(spec, stats, g, weights_cold=weights_are_cold(40_000_000, g)).time_us
    band = compute_band(total, gpu)
    t = band.totals_us
    assert t["optimistic"] < t["central"] == total(gpu) < t["pessimistic"]
    assert set(band.assumptions["optimistic"]) == set(BAND) and band.assumptions["central"] == {}
    moves = [abs(d) for _, d in band.drivers]
    assert moves == sorted(moves, reverse=True) and moves[0] > 0
    fixed = compute_band(total, gpu, fixed={"node_gap_us"})
    assert "node_gap_us" not in fixed.assumptions["pessimistic"]
    assert "node_gap_us" not in dict(fixed.drivers)
    assert any("spread dominated by" in line for line in format_band(band, 1))


def test_assume_overrides_and_rejects():
    gpu = get_gpu("H100", ["sms=114", "node_gap_us=0"])
    assert (gpu.sms, gpu.node_gap_us, gpu.name) == (114, 0.0, "h100")
    for bad in ("sms", "warp_size=32", "clock_ghz=fast", "clock_ghz=0"):
        with pytest.raises(ValueError, match="--assume"):
            get_gpu("h100", [bad])
    assert {f.name for f in fields(Gpu)} >= {"clock_ghz", "dram_gbs", "l2_gbs", "node_gap_us"}


# ---------------------------------------------------------------------------------------------
# The command


def _estimate(*extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fastres", "compile-report", "resnet18", "--estimate", "--batch", "2",
           "--image-size", "32", "--no-progress", *extra]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=_env_without_interpreter(), timeout=300)


def _total_ms(stdout: str) -> tuple[float, int]:
    pattern = r"^ESTIMATE total: ([\d.]+) ms per forward at batch 2 = [\d,]+ img/s; (\d+) CUDA-graph"
    match = re.search(pattern, stdout, re.M)
    assert match, stdout
    return float(match.group(1)), int(match.group(2))


def test_estimate_command_prints_assumptions_rows_and_total(tmp_path):
    done = _estimate("--out", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "not a measurement" in out
    for f in fields(Gpu):
        assert re.search(rf"^  {f.name} = ", out, re.M), f.name
    total, nodes = _total_ms(out)
    assert total > 0 and nodes == 23  # stem + 19 convs + pool + head (pool and fc); the stem reads the input
    rows = [line for line in out.splitlines() if re.match(r"\s*\d+\s+(conv|stem)", line)]
    assert len(rows) == 20
    assert all(re.search(r"\d\.\d\s+(tensor|issue|latency|reduction|L2|DRAM)$", r) for r in rows)
    band = re.search(r"^ESTIMATE band at batch 2: optimistic ([\d.]+) ms, central ([\d.]+) ms, pessimistic "
                     r"([\d.]+) ms per forward$", out, re.M)  # fmt: skip
    assert band, out
    low, mid, high = map(float, band.groups())
    assert low < mid < high and mid == pytest.approx(total, abs=1e-3)
    assert re.search(r"^  spread dominated by .*: \w+ \+[\d.]+ ms \(\d+%\)", out, re.M), out
    record = json.loads(next(tmp_path.glob("estimate_resnet18_h100_float16_b2.json")).read_text())
    assert record["kind"].startswith("ESTIMATE") and len(record["launches"]) == nodes + 1
    assert record["band_ms"]["optimistic"] < record["band_ms"]["pessimistic"]
    # Every kernel is compiled with PDL for sm_90, so every graph node's gap is the PDL one.
    pdl_line = r"^PDL: (\d+) of \1 distinct kernels use it \(griddepcontrol in the PTX\)"
    assert re.search(pdl_line, out, re.M), out
    # --assume changes the result: 10 us more per graph node, nothing else.
    slower = _estimate("--assume", f"pdl_gap_us={GPUS['h100'].pdl_gap_us + 10}")
    assert slower.returncode == 0, slower.stderr
    assert "pdl_gap_us = 10.5" in slower.stdout
    assert _total_ms(slower.stdout)[0] == pytest.approx(total + nodes * 10e-3, abs=2e-3)
    # A key fixed with --assume is the same in every set of the band, and drives none of its spread.
    assert "pdl_gap_us=" not in slower.stdout.split("ESTIMATE band")[1]


@pytest.mark.parametrize(
    "argv, message",
    [
        pytest.param(["--gpu", "v100"], "unknown --gpu 'v100'; choose one of h100, h200, a100", id="card"),
        pytest.param(["--assume", "sms"], "bad --assume 'sms'", id="bad-assume"),
        pytest.param(["--gpu", "a100", "--arch", "sm_90"], "does not match --gpu a100", id="arch-mismatch"),
    ],
)
def test_bad_estimate_options_exit_2_with_one_line(capsys, argv, message):
    assert main(["compile-report", "resnet18", "--estimate", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastres: error: ") and message in err[0], err


def test_compile_report_without_estimate_still_needs_arch_and_dtype(capsys):
    assert main(["compile-report", "resnet18", "--dtype", "fp16"]) == 2
    assert "needs --arch and --dtype" in capsys.readouterr().err


_LAYERS_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, "benchmarks")
import bench_layers
from fastres.tools.estimate import GPUS
shape = next(s for s in bench_layers.distinct_convs("resnet18", 2, 64) if s.kernel == 3 and s.stride == 1)
gpu = GPUS["h100"]
est = {fused: bench_layers.estimate_ms(shape, torch.float16, fused, gpu) for fused in (False, True)}
rows = [{"comparison": "conv", "layer": shape.label, "est_over_measured": r} for r in (0.5, 1.5, 2.0, None)]
print(json.dumps([shape.label, est[False], est[True], bench_layers.estimate_error_by_kind(rows)]))
"""


def test_bench_layers_estimate_column_runs_without_a_gpu():
    """benchmarks/bench_layers.py's per-layer estimate (the GPU run writes it beside each measurement)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", _LAYERS_SCRIPT], capture_output=True, text=True, cwd=root,
                          env=_env_without_interpreter(), timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    label, plain, fused, by_kind = json.loads(done.stdout.strip().splitlines()[-1])
    assert label.startswith("3x3s1") and 0 < plain < 1 and 0 < fused < 1, (label, plain, fused)
    # The fused epilogue reads the residual too: never estimated cheaper than the plain conv.
    assert fused >= plain
    # The per-kind summary: median of the estimate/measured ratios, rows without an estimate left out.
    assert by_kind == {"conv 3x3s1": [1.5, 3]}


def test_bench_layers_estimates_a_gpu_runs_saved_rows_offline(tmp_path):
    """The device spends no time on estimates: they are added afterwards, on the CPU, to the rows it saved."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "benchmarks"))
    import bench_layers

    comparison, shape = bench_layers.layer_work("resnet18", 2, 64)[0]
    measured = dict(model="resnet18", dtype="float16", comparison=comparison, layer=shape.label, batch=2,
                    median_ms=0.0123, tflops=1.0, gbps=1.0, speedup_vs_cudnn=1.0, est_ms=None)  # fmt: skip
    rows = tmp_path / "layers.jsonl"
    rows.write_text("".join(json.dumps({**measured, "impl": impl}) + "\n" for impl in ("fastres", "cudnn")))
    argv = ["benchmarks/bench_layers.py", "--estimate-from", str(rows), "--gpu", "h200", "--sms", "132"]
    done = subprocess.run([sys.executable, *argv, "--image-size", "64"], capture_output=True, text=True,
                          cwd=root, env=_env_without_interpreter(), timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    ours, cudnn = [json.loads(line) for line in (tmp_path / "layers.est.jsonl").read_text().splitlines()]
    assert ours["est_gpu_model"] == "h200" and 0 < ours["est_ms"] < 1
    assert ours["est_over_measured"] == pytest.approx(ours["est_ms"] / 0.0123)
    assert cudnn["est_ms"] is None  # the model estimates fastres's kernels only
    assert "estimate (fastres.tools.estimate) / measured" in done.stdout
