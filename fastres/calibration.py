"""Calibration for int8: the images a quantizer sees, and the saved calibration file.

The user-facing arguments are the same on every backend: `dtype="int8"`, `calibration=` (images, a
folder of image files, or a saved calibration file) and `save_calibration=` (where to write one).
The saved artefact is backend-specific (on the CPU, OpenVINO's quantized model beside the file), and
the file names the model, the weights' hash, the method, the number of images and fastres's version,
so that a serve replica reuses it instead of re-quantizing, and so that it is never applied to
other weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from .errors import ConfigError, InputError
from .graph import normalize

FORMAT = "fastres-calibration"
FORMAT_VERSION = 1
DEFAULT_CALIBRATION_IMAGES = 300  # OpenVINO's post-training quantization default subset size


class CalibrationMismatchError(ConfigError):
    """A saved calibration was made for another model, weights or backend."""


@dataclass(frozen=True)
class CalibrationRecord:
    model: str
    weights_sha256: str
    method: str
    images: int
    backend: str
    artifact: str  # file name beside the record (e.g. OpenVINO's quantized .xml; its .bin sits next to it)
    fastres: str
    # The Triton path's artefact: plan value -> per-tensor int8 activation scale (weights' per-channel
    # scales follow from the weights, whose hash the record names). None for OpenVINO's record.
    scales: dict[str, float] | None = None
    # The quantized format the scales map onto ("int8": x / 127 steps; "fp8": e4m3, threshold / 448).
    # Files written before fp8 have no such field: they are int8.
    dtype: str = "int8"
    format: str = FORMAT
    format_version: int = FORMAT_VERSION


def weights_hash(state_dict: dict[str, Tensor]) -> str:
    """sha256 over the state dict's names, dtypes, shapes and bytes, in sorted key order."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous().reshape(-1)  # 0-d tensors too
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def is_saved_calibration(calibration) -> bool:
    return isinstance(calibration, (str, os.PathLike)) and Path(calibration).suffix == ".json"


def read_record(path: str | os.PathLike) -> CalibrationRecord:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file not found: {path}")
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ValueError("not a fastres calibration file")
        return CalibrationRecord(**data)
    except (ValueError, TypeError) as error:
        raise ConfigError(
            f"{path} is not a fastres calibration file ({error}); make one with "
            "fastres.load(..., dtype='int8', calibration=IMAGES, save_calibration=PATH) "
            "or `fastres calibrate`"
        ) from None


def check_record(
    record: CalibrationRecord, path, *, model: str, weights_sha256: str, backend: str, dtype: str = "int8"
) -> None:
    """Refuse a calibration made for other weights, another model, another backend's artefact or another
    quantized format (int8 scales are not fp8 scales)."""
    problems = []
    if record.model != model:
        problems.append(f"model {record.model}, not {model}")
    if record.weights_sha256 != weights_sha256:
        problems.append(
            f"weights sha256 {record.weights_sha256[:12]}..., these weights are {weights_sha256[:12]}..."
        )
    if record.backend != backend:
        problems.append(f"the {record.backend} backend, not {backend}")
    if record.dtype != dtype:
        problems.append(f"dtype {record.dtype}, not {dtype}")
    if problems:
        raise CalibrationMismatchError(
            f"calibration {path} was made for {'; '.join(problems)}: recalibrate with "
            "calibration=IMAGES (and save_calibration=PATH to keep it)"
        )


def write_record(path: str | os.PathLike, record: CalibrationRecord) -> Path:
    path = Path(path)
    if path.suffix != ".json":
        raise ConfigError(f"save_calibration must name a .json file, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(asdict(record), indent=2) + "\n")
    os.replace(tmp, path)  # atomic: a replica reading it never sees half a file
    return path


def calibration_images(images: Tensor, mean, std, *, limit: int = DEFAULT_CALIBRATION_IMAGES) -> Tensor:
    """Calibration images (a validated N x 3 x H x W view) as the float32 normalised batch inference
    computes on: float input is taken as normalised, as engine inputs are; uint8 pixels are normalised
    with the engine's mean/std exactly as its first layer does."""
    if images.shape[0] == 0:
        raise InputError("calibration needs at least one image")
    images = images[:limit]
    if images.dtype == torch.uint8:
        return normalize(images.cpu(), mean, std).float()
    return images.detach().cpu().float()


def decode_files(paths) -> Tensor:
    """uint8 N x 3 x H x W: image files (or folders) decoded and preprocessed as `fastres classify`
    does by default (torchvision's evaluation resize and centre crop)."""
    from .images import decode_image, find_images
    from .transforms import transforms

    transform = transforms()
    images = []
    for path in find_images(paths):
        try:
            images.append(transform(decode_image(path)))
        except (ValueError, OSError) as error:  # ImageDecodeError is a ValueError
            raise InputError(f"calibration image {path}: {error}") from None
    return torch.stack(images)
