"""Ahead-of-time compilation of fastres kernels for a GPU that is not present.

A `KernelSpec` holds everything `triton.compile` needs to build exactly the binary a real launch would
build: the `@triton.jit` function, the argument signature, the constexpr values and the divisibility
attributes. Launchers build their specs from the same argument dictionary they launch with
(`kernel_args`), and `make_spec` applies Triton's own launch-time specialization rules to it:

* an int argument equal to 1 becomes a constexpr (Triton specializes on 1);
* an int argument divisible by 16, and every pointer, gets `tt.divisibility = 16` (torch allocations
  are 256-byte aligned, so a real launch with a fresh tensor sees the same);
* other ints are `i32` (or `i64` when they do not fit).

Without the divisibility attributes an implicit-GEMM kernel loses vectorized loads and software
pipelining, and its register count no longer says anything about what a launch gets.

`compile_spec` compiles a spec for `cuda:<arch>` (no GPU needed: ptxas ships with Triton) and reads the
resource usage of the cubin with `cuobjdump -res-usage` (registers, stack, local memory) and, on sm_90,
looks for HGMMA (wgmma) instructions in the SASS; `kernels.sass` reads the SASS's main loop
(instructions, MMAs and bytes per K-step) for the performance estimate (`fastres.tools.estimate`).
Compilation needs a process in which TRITON_INTERPRET is unset: under the interpreter `@triton.jit`
yields an `InterpretedFunction` that cannot be lowered. This module still imports (and builds specs)
under the interpreter.
"""

from __future__ import annotations

import inspect
import math
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
import triton

from .sass import SassSummary, summarize

_TRITON_PTR_TYPES = {
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
    torch.float32: "*fp32",
    torch.uint8: "*u8",  # the stem reads uint8 images directly
    torch.int8: "*i8",  # int8 activations and weights (kernels/conv_int8.py)
    torch.float8_e4m3fn: "*fp8e4nv",  # fp8 activations and weights (kernels/conv_fp8.py)
    torch.int32: "*i32",  # split-K arrival counters
}
_INT32_MAX = 2**31 - 1


def interpreting() -> bool:
    """Whether Triton's interpreter runs the kernels (TRITON_INTERPRET set before triton was imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class ShapeOnly:
    """A tensor's shape and dtype, for building a launcher's arguments without allocating."""

    shape: tuple
    dtype: torch.dtype


@dataclass(frozen=True)
class Pointer:
    """Stands in for a tensor argument when building a spec without allocating anything."""

    dtype: torch.dtype


@dataclass(frozen=True)
class KernelSpec:
    """One kernel launch's specialization: what `triton.compile` needs, a readable name and config string,
    and the launch facts a performance model needs (filled by each launcher's `aot_specs`).

    Launch-fact contract (all per launch, for the input shape the spec was built for; None = unknown,
    and the estimate then says so instead of guessing):

    * `grid`: the launch grid, as passed to `kernel[grid]` (CTAs = the product).
    * `k_steps`: iterations of the kernel's main loop per CTA -- the loop that holds the `tl.dot`
      (the innermost loop with MMAs in the SASS; in a kernel without a dot in a loop, its innermost
      loop with the most instructions; 0 when the kernel has no loop). For nested loops, count the
      total iterations of that innermost loop per CTA.
    * `outer_steps`: iterations per CTA of the loop directly around the main loop, when the kernel has
      one (the estimator then counts that loop's own body this many times); None when there is none.
    * `flops`: useful floating-point work (2 per multiply-add of the math, no padding or super-group
      zeros counted; 0 for data movement).
    * `min_bytes`: the least DRAM traffic the launch can do: every input, weight and output byte once.
    * `reduce_trips`: trips of the fused split-K reduction's loop in the one CTA per tile that runs it
      (`kernels.splitk.reduce_chunks`); None when the launch has no fused reduction.
    * `prefetch_bytes`: weight bytes one CTA asks L2 for before its `gdc_wait` (whole 128-byte lines;
      kernels/pdl.py), 0 when the kernel does not use PDL or prefetches nothing.
    * `l2_bytes`: optional; bytes the CTAs load from and store to L2 in all. None lets the estimator
      count them from the SASS (load/store widths per thread), which cannot see TMA loads: a launcher
      whose kernel uses TMA should give it.
    """

    fn: Any  # the @triton.jit function (a JITFunction outside the interpreter)
    signature: tuple[tuple[str, str], ...]  # (param name, Triton type or "constexpr"), in param order
    constexprs: tuple[tuple[str, Any], ...]  # (param name, value) for every constexpr param
    divisible_args: tuple[int, ...]  # param indices that get tt.divisibility = 16
    num_warps: int
    num_stages: int
    name: str
    config: str
    maxnreg: int | None = None  # register cap handed to ptxas, when the config sets one
    # Launch facts for the performance model (see the contract above); not part of the compile key.
    grid: tuple[int, ...] = ()
    k_steps: int | None = None
    outer_steps: int | None = None
    flops: int | None = None
    min_bytes: int | None = None
    l2_bytes: int | None = None
    reduce_trips: int | None = None
    prefetch_bytes: int = 0

    @property
    def ctas(self) -> int | None:
        return math.prod(self.grid) if self.grid else None

    def compile_key(self) -> tuple:
        """What the compiler sees: two launches with equal keys run the same binary."""
        return (
            self.fn,
            self.signature,
            self.constexprs,
            self.divisible_args,
            self.num_warps,
            self.num_stages,
            self.maxnreg,
        )

    def signature_dict(self) -> dict[str, str]:
        return dict(self.signature)

    def constexpr_dict(self) -> dict[str, Any]:
        return dict(self.constexprs)

    def compile_options(self) -> dict[str, int | bool]:
        # FMA contraction stated as the launches state it (launch.LaunchConfig.launch_options).
        options = {"num_warps": self.num_warps, "num_stages": self.num_stages, "enable_fp_fusion": True}
        if self.maxnreg is not None:
            options["maxnreg"] = self.maxnreg
        if self.uses_pdl:
            options["launch_pdl"] = True
        return options

    @property
    def uses_pdl(self) -> bool:
        """Built with the USE_PDL constexpr on (what `pdl_for_arch` says for the spec's arch)."""
        return bool(self.constexpr_dict().get("USE_PDL"))

    def attrs_dict(self) -> dict[tuple[int], list[list[Any]]]:
        return {(i,): [["tt.divisibility", 16]] for i in self.divisible_args}


@dataclass
class KernelStats:
    """Resource usage of one compiled spec."""

    name: str
    config: str
    registers: int | None = None
    spill_bytes: int | None = None  # stack frame + local memory per thread (spills land there)
    shared_mem_bytes: int | None = None
    uses_wgmma: bool | None = None  # HGMMA in the SASS; None when arch < 90
    griddepcontrol: tuple[str, ...] = ()  # griddepcontrol actions in the PTX: launch_dependents, wait (PDL)
    sass: SassSummary | None = None  # main loop and the rest, counted from the SASS
    num_warps: int | None = None
    num_stages: int | None = None
    compiled_ok: bool = False
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def uses_pdl(self) -> bool:
        """The compiled kernel both lets its dependents launch early and waits for its predecessor."""
        return {"launch_dependents", "wait"} <= set(self.griddepcontrol)


def _param_names(fn) -> list[str]:
    # JITFunction and InterpretedFunction both keep the Python function in `.fn`.
    return list(inspect.signature(fn.fn).parameters)


def _do_not_specialize(fn, names: list[str]) -> set[str]:
    """Parameter names the kernel exempts from value specialization (given by name or index)."""
    listed = getattr(fn, "do_not_specialize", None) or getattr(fn, "kwargs", {}).get("do_not_specialize", ())
    return {names[item] if isinstance(item, int) else item for item in listed}


def make_spec(
    fn,
    args: dict[str, Any],
    constexprs: dict[str, Any],
    *,
    num_warps: int,
    num_stages: int,
    maxnreg: int | None = None,
    name: str,
    config: str,
    grid: tuple[int, ...] = (),
    k_steps: int | None = None,
    outer_steps: int | None = None,
    flops: int | None = None,
    min_bytes: int | None = None,
    l2_bytes: int | None = None,
    reduce_trips: int | None = None,
    prefetch_bytes: int = 0,
) -> KernelSpec:
    """Build the spec a launch `fn[grid](**args, **constexprs)` would compile.

    `args` values are tensors, `Pointer`s, ints, floats or bools; `constexprs` covers every constexpr param.
    `grid`, `k_steps`, `outer_steps`, `flops`, `min_bytes`, `l2_bytes`, `reduce_trips`, `prefetch_bytes`:
    the launch facts (see `KernelSpec`).
    """
    names = _param_names(fn)
    missing = set(names) - set(args) - set(constexprs)
    unknown = (set(args) | set(constexprs)) - set(names)
    if missing or unknown:
        raise ValueError(f"{name}: args do not match kernel params (missing {missing}, unknown {unknown})")
    unspecialized = _do_not_specialize(fn, names)
    signature, consts, divisible = [], dict(constexprs), []
    for i, pname in enumerate(names):
        if pname in constexprs:
            signature.append((pname, "constexpr"))
            continue
        value = args[pname]
        if isinstance(value, (torch.Tensor, Pointer)):
            dtype = value.dtype
            if dtype not in _TRITON_PTR_TYPES:
                raise TypeError(f"{name}: pointer {pname} has unsupported dtype {dtype}")
            signature.append((pname, _TRITON_PTR_TYPES[dtype]))
            if isinstance(value, Pointer) or value.data_ptr() % 16 == 0:
                divisible.append(i)
        elif isinstance(value, bool):
            signature.append((pname, "u1"))
        elif isinstance(value, int) and pname in unspecialized:
            signature.append((pname, "i32" if -_INT32_MAX - 1 <= value <= _INT32_MAX else "i64"))
        elif isinstance(value, int):
            if value == 1:  # Triton turns an int argument equal to 1 into a constexpr
                signature.append((pname, "constexpr"))
                consts[pname] = 1
                continue
            signature.append((pname, "i32" if -_INT32_MAX - 1 <= value <= _INT32_MAX else "i64"))
            if value % 16 == 0:
                divisible.append(i)
        elif isinstance(value, float):
            signature.append((pname, "fp32"))
        else:
            raise TypeError(f"{name}: cannot specialize argument {pname}={value!r}")
    return KernelSpec(
        fn=fn,
        signature=tuple(signature),
        constexprs=tuple((k, consts[k]) for k in names if k in consts),
        divisible_args=tuple(divisible),
        num_warps=num_warps,
        num_stages=num_stages,
        maxnreg=maxnreg,
        name=name,
        config=config,
        grid=tuple(grid),
        k_steps=k_steps,
        outer_steps=outer_steps,
        flops=flops,
        min_bytes=min_bytes,
        l2_bytes=l2_bytes,
        reduce_trips=reduce_trips,
        prefetch_bytes=prefetch_bytes if constexprs.get("USE_PDL") else 0,
    )


def _cuda_tool(name: str) -> str:
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if os.path.exists(bundled):
        return bundled
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found next to Triton's ptxas nor on PATH")
    return found


_GRIDDEPCONTROL = re.compile(r"griddepcontrol\.(\w+)")
_RES_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def compile_spec(spec: KernelSpec, arch: int) -> KernelStats:
    """Compile `spec` for compute capability `arch` (e.g. 90, 80) and report its resource usage.

    Never raises for a kernel that fails to compile: the error lands in `KernelStats.error`.
    """
    stats = KernelStats(
        name=spec.name, config=spec.config, num_warps=spec.num_warps, num_stages=spec.num_stages
    )
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        stats.error = (
            "TRITON_INTERPRET is set: kernels are interpreted and cannot be compiled in this process"
        )
        return stats
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    try:
        src = ASTSource(spec.fn, spec.signature_dict(), spec.constexpr_dict(), spec.attrs_dict())
        kernel = triton.compile(
            src,
            target=GPUTarget("cuda", arch, 32),
            options=spec.compile_options(),
        )
        cubin = kernel.asm["cubin"]
        stats.griddepcontrol = tuple(sorted(set(_GRIDDEPCONTROL.findall(kernel.asm["ptx"]))))
        stats.shared_mem_bytes = int(kernel.metadata.shared)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "kernel.cubin")
            with open(path, "wb") as f:
                f.write(cubin)
            usage = subprocess.run(
                [_cuda_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True, check=True
            ).stdout
            match = _RES_USAGE.search(usage)
            if match is None:
                raise RuntimeError(f"cannot parse cuobjdump -res-usage output:\n{usage}")
            regs, stack, shared, local = (int(g) for g in match.groups())
            stats.registers = regs
            stats.spill_bytes = stack + local
            stats.shared_mem_bytes = max(stats.shared_mem_bytes, shared)
            sass = subprocess.run(
                [_cuda_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True
            ).stdout
            if arch >= 90:
                stats.uses_wgmma = any(op in sass for op in ("HGMMA", "IGMMA", "QGMMA"))  # float, int8, fp8
            stats.sass = summarize(sass)
        stats.compiled_ok = True
    except Exception as exc:  # a report, not a crash: the caller decides what a failure means
        stats.error = f"{type(exc).__name__}: {exc}"
    return stats
