"""Reading ResNet checkpoints: files, in-memory state dicts and torchvision's published weights.

Everything here works on plain ``{name: tensor}`` state dicts in torchvision's key layout
(``conv1``, ``bn1``, ``layerK.i.convJ``/``bnJ``, ``layerK.0.downsample.{0,1}``, ``fc``), which timm's
plain ResNets share; timm's ResNet-D layout (``resnet50d``: deep stem ``conv1.0/1/3/4/6``, projections
``downsample.{1,2}`` with the BN at index 2 after the pool) is recognised from those keys.

Files are always read with ``torch.load(..., weights_only=True)``: a checkpoint that needs code to
unpickle is refused, never executed.
"""

from __future__ import annotations

import functools
import os
import pickle
import re
import urllib.error
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import ArchitectureMismatchError, CheckpointError, ConfigError, UnknownModelError
from .reference import build_resnet
from .specs import MODEL_SPECS, ResNetSpec, find_spec, get_spec

CUSTOM_MODEL_NAME = "resnet-custom"

# Prefixes that wrappers add in front of every key: DataParallel/DDP and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Keys under which training scripts nest the model's state dict next to epoch, optimizer, ...
_NESTING_KEYS = ("state_dict", "model_state_dict", "model")
_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")
_STAGE_KEY = re.compile(r"^layer([1-4])\.(\d+)\.")

# torchvision's published ImageNet-1K weights: download.pytorch.org/models/<file>. The 8 hex digits
# are the sha256 prefix torch.hub checks on download. DEFAULT is V2 where torchvision has one.
_WEIGHTS_BASE_URL = "https://download.pytorch.org/models/"
_TORCHVISION_WEIGHTS: dict[str, dict[str, str]] = {
    "resnet18": {"IMAGENET1K_V1": "resnet18-f37072fd.pth"},
    "resnet34": {"IMAGENET1K_V1": "resnet34-b627a593.pth"},
    "resnet50": {"IMAGENET1K_V1": "resnet50-0676ba61.pth", "IMAGENET1K_V2": "resnet50-11ad3fa6.pth"},
    "resnet101": {"IMAGENET1K_V1": "resnet101-63fe2227.pth", "IMAGENET1K_V2": "resnet101-cd907fc2.pth"},
    "resnet152": {"IMAGENET1K_V1": "resnet152-394f9c45.pth", "IMAGENET1K_V2": "resnet152-f82ba261.pth"},
    "resnext50_32x4d": {
        "IMAGENET1K_V1": "resnext50_32x4d-7cdf4587.pth",
        "IMAGENET1K_V2": "resnext50_32x4d-1a0047aa.pth",
    },
    "resnext101_32x8d": {
        "IMAGENET1K_V1": "resnext101_32x8d-8ba56ff5.pth",
        "IMAGENET1K_V2": "resnext101_32x8d-110c445d.pth",
    },
    "resnext101_64x4d": {"IMAGENET1K_V1": "resnext101_64x4d-173b62eb.pth"},
    "wide_resnet50_2": {
        "IMAGENET1K_V1": "wide_resnet50_2-95faca4d.pth",
        "IMAGENET1K_V2": "wide_resnet50_2-9ba9bcbe.pth",
    },
    "wide_resnet101_2": {
        "IMAGENET1K_V1": "wide_resnet101_2-32ee1156.pth",
        "IMAGENET1K_V2": "wide_resnet101_2-d733dc28.pth",
    },
}
IMAGENET_CLASSES = 1000


@dataclass(frozen=True)
class Architecture:
    """What a checkpoint describes: a family member (or a custom ResNet) and its classifier size."""

    spec: ResNetSpec
    num_classes: int

    @property
    def name(self) -> str:
        return self.spec.name

    def describe(self) -> str:
        classes = "1 class" if self.num_classes == 1 else f"{self.num_classes} classes"
        return f"{self.spec.name} ({self.spec.describe()}, {classes})"


# ---------------------------------------------------------------------------------------------
# Loading


def load_checkpoint(source: str | os.PathLike | Mapping | nn.Module) -> dict[str, Tensor]:
    """A plain ``{key: tensor}`` state dict from a file, a mapping or a module.

    Files: ``.pth``/``.pt``/``.bin`` (read with ``weights_only=True``) or ``.safetensors``. A state
    dict nested under ``state_dict``/``model_state_dict``/``model`` is unwrapped; ``module.`` and
    ``_orig_mod.`` prefixes are stripped; non-tensor entries (epoch, optimizer, ...) are dropped.
    In-memory tensors are returned as they are (detached, not copied, not moved to the CPU).
    """
    if isinstance(source, nn.Module):
        raw: object = source.state_dict()
        where = f"{type(source).__name__}.state_dict()"
    elif isinstance(source, Mapping):
        raw, where = source, "the given dict"
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        raw, where = _read_file(path), str(path)
    else:
        raise CheckpointError(
            f"cannot load a checkpoint from a {type(source).__name__}; pass a file path, "
            "a state dict or an nn.Module"
        )
    return _normalize(raw, where)


def _read_file(path: Path) -> object:
    if not path.exists():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.is_dir():
        found = sorted(p.name for p in path.iterdir() if p.suffix in _CHECKPOINT_SUFFIXES)
        hint = f" (it holds {', '.join(found[:5])})" if found else ""
        raise CheckpointError(f"{path} is a directory; pass the checkpoint file inside it{hint}")
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        return _read_safetensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        message = str(exc).lower()
        # The weights-only unpickler refuses any reference to a class or function ("GLOBAL x.y"),
        # and reports junk bytes ("Unsupported operand") through the same exception type.
        if "weights only load failed" in message and ("global" in message or "reduce" in message):
            match = re.search(r"GLOBAL ([\w.]+)", str(exc))
            culprit = f" (it needs {match.group(1)})" if match else ""
            raise CheckpointError(
                f"{path} contains pickled code objects{culprit}; fastres only loads plain tensors "
                "and never runs code from a checkpoint. Re-save just the weights, e.g. "
                "torch.save(dict(model.state_dict()), 'weights.pth'), or convert to .safetensors"
            ) from None
        raise _unreadable(path, exc) from None
    except PermissionError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror}") from None
    except Exception as exc:  # torch.load raises KeyError, EOFError, RuntimeError, ... on junk
        raise _unreadable(path, exc) from None


def _summary(exc: BaseException) -> str:
    """`Type: first line` of an exception: torch's loader messages run to many lines."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:160]}" if lines else type(exc).__name__


def _unreadable(path: Path, exc: BaseException, kind: str = "PyTorch") -> CheckpointError:
    # torch's own text for junk bytes is its weights_only advice, which cannot help with a corrupt
    # file: say what the bytes are not, and what to do.
    size = path.stat().st_size if path.exists() else 0
    what = "the file is empty" if size == 0 else f"{size} bytes: truncated, corrupt or another format"
    detail = "" if "weights only load failed" in str(exc).lower() else f"; {_summary(exc)}"
    return CheckpointError(
        f"{path} is not a readable {kind} checkpoint ({what}{detail}). Re-download or re-save it "
        "(torch.save(model.state_dict(), path)), "
        "or pass a .safetensors file"
    )


def _looks_like_safetensors(path: Path) -> bool:
    # A safetensors file opens with an 8-byte little-endian header length and then a JSON object.
    try:
        with path.open("rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(
            f"{path} is a .safetensors file, which needs the optional safetensors package: "
            "pip install fastres[safetensors]"
        ) from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError on a bad header
        raise _unreadable(path, exc, "safetensors") from None


def _normalize(raw: object, where: str) -> dict[str, Tensor]:
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{where} holds a {type(raw).__name__}, not a state dict of tensors")
    # Unwrap {"state_dict": {...}, "epoch": ...} as training scripts save it (possibly twice nested).
    while not any(isinstance(v, Tensor) for v in raw.values()):
        inner = next((raw[k] for k in _NESTING_KEYS if isinstance(raw.get(k), Mapping)), None)
        if inner is None:
            keys = ", ".join(map(str, list(raw)[:8])) or "nothing"
            raise CheckpointError(f"{where} contains no tensors (top-level entries: {keys})")
        raw = inner
    state: dict[str, Tensor] = {}
    for key, value in raw.items():
        if not isinstance(value, Tensor):
            continue
        name = str(key)
        while name.startswith(_WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        if name in state:
            raise CheckpointError(f"{where} has {name!r} both with and without a module./_orig_mod. prefix")
        state[name] = value.detach()
    return state


# ---------------------------------------------------------------------------------------------
# Architecture


def infer_architecture(state_dict: Mapping[str, Tensor]) -> Architecture:
    """The ResNet a torchvision- or timm-layout state dict describes, read from its keys and shapes."""
    deep_stem = "conv1.0.weight" in state_dict  # timm's Sequential stem; a 7x7 stem is conv1.weight
    avg_down = any(k.endswith(".downsample.2.weight") for k in state_dict)
    required = ("conv1.0.weight" if deep_stem else "conv1.weight", "fc.weight", "layer1.0.conv2.weight")
    missing = [k for k in required if k not in state_dict]
    if missing:
        hint = ""
        if any(k.startswith(("head.", "classifier.", "model.")) for k in state_dict):
            hint = " Its keys use another naming scheme (head./classifier./model.)."
        raise CheckpointError(
            f"this does not look like a torchvision ResNet checkpoint: missing {', '.join(missing)}."
            f"{hint} Found keys like: {', '.join(list(state_dict)[:5])}"
        )

    indices: dict[int, set[int]] = {1: set(), 2: set(), 3: set(), 4: set()}
    for key in state_dict:
        match = _STAGE_KEY.match(key)
        if match:
            indices[int(match.group(1))].add(int(match.group(2)))
    layers = []
    for stage, found in indices.items():
        if not found or found != set(range(len(found))):
            raise CheckpointError(
                f"layer{stage} has blocks {sorted(found)}; a ResNet stage holds blocks 0..n-1 (n >= 1)"
            )
        layers.append(len(found))

    block = "bottleneck" if any(k.endswith(".conv3.weight") for k in state_dict) else "basic"
    groups, width_per_group = 1, 64
    conv2 = state_dict["layer1.0.conv2.weight"]
    if block == "bottleneck":
        if conv2.dim() != 4 or conv2.shape[1] == 0 or conv2.shape[0] % conv2.shape[1]:
            raise CheckpointError(f"layer1.0.conv2.weight has shape {tuple(conv2.shape)}, not a 3x3 conv")
        # Stage 1 has planes = 64, so its 3x3 conv is width_per_group * groups wide.
        groups = conv2.shape[0] // conv2.shape[1]
        width_per_group = conv2.shape[0] // groups

    fc = state_dict["fc.weight"]
    if fc.dim() != 2:
        raise CheckpointError(f"fc.weight has shape {tuple(fc.shape)}; a linear classifier weight is 2-D")
    structure = (block, tuple(layers), groups, width_per_group, deep_stem, avg_down)
    spec = find_spec(*structure) or ResNetSpec(CUSTOM_MODEL_NAME, *structure)
    return Architecture(spec, int(fc.shape[0]))


@functools.lru_cache(maxsize=32)
def _expected_shapes(spec: ResNetSpec, num_classes: int) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # no memory, no init cost: only names and shapes are needed
        model = build_resnet(spec, num_classes)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _is_optional(key: str) -> bool:
    # BN step counters: torchvision saves them, timm does not; inference never reads them.
    return key.endswith("num_batches_tracked")


def validate_state_dict(state_dict: Mapping[str, Tensor], arch: Architecture) -> None:
    """Raise CheckpointError unless `state_dict` fits `arch` key for key and shape for shape."""
    expected = _expected_shapes(arch.spec, arch.num_classes)
    missing = [k for k in expected if k not in state_dict and not _is_optional(k)]
    unexpected = [k for k in state_dict if k not in expected]
    for what, keys in (("is missing", missing), ("has unexpected", unexpected)):
        if keys:
            shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
            raise CheckpointError(
                f"checkpoint {what} {len(keys)} key{'s' if len(keys) != 1 else ''} for "
                f"{arch.describe()}: {shown}"
            )
    for key, shape in expected.items():
        if key not in state_dict or _is_optional(key):
            continue
        tensor = state_dict[key]
        if tuple(tensor.shape) != shape:
            raise CheckpointError(
                f"{key} has shape {tuple(tensor.shape)} in the checkpoint but {shape} in {arch.describe()}"
            )
        if not tensor.is_floating_point():
            raise CheckpointError(f"{key} has dtype {tensor.dtype}; weights must be floating point")


# ---------------------------------------------------------------------------------------------
# torchvision's published weights


def _weight_file(model_name: str, weights_name: str) -> str:
    files = _TORCHVISION_WEIGHTS.get(get_spec(model_name).name)  # get_spec: UnknownModelError
    if files is None:
        raise CheckpointError(
            f"torchvision publishes no weights for {model_name} (a timm model); pass its timm checkpoint "
            f"file or state dict, e.g. timm.create_model({model_name!r}, pretrained=True).state_dict()"
        )
    name = weights_name.upper() if isinstance(weights_name, str) else weights_name
    if name == "DEFAULT":
        name = "IMAGENET1K_V2" if "IMAGENET1K_V2" in files else "IMAGENET1K_V1"
    if name not in files:
        raise CheckpointError(
            f"unknown weights {weights_name!r} for {model_name}; torchvision publishes: "
            f"{', '.join([*files, 'DEFAULT'])} (or pass a checkpoint path)"
        )
    return files[name]


def weight_names(model_name: str) -> list[str]:
    """The torchvision weight names `model_name` accepts, DEFAULT included (none for timm's models)."""
    get_spec(model_name)
    return [*_TORCHVISION_WEIGHTS[model_name], "DEFAULT"] if model_name in _TORCHVISION_WEIGHTS else []


def weights_url(model_name: str, weights_name: str) -> str:
    """torchvision's download URL for e.g. ("resnet50", "IMAGENET1K_V2")."""
    return _WEIGHTS_BASE_URL + _weight_file(model_name, weights_name)


def weights_cache_path(model_name: str, weights_name: str) -> Path:
    """Where torch.hub keeps the file: ``$TORCH_HOME/hub/checkpoints/<file>`` (or torch.hub.set_dir's)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / _weight_file(model_name, weights_name)


def download_weights(model_name: str, weights_name: str, *, progress: bool = True) -> dict[str, Tensor]:
    """torchvision's published weights, from the torch.hub cache or downloaded into it."""
    url = weights_url(model_name, weights_name)
    cached = weights_cache_path(model_name, weights_name)
    was_cached = cached.exists()
    try:
        raw = torch.hub.load_state_dict_from_url(
            url,
            model_dir=str(cached.parent),
            map_location="cpu",
            progress=progress,
            check_hash=True,
            file_name=cached.name,
            weights_only=True,
        )
    except Exception as exc:
        if not was_cached and isinstance(exc, (urllib.error.URLError, OSError)):
            raise CheckpointError(
                f"could not download {model_name} {weights_name} weights from {url} ({exc}). "
                f"Without internet access, place the file at {cached} or pass a local checkpoint path"
            ) from None
        if not was_cached and "hash" in str(exc).lower():
            raise CheckpointError(f"the file downloaded from {url} failed its hash check: {exc}") from None
        raise CheckpointError(
            f"cached weights at {cached} could not be read ({_summary(exc)}); "
            "delete the file to download it again"
        ) from None
    return _normalize(raw, str(cached))


# ---------------------------------------------------------------------------------------------
# Model + weights -> architecture + state dict


def _check_num_classes(num_classes: int | None) -> None:
    if num_classes is not None and (
        not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1
    ):
        raise ConfigError(f"num_classes must be a positive int, got {num_classes!r}")


def _from_checkpoint(state: dict[str, Tensor], num_classes: int | None) -> Architecture:
    arch = infer_architecture(state)
    if num_classes is not None and num_classes != arch.num_classes:
        raise ArchitectureMismatchError(
            f"the checkpoint's classifier has {arch.num_classes} classes (fc.weight "
            f"{tuple(state['fc.weight'].shape)}); you asked for num_classes={num_classes}. "
            f"Omit num_classes or pass {arch.num_classes}"
        )
    return arch


def is_weight_name(weights: object) -> bool:
    """A string that names torchvision weights rather than a file (which would win if it existed)."""
    return (
        isinstance(weights, str)
        and not os.path.exists(weights)
        and not weights.endswith(_CHECKPOINT_SUFFIXES)
        and os.sep not in weights
        and "/" not in weights
    )


def resolve_model(
    model: str | os.PathLike,
    weights: str | os.PathLike | Mapping | nn.Module | None = None,
    *,
    num_classes: int | None = None,
) -> tuple[Architecture, dict[str, Tensor] | None]:
    """The architecture to build and the weights to put in it (None: random initialisation).

    `model` is a family name (see list_models()) or the path of a checkpoint whose architecture is
    inferred. `weights` is None, a checkpoint (path, state dict, nn.Module) or a torchvision weight
    name (IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT). A checkpoint must match the named model exactly.
    """
    _check_num_classes(num_classes)
    if not isinstance(model, (str, os.PathLike)):
        raise UnknownModelError(
            f"model must be a model name or a checkpoint path, got a {type(model).__name__}; "
            "pass a module or state dict as weights= with its model name"
        )
    if not (isinstance(model, str) and model in MODEL_SPECS):
        if not os.path.exists(model):
            get_spec(os.fspath(model))  # raises UnknownModelError listing the valid names
        if weights is not None:
            raise CheckpointError(
                f"model is already a checkpoint ({os.fspath(model)}); pass weights=None, "
                "or a model name with weights=<checkpoint>"
            )
        state = load_checkpoint(model)
        arch = _from_checkpoint(state, num_classes)
        validate_state_dict(state, arch)
        return arch, state

    spec = get_spec(model)
    if weights is None:
        return Architecture(spec, IMAGENET_CLASSES if num_classes is None else num_classes), None

    if is_weight_name(weights):
        _weight_file(model, weights)  # unknown weight name: fail before any download
        if num_classes is not None and num_classes != IMAGENET_CLASSES:
            raise ArchitectureMismatchError(
                f"torchvision's {weights} weights for {model} have {IMAGENET_CLASSES} classes; you asked "
                f"for num_classes={num_classes}. Load a checkpoint trained for {num_classes} classes, "
                "or omit num_classes"
            )
        state = download_weights(model, weights)
    else:
        state = load_checkpoint(weights)

    arch = _from_checkpoint(state, num_classes)
    if arch.spec != spec:
        raise ArchitectureMismatchError(
            f"this checkpoint is a {arch.spec.name} ({arch.spec.describe()}); "
            f"you asked for {model} ({spec.describe()})"
        )
    validate_state_dict(state, arch)
    return arch, state
