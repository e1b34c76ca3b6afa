"""uint8 pixels in: the normalisation folded into the stem (padded with 255 * mean), layouts, predict()."""

import pytest
import torch
from e2e import assert_parity, calibrated

import fastres
from fastres.graph import execute, normalize
from fastres.labels import imagenet_categories
from fastres.numerics import parity_bound, relative_error
from fastres.planner import plan_resnet

ODD_MEAN_STD = ((0.5, 0.25, 0.75), (0.5, 0.2, 0.35))


def pixels(batch, height, width, *, seed, nhwc=False):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, height, width, 3) if nhwc else (batch, 3, height, width)
    return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)


@pytest.mark.parametrize(
    "mean, std", [pytest.param(*ODD_MEAN_STD, id="odd"), pytest.param(None, None, id="imagenet")]
)
@pytest.mark.parametrize("size", [(1, 1), (5, 3), (37, 29)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_folded_stem_equals_normalise_then_run_in_float64(mean, std, size):
    model = calibrated("resnet18", 10)
    kwargs = {} if mean is None else {"mean": mean, "std": std}
    plan = plan_resnet(fastres.get_spec("resnet18"), 10, model.state_dict(), **kwargs)
    x = pixels(2, *size, seed=1)
    folded = execute(plan.ops_for(torch.uint8), x.double())
    expected = execute(plan.ops, normalize(x, plan.mean, plan.std))
    assert relative_error(folded, expected) < 1e-12


def test_zero_padding_would_break_the_folded_stem():
    """The border value matters: the same folded weights padded with 0 differ at the borders."""
    model = calibrated("resnet18", 10)
    plan = plan_resnet(
        fastres.get_spec("resnet18"), 10, model.state_dict(), mean=ODD_MEAN_STD[0], std=ODD_MEAN_STD[1]
    )
    x = pixels(1, 9, 9, seed=2)
    stem = plan.uint8_stem
    expected = execute([plan.ops[0]], normalize(x, plan.mean, plan.std))
    assert relative_error(execute([stem], x.double()), expected) < 1e-12
    stem.pad_value, saved = None, stem.pad_value
    try:
        assert relative_error(execute([stem], x.double()), expected) > 1e-3
    finally:
        stem.pad_value = saved


@pytest.mark.parametrize("nhwc", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("size", [(1, 1), (33, 17), (64, 64)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_torch_backend_uint8_parity(nhwc, size):
    model = calibrated("resnet18", 10)
    engine = fastres.optimize(model, device="cpu", backend="torch", mean=ODD_MEAN_STD[0], std=ODD_MEAN_STD[1])
    assert_parity(engine, model, pixels(3, *size, seed=3, nhwc=nhwc), torch.float32)


def test_uint8_matches_float_input_and_layouts_agree():
    model = calibrated("resnet50", 7)
    engine = fastres.optimize(model, device="cpu", backend="torch", mean=ODD_MEAN_STD[0], std=ODD_MEAN_STD[1])
    x = pixels(2, 41, 35, seed=4)
    from_pixels = engine(x)
    from_float = engine(normalize(x, engine.mean, engine.std).float())
    assert relative_error(from_pixels, from_float) < 1e-4
    torch.testing.assert_close(engine(x.permute(0, 2, 3, 1).contiguous()), from_pixels, rtol=0, atol=0)
    # A non-contiguous view (a crop) is read correctly too.
    big = pixels(2, 50, 50, seed=5)
    torch.testing.assert_close(engine(big[:, :, 3:44, 7:42]), engine(big[:, :, 3:44, 7:42].contiguous()))


def test_reference_backend_takes_uint8():
    model = calibrated("resnet18", 10)
    x = pixels(2, 32, 32, seed=6)
    ref = fastres.optimize(model, device="cpu", backend="reference")
    fused = fastres.optimize(model, device="cpu", backend="torch")
    assert relative_error(fused(x), ref(x)) < 1e-4


def test_ambiguous_layout_needs_an_explicit_layout():
    model = calibrated("resnet18", 10)
    engine = fastres.optimize(model, device="cpu", backend="torch")
    x = pixels(2, 3, 3, seed=7)  # N x 3 x 3 x 3: channels could be dim 1 or dim 3
    with pytest.raises(fastres.InputError, match="layout='NCHW' or layout='NHWC'"):
        engine(x)
    nchw, nhwc = engine(x, layout="NCHW"), engine(x, layout="nhwc")
    torch.testing.assert_close(
        nhwc, engine(x.permute(0, 3, 1, 2).contiguous(), layout="NCHW"), rtol=0, atol=0
    )
    assert not torch.equal(nchw, nhwc)
    with pytest.raises(fastres.InputError, match="layout must be"):
        engine(x, layout="CHW")
    with pytest.raises(fastres.InputError, match="dim 3"):
        engine(pixels(1, 8, 8, seed=8), layout="NHWC")


def test_check_and_layer_errors_accept_uint8():
    model = calibrated("resnet18", 10)
    engine = fastres.optimize(model, device="cpu", backend="torch", mean=ODD_MEAN_STD[0], std=ODD_MEAN_STD[1])
    x = pixels(2, 40, 40, seed=9)
    result = engine.check(x)
    assert result.relative_error <= parity_bound(result.eager_relative_error)
    layers = engine.layer_errors(x)
    assert len(layers) == len(engine.plan.ops) and max(e.relative_error for e in layers) < 1e-4


def test_warmup_uint8_then_call():
    engine = fastres.optimize(calibrated("resnet18", 10), device="cpu", backend="torch")
    engine.warmup(batch_sizes=(2,), image_size=(20, 24), input_dtype=torch.uint8, layout="NHWC")
    assert engine(pixels(2, 20, 24, seed=10, nhwc=True)).shape == (2, 10)


@pytest.mark.parametrize(
    "mean, std, message",
    [
        ((0.5, 0.5), (0.5, 0.5, 0.5), "three"),
        ((0.5, 0.5, 0.5), (0.5, 0.0, 0.5), "positive"),
        ((0.5, float("nan"), 0.5), (0.5, 0.5, 0.5), "finite"),
        ("abc", (0.5, 0.5, 0.5), "three"),
    ],
)
def test_bad_mean_std_is_a_clear_value_error(mean, std, message):
    with pytest.raises(ValueError, match=message):
        fastres.optimize(calibrated("resnet18", 10), device="cpu", backend="torch", mean=mean, std=std)


def test_predict_names_probabilities_and_order(tmp_path):
    model = calibrated("resnet18", 4)
    names = ["cat", "dog", "bird", "fish"]
    path = tmp_path / "labels.txt"
    path.write_text("\n".join(names) + "\n\n")
    engine = fastres.optimize(model, device="cpu", backend="torch", labels=str(path))
    x = pixels(3, 32, 32, seed=11)
    logits = engine(x)
    predictions = engine.predict(x, topk=3)
    assert len(predictions) == 3 and all(len(p) == 3 for p in predictions)
    probs = torch.softmax(logits, dim=1)
    for row, image_probs in zip(predictions, probs):
        assert [p.prob for p in row] == sorted((p.prob for p in row), reverse=True)
        for p in row:
            assert p.label == names[p.index]
            assert p.prob == pytest.approx(image_probs[p.index].item(), rel=1e-6)
        assert row[0].index == int(image_probs.argmax())
    assert len(engine.predict(x, topk=10)[0]) == 4  # clipped to the number of classes
    with pytest.raises(ValueError, match="topk"):
        engine.predict(x, topk=0)


def test_default_labels_are_imagenet_for_1000_classes():
    names = imagenet_categories()
    assert len(names) == 1000 and len(set(names)) == 1000
    assert names[0] == "tench" and names[1] == "goldfish" and names[999] == "toilet tissue"
    engine = fastres.optimize(calibrated("resnet18", 1000), device="cpu", backend="torch")
    assert engine.labels == list(names)
    top = engine.predict(pixels(1, 32, 32, seed=12), topk=1)[0][0]
    assert top.label == names[top.index]
    assert fastres.optimize(calibrated("resnet18", 10), device="cpu", backend="torch").labels[3] == "class 3"


def test_labels_with_the_wrong_count_are_rejected(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("a\nb\n")
    with pytest.raises(fastres.InputError, match="2 names but the model has 10 classes"):
        fastres.optimize(calibrated("resnet18", 10), device="cpu", backend="torch", labels=str(path))
    with pytest.raises(fastres.InputError, match="cannot read labels file"):
        fastres.optimize(
            calibrated("resnet18", 10), device="cpu", backend="torch", labels=str(tmp_path / "missing.txt")
        )


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
)
@pytest.mark.parametrize("nhwc", [False, True], ids=["nchw", "nhwc"])
def test_triton_backend_uint8_parity(dtype, nhwc):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = calibrated("resnet18", 7)
    engine = fastres.optimize(
        model, device=device, dtype=dtype, backend="triton", mean=ODD_MEAN_STD[0], std=ODD_MEAN_STD[1]
    )
    assert_parity(engine, model, pixels(2, 29, 23, seed=13, nhwc=nhwc), dtype, device=device)
