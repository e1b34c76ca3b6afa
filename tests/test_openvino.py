"""The openvino backend: parity for the family, uint8 in both layouts, odd shapes, ownership, threads."""

import sys

import pytest
import torch
from e2e import FAMILY, assert_parity, assert_same_results_from_threads, calibrated
from test_uint8 import ODD_MEAN_STD, pixels

import fastres
from fastres.errors import BackendUnavailableError, ConfigError
from fastres.testing import random_images

openvino = pytest.importorskip(
    "openvino", reason="OpenVINO is not installed (pip install 'fastres[openvino]')"
)

from fastres.backends.openvino_backend import cpu_capabilities, default_precision  # noqa: E402


def ov_engine(model, dtype="fp32", **options):
    return fastres.optimize(model, device="cpu", backend="openvino", dtype=dtype, **options)


@pytest.mark.parametrize("name, num_classes", FAMILY)
def test_matches_reference_on_odd_sizes(name, num_classes):
    model = calibrated(name, num_classes)
    engine = ov_engine(model)
    assert engine.backend_name == "openvino" and engine.dtype == torch.float32
    assert_parity(engine, model, random_images(3, 67, 93, seed=5), torch.float32)


@pytest.mark.parametrize("size", [(1, 1), (7, 3), (33, 34)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_tiny_and_odd_images_share_one_compiled_model(size):
    model = calibrated("resnet18", 10)
    engine = ov_engine(model)
    assert_parity(engine, model, random_images(2, *size, seed=6), torch.float32)
    engine(random_images(3, 40, 41, seed=7))
    assert len(engine.backend._compiled) == 1  # dynamic shapes: no recompilation per batch or size


@pytest.mark.parametrize("nhwc", [False, True], ids=["NCHW", "NHWC"])
@pytest.mark.parametrize("size", [(1, 1), (5, 4), (37, 29)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_uint8_pixels_in_both_layouts_borders_included(nhwc, size):
    """Normalisation inside the compiled model, before the stem's zero padding: eager's border exactly."""
    model = calibrated("resnet18", 10)
    engine = ov_engine(model, mean=ODD_MEAN_STD[0], std=ODD_MEAN_STD[1])
    assert_parity(engine, model, pixels(2, *size, seed=3, nhwc=nhwc), torch.float32)


def test_channels_last_and_non_contiguous_float_input():
    model = calibrated("resnet18", 10)
    engine = ov_engine(model)
    x = random_images(4, 48, 50, seed=11)
    expected = engine(x)
    torch.testing.assert_close(engine(x.contiguous(memory_format=torch.channels_last)), expected)
    wide = random_images(8, 48, 100, seed=12)
    strided = wide[::2, :, :, ::2]  # a view with gaps in batch and width
    torch.testing.assert_close(engine(strided), engine(strided.contiguous()), rtol=0, atol=0)
    assert_parity(engine, model, strided, torch.float32)


def test_empty_batch_outputs_are_fresh_and_threads_agree():
    engine = ov_engine(calibrated("resnet18", 10))
    assert engine(random_images(0, 32, 32)).shape == (0, 10)
    x = random_images(2, 40, 40, seed=13)
    first = engine(x)
    kept = first.clone()
    first.fill_(float("nan"))  # the caller owns the result: scribbling on it changes nothing inside
    torch.testing.assert_close(engine(x), kept, rtol=0, atol=0)
    assert_same_results_from_threads(engine, [random_images(2, 40, 40, seed=s) for s in range(3)])


def test_non_finite_pixels_give_that_image_nan_logits():
    engine = ov_engine(calibrated("resnet18", 10))
    x = random_images(3, 40, 40, seed=14)
    clean = engine(x)
    x[1, 0, 5, 5], x[2, 2, 0, 0] = float("nan"), float("inf")
    out = engine(x)
    assert out[1:].isnan().all()
    torch.testing.assert_close(out[0], clean[0], rtol=0, atol=0)


@pytest.mark.skipif("BF16" not in cpu_capabilities(), reason="this CPU has no bf16 support in OpenVINO")
def test_bf16_matches_eager_bf16():
    model = calibrated("resnet50", 10)
    engine = ov_engine(model, dtype="bf16")
    assert engine.dtype == torch.bfloat16
    # Eight images: bf16's worst-case error over two is too noisy a statistic for a 2x bound.
    assert_parity(engine, model, random_images(8, 64, 64, seed=15), torch.bfloat16)
    assert_parity(engine, model, pixels(8, 45, 61, seed=4), torch.bfloat16)


def test_default_cpu_backend_follows_openvino_and_fp32_is_fp32():
    model = calibrated("resnet18", 10)
    engine = fastres.optimize(model, device="cpu")
    assert engine.backend_name == "openvino" and engine.dtype == default_precision()
    precision = engine.backend.compiled(torch.float32, "NCHW").get_property("INFERENCE_PRECISION_HINT")
    assert precision == {torch.bfloat16: openvino.Type.bf16, torch.float32: openvino.Type.f32}[engine.dtype]
    fp32 = fastres.optimize(model, device="cpu", dtype="fp32")
    assert fp32.dtype == torch.float32
    assert fp32.backend.compiled(torch.float32, "NCHW").get_property("INFERENCE_PRECISION_HINT") == (
        openvino.Type.f32
    )


def test_threads_and_streams_reach_openvino():
    engine = ov_engine(calibrated("resnet18", 10), threads=1, streams=1)
    compiled = engine.backend.compiled(torch.float32, "NCHW")
    assert compiled.get_property("INFERENCE_NUM_THREADS") == 1 and compiled.get_property("NUM_STREAMS") == 1
    with pytest.raises(ConfigError, match="openvino"):
        fastres.optimize(calibrated("resnet18", 10), device="cpu", backend="torch", threads=2)


def test_layer_errors_say_to_use_the_torch_backend():
    engine = ov_engine(calibrated("resnet18", 10))
    with pytest.raises(ConfigError, match="backend='torch'"):
        engine.layer_errors(random_images(1, 32, 32))


def test_missing_openvino_is_a_typed_error_and_the_default_falls_back(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    model = calibrated("resnet18", 10)
    with pytest.raises(BackendUnavailableError, match=r"fastres\[openvino\]"):
        fastres.optimize(model, device="cpu", backend="openvino")
    engine = fastres.optimize(model, device="cpu")
    assert engine.backend_name == "torch" and engine.dtype == torch.float32


def test_cli_check_passes_on_openvino_and_says_where_the_layer_report_is(capsys):
    from fastres.cli import main

    code = main(
        ["check", "resnet18", "--device", "cpu", "--batch", "2", "--image-size", "48", "--dtype", "fp32"]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "backend=openvino" in out and "PASS" in out and "--backend torch has it" in out


def test_features_match_the_module_and_embed_runs_on_openvino():
    from test_backbone import FEATURE_NAMES, assert_features_match

    model = calibrated("resnet18", 10)
    engine = ov_engine(model, features=FEATURE_NAMES)
    assert engine.backend_name == "openvino" and engine.outputs == FEATURE_NAMES
    assert_features_match(engine, model, random_images(2, 45, 61, seed=21), torch.float32)
    pixels_in = pixels(2, 37, 29, seed=5)
    assert_features_match(engine, model, pixels_in, torch.float32)  # uint8, borders included
    for name, value in engine(pixels_in.permute(0, 2, 3, 1).contiguous()).items():  # and NHWC frames
        torch.testing.assert_close(value, engine(pixels_in)[name], rtol=0, atol=0)
    classifier = ov_engine(model)
    x = random_images(3, 40, 44, seed=22)
    with torch.inference_mode():
        reference = model.eval()
        expected = torch.nn.functional.adaptive_avg_pool2d(
            torch.nn.Sequential(*list(reference.children())[:-2])(x), 1
        ).flatten(1)
    embedded = classifier.embed(x, normalize=True)
    assert classifier._embedding_engine().backend_name == "openvino"
    torch.testing.assert_close(embedded, torch.nn.functional.normalize(expected, dim=1), rtol=1e-4, atol=1e-5)
    nan_input = x.clone()
    nan_input[1, 0, 0, 0] = float("nan")
    features = engine(nan_input)
    assert all(f[1].isnan().all() and not f[0].isnan().any() for f in features.values())
