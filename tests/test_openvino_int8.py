"""int8 on the CPU: NNCF calibration through the openvino backend, the saved calibration, the CLI."""

import json

import pytest
import torch
from digits import accuracy, digit_images, trained_digits_model
from e2e import calibrated

import fastres
from fastres.calibration import CalibrationMismatchError, weights_hash
from fastres.errors import ConfigError
from fastres.graph import normalize
from fastres.specs import IMAGENET_MEAN, IMAGENET_STD
from fastres.testing import random_images, write_sample_images

pytest.importorskip("openvino", reason="OpenVINO is absent (pip install 'fastres[openvino]')")
pytest.importorskip("nncf", reason="NNCF is absent (pip install 'fastres[openvino]')")

# The stated bound for the default method (NNCF's performance preset) on the trained digits model.
INT8_MIN_TOP1_AGREEMENT = 0.97  # measured 98.5% (400 digits, 128 calibration images)


def int8_engine(model, calibration, **options):
    return fastres.optimize(
        model, device="cpu", backend="openvino", dtype="int8", calibration=calibration, **options
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A resnet18 int8 engine calibrated on 16 random images and saved: (engine, path, model)."""
    model = calibrated("resnet18", 10)
    path = tmp_path_factory.mktemp("calib") / "resnet18.json"
    engine = int8_engine(model, random_images(16, 48, 48, seed=1), save_calibration=path)
    return engine, path, model


def test_saved_calibration_names_what_it_was_made_for_and_reloads_the_same_model(saved):
    engine, path, model = saved
    record = json.loads(path.read_text())
    assert record["model"] == "resnet18" and record["images"] == 16 and record["backend"] == "openvino"
    assert (
        record["weights_sha256"] == weights_hash(model.state_dict())
        and record["fastres"] == fastres.__version__
    )
    assert record["method"] == "nncf-ptq-performance"
    artifact = path.parent / record["artifact"]
    assert artifact.is_file() and artifact.with_suffix(".bin").is_file()
    again = int8_engine(model, path)  # no calibration run: the saved quantized model is read
    x = random_images(4, 40, 52, seed=2)
    torch.testing.assert_close(again(x), engine(x), rtol=0, atol=0)
    assert engine.dtype == torch.int8 and engine(x).dtype == torch.float32


def test_a_calibration_for_other_weights_or_model_is_refused(saved, tmp_path):
    _, path, _ = saved
    with pytest.raises(CalibrationMismatchError, match="weights sha256") as error:
        int8_engine(calibrated("resnet18", 10, seed=1), path)
    assert isinstance(error.value, ValueError)
    with pytest.raises(CalibrationMismatchError, match="model resnet18, not resnet34"):
        int8_engine(calibrated("resnet34", 10), path)
    (tmp_path / "junk.json").write_text('{"hello": 1}')
    with pytest.raises(ConfigError, match="not a fastres calibration file"):
        int8_engine(calibrated("resnet18", 10), tmp_path / "junk.json")
    record = json.loads(path.read_text())
    (tmp_path / "moved.json").write_text(json.dumps(record))  # the record without its IR beside it
    with pytest.raises(FileNotFoundError, match="missing"):
        int8_engine(calibrated("resnet18", 10), tmp_path / "moved.json")


def test_int8_needs_calibration_and_calibration_needs_int8():
    model = calibrated("resnet18", 10)
    with pytest.raises(ConfigError, match="needs calibration="):
        fastres.optimize(model, device="cpu", backend="openvino", dtype="int8")
    with pytest.raises(ConfigError, match="apply to dtype='int8'"):
        fastres.optimize(model, device="cpu", backend="openvino", dtype="fp32", calibration=random_images(2))


def test_uint8_calibration_images_are_normalised_as_inference_normalises_them():
    model = calibrated("resnet18", 10)
    pixels = torch.randint(
        0, 256, (8, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(3)
    )
    from_pixels = int8_engine(model, pixels)
    from_floats = int8_engine(model, normalize(pixels, IMAGENET_MEAN, IMAGENET_STD).float())
    x = random_images(2, 40, 40, seed=4)
    torch.testing.assert_close(from_pixels(x), from_floats(x), rtol=0, atol=0)
    # uint8 inference in both layouts runs the same quantized model behind the normalisation
    torch.testing.assert_close(from_pixels(pixels), from_pixels(pixels.permute(0, 2, 3, 1)), rtol=0, atol=0)


@pytest.mark.slow
def test_digits_model_agreement_fp32_exact_bf16_and_int8_reported(capsys):
    model = trained_digits_model()
    pixels, labels = digit_images(400, seed=7)
    calibration, _ = digit_images(128, seed=8)
    expected = model(normalize(pixels, IMAGENET_MEAN, IMAGENET_STD).float()).argmax(1)
    agreement = {}
    for dtype in ("fp32", "bf16", "int8"):
        options = {"calibration": calibration} if dtype == "int8" else {}
        try:
            engine = fastres.optimize(model, device="cpu", backend="openvino", dtype=dtype, **options)
        except fastres.BackendUnavailableError as error:  # bf16 on a CPU without it: reported, not run
            agreement[dtype] = str(error)
            continue
        agreement[dtype] = (engine(pixels).argmax(1) == expected).double().mean().item()
    with capsys.disabled():
        print(f"\ndigits model (accuracy {accuracy(model, pixels, labels):.1%}): top-1 agreement {agreement}")
    assert agreement["fp32"] == 1.0
    assert agreement["int8"] >= INT8_MIN_TOP1_AGREEMENT


def test_cli_calibrate_then_check_int8(tmp_path, capsys):
    from fastres.cli import main

    model = calibrated("resnet18", 10)
    weights = tmp_path / "w.pth"
    torch.save(model.state_dict(), weights)
    images = tmp_path / "images"
    write_sample_images(images, count=6, height=60, width=80)
    out = tmp_path / "calib.json"
    assert (
        main(["calibrate", "resnet18", "--weights", str(weights), "--images", str(images), "--out", str(out)])
        == 0
    )
    assert "calibrated resnet18" in capsys.readouterr().out and out.is_file()
    check = ["check", "resnet18", "--weights", str(weights), "--dtype", "int8", "--calibration", str(out)]
    code = main([*check, "--images", str(images), "--min-top1", "0"])
    text = capsys.readouterr().out
    assert code == 0 and "top-1 agreement" in text and "dtype=int8" in text, text
    # an impossible threshold fails: the exit status follows the agreement
    assert main([*check, "--images", str(images), "--min-top1", "1.01"]) == 1
    assert "FAIL: top-1 agreement" in capsys.readouterr().out


def test_serve_int8_reads_the_saved_calibration_and_refuses_a_mismatch(saved, tmp_path):
    pytest.importorskip("ray", reason="Ray Serve is absent (pip install 'fastres[serve]')")
    from fastres.serving.config import ServeConfig
    from fastres.serving.deployment import ImageClassifier
    from fastres.serving.driver import _preflight

    engine, path, model = saved
    weights = tmp_path / "w.pth"
    torch.save(model.state_dict(), weights)
    config = ServeConfig(
        "resnet18", weights=str(weights), device="cpu", dtype="int8", calibration=str(path), max_batch=2,
        warmup_size=32,
    )  # fmt: skip
    _preflight(config)  # checks the record against the weights before any replica starts
    replica = ImageClassifier.func_or_class(config)
    x = random_images(2, 48, 48, seed=5)
    torch.testing.assert_close(replica.engine(x), engine(x), rtol=0, atol=0)
    other = tmp_path / "other.pth"
    torch.save(calibrated("resnet18", 10, seed=1).state_dict(), other)
    with pytest.raises(CalibrationMismatchError):
        _preflight(ServeConfig("resnet18", weights=str(other), dtype="int8", calibration=str(path)))
    with pytest.raises(ConfigError, match="go together"):
        _preflight(ServeConfig("resnet18", weights=str(weights), dtype="int8"))
