"""The fp8 conv kernel compiled ahead of time for sm_89 and sm_90 (no GPU, a child process without the
interpreter): 0 spills and fp8 tensor-core MMAs in the SASS main loop (QMMA.16832.F32.E4M3.E4M3 =
mma.sync on sm_89, QGMMA.64xNx32.F32.E4M3.E4M3 = wgmma on sm_90)."""

import json
import os
import subprocess
import sys

import pytest
from fastres.kernels.sass import count_ops, parse_instructions

_CHILD = r"""
import json
import torch
from fastres.kernels.aot import compile_spec
from fastres.kernels.conv_fp8 import Fp8ConvLayer

w = torch.randn(64, 64, 3, 3).to(torch.float8_e4m3fn)
conv = Fp8ConvLayer(w, torch.full((64,), 1e-3), torch.zeros(64), stride=1, padding=1, relu=True,
                    has_residual=True, residual_scale=0.1, output_scale=0.1)
report = []
for arch in (89, 90):
    for spec in conv.aot_specs((8, 56, 56, 64), arch):
        stats = compile_spec(spec, arch)
        main = (stats.sass.main_loop or stats.sass.outside) if stats.sass else None  # no loop: all unrolled
        report.append(dict(arch=arch, ok=stats.compiled_ok, error=stats.error, spills=stats.spill_bytes,
                           mma_kind=main.mma_kind if main else None, mma=main.mma if main else 0))
print(json.dumps(report))
"""


@pytest.mark.slow
def test_fp8_kernel_compiles_without_spills_to_fp8_mma():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-c", _CHILD]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(report) == 2
    for r in report:
        assert r["ok"] and r["spills"] == 0, r
        assert r["mma_kind"] == ("QMMA" if r["arch"] == 89 else "QGMMA") and r["mma"] > 0, r


def test_sass_parser_counts_fp8_mma():
    sass = """
        /*0000*/                   QMMA.16832.F32.E4M3.E4M3 R12, R16, R20, R12 ;
        /*0010*/                   QGMMA.64x64x32.F32.E4M3.E4M3 R24, gdesc[UR12].tnspB, R24 ;
    """
    counts = count_ops(parse_instructions(sass))
    assert counts.mma == 2 and counts.mma_kind == "QMMA"
    assert counts.mma_flops == 2 * 16 * 8 * 32 + 2 * 64 * 64 * 32


_PROMOTION_CHILD = r"""
import dataclasses, json
import torch
from fastres.kernels.aot import compile_spec
from fastres.kernels.conv_fp8 import Fp8ConvLayer

w = torch.randn(256, 256, 3, 3).to(torch.float8_e4m3fn)
conv = Fp8ConvLayer(w, torch.full((256,), 1e-3), torch.zeros(256), stride=1, padding=1, relu=True,
                    has_residual=True, residual_scale=0.1, output_scale=0.1)
spec = conv.aot_specs((256, 14, 14, 256), 90)[0]
unpromoted = dataclasses.replace(spec, constexprs=tuple(
    (k, None if k == "IMPRECISE_ACC" else v) for k, v in spec.constexprs))  # Triton: 2**30 on sm_90
out = {}
for name, s in (("promoted", spec), ("unpromoted", unpromoted)):
    stats = compile_spec(s, 90)
    out[name] = dict(spills=stats.spill_bytes, loop=stats.sass.main_loop.instructions,
                     imprecise=dict(s.constexprs)["IMPRECISE_ACC"], block_k=dict(s.constexprs)["BLOCK_K"],
                     tile=[dict(s.constexprs)["BLOCK_M"], dict(s.constexprs)["BLOCK_N"]], warps=s.num_warps)
print(json.dumps(out))
"""


@pytest.mark.slow
def test_fp8_accumulator_is_promoted_to_fp32_once_per_k_step():
    """sm_90: the layer asks for fp32 promotion every BLOCK_K (IMPRECISE_ACC), and the SASS main loop
    then holds one FADD per accumulator register more than with Triton's default (no promotion)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _PROMOTION_CHILD], capture_output=True, text=True, env=env,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    promoted, unpromoted = out["promoted"], out["unpromoted"]
    assert promoted["imprecise"] == promoted["block_k"] and promoted["spills"] == 0, out
    block_m, block_n = promoted["tile"]
    accumulators_per_thread = block_m * block_n // (32 * promoted["warps"])
    assert promoted["loop"] - unpromoted["loop"] >= accumulators_per_thread, out
