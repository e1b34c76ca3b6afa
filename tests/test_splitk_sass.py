"""The fused split-K reduction in the compiled sm_90 SASS: every slice of a chunk loaded before the sum.

The rolled reduction paid one dependent L2 round trip per slice (SPLIT-1 trips of a loop); the chunked one
issues all SPLIT loads of a chunk before their first use, so a chunk costs one to three round trips
(ptxas batches them without a register cap) and a tile `reduce_trips` chunks. Compiling needs a process
without TRITON_INTERPRET, so the kernels are compiled in a child process.
"""

import json
import os
import subprocess
import sys

from fastres.kernels.sass import load_round_trips, parse_instructions, summarize

_COMPILE_SCRIPT = r"""
import json, torch
from fastres.kernels import ConvLayer, compile_spec
out = []
# ResNet-34's split-K 3x3 convs with the residual+ReLU epilogue at batch 1: the 512-channel 7x7 layers
# (fp16 and fp32) and the 64-channel 56x56 one, whose fp32 sm_90 build spilled 32 bytes before.
for c, hw, dtype in [(512, 7, torch.float16), (512, 7, torch.float32), (64, 56, torch.float32)]:
    layer = ConvLayer(torch.randn(c, c, 3, 3), torch.randn(c), stride=1, padding=1, relu=True,
                      has_residual=True, dtype=dtype)
    spec = layer.aot_specs((1, hw, hw, c), 90)[0]
    st = compile_spec(spec, 90)
    out.append(dict(ok=st.compiled_ok, error=st.error, spill=st.spill_bytes, config=spec.config,
                    split=dict(spec.constexprs)["SPLIT"], reduce_trips=spec.reduce_trips,
                    reduction=st.sass.reduction.__dict__ if st.sass.reduction else None))
print(json.dumps(out))
"""


def test_fused_reduction_loads_every_slice_of_a_chunk_before_summing():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    for r in json.loads(done.stdout.strip().splitlines()[-1]):
        assert r["ok"], r["error"]
        assert r["spill"] == 0, f"{r['config']} spills {r['spill']} bytes"
        red, split = r["reduction"], r["split"]
        assert split > 1 and red is not None and r["reduce_trips"] >= 1, r
        # One trip per chunk of rows (not per slice): at least one load per slice in each trip, and
        # few dependent round trips per trip.
        assert red["loads_per_trip"] >= split and red["round_trips_per_trip"] <= 3, r
        if split >= 8:  # the rolled loop's SPLIT-1 trips took at least one round trip each
            trips = r["reduce_trips"] if red["looped"] else 1
            assert trips * red["round_trips_per_trip"] < split - 1, r


def test_load_round_trips_counts_batches_of_loads_in_issue_order():
    sass = """
        /*0000*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0010*/                   LDG.E.128 R8, desc[UR4][R2.64+0x10] ;
        /*0020*/                   FADD R12, R4, R8 ;
        /*0030*/                   LDG.E.64 R14, desc[UR4][R20.64] ;
        /*0040*/                   FADD R13, R5, R9 ;
        /*0050*/                   FADD R12, R12, R15 ;
        /*0060*/                   STG.E desc[UR4][R2.64], R12 ;
    """
    # Two loads, then a use (one round trip); a third load, a use of old data (no wait), a use of R15.
    assert load_round_trips(parse_instructions(sass)) == (3, 2)
    hoisted = "\n".join(line for line in sass.splitlines() if "0020" not in line)
    assert load_round_trips(parse_instructions(hoisted)) == (3, 1)


def test_reduction_is_the_code_after_the_arrival_counter():
    sass = """
        /*0000*/                   HMMA.16816.F32 R12, R16, R20, R12 ;
        /*0010*/               @P0 BRA 0x0 ;
        /*0020*/                   ATOMG.E.ADD.STRONG.GPU PT, R0, desc[UR16][R28.64], R11 ;
        /*0030*/                   LDG.E.128.STRONG.GPU R40, desc[UR16][R70.64] ;
        /*0040*/                   LDG.E.128.STRONG.GPU R44, desc[UR16][R72.64] ;
        /*0050*/                   FADD R31, R40, R44 ;
        /*0060*/                   STG.E desc[UR16][R2.64], R31 ;
        /*0070*/               @P1 BRA 0x30 ;
        /*0080*/                   EXIT ;
    """
    red = summarize(sass).reduction
    assert (red.loads_per_trip, red.round_trips_per_trip, red.looped) == (2, 1, True)
    assert summarize(sass.replace("ATOMG.E.ADD.STRONG.GPU", "IADD3")).reduction is None
