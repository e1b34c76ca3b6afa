"""int8 on the CPU: OpenVINO's own post-training quantization (NNCF) of the plan, saved for reuse.

NNCF's default ("performance" preset: symmetric int8 weights per output channel, int8 activations
per tensor, statistics from the calibration images, then fast bias correction) quantizes the float
model before the uint8 preprocessing is attached, so calibration images are normalised exactly as
inference normalises them. A saved calibration is OpenVINO's quantized IR beside the .json record,
named by the weights' hash: a serve replica reads it in well under a second instead of re-running
the statistics (seconds to minutes), and NNCF's result is reproducible anyway, so either way a
replica gets the same model.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from .. import __version__
from ..calibration import (
    CalibrationRecord,
    calibration_images,
    check_record,
    is_saved_calibration,
    read_record,
    write_record,
)
from ..errors import BackendUnavailableError
from .openvino_runtime import core, import_openvino

METHOD = "nncf-ptq-performance"  # NNCF's default preset (see the module docstring)


def import_nncf():
    try:
        import nncf
    except ImportError as error:
        raise BackendUnavailableError(
            "int8 on the CPU quantizes with NNCF, OpenVINO's post-training quantization: "
            "pip install 'fastres[openvino]' installs it"
        ) from error
    return nncf


def int8_model(make_float_model, plan, calibration, save_calibration, model_name: str, weights_sha256: str):
    """(quantized OpenVINO model, its CalibrationRecord): read from a saved calibration, or made now."""
    if is_saved_calibration(calibration):
        record = read_record(calibration)
        check_record(record, calibration, model=model_name, weights_sha256=weights_sha256, backend="openvino")
        artifact = Path(calibration).parent / record.artifact
        if not artifact.is_file() or not artifact.with_suffix(".bin").is_file():
            raise FileNotFoundError(
                f"calibration {calibration} names {artifact} (and its .bin), which is missing: "
                "copy both next to the .json, or recalibrate"
            )
        model = core().read_model(str(artifact))
    else:
        nncf = import_nncf()
        images = calibration_images(calibration, plan.mean, plan.std)  # validated by the api
        logging.getLogger("nncf").setLevel(logging.WARNING)  # no progress bars in the user's log
        dataset = nncf.Dataset([images[i : i + 1].numpy() for i in range(images.shape[0])])
        model = nncf.quantize(make_float_model(), dataset, subset_size=images.shape[0])
        record = CalibrationRecord(
            model=model_name,
            weights_sha256=weights_sha256,
            method=METHOD,
            images=int(images.shape[0]),
            backend="openvino",
            artifact="",
            fastres=__version__,
        )
    if save_calibration is not None:
        record = save(model, record, save_calibration)
    return model, record


def save(model, record: CalibrationRecord, path) -> CalibrationRecord:
    """Write the quantized IR beside `path` (named by the weights' hash) and then the record."""
    ov = import_openvino()
    path = Path(path)
    artifact = f"{path.stem}.openvino-int8.{record.weights_sha256[:12]}.xml"
    path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(path.parent / artifact), compress_to_fp16=False)
    record = dataclasses.replace(record, artifact=artifact)
    write_record(path, record)
    return record
