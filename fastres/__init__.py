"""fastres: torchvision ResNets on NVIDIA GPUs through fused Triton kernels, straight from a checkpoint."""

from .errors import (
    ArchitectureMismatchError,
    BackendUnavailableError,
    CheckpointError,
    FastresError,
    InputError,
    UnknownModelError,
)
from .specs import MODEL_SPECS, ResNetSpec, get_spec, list_models

__version__ = "0.1.0"

__all__ = [
    "ArchitectureMismatchError",
    "BackendUnavailableError",
    "CheckpointError",
    "FastresError",
    "InputError",
    "MODEL_SPECS",
    "ResNetSpec",
    "UnknownModelError",
    "__version__",
    "get_spec",
    "list_models",
]
