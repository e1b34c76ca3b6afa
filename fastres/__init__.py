"""fastres: torchvision ResNets on NVIDIA GPUs through fused Triton kernels, straight from a checkpoint."""

# testing is imported so that `fastres.testing.write_sample_images(...)` works after `import fastres`.
from . import reference, testing
from .api import load, optimize
from .checkpoints import Architecture, load_checkpoint, resolve_model
from .engine import CheckResult, Engine, Prediction
from .errors import (
    ArchitectureMismatchError,
    BackendUnavailableError,
    CheckpointError,
    ConfigError,
    FastresError,
    ImageDecodeError,
    InputError,
    UnknownModelError,
)
from .specs import IMAGENET_MEAN, IMAGENET_STD, MODEL_SPECS, ResNetSpec, get_spec, list_models
from .transforms import transforms  # shadows the module name; `from fastres.transforms import X` works

__version__ = "0.1.0"

__all__ = [
    "Architecture",
    "ArchitectureMismatchError",
    "BackendUnavailableError",
    "CheckResult",
    "CheckpointError",
    "ConfigError",
    "Engine",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "FastresError",
    "ImageDecodeError",
    "InputError",
    "MODEL_SPECS",
    "Prediction",
    "ResNetSpec",
    "UnknownModelError",
    "__version__",
    "get_spec",
    "list_models",
    "load",
    "optimize",
    "reference",
    "testing",
    "load_checkpoint",
    "resolve_model",
    "transforms",
]
