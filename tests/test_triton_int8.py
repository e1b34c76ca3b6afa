"""The int8 engine on the triton backend (under the interpreter on the CPU): the digits model trained in
the suite, quantized with each calibration method, against its float32 predictions; the saved
calibration; per-layer SQNR."""

import json
import math

import pytest
import torch
from digits import normalised, quantization_case, trained_digits_model

import fastres
from fastres.calibration import CalibrationMismatchError
from fastres.errors import ConfigError
from fastres.graph import normalize
from fastres.quantize import METHODS, activation_scales, simulate_int8

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CALIBRATION_IMAGES = 48
TEST_IMAGES = 64
ENGINE_TEST_IMAGES = 16  # the interpreter runs ~1-3 s per image of the int8 engine on a loaded 2-core box
# The stated bound for the default method (percentile 99.99) on the digits model; measured: see the
# report of test_every_method_keeps_top1 (record_property) and the README.
INT8_MIN_TOP1_AGREEMENT = 0.95
# Every method must still classify: a looser bound than the default's (max clips nothing and spends
# its range on outliers, the weakness the issue cites).
ANY_METHOD_MIN_TOP1_AGREEMENT = 0.80


@pytest.fixture(scope="module")
def digits():
    """(model, calibration pixels, test pixels, fp32 top-1 of the test pixels, the folded plan)."""
    return quantization_case(CALIBRATION_IMAGES, TEST_IMAGES)


def int8_engine(model, calibration, **options):
    options.update(device=DEVICE, dtype="int8", backend="triton", calibration=calibration)
    return fastres.optimize(model, **options)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_keeps_top1(digits, method, record_property):
    """Each method's top-1 agreement with fp32, from the int8 arithmetic simulated on the torch backend
    (fast enough for all four methods and 64 images; the Triton engine itself is tested below)."""
    _, calibration, test, fp32_top1, plan = digits
    scales = activation_scales(plan, normalised(plan, calibration), method)
    with torch.inference_mode():
        logits = simulate_int8(plan, scales, normalised(plan, test))
    agreement = (logits.argmax(1) == fp32_top1).double().mean().item()
    record_property(f"int8_simulated_top1_agreement_{method}", agreement)
    bound = INT8_MIN_TOP1_AGREEMENT if method == "percentile" else ANY_METHOD_MIN_TOP1_AGREEMENT
    assert agreement >= bound, f"{method}: top-1 agreement {agreement:.1%} < {bound:.0%}"


@pytest.mark.interpreter
@pytest.mark.slow
def test_int8_engine_top1_agreement_with_fp32(digits, record_property):
    """The Triton int8 engine (default method) end to end on the digits model."""
    model, calibration, test, fp32_top1, _ = digits
    engine = int8_engine(model, calibration)
    assert engine.dtype == torch.int8 and engine.backend.calibration.images == CALIBRATION_IMAGES
    with torch.inference_mode():
        logits = engine(test[:ENGINE_TEST_IMAGES])
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    agreement = (logits.argmax(1).cpu() == fp32_top1[:ENGINE_TEST_IMAGES]).double().mean().item()
    record_property("int8_triton_top1_agreement_percentile", agreement)
    assert agreement >= INT8_MIN_TOP1_AGREEMENT, f"top-1 agreement {agreement:.1%}"


@pytest.fixture(scope="module")
def saved(digits, tmp_path_factory):
    model, calibration, _, _, _ = digits
    path = tmp_path_factory.mktemp("calib") / "digits.json"
    engine = int8_engine(model, calibration[:8], save_calibration=path)
    return engine, path


@pytest.mark.interpreter
def test_saved_calibration_holds_the_scales_and_reloads_the_same_engine(digits, saved):
    model, _, test, _, _ = digits
    engine, path = saved
    record = json.loads(path.read_text())
    assert record["backend"] == "triton" and record["method"] == "percentile-99.99" and record["images"] == 8
    assert set(record["scales"]) == set(engine.backend.scales) and "maxpool" in record["scales"]
    again = int8_engine(model, path)  # no calibration run: the scales are read
    x = test[:3]
    torch.testing.assert_close(again(x), engine(x), rtol=0, atol=0)


@pytest.mark.interpreter
def test_a_calibration_for_other_weights_is_refused(saved):
    _, path = saved
    other = trained_digits_model.__wrapped__(steps=1)  # the same architecture, other weights
    with pytest.raises(CalibrationMismatchError, match="weights sha256"):
        int8_engine(other, path)
    with pytest.raises(ConfigError, match="calibration_method= applies to the triton backend"):
        fastres.optimize(other, device="cpu", dtype="int8", backend="openvino", calibration=path,
                         calibration_method="entropy")  # fmt: skip


@pytest.mark.interpreter
def test_uint8_pixels_and_non_finite_images(digits, saved):
    """Raw pixels take the uint8 stem (the same predictions as normalised input); an image with a NaN
    gets NaN logits (int8 cannot carry it), the others are unaffected."""
    _, _, test, _, _ = digits
    engine, _ = saved
    x = test[:3]
    from_pixels = engine(x)
    floats = normalize(x, engine.mean, engine.std).float()
    assert (engine(floats).argmax(1) == from_pixels.argmax(1)).all()
    floats[1, 0, 5, 5] = math.nan
    logits = engine(floats)
    assert torch.isnan(logits[1]).all() and torch.isfinite(logits[[0, 2]]).all()


@pytest.mark.interpreter
def test_layer_report_has_sqnr_for_every_int8_layer(digits, saved):
    _, _, test, _, _ = digits
    engine, _ = saved
    layers = engine.layer_errors(test[:2])
    convs = [e for e in layers if e.kind == "conv"]
    assert len(convs) == 20  # resnet18: the stem, 16 block convs, 3 projections (basic blocks: not merged)
    # The fp16 stem is near exact; the int8 convs keep a few bits short of 8 (~6 dB per bit), compounding
    # over depth: well above 15 dB, far from an exact (inf) result.
    assert convs[0].op == "conv1" and convs[0].sqnr_db > 50
    assert all(15 < e.sqnr_db < 50 for e in convs[1:]), [(e.op, round(e.sqnr_db, 1)) for e in convs]


def test_int8_engine_warmup_refuses_tuning(saved):
    engine, _ = saved
    with pytest.raises(fastres.ConfigError, match="int8/fp8 are not tuned"):
        engine.warmup(batch_sizes=(1,), image_size=32, tune=True)


def test_int8_refuses_tuning_and_the_self_check_before_calibrating():
    # The tuner's candidates and the self-check cover the float kernels only: asked for, a typed error
    # (the default tune="cached" loads int8 untuned, as the tests above do).
    for option in ({"tune": True}, {"self_check": True}):
        with pytest.raises(fastres.ConfigError, match="int8/fp8 are not tuned"):
            fastres.load("resnet18", device="cpu", backend="triton", dtype="int8", calibration="x", **option)
