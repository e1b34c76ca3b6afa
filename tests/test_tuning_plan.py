"""Tuned plans end to end under the interpreter: Triton and cuDNN layers mixed in one plan, and the
first-use self-check's fallbacks when a kernel is deliberately made wrong.

The heavy late layers run on the cuDNN tactic (CPU convolutions stand in for cuDNN here), which is
itself what is tested, and keeps the interpreter's share small.
"""

from __future__ import annotations

import json

import pytest
import torch
from e2e import assert_parity, calibrated
from fastres.kernels import ConvConfig, ConvLayer

import fastres
from fastres.backends import triton_backend
from fastres.testing import random_images
from fastres.tuning import selfcheck
from fastres.tuning.cache import TuneCache, entry_key
from fastres.tuning.selfcheck import SelfCheckWarning
from fastres.tuning.tactics import CUDNN_TACTIC, CudnnConv, triton_tactic

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
OPTIONS = dict(device="cpu", backend="triton")


def _spy_cudnn(monkeypatch) -> list[int]:
    calls = []
    call = CudnnConv.__call__
    monkeypatch.setattr(CudnnConv, "__call__", lambda self, *a: calls.append(id(self)) or call(self, *a))
    return calls


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_triton_and_cudnn_plan_matches_the_reference(dtype, monkeypatch):
    model = calibrated("resnet18", 7)
    engine = fastres.optimize(model, dtype=dtype, tune=False, self_check=False, **OPTIONS)
    backend = engine.backend
    inputs = backend.conv_inputs(2, 32, 32)
    chosen = [n for n in inputs if n.startswith(("layer3", "layer4"))]
    chosen += ["layer1.0.conv2", "layer2.0.downsample.0"]
    for name in chosen:
        backend.tuned[(inputs[name][0], 2)] = CUDNN_TACTIC
    # A choice is per signature: layer1.1.conv2 has layer1.0.conv2's, so it runs on cuDNN too.
    on_cudnn = [n for n, (sig, _) in inputs.items() if (sig, 2) in backend.tuned]
    assert "layer1.1.conv2" in on_cudnn and "layer1.0.conv1" not in on_cudnn
    # A tuned Triton tactic too: split-K with the separate reduction kernel on layer2.0.conv1.
    split = triton_tactic(ConvConfig(32, 32, 16, 4, 1, split_k=3, fused_reduce=False))
    backend.tuned[(inputs["layer2.0.conv1"][0], 2)] = split
    calls = _spy_cudnn(monkeypatch)
    assert_parity(engine, model, random_images(2, 32, 32, seed=11), dtype)
    assert len(calls) == len(on_cudnn)  # each listed conv ran on cuDNN, once; the others on Triton
    layer, shape = backend.layers["layer2.0.conv1"], inputs["layer2.0.conv1"][1]
    assert layer._config(shape, torch.device("cpu")).split_k == 3


@pytest.mark.interpreter
@pytest.mark.slow
def test_cudnn_tactic_on_merged_projection_shortcuts(monkeypatch):
    """resnet50's first block-final convs carry the projection K-concatenated: the cuDNN tactic runs
    it as a second convolution. Everything on cuDNN but the convs shaped as layer1.1's two first."""
    model = calibrated("resnet50", 5)
    engine = fastres.optimize(model, dtype=torch.float32, tune=False, self_check=False, **OPTIONS)
    inputs = engine.backend.conv_inputs(1, 32, 32)
    merged = [op.name for op in engine.plan.ops if getattr(op, "shortcut_input", None) is not None]
    assert merged
    on_triton = {inputs[name][0] for name in ("layer1.1.conv1", "layer1.1.conv2")}
    for signature, _ in inputs.values():
        if signature not in on_triton:
            engine.backend.tuned[(signature, 1)] = CUDNN_TACTIC
    assert any(inputs[name][0] not in on_triton for name in merged)
    calls = _spy_cudnn(monkeypatch)
    assert_parity(engine, model, random_images(1, 32, 32, seed=12), torch.float32)
    assert 0 < len(calls) == sum(sig not in on_triton for sig, _ in inputs.values()) < len(inputs)


def _cache_heavy_layers_on_cudnn(tmp_path, monkeypatch, dtype=torch.float32):
    """The self-check's batch (2 at 32 px) with layer3 and layer4 on cuDNN, from the tuning cache."""
    monkeypatch.setenv("FASTRES_CACHE", str(tmp_path))
    monkeypatch.setattr(selfcheck, "CHECK_SIZE", 32)
    model = calibrated("resnet18", 7)
    plain = fastres.optimize(model, dtype=dtype, tune=False, self_check=False, **OPTIONS)
    layers = {
        entry_key(signature, 2): {"tactic": CUDNN_TACTIC.to_json()}
        for name, (signature, _) in plain.backend.conv_inputs(2, 32, 32).items()
        if name.startswith(("layer3", "layer4"))
    }
    TuneCache(torch.device("cpu")).update(layers=layers)
    return model


def _wrong_layer1_conv1(monkeypatch):
    """A deliberately wrong kernel result from resnet18's layer1.x.conv1 (64 -> 64, 3x3, no residual)."""
    launch = ConvLayer.launch

    def wrong(self, *args, **kw):
        out = launch(self, *args, **kw)
        if (self.in_channels, self.out_channels, self.has_residual) == (64, 64, False):
            out.mul_(1.5)
        return out

    monkeypatch.setattr(ConvLayer, "launch", wrong)


@pytest.mark.interpreter
@pytest.mark.slow
def test_self_check_moves_a_drifting_layer_to_cudnn(tmp_path, monkeypatch):
    model = _cache_heavy_layers_on_cudnn(tmp_path, monkeypatch)
    _wrong_layer1_conv1(monkeypatch)
    with pytest.warns(SelfCheckWarning, match=r"layer1\.0\.conv1, layer1\.1\.conv1 drifted"):
        engine = fastres.optimize(model, dtype=torch.float32, self_check=True, **OPTIONS)
    assert engine.backend_name == "triton"
    assert engine.backend.cudnn_shapes["layer1.0.conv1"] is None  # every shape, from now on
    assert_parity(engine, model, random_images(2, 32, 32, seed=13), torch.float32)
    verdicts = json.loads(TuneCache(torch.device("cpu")).path.read_text())["self_check"]
    (verdict,) = verdicts.values()
    assert verdict["action"] == "cudnn" and verdict["drifted"] == ["layer1.0.conv1", "layer1.1.conv1"]
    assert verdict["relative_error"] > verdict["bound"]


@pytest.mark.interpreter
def test_self_check_falls_back_to_torch_when_the_error_is_not_local(tmp_path, monkeypatch):
    model = _cache_heavy_layers_on_cudnn(tmp_path, monkeypatch)
    pool = triton_backend.max_pool2d_nhwc
    monkeypatch.setattr(triton_backend, "max_pool2d_nhwc", lambda *a, **kw: pool(*a, **kw).add_(0.5))
    with pytest.warns(SelfCheckWarning, match="torch backend"):
        engine = fastres.optimize(model, dtype=torch.float32, self_check=True, **OPTIONS)
    assert engine.backend_name == "torch"
    assert_parity(engine, model, random_images(2, 32, 32, seed=14), torch.float32)


@pytest.mark.interpreter
def test_self_check_passes_a_correct_plan_and_can_be_turned_off(tmp_path, monkeypatch, recwarn):
    model = _cache_heavy_layers_on_cudnn(tmp_path, monkeypatch)
    engine = fastres.optimize(model, dtype=torch.float32, self_check=True, **OPTIONS)
    assert engine.backend_name == "triton" and not engine.backend.cudnn_shapes.get("layer1.0.conv1")
    (verdict,) = json.loads(TuneCache(torch.device("cpu")).path.read_text())["self_check"].values()
    assert verdict["ok"] and verdict["action"] == "none"
    _wrong_layer1_conv1(monkeypatch)
    engine = fastres.optimize(model, dtype=torch.float32, self_check=False, **OPTIONS)
    assert engine.backend_name == "triton" and "layer1.0.conv1" not in engine.backend.cudnn_shapes
    assert not [w for w in recwarn if issubclass(w.category, SelfCheckWarning)]


def _fake_tuner(calls):
    """Stands in for tune_and_cache: records the request, puts every conv on cuDNN (fast to run here)."""

    def tune(backend, batches, height, width, **options):
        calls.append((list(batches), height, width))
        for batch in batches:
            for signature, _ in backend.conv_inputs(batch, height, width).values():
                backend.tuned[(signature, batch)] = CUDNN_TACTIC

    return tune


@pytest.mark.interpreter
def test_warmup_tune_tunes_first_and_captures_with_the_choices(tmp_path, monkeypatch):
    from fastres.tuning import use

    monkeypatch.setenv("FASTRES_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(use, "tune_and_cache", _fake_tuner(calls))
    model = calibrated("resnet18", 7)
    engine = fastres.optimize(model, dtype=torch.float32, self_check=False, **OPTIONS)
    cudnn_calls = _spy_cudnn(monkeypatch)
    engine.warmup(batch_sizes=(2,), image_size=32, tune=True)
    assert calls == [([2], 32, 32)]
    assert len(cudnn_calls) == len(engine.backend.conv_inputs(2, 32, 32))  # the warm-up ran the choices
    torch_engine = fastres.optimize(model, device="cpu", dtype=torch.float32, backend="torch")
    with pytest.raises(fastres.ConfigError, match="triton backend"):
        torch_engine.warmup(tune=True)


@pytest.mark.interpreter
def test_load_tune_true_tunes_each_new_batch_bucket_on_first_use(tmp_path, monkeypatch):
    from fastres.tuning import use

    monkeypatch.setenv("FASTRES_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(use, "tune_and_cache", _fake_tuner(calls))
    model = calibrated("resnet18", 7)
    engine = fastres.optimize(model, dtype=torch.float32, self_check=False, tune=True, **OPTIONS)
    assert calls == []  # nothing at load
    x = random_images(2, 32, 32, seed=15)
    assert_parity(engine, model, x, torch.float32)
    engine(x)
    assert calls == [([2], 32, 32)]  # once per bucket and size, the first time the engine sees it
    with pytest.raises(fastres.ConfigError, match="triton backend"):
        fastres.optimize(model, device="cpu", backend="torch", tune=True)
