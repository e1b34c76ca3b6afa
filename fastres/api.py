"""The public entry points: fastres.load and fastres.optimize."""

from __future__ import annotations

import dataclasses
import os
import warnings

import torch
from torch import nn

from .backends import BACKENDS, create_backend
from .backends.openvino_runtime import default_precision as default_openvino_precision
from .backends.openvino_runtime import openvino_available
from .calibration import decode_files, is_saved_calibration, weights_hash
from .checkpoints import (
    Architecture,
    infer_architecture,
    is_weight_name,
    load_checkpoint,
    resolve_model,
    validate_state_dict,
)
from .engine import Engine, as_nchw
from .errors import ArchitectureMismatchError, BackendUnavailableError, ConfigError, InputError
from .graph import ConvOp, build_eager_graph
from .planner import plan_resnet, resolve_features, select_outputs
from .quantize import QUANTIZED_DTYPES
from .reference import build_resnet
from .specs import IMAGENET_MEAN, IMAGENET_STD
from .tuning.use import DEFAULT_BUDGET_S, check_tune_mode

_DTYPE_NAMES = {
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "int8": torch.int8,
    "fp8": torch.float8_e4m3fn,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "e4m3": torch.float8_e4m3fn,
}
# Calibrated 8-bit dtypes (fastres/quantize.py's QUANTIZED_DTYPES): int8 on the triton and openvino
# backends, fp8 (e4m3) on the triton backend on sm_89+ GPUs.
# The kernels' dtypes (fastres.kernels.launch.SUPPORTED_DTYPES), restated: importing fastres.kernels
# needs Triton, which the torch backend on a machine without it must not (test_structure checks they agree).
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def dtype_name(dtype: torch.dtype) -> str:
    """The short name a calibration record and the command line use ("int8", "fp8", "float16")."""
    return "fp8" if dtype == torch.float8_e4m3fn else str(dtype).replace("torch.", "")


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in (*SUPPORTED_DTYPES, *QUANTIZED_DTYPES):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype.lower()]
    raise ConfigError(
        f"unsupported dtype {dtype!r}; use float16 (fp16), bfloat16 (bf16), float32 (fp32), or int8 or "
        "fp8 (with calibration=)"
    )


def _resolve_device_dtype_backend(device, dtype, backend) -> tuple[torch.device, torch.dtype, str]:
    device = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(
            "device 'cuda' was requested but torch sees no CUDA GPU; use device='cpu'"
        )
    if device.type == "cuda" and device.index is None:
        # Pinned now: weights land on the current device, and a later torch.cuda.set_device must not
        # move the engine's streams and workspaces away from them.
        device = torch.device("cuda", torch.cuda.current_device())
    on_gpu = device.type == "cuda"
    if backend is None:
        cpu_default = "openvino" if device.type == "cpu" and openvino_available() else "torch"
        backend = "triton" if on_gpu else cpu_default
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if dtype is not None:
        dtype = parse_dtype(dtype)
    elif backend == "openvino":
        dtype = default_openvino_precision()  # what OpenVINO's users get: bf16 on CPUs that have it
    else:
        dtype = torch.float16 if on_gpu else torch.float32
    if dtype == torch.int8 and backend not in ("openvino", "triton"):
        raise ConfigError(
            f"int8 runs on the openvino backend (the CPU; pip install 'fastres[openvino]') or the triton "
            f"backend (CUDA GPUs), not on {backend}"
        )
    if dtype == torch.float8_e4m3fn and backend != "triton":
        raise ConfigError(
            f"fp8 runs on the triton backend (CUDA GPUs, sm_89+), not on {backend}; on the CPU use "
            "dtype='int8' with the openvino backend (pip install 'fastres[openvino]')"
        )
    if backend == "triton":
        if device.type not in ("cuda", "cpu"):
            raise BackendUnavailableError(f"the triton backend runs on CUDA GPUs, not on {device}")
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise BackendUnavailableError(
                "the triton backend needs a CUDA GPU; on the CPU it only runs under Triton's interpreter "
                "(set TRITON_INTERPRET=1 before starting Python; slow, for testing). "
                "For CPU inference use backend='torch' (`--backend torch` on the command line), "
                "the default on CPU."
            )
    return device, dtype, backend


def resolve_backend(device=None, backend: str | None = None) -> str:
    """The backend `fastres.load` would use for these arguments."""
    return _resolve_device_dtype_backend(device, None if backend is None else "fp32", backend)[2]


def _build_engine(
    arch: Architecture, state_dict, device, dtype, backend, mean, std, labels, engine_options, features=None
) -> Engine:
    device, dtype, backend = _resolve_device_dtype_backend(device, dtype, backend)
    tune = engine_options.pop("tune", "cached")
    self_check = engine_options.pop("self_check", None)
    tune_budget_s = float(engine_options.pop("tune_budget_s", DEFAULT_BUDGET_S))
    check_tune_mode(tune)
    if backend != "triton" and (tune is True or self_check is True):
        raise ConfigError("tune=True and self_check=True apply to the triton backend (a CUDA GPU)")
    quantized = dtype in QUANTIZED_DTYPES
    if quantized and (tune is True or self_check is True):
        raise ConfigError("tune=True and self_check=True cover the float kernels; int8/fp8 are not tuned")
    plan = plan_resnet(arch.spec, arch.num_classes, state_dict, mean=mean, std=std, dtype=dtype)
    calibration = engine_options.pop("calibration", None)
    save_calibration = engine_options.pop("save_calibration", None)
    calibration_method = engine_options.pop("calibration_method", None)
    options = {}
    if quantized:
        if calibration is None:
            raise ConfigError(
                f"dtype='{dtype_name(dtype)}' needs calibration=: about 300 representative images (a "
                "tensor, or a folder of image files), or a calibration file saved with save_calibration="
            )
        if not is_saved_calibration(calibration):
            if isinstance(calibration, (str, os.PathLike, list, tuple)):
                calibration = decode_files(calibration)
            if not isinstance(calibration, torch.Tensor):
                raise InputError(
                    "calibration= takes a tensor of images, a folder or list of image files, or a saved "
                    f".json calibration file, got {type(calibration).__name__}"
                )
            calibration = as_nchw(calibration)
        options.update(
            calibration=calibration,
            save_calibration=save_calibration,
            model_name=arch.spec.variant_name,  # a dilated net's calibration is not the plain one's
            weights_sha256=weights_hash(state_dict),
        )
        if calibration_method is not None:
            if backend != "triton":  # OpenVINO quantizes with NNCF's own preset (backends/openvino_int8.py)
                raise ConfigError("calibration_method= applies to the triton backend; OpenVINO uses NNCF's")
            options["calibration_method"] = calibration_method
    elif calibration is not None or save_calibration is not None or calibration_method is not None:
        raise ConfigError(
            "calibration=, save_calibration= and calibration_method= apply to dtype='int8' or 'fp8'"
        )
    allow_tf32 = bool(engine_options.pop("allow_tf32", False))
    if allow_tf32:
        if dtype != torch.float32 or backend == "reference":
            raise ConfigError("allow_tf32=True applies to float32 with the triton or torch backend")
        options["allow_tf32"] = True
    for name in ("threads", "streams"):
        if engine_options.get(name) is not None:
            if backend != "openvino":
                raise ConfigError(f"{name}= applies to the openvino backend")
            options[name] = engine_options.pop(name)
        engine_options.pop(name, None)
    if backend == "reference":
        options["module"] = build_resnet(arch.spec, arch.num_classes, state_dict)
    runner = create_backend(backend, plan, device, dtype, **options)
    tuner = None
    if backend == "triton" and not quantized:  # tuned choices, first-use tuning and self-check
        from .tuning.use import prepare_backend

        runner, tuner = prepare_backend(runner, tune=tune, self_check=self_check, budget_s=tune_budget_s)
    if features is not None:  # weights packed for the whole plan (embed() may need more), run cut
        plan = select_outputs(plan, features)
        runner = runner.for_plan(plan)
    return Engine(plan, runner, arch, state_dict, labels=labels, tuner=tuner, **engine_options)


def _outputs(num_classes, features, out_indices, engine_options) -> tuple[int | None, tuple | None]:
    """(num_classes to check the checkpoint's fc against, feature names or None) for load/optimize.

    num_classes=0 (timm's convention) returns the pooled features as one tensor and ignores the fc.
    With features= the fc never runs either, so num_classes=0 beside it changes nothing.
    """
    names = resolve_features(features, out_indices)
    if num_classes == 0 and not isinstance(num_classes, bool):
        num_classes = None
        if names is None:
            names = ("pool",)
            engine_options["embedding"] = True
    return num_classes, names


def _module_dilation(module: nn.Module, spec) -> tuple[bool, bool, bool] | None:
    """The replace_stride_with_dilation a torchvision-layout Bottleneck module was built with: layer2..4
    whose first 3x3 has stride 1, not 2 (None where there are no such convs to read)."""
    if spec.block != "bottleneck":
        return None  # BasicBlocks are never dilated; the conv-by-conv check still runs
    try:
        convs = [module.get_submodule(f"layer{stage}.0.conv2") for stage in (2, 3, 4)]
    except AttributeError:
        return None
    if not all(isinstance(c, nn.Conv2d) for c in convs):
        return None
    return tuple(c.stride == (1, 1) for c in convs)


def _dilated(arch: Architecture, replace_stride_with_dilation, output_stride, module=None, state=None):
    """`arch` with the dilation asked for; from a live module, the one it was built with, checked conv by
    conv against the plan (a module whose geometry fastres would not reproduce is refused, not guessed)."""
    spec = arch.spec.with_dilation(replace_stride_with_dilation, output_stride)
    if isinstance(module, nn.Module):
        found = _module_dilation(module, arch.spec)
        if found is not None and replace_stride_with_dilation is None and output_stride is None:
            spec = arch.spec.with_dilation(found)
        for op in build_eager_graph(spec, state):
            try:
                conv = module.get_submodule(op.name)
            except AttributeError:
                continue
            if not (isinstance(op, ConvOp) and isinstance(conv, nn.Conv2d)):
                continue
            stride = 1 if op.avg_pool else op.stride  # ResNet-D: the module pools, then a stride-1 conv
            planned = tuple((v, v) for v in (stride, op.padding, op.dilation))
            dilation = conv.dilation if conv.kernel_size != (1, 1) else (1, 1)  # meaningless for a 1x1
            if (conv.stride, conv.padding, dilation) != planned:
                raise ArchitectureMismatchError(
                    f"the module's {op.name} has stride, padding, dilation {conv.stride}, {conv.padding}, "
                    f"{conv.dilation}, but {spec.name} ({spec.describe()}) has {planned}: pass the "
                    "replace_stride_with_dilation (or output_stride) the module was built with"
                )
    return dataclasses.replace(arch, spec=spec)


def _with_placeholder_fc(state: dict) -> dict:
    """A headless state dict (timm's num_classes=0 or fc = Identity: no fc keys) with a 1-class zero fc
    added, so the architecture infers and validates as usual. It never runs: only for features."""
    if "fc.weight" in state or "layer1.0.conv2.weight" not in state:
        return state  # has a head, or is no ResNet (the usual error explains)
    last = max((int(k.split(".")[1]) for k in state if k.startswith("layer4.")), default=None)
    bn = state.get(f"layer4.{last}.bn3.weight", state.get(f"layer4.{last}.bn2.weight"))
    if bn is None:
        return state
    return {**state, "fc.weight": bn.new_zeros(1, bn.shape[0]), "fc.bias": bn.new_zeros(1)}


def load(
    model: str | os.PathLike,
    weights=None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    backend: str | None = None,
    num_classes: int | None = None,
    features=None,
    out_indices=None,
    replace_stride_with_dilation=None,
    output_stride: int | None = None,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    labels=None,
    **engine_options,
) -> Engine:
    """Plan and load a ResNet for inference.

    model: a name from `fastres.list_models()`, or a checkpoint path (architecture inferred).
    weights: a checkpoint path, a state dict, an nn.Module, or a torchvision weight name
        ('IMAGENET1K_V1', 'IMAGENET1K_V2', 'DEFAULT'); None gives torchvision's random initialisation,
        seeded so that every load without weights gives the same network.
    device: 'cuda' when available, else 'cpu'.
    backend: 'triton' on CUDA; on the CPU 'openvino' when OpenVINO is installed (fastres[openvino]),
        else 'torch'; 'reference' runs the unfused PyTorch model.
    dtype: float16 on CUDA; on the CPU float32, except that the openvino backend follows OpenVINO's
        own default (bfloat16 on CPUs with bf16 instructions, else float32): pass 'fp32' for IEEE fp32.
    mean, std: per-channel RGB statistics for uint8 input, normalised as (x / 255 - mean) / std inside
        the first layer (ImageNet's by default); float input is taken as already normalised.
    labels: class names for `Engine.predict`: a list or a text file with one name per line
        (default: ImageNet-1k's names for 1000 classes, else "class i").
    num_classes=0: a call returns float32 N x C pooled features (timm's convention); any fc in the
        checkpoint is ignored, and a checkpoint without one (headless) loads too. Every engine also
        has `embed(x, normalize=False)`.
    features: names from planner.FEATURE_NAMES ("stem", "layer1".."layer4", "pool"), or timm's
        out_indices (0 = stem, 1-4 = layer1-4): a call returns a dict name -> tensor, ops after the
        last one are not run. Takes precedence over num_classes=0 (the fc never runs with either).
    replace_stride_with_dilation: torchvision's three flags for layer2..layer4, e.g. (False, True, True);
        or output_stride=8 | 16 | 32 as timm spells it (16: layer4 dilated, 8: layer3 and layer4). A
        dilated stage keeps stride 1 and dilates its 3x3 convs, as torchvision builds it (DeepLabV3's
        backbone); Bottleneck models only. The dilated stages then run at 4x (16) or 4x and 16x (8) the
        pixels. From an nn.Module (weights= here, or optimize), its own dilation is read and checked.
    tune (triton backend): "cached" (default) applies tuned choices from the tuning cache
        ($FASTRES_CACHE, default ~/.cache/fastres) when it has them, else the rule table, and never
        times anything; True also tunes each new input size on first use within tune_budget_s
        (default 60) and caches the result; False uses the rule table only (see fastres.tuning).
    self_check (triton backend): None (default) checks the Triton plan against the torch backend the
        first time it runs on a GPU (per cache key) and falls back on a mismatch; True always checks,
        also under the interpreter; False never.
    engine_options: allow_tf32 (float32 convs on TF32 tensor cores; off by default: IEEE fp32),
        cuda_graphs (default on for CUDA), max_batch (larger batches run in chunks),
        max_cached_shapes (input shapes kept warm, LRU); openvino only: threads (OpenVINO's
        INFERENCE_NUM_THREADS), streams (NUM_STREAMS).
    int8 (openvino backend): dtype='int8' with calibration= images (a tensor as engine inputs are,
        uint8 pixels, or a folder of image files preprocessed as `fastres classify` does; about 300)
        or a saved calibration .json; save_calibration='calib.json' keeps the result for reuse.
    """
    num_classes, features = _outputs(num_classes, features, out_indices, engine_options)
    module = weights if isinstance(weights, nn.Module) else None  # its dilation is read below
    if features is not None and weights is not None and not is_weight_name(weights):
        weights = _with_placeholder_fc(load_checkpoint(weights))  # a headless checkpoint is fine here
    arch, state_dict = resolve_model(model, weights, num_classes=num_classes)
    arch = _dilated(arch, replace_stride_with_dilation, output_stride, module, state_dict)
    if state_dict is None:
        warnings.warn(
            f"fastres.load({str(model)!r}) without weights gives a randomly initialised, untrained network; "
            "pass weights='DEFAULT' or a checkpoint path for real predictions",
            UserWarning,
            stacklevel=2,
        )
        # Seeded, and without touching the caller's RNG: an unseeded net labels the same image
        # differently on every run, which reads as a bug rather than as "untrained".
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            state_dict = build_resnet(arch.spec, arch.num_classes).state_dict()
    return _build_engine(
        arch, state_dict, device, dtype, backend, mean, std, labels, engine_options, features
    )


def optimize(
    module: nn.Module,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    backend: str | None = None,
    features=None,
    out_indices=None,
    replace_stride_with_dilation=None,
    output_stride: int | None = None,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    labels=None,
    **engine_options,
) -> Engine:
    """An Engine from a live torchvision-compatible ResNet (e.g. fine-tuned with a new fc).

    Options as for `load`; a dilated module (torchvision's replace_stride_with_dilation) plans dilated.
    """
    _, features = _outputs(None, features, out_indices, engine_options)
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"optimize() takes an nn.Module (a torchvision-compatible ResNet), got {type(module).__name__}"
        )
    state_dict = load_checkpoint(module)
    if "fc.weight" not in state_dict and features is None:  # fc = Identity (timm's num_classes=0)
        features, engine_options["embedding"] = ("pool",), True
    state_dict = _with_placeholder_fc(state_dict) if features is not None else state_dict
    arch = infer_architecture(state_dict)
    validate_state_dict(state_dict, arch)
    arch = _dilated(arch, replace_stride_with_dilation, output_stride, module, state_dict)
    state_dict = {k: v.detach().to("cpu") for k, v in state_dict.items()}
    return _build_engine(
        arch, state_dict, device, dtype, backend, mean, std, labels, engine_options, features
    )
