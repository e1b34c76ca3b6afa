"""`fastres compile-report`: compile every kernel a model launches for a GPU that is not here.

The Triton backend is built on the CPU with random weights (only shapes and dtypes matter), asked for
the kernel specializations one input size launches (`TritonBackend.kernel_specs`), identical ones are
merged, and each distinct one is compiled ahead of time for the requested compute capability with
`fastres.kernels.compile_spec` (ptxas ships with Triton, so no GPU and no CUDA toolkit are needed). The
report gives per kernel its registers, spill (stack + local) bytes, shared memory and, on sm_90, whether
the SASS uses wgmma, whether the kernel uses programmatic dependent launch (griddepcontrol.wait and
.launch_dependents in its PTX) and how many weight bytes one CTA prefetches into L2 before that wait
(the launch fact, shown where the SASS has L2 prefetches ahead of the wait); a kernel that fails to
compile or spills makes the exit status non-zero.

With `--estimate` the same compiled kernels feed the performance model instead (fastres.estimate,
fastres.estimate_report): an estimated time per launch on a modelled GPU, never a measurement.

Compilation needs a process in which TRITON_INTERPRET is unset (under the interpreter `@triton.jit`
gives interpreted functions that cannot be lowered); `main` runs itself in a child process without it
when it is set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..quantize import QUANTIZED_DTYPES

ARCHS = {"sm_80": 80, "sm_86": 86, "sm_89": 89, "sm_90": 90}


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def parse_arch(arch: str) -> int:
    digits = arch.lower().removeprefix("sm").lstrip("_")
    if f"sm_{digits}" not in ARCHS:
        raise ConfigError(f"unsupported --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    return ARCHS[f"sm_{digits}"]


@dataclass
class KernelReport:
    name: str
    config: str
    launches: int  # how many plan launches share this specialization
    registers: int | None
    spill_bytes: int | None
    shared_mem_bytes: int | None
    uses_wgmma: bool | None
    compile_s: float
    compiled_ok: bool
    error: str | None
    uses_pdl: bool | None = None  # griddepcontrol.wait and .launch_dependents in the PTX
    prefetch_bytes: int | None = None  # weight bytes per CTA prefetched into L2 before the wait

    @property
    def spills(self) -> bool:
        return bool(self.spill_bytes)


def _spec_key(spec) -> tuple:
    # Names differ between layers that compile to the same binary; what the compiler sees does not.
    return spec.compile_key()


def collect_specs(
    model: str,
    dtype: torch.dtype,
    batch: int,
    height: int,
    width: int,
    arch: int,
    num_classes: int = 1000,
    output_stride: int = 32,
) -> tuple[list[tuple[Any, int]], int]:
    """Distinct kernel specs this model launches, each with its launch count, and the total launches.

    output_stride 16 or 8: the dilated network (layer4, or layer3 and layer4, dilated)."""
    from ..backends.triton_backend import TritonBackend
    from ..planner import plan_resnet
    from ..reference import build_resnet
    from ..specs import get_spec

    spec = get_spec(model).with_dilation(output_stride=output_stride)
    torch.manual_seed(0)
    state_dict = build_resnet(spec, num_classes).state_dict()
    plan = plan_resnet(spec, num_classes, state_dict)
    # Built directly: fastres.load refuses triton on the CPU, but building specs touches no GPU.
    # int8 / fp8: scales from two random images; they change no kernel, only its arguments.
    if dtype in QUANTIZED_DTYPES:
        from ..backends.triton_int8 import TritonInt8Backend
        from ..testing import random_images

        if dtype == torch.float8_e4m3fn and arch < 89:
            raise ConfigError(f"fp8 compiles for sm_89 and later (e4m3 tensor cores), not sm_{arch}")
        backend = TritonInt8Backend(
            plan, "cpu", dtype, calibration=random_images(2, 64, 64), model_name=model, weights_sha256=""
        )
    else:
        backend = TritonBackend(plan, "cpu", dtype)
    specs = backend.kernel_specs(batch, height, width, arch)
    distinct: dict[tuple, list] = {}
    for s in specs:
        distinct.setdefault(_spec_key(s), [s, 0])[1] += 1
    # uint8 pixels swap in a stem variant of their own: compiled and checked too, not an extra launch.
    for s in backend.kernel_specs(batch, height, width, arch, input_dtype=torch.uint8):
        distinct.setdefault(_spec_key(s), [s, 0])
    return [(s, n) for s, n in distinct.values()], len(specs)


_EPILOGUE_FLAGS = {"HAS_SHORTCUT": "shortcut", "HAS_RESIDUAL": "residual", "APPLY_RELU": "relu"}


def _variant(spec) -> str:
    """Epilogue switches, so two layers with the same shape but different epilogues read apart."""
    flags = [label for key, label in _EPILOGUE_FLAGS.items() if spec.constexpr_dict().get(key)]
    return f" +{'+'.join(flags)}" if flags else ""


def compile_all(specs: list[tuple[Any, int]], arch: int, progress: bool = True) -> list[KernelReport]:
    from ..kernels import compile_spec
    from ..progress import Progress

    reports = []
    bar = Progress(len(specs), f"compiling for sm_{arch}", progress)
    try:
        for spec, launches in specs:
            start = time.perf_counter()
            st = compile_spec(spec, arch)
            reports.append(
                KernelReport(
                    st.name + _variant(spec),
                    st.config,
                    launches,
                    st.registers,
                    st.spill_bytes,
                    st.shared_mem_bytes,
                    st.uses_wgmma,
                    time.perf_counter() - start,
                    st.compiled_ok,
                    st.error,
                    st.uses_pdl if st.compiled_ok else None,
                    _prefetched(spec, st),
                )
            )
            bar.update()
    finally:
        bar.close()
    return reports


def _prefetched(spec, stats) -> int | None:
    """The spec's prefetch bytes where the compiled code prefetches before its gdc_wait, else 0."""
    if not stats.compiled_ok or stats.sass is None:
        return None
    return spec.prefetch_bytes if stats.sass.gdc_wait and stats.sass.l2_prefetches_before_wait else 0


def format_report(reports: list[KernelReport], arch: int, launches: int, total_s: float) -> str:
    show_wgmma = arch >= 90
    header = ["kernel", "config", "uses", "regs", "spill B", "smem KiB"] + (["wgmma"] if show_wgmma else [])
    header += ["PDL", "pf KiB/CTA"]
    header += ["compile s", "status"]
    rows = []
    for r in reports:
        status = (
            "ok" if r.compiled_ok and not r.spills else ("SPILLS" if r.compiled_ok else f"FAILED: {r.error}")
        )
        row = [
            r.name,
            r.config,
            str(r.launches),
            _s(r.registers),
            _s(r.spill_bytes),
            "-" if r.shared_mem_bytes is None else f"{r.shared_mem_bytes / 1024:.1f}",
        ]
        if show_wgmma:
            row.append("-" if r.uses_wgmma is None else ("yes" if r.uses_wgmma else "no"))
        row.append("-" if r.uses_pdl is None else ("yes" if r.uses_pdl else "no"))
        row.append("-" if r.prefetch_bytes is None else f"{r.prefetch_bytes / 1024:.1f}")
        rows.append(row + [f"{r.compile_s:.2f}", status])
    widths = [max(len(x[i]) for x in [header, *rows]) for i in range(len(header) - 1)]
    line = lambda x: "  ".join(
        [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(x[:-1], widths, strict=True))]
        + [x[-1]]
    ).rstrip()
    failed = sum(not r.compiled_ok for r in reports)
    spilled = sum(r.compiled_ok and r.spills for r in reports)
    out = [line(header), line(["-" * w for w in widths] + [""]), *map(line, rows), ""]
    pdl = sum(bool(r.uses_pdl) for r in reports)
    out.append(f"programmatic dependent launch (griddepcontrol in the PTX): {pdl} of {len(reports)} kernels")
    out.append(
        f"distinct kernels compiled: {len(reports) - failed} of {len(reports)} "
        f"({launches} launches per forward pass); failed: {failed}; spilling: {spilled}"
    )
    out.append(f"total compile time: {total_s:.1f} s (kernels already in Triton's on-disk cache take ~0 s)")
    return "\n".join(out)


def _s(v: Any) -> str:
    return "-" if v is None else str(v)


def run(
    model: str,
    arch: str,
    dtype: torch.dtype,
    batch: int = 8,
    image_size: int = 224,
    out_dir: str | None = None,
    progress: bool = True,
    output_stride: int = 32,
) -> int:
    """Print the report; 0 when every kernel compiled without spills, 1 otherwise."""
    arch_num = parse_arch(arch)
    if batch < 1 or image_size < 32:
        raise ConfigError(f"need --batch >= 1 and --image-size >= 32, got {batch} and {image_size}")
    if interpreter_enabled():
        raise RuntimeError(
            "compile-report cannot compile under TRITON_INTERPRET; use main(), which re-runs "
            "itself without it"
        )
    dtype_name = str(dtype).replace("torch.", "")
    dilated = f" output stride {output_stride}" if output_stride != 32 else ""
    print(
        f"{model}{dilated} {dtype_name}, input {batch}x3x{image_size}x{image_size}, compiled for "
        f"sm_{arch_num} (no GPU needed)",
        flush=True,
    )
    specs, launches = collect_specs(
        model, dtype, batch, image_size, image_size, arch_num, output_stride=output_stride
    )
    start = time.perf_counter()
    reports = compile_all(specs, arch_num, progress)
    total = time.perf_counter() - start
    if out_dir is not None:
        from .environment import environment

        path = Path(out_dir)
        path.mkdir(parents=True, exist_ok=True)
        stride = f"_os{output_stride}" if dilated else ""
        file = path / f"compile_report_{model}{stride}_sm{arch_num}_{dtype_name}.json"
        record = {
            **environment(torch.device("cpu")),
            "model": model,
            "arch": f"sm_{arch_num}",
            "dtype": dtype_name,
            "batch": batch,
            "image_size": image_size,
            "output_stride": output_stride,
            "total_compile_s": total,
            "kernels": [asdict(r) for r in reports],
        }
        file.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {file}")
    print(format_report(reports, arch_num, launches, total))  # totals last
    ok = all(r.compiled_ok and not r.spills for r in reports)
    return 0 if ok else 1


def rerun_without_interpreter(argv: list[str]) -> int:
    """Run `python -m fastres <argv>` in a child process with TRITON_INTERPRET removed; its exit code."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    print(
        "fastres: TRITON_INTERPRET is set in this process; compiling in a child process without it",
        file=sys.stderr,
        flush=True,
    )
    return subprocess.run([sys.executable, "-m", "fastres", *argv], env=env).returncode
