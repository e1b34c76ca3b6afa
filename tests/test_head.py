"""HeadLayer (kernels/head.py): global average pool + linear against float64 mean + matmul."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from fastres.kernels import head
from fastres.kernels.head import HeadLayer

from fastres.numerics import LAYER_RTOL, assert_close, poison_

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]

# (N, H, W, C), classes, bias. Batch 1-4 takes the GEMV path, larger batches the tl.dot path.
CASES = [
    pytest.param((1, 7, 7, 2048), 1000, True, id="resnet50_batch1"),
    pytest.param((3, 7, 5, 100), 1001, False, id="batch3_7x5_c100_to1001_nobias"),
    pytest.param((17, 1, 1, 64), 10, True, id="batch17_1x1_c64_to10"),
    pytest.param((2, 7, 7, 512), 1, True, id="resnet18_batch2_to1"),
    pytest.param((17, 7, 7, 100), 1000, False, id="batch17_c100_to1000_nobias"),
    pytest.param((1, 1, 1, 64), 1001, True, id="batch1_1x1_to1001"),
]


def _make(shape, num_classes, with_bias, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(num_classes, shape[3], generator=gen) / shape[3] ** 0.5).to(DEVICE)
    bias = torch.randn(num_classes, generator=gen).to(DEVICE) if with_bias else None
    x = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    return HeadLayer(weight, bias, dtype=dtype), weight, bias, x


def _reference(x, weight, bias, dtype):
    ref = x.double().cpu().mean(dim=(1, 2)) @ weight.to(dtype).double().cpu().T
    return ref if bias is None else ref + bias.double().cpu()


def _run(layer, x):
    out = poison_(torch.empty(x.shape[0], layer.num_classes, dtype=torch.float32, device=DEVICE))
    assert layer(x, out=out) is out
    return out


def _check(shape, num_classes, with_bias, dtype):
    layer, weight, bias, x = _make(shape, num_classes, with_bias, dtype, seed=int(torch.randint(2**31, ())))
    out = _run(layer, x)
    # fp32 accumulation, fp32 pooled features and fp32 logits whatever the input dtype: the fp32 bound.
    assert_close(out, _reference(x, weight, bias, dtype), LAYER_RTOL[torch.float32], what=f"head {shape}")


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, num_classes, with_bias", CASES)
def test_head_matches_reference(shape, num_classes, with_bias, dtype):
    _check(shape, num_classes, with_bias, dtype)


@pytest.fixture
def gpu_configs(monkeypatch):
    """Run the shipped GPU configs under the interpreter (which otherwise uses wider tiles)."""
    monkeypatch.setattr(head, "POOL_INTERP_CONFIG", head.POOL_CONFIG)
    monkeypatch.setattr(head, "FC_INTERP_CONFIGS", head.FC_CONFIGS)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape, num_classes",
    [
        pytest.param((1, 3, 3, 200), 1000, id="gemv_row"),
        pytest.param((17, 3, 3, 200), 70, id="dot16_row"),
        pytest.param((20, 2, 2, 100), 40, id="dot16x32_row"),
        pytest.param((65, 1, 1, 100), 40, id="dot32_row"),
        pytest.param((129, 1, 1, 40), 33, id="dot64_row"),
    ],
)
def test_gpu_configs_under_interpreter(gpu_configs, shape, num_classes, dtype):
    expected = [row for row in head.FC_CONFIGS if row[0] is None or shape[0] <= row[0]][0][1]
    assert head.fc_config(shape[0]) == expected  # each case exercises a different table row
    _check(shape, num_classes, True, dtype)


@pytest.mark.interpreter
def test_16bit_pooled_features_need_the_split(monkeypatch):
    """Rounding the pooled features to fp16 (one term) misses the fp32 bound the split (two) meets."""
    shape, num_classes = (17, 7, 7, 256), 64
    layer, weight, bias, x = _make(shape, num_classes, True, torch.float16, seed=3)
    ref = _reference(x, weight, bias, torch.float16)
    assert_close(_run(layer, x), ref, LAYER_RTOL[torch.float32])
    monkeypatch.setitem(head._SPLIT_TERMS, torch.float16, 1)
    with pytest.raises(AssertionError, match="relative error"):
        assert_close(_run(layer, x), ref, LAYER_RTOL[torch.float32])


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [pytest.param(1, id="gemv"), pytest.param(17, id="dot")])
def test_bitwise_deterministic(batch, dtype):
    layer, _, _, x = _make((batch, 7, 7, 96), 300, True, dtype, seed=5)
    first = _run(layer, x)
    assert torch.equal(first, _run(layer, x)), "two runs on the same input differ"


@pytest.mark.interpreter
def test_pooled_scratch_is_cached_per_batch():
    layer, _, _, x = _make((3, 2, 2, 32), 10, True, torch.float32, seed=6)
    _run(layer, x)
    scratch = layer.pooled_buffer(3)
    _run(layer, x)
    assert layer.pooled_buffer(3) is scratch and scratch.shape == (3, 32) and scratch.dtype == torch.float32
    assert layer.pooled_buffer(5).data_ptr() != scratch.data_ptr()


class _Recorder:
    """Stands in for a @triton.jit kernel: logs each launch, then launches the real kernel."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        def launch(**kwargs):
            self.log.append((self.kernel, grid, kwargs))
            return self.kernel[grid](**kwargs)

        return launch


@pytest.mark.interpreter
@pytest.mark.parametrize("batch", [1, 17])
def test_aot_specs_match_launches(gpu_configs, monkeypatch, batch):
    """One spec per launch, in launch order, with the launch's kernel, constexprs and launch options."""
    layer, _, _, x = _make((batch, 2, 2, 48), 20, True, torch.float16, seed=7)
    monkeypatch.setenv("FASTRES_PDL", "0")  # the interpreted launch below never uses PDL (tests/test_pdl.py)
    specs = layer.aot_specs(tuple(x.shape), 90)
    log = []
    for name in ("_head_pool_kernel", "_head_fc_kernel"):
        monkeypatch.setattr(head, name, _Recorder(getattr(head, name), log))
    _run(layer, x)
    assert len(specs) == len(log) == 2
    assert [grid for _, grid, _ in log] == layer.grids(tuple(x.shape))
    for spec, (kernel, _, kwargs) in zip(specs, log):
        assert spec.fn is kernel
        assert kwargs["num_warps"] == spec.num_warps and kwargs["num_stages"] == spec.num_stages
        for name, value in spec.constexprs:
            assert kwargs[name] == value, name


def test_grids_fill_the_gpu():
    """Programs per launch for ResNet-50's head (C=2048, 1000 classes) and ResNet-18's (C=512)."""
    layer = HeadLayer(torch.randn(1000, 2048), None, dtype=torch.float16)
    assert layer.padded_classes == 1024 and layer.weight_packed.shape == (2048, 1024)
    assert layer.grids((1, 7, 7, 2048)) == [(1, 64), (1, 128)]
    assert layer.grids((64, 7, 7, 2048)) == [(64, 64), (4, 32)]
    assert layer.grids((256, 7, 7, 2048)) == [(256, 64), (4, 32)]
    resnet18 = HeadLayer(torch.randn(1000, 512), None, dtype=torch.float16)
    assert resnet18.grids((1, 7, 7, 512)) == [(1, 16), (1, 128)]


@pytest.mark.interpreter
def test_allocates_fp32_output():
    layer = HeadLayer(torch.randn(10, 16, device=DEVICE), None, dtype=torch.float16)
    out = layer(torch.randn(2, 3, 3, 16, device=DEVICE, dtype=torch.float16))
    assert out.shape == (2, 10) and out.dtype == torch.float32


@pytest.mark.interpreter
def test_rejects_bad_inputs():
    layer = HeadLayer(torch.randn(10, 16, device=DEVICE), torch.randn(10, device=DEVICE), dtype=torch.float32)
    x = torch.randn(2, 3, 3, 16, device=DEVICE)
    with pytest.raises(TypeError, match="expected x dtype torch.float32"):
        layer(x.half())
    with pytest.raises(ValueError, match=r"expected NHWC \(N, H, W, 16\)"):
        layer(torch.randn(2, 3, 3, 15, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        layer(x.permute(0, 2, 1, 3))
    with pytest.raises(TypeError, match="out must be a float32"):
        layer(x, out=torch.empty(2, 10, device=DEVICE, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"contiguous \(2, 10\)"):
        layer(x, out=torch.empty(3, 10, device=DEVICE))
    with pytest.raises(ValueError, match="bias must have shape"):
        HeadLayer(torch.randn(10, 16), torch.randn(9), dtype=torch.float32)


# Compiles both head launches for sm_90 and sm_80 (no GPU needed) and prints, per spec, its resource
# usage and how the PTX loads global memory: plain loads by width, and cp.async copies by byte count.
_COMPILE_SCRIPT = r"""
import dataclasses, json, re, sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastres.kernels import HeadLayer, compile_spec

result = {}
for dtype in (torch.float16, torch.bfloat16, torch.float32):
    layer = HeadLayer(torch.randn(1000, 2048), torch.randn(1000), dtype=dtype)
    for batch in (1, 8, 64, 256):
        for arch in (90, 80):
            for spec in layer.aot_specs((batch, 7, 7, 2048), arch):
                stats = dataclasses.asdict(compile_spec(spec, arch))
                src = ASTSource(spec.fn, spec.signature_dict(), spec.constexpr_dict(), spec.attrs_dict())
                ptx = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=spec.compile_options())
                ptx = ptx.asm["ptx"]
                stats["loads"] = sorted(set(re.findall(r"ld\.global[.\w]*", ptx)))
                copies = re.findall(r"cp\.async\.c[ag]\.shared\.global \[[^]]*\], \[[^]]*\], (\w+)", ptx)
                stats["cp_async_bytes"] = sorted({int(n, 0) for n in copies})
                result[f"{spec.name}_sm{arch}"] = {k: v for k, v in stats.items() if k != "extra"}
print(json.dumps(result))
"""


@pytest.mark.slow
def test_compiles_clean_and_vectorised():
    """sm_90 and sm_80, fp16/bf16/fp32, GEMV and dot paths: no spills, 16-byte weight loads."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"AOT compile subprocess failed:\n{proc.stderr[-4000:]}"
    compiled = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(compiled) == 3 * 4 * 2 * 2
    for label, stats in compiled.items():
        assert stats["compiled_ok"], f"{label}: {stats['error']}"
        assert stats["spill_bytes"] == 0, f"{label} spills {stats['spill_bytes']} bytes"
        if "_fc_1x" in label:  # GEMV: the weight tile arrives by plain 16-byte loads
            assert stats["loads"] == ["ld.global.v4.b32"], f"{label}: {stats['loads']}"
        elif "_fc_" in label:  # dot path: weight and pooled tiles by 16-byte asynchronous copies
            assert stats["cp_async_bytes"] == [16], f"{label}: {stats['cp_async_bytes']}"
        else:  # pooling
            assert stats["loads"] == ["ld.global.v4.b32"], f"{label}: {stats['loads']}"


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 8, 64, 256])
@pytest.mark.parametrize("dtype", DTYPES + [pytest.param(torch.bfloat16, id="bf16")])
def test_resnet50_head_gpu(batch, dtype):
    _check((batch, 7, 7, 2048), 1000, True, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("dtype", DTYPES + [pytest.param(torch.bfloat16, id="bf16")])
def test_bitwise_deterministic_gpu(batch, dtype):
    layer, _, _, x = _make((batch, 7, 7, 2048), 1000, True, dtype, seed=8)
    first = _run(layer, x)
    assert torch.equal(first, _run(layer, x)), "two runs on the same input differ"
