"""The int8 conv kernel compiled ahead of time for sm_80 and sm_90 (no GPU needed, a child process
without the interpreter): 0 spills, integer tensor-core MMAs in its SASS (IMMA on sm_80, integer
wgmma = IGMMA on sm_90), and the SASS parser counting them."""

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
from fastres.kernels.conv_int8 import Int8ConvLayer

def layer(c_in, c_out, k, **options):
    w = torch.randint(-127, 128, (c_out, c_in, k, k), dtype=torch.int8)
    scale, bias = torch.full((c_out,), 1e-3), torch.zeros(c_out)
    return Int8ConvLayer(w, scale, bias, stride=1, padding=k // 2, **options)

cases = [
    ("3x3_residual", layer(64, 64, 3, relu=True, has_residual=True, residual_scale=0.1, output_scale=0.1),
     (8, 56, 56, 64)),
    ("3x3_b1_splitk", layer(512, 512, 3, relu=True, output_scale=0.1), (1, 7, 7, 512)),
    ("1x1_fp16_out", layer(1024, 64, 1, out_dtype=torch.float16), (8, 28, 28, 1024)),
]
report = []
for arch in (80, 90):
    for name, conv, shape in cases:
        for spec in conv.aot_specs(shape, arch):
            stats = compile_spec(spec, arch)
            # No loop at all when ptxas unrolls every K-step (a short K on two warpgroups): then the MMAs
            # are in the straight-line code.
            main = (stats.sass.main_loop or stats.sass.outside) if stats.sass else None
            report.append(dict(
                arch=arch, name=name, config=spec.config, ok=stats.compiled_ok, error=stats.error,
                spills=stats.spill_bytes, registers=stats.registers,
                mma_kind=main.mma_kind if main else None, mma=main.mma if main else 0,
            ))
print(json.dumps(report))
"""


@pytest.mark.slow
def test_int8_kernel_compiles_without_spills_to_integer_mma():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-c", _CHILD]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(report) == 6 and any("_k" in r["config"] for r in report)  # one of them splits K
    for r in report:
        assert r["ok"], r
        assert r["spills"] == 0, r
        assert r["mma_kind"] == ("IMMA" if r["arch"] == 80 else "IGMMA") and r["mma"] > 0, r


def test_sass_parser_counts_integer_mma():
    sass = """
        /*0000*/                   IMMA.16832.S8.S8.SAT R12, R16.ROW, R20.COL, R12 ;
        /*0010*/                   IGMMA.64x64x32.S8.S8 R24, gdesc[UR12].tnspB, R24 ;
    """
    counts = count_ops(parse_instructions(sass))
    assert counts.mma == 2 and counts.mma_kind == "IMMA"
    assert counts.mma_flops == 2 * 16 * 8 * 32 + 2 * 64 * 64 * 32
