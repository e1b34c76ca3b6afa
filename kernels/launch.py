"""What every launcher shares: the config base, the dtypes, the int32 limit and the argument checks.

Each kernel family (conv, stem, head's pooling and fc, max-pool) declares its own frozen dataclass of
tile sizes on `LaunchConfig`, so a config prints one way and turns into launch options one way, both
for the launch and for the ahead-of-time compile.
"""

from __future__ import annotations

import torch

from .aot import Pointer, ShapeOnly, interpreting

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Offsets are int32 inside the kernels: every tensor a kernel addresses stays below this many elements.
INT32_LIMIT = 2**31


class LaunchConfig:
    """Base of the config dataclasses. Subclasses declare num_warps and num_stages (and maxnreg where a
    register cap matters) among their own fields, in their own positional order, and name their tile
    through `tile_name()`."""

    num_warps: int
    num_stages: int
    maxnreg: int | None = None

    def tile_name(self) -> str:
        raise NotImplementedError

    def __str__(self) -> str:
        cap = f"_r{self.maxnreg}" if self.maxnreg else ""
        return f"{self.tile_name()}_w{self.num_warps}_s{self.num_stages}{cap}"

    def spec_options(self) -> dict:
        """The `aot.make_spec` keywords this config fixes: warps, stages, register cap, its name."""
        warps_stages = dict(num_warps=self.num_warps, num_stages=self.num_stages)
        return dict(**warps_stages, maxnreg=self.maxnreg, config=str(self))

    def launch_options(self, pdl: bool = False) -> dict[str, int | bool]:
        """pdl: launch with programmatic dependent launch (kernels/pdl.py; the kernel's USE_PDL must
        be on too, so that it waits before reading what its predecessor writes)."""
        # FMA contraction stated, not defaulted: Triton 3.9 warns that its default turns to off in 3.10,
        # and the kernels' speed and their measured rounding both assume fused multiply-adds.
        options: dict[str, int | bool] = {
            "num_warps": self.num_warps,
            "num_stages": self.num_stages,
            "enable_fp_fusion": True,
        }
        if self.maxnreg is not None:
            options["maxnreg"] = self.maxnreg
        if pdl:
            options["launch_pdl"] = True
        return options


def check_tensor(t, what: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    """A contiguous tensor of exactly this shape, dtype and device, or a TypeError/ValueError saying which."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{what}: expected dtype {dtype}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{what}: expected NHWC shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{what}: expected device {device}, got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{what}: expected a contiguous NHWC tensor, got strides {t.stride()}")


def check_launchable(x: torch.Tensor, who: str) -> None:
    """Kernels launch on CUDA tensors, or on CPU tensors under Triton's interpreter."""
    if x.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"{who}: expected a CUDA tensor, got one on {x.device} (CPU runs need TRITON_INTERPRET=1)"
        )


def check_int32_indexing(elements: int, who: str, what: str = "tensors") -> None:
    if elements >= INT32_LIMIT:
        raise ValueError(f"{who}: {what} of 2**31 elements or more need int64 indexing (unsupported)")


def pointers_for_placeholders(args: dict) -> dict:
    """Launch arguments built from ShapeOnly placeholders, with each placeholder as the pointer type
    the ahead-of-time compile needs (sizes and constexprs pass through)."""
    return {k: (Pointer(v.dtype) if isinstance(v, ShapeOnly) else v) for k, v in args.items()}
