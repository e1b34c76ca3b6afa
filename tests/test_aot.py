"""Ahead-of-time compilation (kernels/aot.py) of the shipped kernels for sm_90 and sm_80, without a GPU.

Compiling needs a process without TRITON_INTERPRET (conftest sets it on CPU-only machines), so the
compile runs once, in a subprocess, for every spec these tests look at; spec building is checked in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from fastres.kernels.conv import CONV_CONFIGS, ConvLayer

# Compiles every spec named by (label, arch) and prints one JSON object: label -> KernelStats fields.
_COMPILE_SCRIPT = r"""
import dataclasses, json, torch
from fastres.kernels import CONV_CONFIGS, ConvLayer, HeadLayer, compile_spec, max_pool_aot_specs

def conv(c_in, c_out, k, stride, pad, dtype, residual=False, dilation=1):
    w = torch.randn(c_out, c_in, k, k)
    return ConvLayer(
        w, torch.randn(c_out), stride=stride, padding=pad, relu=True, has_residual=residual, dtype=dtype,
        dilation=dilation,
    )

jobs = {}
for arch in (90, 80):
    r50_3x3 = conv(64, 64, 3, 1, 1, torch.float16)
    r50_1x1 = conv(64, 256, 1, 1, 0, torch.float16, residual=True)
    jobs[f"r50_3x3_b8_sm{arch}"] = (r50_3x3.aot_specs((8, 56, 56, 64), arch)[0], arch)
    jobs[f"r50_1x1_b8_sm{arch}"] = (r50_1x1.aot_specs((8, 56, 56, 64), arch)[0], arch)
    for dtype, suffix in ((torch.float16, ""), (torch.float32, "_fp32")):  # layer3 3x3 at output stride 8
        dilated = conv(256, 256, 3, 1, 2, dtype, dilation=2).aot_specs((8, 28, 28, 256), arch)[0]
        jobs[f"r50_3x3_d2_b8{suffix}_sm{arch}"] = (dilated, arch)
    jobs[f"maxpool_sm{arch}"] = (max_pool_aot_specs((8, 112, 112, 64), torch.float16, arch)[0], arch)
    for dtype, width in ((torch.float16, "fp16"), (torch.float32, "fp32")):
        # ResNet-D: resnet50d's layer2.0.conv3 with its 2x2-pooled projection concatenated along K, and
        # resnet18d's standalone pooled projection (both average while loading A).
        pooled = ConvLayer(torch.randn(512, 128, 1, 1), torch.randn(512), stride=1, padding=0, relu=True,
                           dtype=dtype, shortcut_weight=torch.randn(512, 256, 1, 1), shortcut_stride=2,
                           avg_pool=True)  # fmt: skip
        alone = ConvLayer(torch.randn(128, 64, 1, 1), torch.randn(128), stride=2, padding=0, dtype=dtype,
                          avg_pool=True)  # fmt: skip
        jobs[f"pooled_shortcut_{width}_sm{arch}"] = (pooled.aot_specs((8, 28, 28, 128), arch)[0], arch)
        jobs[f"pooled_alone_{width}_sm{arch}"] = (alone.aot_specs((8, 56, 56, 64), arch)[0], arch)
    head = HeadLayer(torch.randn(1000, 2048), torch.randn(1000), dtype=torch.float16)
    head_pool, head_fc = head.aot_specs((8, 7, 7, 2048), arch)
    jobs[f"head_pool_sm{arch}"], jobs[f"head_fc_sm{arch}"] = (head_pool, arch), (head_fc, arch)
for (family, width, kind), config in CONV_CONFIGS.items():
    if family == "interp":
        continue
    arch = 90 if family == "sm90" else 80
    dtype = torch.float32 if width == "fp32" else torch.float16
    if kind == "gather":
        layer, shape = conv(3, 64, 7, 2, 3, dtype), (8, 224, 224, 3)
    else:
        layer, shape = conv(64, 128, 3, 1, 1, dtype, residual=True), (8, 56, 56, 64)
    spec = layer.aot_specs(shape, arch, config=layer.clip_config(config))[0]
    jobs[f"config:{family}-{width}-{kind}"] = (spec, arch)
result = {}
for label, (spec, arch) in jobs.items():
    stats = compile_spec(spec, arch)
    result[label] = {k: v for k, v in dataclasses.asdict(stats).items() if k != "extra"}
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"AOT compile subprocess failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_clean(stats):
    assert stats["compiled_ok"], f"{stats['name']} {stats['config']}: {stats['error']}"
    assert stats["spill_bytes"] == 0, f"{stats['name']} {stats['config']} spills {stats['spill_bytes']} bytes"
    assert stats["registers"] <= 255


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("layer", ["r50_3x3_b8", "r50_1x1_b8", "r50_3x3_d2_b8", "r50_3x3_d2_b8_fp32"])
def test_resnet50_conv_compiles_clean(compiled, layer, arch):
    stats = compiled[f"{layer}_sm{arch}"]
    _assert_clean(stats)
    if arch >= 90:  # IEEE fp32 runs on the FMA units, 16-bit on wgmma
        fp32 = layer.endswith("fp32")
        assert stats["uses_wgmma"] is not fp32, f"{stats['name']}: HGMMA in the SASS is {stats['uses_wgmma']}"
    else:
        assert stats["uses_wgmma"] is None


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("kernel", ["maxpool", "head_pool", "head_fc"])
def test_pool_and_head_compile_clean(compiled, kernel, arch):
    _assert_clean(compiled[f"{kernel}_sm{arch}"])


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("width", ["fp16", "fp32"])
@pytest.mark.parametrize("layer", ["pooled_shortcut", "pooled_alone"])
def test_resnet_d_pooled_projections_compile_clean(compiled, layer, width, arch):
    stats = compiled[f"{layer}_{width}_sm{arch}"]
    _assert_clean(stats)
    assert "avg2x2" in stats["name"]
    if arch >= 90 and width == "fp16":
        assert stats["uses_wgmma"] is True, f"{stats['name']}: no HGMMA in the sm_90 SASS"


@pytest.mark.slow
@pytest.mark.parametrize(
    "key",
    [pytest.param(k, id="-".join(k)) for k in CONV_CONFIGS if k[0] != "interp"],
)
def test_every_shipped_config_compiles_clean(compiled, key):
    stats = compiled["config:" + "-".join(key)]
    _assert_clean(stats)
    if key[0] == "sm90" and key[1] == "16bit":
        assert stats["uses_wgmma"] is True, f"{stats['name']} {stats['config']}: no HGMMA in the SASS"


def test_spec_follows_launch_specialization():
    """Specs carry the specialization a real launch gets: ints == 1 constexpr, multiples of 16 divisible."""
    layer = ConvLayer(torch.randn(64, 64, 3, 3), torch.randn(64), stride=1, padding=1, dtype=torch.float16)
    (spec,) = layer.aot_specs((1, 56, 56, 64), 90)
    signature, constexprs = spec.signature_dict(), spec.constexpr_dict()
    assert signature["x_ptr"] == "*fp16" and signature["bias_ptr"] == "*fp32"
    assert signature["M"] == "i32" and signature["H"] == "i32"
    # Geometry and epilogue switches are constexpr; sizes are runtime ints.
    assert constexprs["R"] == 3 and constexprs["HAS_BIAS"] is True and "M" not in constexprs
    names = [name for name, _ in spec.signature]
    divisible = {names[i] for i in spec.divisible_args}
    assert {"x_ptr", "w_ptr", "bias_ptr", "res_ptr", "out_ptr", "C_IN", "C_OUT", "CG", "NG"} <= divisible
    assert "H" not in divisible  # 56 is not a multiple of 16
    assert spec.attrs_dict()[(names.index("C_IN"),)] == [["tt.divisibility", 16]]
    # Channel counts equal to 1 would become constexprs, as Triton specializes int arguments equal to 1;
    # the spatial sizes are exempt (do_not_specialize), so a 1x1 image reuses the same binary.
    (spec1,) = layer.aot_specs((1, 1, 1, 64), 90)
    assert spec1.signature_dict()["H"] == "i32" and "H" not in spec1.constexpr_dict()
    assert spec1.signature == spec.signature and spec1.divisible_args == spec.divisible_args


def test_spec_matches_tritons_own_specializer():
    """make_spec's rules agree with the specializer Triton runs at launch, on a real launch's arguments."""
    jit = pytest.importorskip("triton.runtime.jit")
    if not hasattr(jit, "native_specialize_impl"):
        pytest.skip("this Triton has no native_specialize_impl to compare with")
    from fastres.kernels.aot import _do_not_specialize, make_spec
    from fastres.kernels.conv import _conv_kernel
    from triton.backends.compiler import BaseBackend

    layer = ConvLayer(
        torch.randn(48, 24, 3, 3), None, stride=2, padding=1, dtype=torch.float16, has_residual=True
    )
    x = torch.randn(1, 33, 1, 24).half()
    out = torch.empty(layer.output_shape(tuple(x.shape)), dtype=torch.float16)
    args, constexprs, _ = layer._kernel_args(x, torch.empty_like(out), out, layer.config_for(x.shape, 90))
    spec = make_spec(_conv_kernel, args, constexprs, num_warps=4, num_stages=3, name="t", config="c")
    names = [name for name, _ in spec.signature]
    unspecialized = _do_not_specialize(_conv_kernel, names)
    for name, value in args.items():
        specialize = name not in unspecialized
        kind, attr = jit.native_specialize_impl(BaseBackend, value, False, specialize, True)
        assert spec.signature_dict()[name] == kind, name
        assert (names.index(name) in spec.divisible_args) == (attr == "D"), name


# The ReLU epilogues as compiled for sm_90: PTX's plain max.f32 returns the non-NaN operand, so a NaN
# would come out of the ReLU as 0 on the GPU (the interpreter's numpy maximum keeps it either way).
_RELU_PTX_SCRIPT = r"""
import json, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastres.kernels import ConvLayer, StemLayer

def ptx(spec):
    src = ASTSource(spec.fn, spec.signature_dict(), spec.constexpr_dict(), spec.attrs_dict())
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=spec.compile_options()).asm["ptx"]

conv = ConvLayer(torch.randn(64, 64, 3, 3), torch.randn(64), stride=1, padding=1, relu=True,
                 has_residual=True, dtype=torch.float16)
stem = StemLayer(torch.randn(64, 3, 7, 7), torch.randn(64), dtype=torch.float16)
out = {}
specs = {"conv": conv.aot_specs((1, 14, 14, 64), 90)[0], "stem": stem.aot_specs((1, 224, 224, 3), 90)[0]}
for name, spec in specs.items():
    text = ptx(spec)
    out[name] = {"nan_max": text.count("max.NaN.f32"), "plain_max": text.count("max.f32")}
print(json.dumps(out))
"""


def test_relu_epilogues_keep_nan_on_the_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", _RELU_PTX_SCRIPT], capture_output=True, text=True, env=env, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    for kernel, seen in counts.items():
        assert seen["nan_max"] > 0, f"{kernel}: no NaN-propagating max in the PTX ({seen})"
        assert seen["plain_max"] == 0, f"{kernel}: a plain max.f32 drops NaN ({seen})"
