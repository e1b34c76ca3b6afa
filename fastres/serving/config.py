"""What `fastres serve` deploys: the replicas' configuration, importable without Ray."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from ..errors import ConfigError
from ..planner import resolve_features
from ..specs import IMAGENET_MEAN, IMAGENET_STD


@dataclass(frozen=True)
class ServeConfig:
    """What each replica serves; the arguments of `fastres serve` that replicas need."""

    model: str
    weights: str | None = None
    name: str | None = None  # the model name in URLs; MODEL's stem by default
    device: str | None = None  # "cuda" or "cpu"; start() picks cuda when the cluster has GPUs
    dtype: str | None = None
    backend: str | None = None
    # dtype "int8": a calibration file from `fastres calibrate` (every replica reads it, none recalibrates)
    calibration: str | None = None
    num_classes: int | None = None  # 0: an embedder (answers `embedding` only, no classifier)
    # A feature engine (fastres.load's features=: stem, layer1..layer4, pool): answers those, no logits
    features: tuple[str, ...] | None = None
    labels: str | None = None  # a text file, one class name per line
    mean: tuple[float, float, float] = IMAGENET_MEAN  # uint8 input is normalised in the stem
    std: tuple[float, float, float] = IMAGENET_STD
    max_batch: int = 64
    batch_wait_ms: float = 2.0
    max_body_bytes: int = 128 << 20  # refused from Content-Length (413) before any byte is read
    # Pixels per request and per engine call (a full batch of 512x512 images): bounds a replica's
    # memory whatever the image size; larger merged batches run in chunks.
    max_pixels: int = 64 * 512 * 512
    # A body must have arrived this many seconds after the request reached the replica (408 if not):
    # a client trickling bytes (slowloris) holds one of the replica's request slots no longer.
    body_timeout_s: float = 30.0
    warmup_size: int = 224  # image size the replica runs once before it reports ready
    # /v1/classify: fastres.transforms for the weights (resize the short side, centre crop), overridable
    resize: int | None = None
    crop: int | None = None
    # The triton backend: tune each new input size on first use (fastres.load(tune=True)) and cache the
    # choices; the first replica to reach a size tunes it under a file lock, the others then read it.
    # Off: every replica applies what the cache already has (tune="cached").
    tune: bool = False
    # Required as `Authorization: Bearer KEY` on every route but health; out of repr, hence of logs.
    api_key: str | None = field(default=None, repr=False)

    @property
    def model_name(self) -> str:
        if self.name:
            return self.name
        return os.path.splitext(os.path.basename(str(self.model)))[0]

    def __post_init__(self):
        if min(self.max_batch, self.max_body_bytes, self.max_pixels) < 1 or self.batch_wait_ms < 0:
            raise ConfigError("max_batch, max_body_bytes and max_pixels must be positive, batch_wait_ms >= 0")
        if self.features is not None:
            object.__setattr__(self, "features", resolve_features(self.features))  # ConfigError if unknown
        if not self.body_timeout_s > 0:
            raise ConfigError("body_timeout_s must be positive")
        if self.api_key is not None and not re.fullmatch(r"[\x21-\x7e]+", self.api_key):
            raise ConfigError("the API key must be printable ASCII without spaces (it is sent in a header)")
        if not re.fullmatch(r"[\w.\-]+", self.model_name):
            raise ConfigError(
                f"model name {self.model_name!r} must be letters, digits, '_', '-' or '.'; use --name"
            )
