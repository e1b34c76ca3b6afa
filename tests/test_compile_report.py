"""`fastres compile-report`: ahead-of-time compilation for a GPU that is not here, in a child process.

The test session runs with TRITON_INTERPRET=1 on machines without a GPU (tests/conftest.py), and kernels
cannot be compiled under the interpreter, so the report runs in a subprocess with the variable removed.
"""

import os
import subprocess
import sys

import pytest

from fastres.tools.compile_report import parse_arch


def _env_without_interpreter():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _report(dtype: str, image_size: int, env: dict, *extra: str, model: str = "resnet18",
            arch: str = "sm_80") -> subprocess.CompletedProcess:  # fmt: skip
    """`fastres compile-report MODEL --arch ARCH` at batch 1 in a child process."""
    cmd = [sys.executable, "-m", "fastres", "compile-report", model, "--arch", arch, "--dtype", dtype,
           "--batch", "1", "--image-size", str(image_size), "--no-progress", *extra]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize(
    "text, arch",
    [
        pytest.param("sm_90", 90, id="sm_90"),
        pytest.param("sm80", 80, id="sm80"),
        pytest.param("SM_90", 90, id="upper"),
    ],
)
def test_parse_arch(text, arch):
    assert parse_arch(text) == arch


def test_parse_arch_rejects_unknown():
    with pytest.raises(ValueError, match="sm_90"):
        parse_arch("sm_70")


def test_small_report_compiles_without_spills(tmp_path):
    done = _report("fp16", 64, _env_without_interpreter(), "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[-2].startswith("distinct kernels compiled: ") and "failed: 0; spilling: 0" in lines[-2]
    assert lines[-1].startswith("total compile time: ")
    # The stem reads float and uint8 images: both variants are compiled.
    assert "stem7x7_s2_3to64" in done.stdout and "uint8tofloat16" in done.stdout and "head_" in done.stdout
    assert list(tmp_path.glob("compile_report_resnet18_sm80_float16.json"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "model, dtype",
    [
        # fp32 split-K 3x3 residual+ReLU convs spilled on sm_90 (issue 18); bf16 has its own binaries.
        pytest.param("resnet34", "fp32", id="resnet34-fp32"),
        pytest.param("resnet18", "bf16", id="resnet18-bf16"),
    ],
)
def test_batch1_sm90_report_has_no_spills(model, dtype):
    """At 224 px and batch 1 the late layers split K and run the fused reduction: no kernel spills."""
    done = _report(dtype, 224, _env_without_interpreter(), model=model, arch="sm_90")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "_k" in done.stdout  # some kernel splits K (its config ends in _k<split>)
    assert "failed: 0; spilling: 0" in done.stdout.strip().splitlines()[-2]


def test_report_reruns_itself_without_the_interpreter(tmp_path):
    done = _report("fp32", 32, {**_env_without_interpreter(), "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "TRITON_INTERPRET is set" in done.stderr and "distinct kernels compiled" in done.stdout
