"""Programmatic dependent launch (kernels/pdl.py) in the compiled kernels, the specs and the launch options.

Without a GPU: the kernels are compiled ahead of time in a child process without the interpreter.
sm_90 binaries must hold griddepcontrol.launch_dependents and .wait with the weight prefetch ahead of
the wait and no global load, store or atomic before it (the hazard rule); sm_80 binaries and FASTRES_PDL=0
must hold none of it. Whether the overlap happens, and what it saves, only a GPU can show
(tests/test_pdl_gpu.py).
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from fastres.kernels import ConvLayer, HeadLayer, StemLayer, max_pool_aot_specs
from fastres.kernels.conv import ConvConfig
from fastres.kernels.pdl import PDL_ENV, pdl_enabled, pdl_for_arch

_CHILD = r"""
import json, os, sys
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastres.kernels import ConvLayer, HeadLayer, StemLayer, compile_spec, max_pool_aot_specs
from fastres.kernels.conv_int8 import Int8ConvLayer
from fastres.kernels.conv import ConvConfig

torch.manual_seed(0)
arch_list = [int(a) for a in sys.argv[1].split(",")]
# resnet50 layer4's 3x3 at batch 1: split-K with the fused reduction (counters, workspace) on both archs.
conv = ConvLayer(torch.randn(512, 512, 3, 3), torch.randn(512), stride=1, padding=1, relu=True,
                 has_residual=True, dtype=torch.float16)
shape = (1, 7, 7, 512)
q = torch.randint(-127, 128, (512, 512, 3, 3), dtype=torch.int8)
int8 = Int8ConvLayer(q, torch.full((512,), 1e-3), torch.zeros(512), stride=1, padding=1, relu=True,
                     output_scale=0.1)
stem = StemLayer(torch.randn(64, 3, 7, 7), torch.randn(64), dtype=torch.float16)
head = HeadLayer(torch.randn(1000, 2048), torch.randn(1000), dtype=torch.float16)
jobs = []
for arch in arch_list:
    config = conv.config_for(shape, arch)
    assert config.split_k > 1 and config.fused_reduce, config
    jobs.append(("conv_splitk_fused", conv.aot_specs(shape, arch)[0], arch))
    unfused = conv.aot_specs(shape, arch, config=ConvConfig(64, 64, 64, 4, 3, split_k=4, fused_reduce=False))
    jobs += [("conv_splitk_unfused", unfused[0], arch), ("splitk_reduce", unfused[1], arch)]
    jobs.append(("int8_conv", int8.aot_specs(shape, arch)[0], arch))
    jobs.append(("stem", stem.aot_specs((1, 3, 64, 64), arch)[0], arch))
    jobs.append(("maxpool", max_pool_aot_specs((1, 32, 32, 64), torch.float16, arch)[0], arch))
    head_pool, head_fc = head.aot_specs((1, 7, 7, 2048), arch)
    jobs += [("head_pool", head_pool, arch), ("head_fc", head_fc, arch)]
out = []
for label, spec, arch in jobs:
    stats = compile_spec(spec, arch)
    src = ASTSource(spec.fn, spec.signature_dict(), spec.constexpr_dict(), spec.attrs_dict())
    ptx = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=spec.compile_options()).asm["ptx"]
    out.append(dict(
        label=label, arch=arch, ok=stats.compiled_ok, error=stats.error, spills=stats.spill_bytes,
        griddepcontrol=list(stats.griddepcontrol), uses_pdl=stats.uses_pdl,
        prefetch_bytes=spec.prefetch_bytes,
        ptx_prefetches=ptx.count("prefetch.global.L2"), wait=stats.sass.gdc_wait if stats.sass else None,
        prefetches_before_wait=stats.sass.l2_prefetches_before_wait if stats.sass else None,
        memory_before_wait=list(stats.sass.memory_ops_before_wait) if stats.sass else None,
    ))
print(json.dumps(out))
"""


def _compile(archs: str, **env_extra) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env_extra
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, archs], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    return _compile("90,80")


KERNELS = ["conv_splitk_fused", "conv_splitk_unfused", "splitk_reduce", "int8_conv", "stem", "maxpool",
           "head_pool", "head_fc"]  # fmt: skip
WITH_WEIGHTS = {"conv_splitk_fused", "conv_splitk_unfused", "int8_conv", "stem", "head_fc"}


def _row(compiled, label, arch):
    (row,) = [r for r in compiled if r["label"] == label and r["arch"] == arch]
    assert row["ok"] and row["spills"] == 0, row
    return row


@pytest.mark.slow
@pytest.mark.parametrize("label", KERNELS)
def test_sm90_kernel_waits_after_its_prefetch_and_touches_no_activation_before(compiled, label):
    row = _row(compiled, label, 90)
    assert row["griddepcontrol"] == ["launch_dependents", "wait"] and row["uses_pdl"] and row["wait"], row
    # The hazard rule, read from the SASS: no global load, store or atomic before the wait.
    assert row["memory_before_wait"] == [], row
    if label in WITH_WEIGHTS:  # its first weight tiles are asked of L2 before the wait
        assert row["prefetches_before_wait"] > 0 and row["prefetch_bytes"] > 0, row
    elif label != "splitk_reduce":  # the reduce kernel prefetches its bias only
        assert row["prefetches_before_wait"] == 0 and row["prefetch_bytes"] == 0, row


@pytest.mark.slow
@pytest.mark.parametrize("label", KERNELS)
def test_sm80_kernel_has_no_griddepcontrol_and_no_prefetch(compiled, label):
    row = _row(compiled, label, 80)
    assert row["griddepcontrol"] == [] and not row["uses_pdl"] and row["wait"] is False, row
    assert row["ptx_prefetches"] == 0 and row["prefetch_bytes"] == 0, row


@pytest.mark.slow
def test_the_off_switch_compiles_sm90_without_pdl():
    for row in _compile("90", **{PDL_ENV: "0"}):
        assert row["ok"] and row["griddepcontrol"] == [] and row["ptx_prefetches"] == 0, row


def test_specs_and_launch_options_follow_the_arch_and_the_switch(monkeypatch):
    monkeypatch.delenv(PDL_ENV, raising=False)
    conv = ConvLayer(torch.randn(64, 64, 3, 3), torch.randn(64), stride=1, padding=1, dtype=torch.float16)
    stem = StemLayer(torch.randn(64, 3, 7, 7), torch.randn(64), dtype=torch.float16)
    head = HeadLayer(torch.randn(10, 64), torch.randn(10), dtype=torch.float16)

    def specs(arch):
        pool = max_pool_aot_specs((1, 32, 32, 64), torch.float16, arch)
        return [*conv.aot_specs((1, 56, 56, 64), arch), *stem.aot_specs((1, 3, 64, 64), arch), *pool,
                *head.aot_specs((1, 7, 7, 64), arch)]  # fmt: skip

    assert pdl_for_arch(90) and not pdl_for_arch(80) and not pdl_for_arch(0)
    for spec in specs(90):
        assert spec.uses_pdl and spec.compile_options()["launch_pdl"] is True, spec.name
    for spec in specs(80):
        assert not spec.uses_pdl and "launch_pdl" not in spec.compile_options() and spec.prefetch_bytes == 0
    # The conv prefetches its first num_stages K-steps: (3 stages of 64 rows) x 64 fp16 columns = 128 B.
    (conv_spec,) = conv.aot_specs((1, 56, 56, 64), 90, config=ConvConfig(64, 64, 64, 4, 3))
    assert conv_spec.constexpr_dict()["PREFETCH_STEPS"] == 3 and conv_spec.prefetch_bytes == 3 * 64 * 128
    monkeypatch.setenv(PDL_ENV, "0")
    assert not pdl_for_arch(90) and not any(spec.uses_pdl for spec in specs(90))
    assert ConvConfig(64, 64, 64, 4, 3).launch_options(pdl=True)["launch_pdl"] is True
    assert "launch_pdl" not in ConvConfig(64, 64, 64, 4, 3).launch_options()


def test_no_pdl_on_the_cpu_or_under_the_interpreter(monkeypatch):
    monkeypatch.delenv(PDL_ENV, raising=False)
    assert not pdl_enabled(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # interpreted kernels never see a gdc_* call
    assert not pdl_enabled(torch.device("cuda", 0))


def test_sass_summary_reads_the_wait_the_prefetches_before_it_and_memory_ops_before_it():
    from fastres.kernels.sass import summarize

    sass = """
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/                   PREEXIT ;
        /*0020*/                   CCTL.E.PF2 [R2] ;
        /*0030*/                   LDG.E R4, desc[UR4][R2.64] ;
        /*0040*/                   CCTL.E.PF2 [R6] ;
        /*0050*/                   ACQBULK ;
        /*0060*/                   CCTL.E.PF2 [R8] ;
        /*0070*/                   STG.E desc[UR4][R2.64], R4 ;
        /*0080*/                   EXIT ;
        /*0090*/                   BRA 0x90;
"""
    summary = summarize(sass)
    assert summary.gdc_wait and summary.l2_prefetches_before_wait == 2
    assert summary.memory_ops_before_wait == ("LDG.E",)
    plain = summarize(sass.replace("ACQBULK", "NOP"))
    assert not plain.gdc_wait and plain.l2_prefetches_before_wait == 0 and plain.memory_ops_before_wait == ()
