"""ResNet as a backbone and an embedder: pooled embeddings, multi-scale features, truncated plans.

Judged like the logits: each output against the reference module's own intermediate output run in
float64, fastres's relative error at most parity_bound(eager PyTorch's error in the same dtype).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from e2e import calibrated

import fastres
from fastres.graph import normalize
from fastres.numerics import parity_bound, poison_, relative_error
from fastres.planner import FEATURE_NAMES
from fastres.runner import Runner
from fastres.testing import random_images

LEVELS = ("stem", "layer1", "layer2", "layer3", "layer4")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def module_features(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The reference module's intermediate outputs, caught by forward hooks on a full forward."""
    found = {}
    modules = {"stem": model.relu, **{f"layer{i}": getattr(model, f"layer{i}") for i in range(1, 5)}}
    modules["pool"] = model.avgpool
    hooks = [
        m.register_forward_hook(lambda _m, _i, out, name=name: found.__setitem__(name, out.clone()))
        for name, m in modules.items()
    ]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    found["pool"] = found["pool"].flatten(1)
    return found


def assert_features_match(engine, model, x, dtype, names=FEATURE_NAMES, device="cpu"):
    """Every requested output vs float64 (the reference module's), bounded by eager's error in `dtype`."""
    pixels = x
    if x.dtype == torch.uint8:
        x = normalize(x, engine.mean, engine.std)
    layout = getattr(engine.backend, "memory_format", torch.contiguous_format)
    ref = module_features(copy.deepcopy(model).to(device, torch.float64), x.to(device, torch.float64))
    eager_model = copy.deepcopy(model).to(device, dtype, memory_format=layout)
    eager = module_features(eager_model, x.to(device, dtype).contiguous(memory_format=layout))
    ours = engine(pixels)
    assert list(ours) == list(names)
    for name in names:
        got = ours[name]
        assert got.shape == ref[name].shape, name
        if got.dim() == 4:
            assert got.is_contiguous(memory_format=torch.channels_last), f"{name} is not channels-last"
            assert got.dtype == engine.dtype
        else:
            assert got.dtype == torch.float32
        err, eager_err = relative_error(got, ref[name]), relative_error(eager[name], ref[name])
        bound = parity_bound(eager_err)
        assert err <= bound, (
            f"{name}: relative error {err:.3e} > {bound:.3e} (eager {dtype}: {eager_err:.3e})"
        )


@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
)
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torch_backend_features_match_the_module(name, dtype):
    model = calibrated(name, 10)
    engine = fastres.optimize(model, device="cpu", dtype=dtype, backend="torch", features=FEATURE_NAMES)
    assert engine.outputs == FEATURE_NAMES and engine.num_classes == 0
    assert_features_match(engine, model, random_images(2, 45, 61, seed=21), dtype)


def test_uint8_features_and_out_indices():
    model = calibrated("resnet18", 10)
    engine = fastres.optimize(model, device="cpu", backend="torch", out_indices=(0, 2, 4))
    assert engine.outputs == ("stem", "layer2", "layer4")
    pixels = torch.randint(
        0, 256, (2, 3, 45, 61), dtype=torch.uint8, generator=torch.Generator().manual_seed(3)
    )
    assert_features_match(engine, model, pixels, torch.float32, names=engine.outputs)
    nhwc = engine(pixels.permute(0, 2, 3, 1).contiguous())
    for name, value in engine(pixels).items():
        torch.testing.assert_close(nhwc[name], value, rtol=1e-5, atol=1e-5)


def test_reference_backend_features_are_the_modules_own():
    model = calibrated("resnet18", 10)
    engine = fastres.optimize(model, device="cpu", backend="reference", features=FEATURE_NAMES)
    x = random_images(2, 45, 61, seed=22)
    ours, ref = engine(x), module_features(model, x)
    for name in FEATURE_NAMES:
        torch.testing.assert_close(ours[name], ref[name], rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_embeddings_match_the_reference_with_an_identity_fc(backend):
    model = calibrated("resnet50", 10)
    headless = copy.deepcopy(model)
    headless.fc = torch.nn.Identity()
    x = random_images(2, 45, 61, seed=23)
    with torch.inference_mode():
        ref = copy.deepcopy(headless).double()(x.double())
        eager = headless.to(memory_format=torch.channels_last)(
            x.contiguous(memory_format=torch.channels_last)
        )
    classifier = fastres.optimize(model, device="cpu", backend=backend)
    embedder = fastres.load("resnet50", model.state_dict(), num_classes=0, device="cpu", backend=backend)
    assert embedder.num_classes == 0 and embedder.outputs == ("pool",)
    for engine in (classifier, embedder):
        for out in (engine.embed(x), embedder(x)):
            assert out.shape == (2, 2048) and out.dtype == torch.float32
            assert relative_error(out, ref) <= parity_bound(relative_error(eager, ref))
    assert classifier(x).shape == (2, 10)  # the classifier itself still returns logits
    unit = classifier.embed(x, normalize=True)
    torch.testing.assert_close(unit, F.normalize(ref.float(), dim=1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(unit.norm(dim=1), torch.ones(2))


def test_outputs_are_fresh_and_owned_by_the_caller():
    model = calibrated("resnet18", 10)
    engine = fastres.optimize(model, device="cpu", backend="torch", features=("layer1", "layer4", "pool"))
    a, b = random_images(1, 45, 61, seed=24), random_images(1, 45, 61, seed=25)
    first = engine(a)
    snapshot = {k: v.clone() for k, v in first.items()}
    for v in first.values():
        v.zero_()  # the caller's to mutate: the next call is unaffected
    again = engine(a)
    for name in first:
        torch.testing.assert_close(again[name], snapshot[name], rtol=0, atol=0)
    second = engine(b)
    for name in first:
        assert again[name].untyped_storage().data_ptr() != second[name].untyped_storage().data_ptr()
        assert not torch.equal(again[name], second[name])


def test_captured_runner_clones_static_feature_outputs():
    """With a (recorded) CUDA graph the outputs are static tensors: every call hands back clones."""
    engine = fastres.optimize(
        calibrated("resnet18", 10), device="cpu", backend="torch", features=("stem", "layer2")
    )

    class Recorded:  # a replay writes into the captured outputs' memory, as a CUDA graph does
        def __init__(self, forward):
            self.forward, self.static = forward, forward()

        def replay(self):
            for name, value in self.forward().items():
                self.static[name].copy_(value)

    def capture(forward, stream):
        graph = Recorded(forward)
        return graph, graph.static

    a, b = random_images(1, 32, 32, seed=26), random_images(1, 32, 32, seed=27)
    runner = Runner(engine.backend, a, use_cuda_graph=True, capture=capture)
    first, expected = runner(a), engine(a)
    second = runner(b)
    for name in ("stem", "layer2"):
        torch.testing.assert_close(first[name], expected[name], rtol=0, atol=0)
        assert first[name].data_ptr() != runner.static_output[name].data_ptr()
        assert first[name].is_contiguous(memory_format=torch.channels_last)
        assert not torch.equal(first[name], second[name])


def test_ops_after_the_last_requested_output_are_not_run():
    model = calibrated("resnet18", 10)
    engine = fastres.optimize(model, device="cpu", backend="torch", features=("stem", "layer2"))
    assert engine.plan.ops[-1].name == "layer2.1.conv2"
    ran = []
    engine.backend.run(random_images(1, 32, 32), None, observer=lambda name, _: ran.append(name))
    assert ran == [op.name for op in engine.plan.ops] and not any(
        n.startswith(("layer3", "head")) for n in ran
    )
    stem_only = fastres.optimize(model, device="cpu", backend="torch", features="stem")
    assert [op.name for op in stem_only.plan.ops] == ["conv1"] and stem_only.plan.num_slots == 0
    # The reference backend stops too: layer3 of its module never runs.
    reference = fastres.optimize(model, device="cpu", backend="reference", features=("layer2",))
    calls = []
    reference.backend.module.layer3.register_forward_hook(lambda *a: calls.append(1))
    reference(random_images(1, 32, 32))
    assert calls == []
    # An embedder skips the fc: its plan ends with the pool.
    assert [op.kind for op in engine._embedding_engine().plan.ops[-2:]] == ["conv", "globalpool"]


def test_requested_outputs_never_share_a_reused_buffer():
    engine = fastres.optimize(calibrated("resnet50", 10), device="cpu", backend="torch", features=LEVELS)
    plan = engine.plan
    assert set(plan.outputs.values()).isdisjoint(plan.slots)
    assert len(plan.slots) == len([op for op in plan.ops if op.output not in plan.outputs.values()])


def test_features_split_into_chunks_and_empty_batches():
    model = calibrated("resnet18", 10)
    whole = fastres.optimize(model, device="cpu", backend="torch", features=("layer3", "pool"))
    chunked = fastres.optimize(model, device="cpu", backend="torch", features=("layer3", "pool"), max_batch=2)
    x = random_images(5, 33, 33, seed=28)
    for name, value in chunked(x).items():
        torch.testing.assert_close(value, whole(x)[name], rtol=1e-5, atol=1e-5)
        assert value.shape[0] == 5
    empty = whole(torch.randn(0, 3, 45, 61))
    assert empty["layer3"].shape == (0, 256, 3, 4) and empty["pool"].shape == (0, 512)
    assert whole.output_shapes(1, 45, 61) == {"layer3": (1, 256, 3, 4), "pool": (1, 512)}
    assert "outputs=layer3+pool" in repr(whole)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        pytest.param(dict(features=("layer5",)), "valid names: stem, layer1", id="unknown-name"),
        pytest.param(dict(features=()), "no features", id="empty"),
        pytest.param(dict(out_indices=(1, 5)), "0=stem, 1=layer1", id="unknown-index"),
        pytest.param(dict(out_indices=(True,)), "unknown out_indices", id="bool-index"),
        pytest.param(dict(features=("stem",), out_indices=(0,)), "not both", id="both"),
    ],
)
def test_bad_feature_requests_are_config_errors(kwargs, message):
    with pytest.raises(fastres.ConfigError, match=message):
        fastres.optimize(calibrated("resnet18", 10), device="cpu", backend="torch", **kwargs)


def test_num_classes_zero_and_features_together():
    """features= wins: a dict of features (the fc never runs either way); the checkpoint's fc is ignored."""
    model = calibrated("resnet18", 10)
    engine = fastres.load(
        "resnet18", model.state_dict(), num_classes=0, features=("pool",), device="cpu", backend="torch"
    )
    out = engine(random_images(1, 32, 32))
    assert isinstance(out, dict) and out["pool"].shape == (1, 512)
    with pytest.raises(fastres.ConfigError, match="needs logits"):
        engine.predict(random_images(1, 32, 32))


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
)
def test_triton_features_match_the_module(dtype):
    model = calibrated("resnet18", 10)
    engine = fastres.optimize(model, device=DEVICE, dtype=dtype, backend="triton", features=FEATURE_NAMES)
    assert_features_match(engine, model, random_images(1, 45, 61, seed=29), dtype, device=DEVICE)
    workspace = engine.backend.make_workspace(1, 45, 61)
    assert set(engine.plan.outputs.values()).isdisjoint(workspace.values)


@pytest.mark.interpreter
def test_triton_uint8_embed_and_truncation(monkeypatch):
    from fastres.kernels import HeadLayer

    def no_fc(*args, **kwargs):
        raise AssertionError("embed() ran the fc head")

    monkeypatch.setattr(HeadLayer, "__call__", no_fc)
    model = calibrated("resnet18", 10)
    engine = fastres.optimize(model, device=DEVICE, dtype=torch.float32, backend="triton")
    pixels = torch.randint(
        0, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(4)
    )
    headless = copy.deepcopy(model)
    headless.fc = torch.nn.Identity()
    x = normalize(pixels, engine.mean, engine.std)
    with torch.inference_mode():
        ref, eager = copy.deepcopy(headless).double()(x), headless(x.float())
    ours = engine.embed(pixels.to(DEVICE))
    assert ours.shape == (1, 512) and ours.dtype == torch.float32
    assert relative_error(ours, ref) <= parity_bound(relative_error(eager, ref))
    embedder = engine._embedding_engine()
    assert embedder.backend.layers is engine.backend.layers  # packed weights shared, not packed again
    assert [op.kind for op in embedder.plan.ops[-2:]] == ["conv", "globalpool"]


def test_headless_checkpoints_and_modules_embed():
    """timm's num_classes=0 saves no fc (fc = Identity): fine for embeddings and features."""
    model = calibrated("resnet18", 10)
    headless = copy.deepcopy(model)
    headless.fc = torch.nn.Identity()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    x = random_images(1, 32, 32, seed=30)
    expected = fastres.optimize(model, device="cpu", backend="torch").embed(x)
    live = fastres.optimize(headless, device="cpu", backend="torch")  # no fc to run: an embedder
    assert live.outputs == ("pool",)
    torch.testing.assert_close(live(x), expected, rtol=0, atol=0)
    loaded = fastres.load("resnet18", state, num_classes=0, device="cpu", backend="torch")
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    layers = fastres.load("resnet18", state, features=("layer3",), device="cpu", backend="torch")
    assert layers(x)["layer3"].shape == (1, 256, 2, 2)
    with pytest.raises(fastres.CheckpointError, match="fc.weight"):
        fastres.load("resnet18", state, device="cpu", backend="torch")  # a classifier needs its fc


def test_out_indices_follow_timm():
    from fastres.planner import resolve_features

    assert resolve_features(out_indices=(1, 2, 3, 4)) == ("layer1", "layer2", "layer3", "layer4")
    assert resolve_features(out_indices=(4, 0)) == ("stem", "layer4")  # shallowest first, as timm returns
    assert resolve_features(features=("pool", "layer1", "pool")) == ("layer1", "pool")
    assert resolve_features() is None


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cuda_graph_features_are_fresh_clones(backend):
    """Captured outputs are static: each call's are clones, equal to an uncaptured run, and owned."""
    model = calibrated("resnet50", 10)
    names = ("stem", "layer2", "layer4", "pool")
    graphed = fastres.optimize(model, device="cuda", dtype="fp16", backend=backend, features=names)
    plain = fastres.optimize(
        model, device="cuda", dtype="fp16", backend=backend, features=names, cuda_graphs=False
    )
    a, b = random_images(2, 45, 61, seed=31).cuda(), random_images(2, 45, 61, seed=32).cuda()
    first = graphed(a)
    snapshot = {k: v.clone() for k, v in first.items()}
    second = graphed(b)
    expected = plain(a)
    for name in names:
        torch.testing.assert_close(first[name], snapshot[name], rtol=0, atol=0)
        torch.testing.assert_close(first[name], expected[name], rtol=1e-3, atol=1e-3)
        assert first[name].data_ptr() != second[name].data_ptr()
        assert first[name].dim() == 2 or first[name].is_contiguous(memory_format=torch.channels_last)
    assert_features_match(graphed, model, a.cpu(), torch.float16, names=names, device="cuda")
    torch.testing.assert_close(graphed.embed(a), expected["pool"], rtol=1e-3, atol=1e-3)


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"]
)
def test_global_avg_pool_kernel(dtype):
    from fastres.kernels import global_avg_pool_nhwc

    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 5, 7, 300, generator=gen).to(DEVICE, dtype)  # 300: a partial channel block
    out = poison_(torch.empty(2, 300, device=DEVICE))  # every element must be written
    global_avg_pool_nhwc(x, out=out)
    ref = x.double().mean(dim=(1, 2))
    assert torch.isfinite(out).all() and relative_error(out, ref) < 1e-6
    with pytest.raises(ValueError, match="contiguous NHWC"):
        global_avg_pool_nhwc(x.permute(0, 3, 1, 2))


def test_features_and_embeddings_on_the_cpu_default_backend():
    """The CPU default (openvino when installed, else torch) runs cut plans too."""
    model = calibrated("resnet18", 10)
    x = random_images(2, 32, 32, seed=3)
    engine = fastres.optimize(model, device="cpu", dtype="fp32", features="layer1")
    assert engine.backend_name in ("openvino", "torch") and list(engine(x)) == ["layer1"]
    embedder = fastres.load("resnet18", model.state_dict(), num_classes=0, device="cpu", dtype="fp32")
    expected = fastres.optimize(model, device="cpu", backend="torch").embed(x)
    torch.testing.assert_close(embedder(x), expected, rtol=1e-4, atol=1e-5)
