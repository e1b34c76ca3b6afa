"""What `fastres bench` times beside fastres: eager PyTorch, torch.compile, OpenVINO used directly.

Every candidate runs the same module with the same weights as fastres. OpenVINO is converted straight
from the module, with the same dynamic shapes and inference precision fastres's openvino backend asks
for: the anchor that says what fastres adds (or costs) on top of OpenVINO on the CPU.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError
from ..quantize import QUANTIZED_DTYPES

ANCHORS = ("eager", "compile", "openvino")  # what --compare may name
COMPILE_MODES = (
    "default",
    "reduce-overhead",
    "max-autotune",
    "max-autotune-no-cudagraphs",
)  # torch.compile's
# reduce-overhead first: it compiles faster, so a --compile-budget that runs out still leaves one anchor.
_GPU_COMPILE_MODES = ("reduce-overhead", "max-autotune-no-cudagraphs")


def one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


@dataclass
class Candidate:
    """One thing to time: `fn(x)` on a batch already on the device in the run's dtype."""

    name: str
    fn: Callable[[torch.Tensor], Any]
    error: str | None = None  # set when it could not even be built
    is_compile: bool = False


@contextmanager
def cudnn_benchmark(on: bool) -> Iterator[None]:
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def eager_candidates(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> list[Candidate]:
    """Eager PyTorch in NCHW, and channels-last with cudnn.benchmark on, in the run's dtype."""
    nchw = copy.deepcopy(module).to(device, dtype).eval()
    cl = copy.deepcopy(module).to(device, dtype).to(memory_format=torch.channels_last).eval()

    def channels_last(x: torch.Tensor) -> Any:
        with cudnn_benchmark(True):
            return cl(x.contiguous(memory_format=torch.channels_last))

    return [Candidate("eager", nchw), Candidate("eager-channels-last", channels_last)]


def default_compile_modes(device: torch.device) -> tuple[str, ...]:
    return _GPU_COMPILE_MODES if device.type == "cuda" else ("default",)


def check_compile_modes(modes: Sequence[str] | None, compare: Sequence[str]) -> None:
    unknown = set(modes or ()) - set(COMPILE_MODES)
    if unknown:
        known, got = ", ".join(COMPILE_MODES), ", ".join(sorted(unknown))
        raise ConfigError(f"--compile-modes takes {known} (comma-separated), got {got}")
    if modes and "compile" not in compare:
        raise ConfigError("--compile-modes needs compile in --compare")


def compile_candidates(
    module: torch.nn.Module, device: torch.device, dtype: torch.dtype, modes: Sequence[str] | None = None
) -> list[Candidate]:
    """torch.compile anchors (static shapes), one per mode (default: `default_compile_modes`). Build
    failures become candidates that carry their error."""
    modes = modes or default_compile_modes(device)
    out = []
    for mode in modes:
        name = f"compile-{mode}"
        try:
            compiled = torch.compile(copy.deepcopy(module).to(device, dtype).eval(), mode=mode, dynamic=False)
        except Exception as exc:
            out.append(Candidate(name, _never, error=one_line(exc), is_compile=True))
            continue
        if mode == "reduce-overhead":

            def fn(x: torch.Tensor, compiled=compiled) -> Any:
                torch.compiler.cudagraph_mark_step_begin()  # previous outputs may be overwritten: fine here
                return compiled(x)
        else:
            fn = compiled
        out.append(Candidate(name, fn, is_compile=True))
    return out


def _never(x: torch.Tensor) -> Any:
    raise RuntimeError("candidate was not built")


def openvino_candidates(
    module: torch.nn.Module, device: torch.device, dtype: torch.dtype, calibration: torch.Tensor | None = None
) -> list[Candidate]:
    """OpenVINO's converter and CPU plugin on the module itself, in the run's precision."""
    if device.type != "cpu":
        return []
    try:
        from ..backends.openvino_backend import core, import_openvino, precision_config

        ov = import_openvino()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            model = ov.convert_model(
                copy.deepcopy(module).float().eval(),
                example_input=torch.randn(1, 3, 64, 64),
                input=[ov.PartialShape([-1, 3, -1, -1])],
            )
        if dtype == torch.int8:
            import nncf

            items = [calibration[i : i + 1].numpy() for i in range(calibration.shape[0])]
            model = nncf.quantize(model, nncf.Dataset(items), subset_size=len(items))
        request = core().compile_model(model, "CPU", precision_config(dtype)).create_infer_request()
    except Exception as exc:  # not installed, or this CPU lacks the precision: a row that says so
        return [Candidate("openvino", _never, error=one_line(exc))]

    def fn(x: torch.Tensor) -> Any:
        return request.infer({0: x.float().numpy()})

    return [Candidate("openvino", fn)]


def anchor_candidates(
    module: torch.nn.Module,
    device: torch.device,
    dtype: torch.dtype,
    compare: Sequence[str],
    calibration: torch.Tensor | None = None,
    compile_modes: Sequence[str] | None = None,
) -> list[Candidate]:
    """int8 and fp8 runs: eager and torch.compile in float32 (PyTorch has no int8 or fp8 conv to time);
    OpenVINO in int8 quantized by NNCF on the same calibration images as fastres (it has no fp8 path)."""
    float_dtype = torch.float32 if dtype in QUANTIZED_DTYPES else dtype
    out = []
    if "eager" in compare:
        out += eager_candidates(module, device, float_dtype)
    if "compile" in compare:
        out += compile_candidates(module, device, float_dtype, compile_modes)
    if "openvino" in compare and dtype == torch.float8_e4m3fn:
        out.append(Candidate("openvino", _never, error="OpenVINO has no fp8 conv: compare with --dtype int8"))
    elif "openvino" in compare:
        out += openvino_candidates(module, device, dtype, calibration)
    return out
