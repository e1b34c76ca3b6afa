"""`fastres tune MODEL --compile-for sm_90`: compile a model's whole candidate space ahead of time.

On the device the tuner compiles each Triton tactic for the device's own arch first and drops those that
fail or spill, so nothing it picks spills there. This answers the same question without a GPU, for a
named arch: every distinct kernel binary the candidate space can launch for this model, input size and
batches (kernels/aot.py builds exactly the specs a launch would compile; identical ones are merged),
compiled, with the ones that fail or spill listed. Needs a process without TRITON_INTERPRET.
"""

from __future__ import annotations

import torch

from ..progress import Progress


def candidate_specs(backend, batches, height: int, width: int, arch: int, max_candidates=None) -> list:
    """[(spec, what)] for every distinct binary of every conv's candidate space (cuDNN excluded)."""
    from .candidates import candidate_space

    distinct: dict = {}
    for batch in batches:
        seen = set()
        for name, (signature, shape) in backend.conv_inputs(batch, height, width).items():
            if signature in seen:
                continue
            seen.add(signature)
            layer = backend.layers[name]
            space = candidate_space(layer, shape, arch, 132, max_candidates=max_candidates, cudnn=False)
            for tactic in space.tactics:
                for spec in layer.aot_specs(shape, arch, tactic.config):
                    distinct.setdefault(spec.compile_key(), (spec, f"{name} b{batch} {tactic.label}"))
    return list(distinct.values())


def run(
    model: str, dtype: torch.dtype, arch: int, batches, size: int, max_candidates=None, progress=True
) -> int:
    """Print what fails or spills; 0 when nothing does, 1 otherwise."""
    from ..backends.triton_backend import TritonBackend
    from ..kernels import compile_spec
    from ..planner import plan_resnet
    from ..reference import build_resnet
    from ..specs import get_spec

    spec = get_spec(model)
    torch.manual_seed(0)
    plan = plan_resnet(spec, 1000, build_resnet(spec, 1000).state_dict())
    backend = TritonBackend(plan, "cpu", dtype)  # shapes and dtypes are all a compile needs
    specs = candidate_specs(backend, batches, size, size, arch, max_candidates)
    dtype_name = str(dtype).replace("torch.", "")
    print(
        f"{model} {dtype_name} at {size}x{size}, batches {' '.join(map(str, batches))}: "
        f"{len(specs)} distinct kernels in the candidate space, compiling for sm_{arch}",
        flush=True,
    )
    bad = []
    bar = Progress(len(specs), f"compiling for sm_{arch}", progress)
    try:
        for kernel, what in specs:
            stats = compile_spec(kernel, arch)
            problem = None
            if not stats.compiled_ok:
                problem = f"FAILED  {what}: {stats.error}"
            elif stats.spill_bytes:
                problem = f"SPILLS  {what}: {stats.spill_bytes} B, {stats.registers} registers"
            if problem:  # as found: a long sweep that is stopped still says what it saw
                bad.append(problem)
                print(problem, flush=True)
            bar.update()
    finally:
        bar.close()
    if not bad:
        print("every candidate compiled with 0 spills")
    print(f"{len(specs) - len(bad)} of {len(specs)} kernels clean on sm_{arch}")
    return 1 if bad else 0
