"""`fastres tune` end to end under the interpreter: candidates, gate, timing, budget, cache write and read.

The times it prints measure Triton's interpreter: the test checks that every step ran and that the
output says the times mean nothing, never what they are.
"""

from __future__ import annotations

import functools
import itertools
import re

import pytest
import torch
from e2e import calibrated

import fastres
import fastres.tuning.tuner
from fastres.cli import main
from fastres.tuning.cache import TuneCache


@pytest.mark.interpreter
@pytest.mark.slow
def test_tune_runs_every_step_under_the_interpreter(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTRES_CACHE", str(tmp_path))
    # The budget on a clock that advances one second per reading, not the wall clock: whether 3 real
    # seconds of the interpreter cover resnet18 depends on the machine and its load (an idle one
    # tuned every layer, and the budget-spent fallback went untested). With this clock the first
    # layer is searched and the budget runs out before the second, on any machine.
    readings = itertools.count()
    tune_backend = fastres.tuning.tuner.tune_backend
    monkeypatch.setattr(
        fastres.tuning.tuner, "tune_backend", functools.partial(tune_backend, clock=lambda: next(readings))
    )
    argv = ["tune", "resnet18", "--device", "cpu", "--dtype", "fp32", "--image-size", "32", "--batch", "1"]
    argv += ["--budget-s", "3", "--max-candidates", "1", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "mean nothing for a GPU" in out
    rows = re.findall(r"^(layer\S+)\s+\d+\s+(BM\S+)\s", out, re.M)
    assert rows and rows[0][0] == "layer1.0.conv1"  # per layer: the rule config beside the choice
    # The layer's verdict; interpreter times are noise, so the end-to-end check may revert the batch.
    verdicts = r"(fastest tactic|rule config is fastest|tie|slower end to end than the rules: rules kept)"
    assert re.search(rf"^layer1\.0\.conv1 .*{verdicts}", out, re.M)
    assert "budget spent: rule config kept" in out  # the fallback for the layers after the first
    # With --no-progress each layer is logged as it is chosen (a run stopped later keeps those lines).
    assert re.search(r"^tuned b1 layer1\.0\.conv1 \(\+\d+\): rule BM\S+ [\d.]+ ms, chosen ", out, re.M)
    assert re.search(r"^whole network, batch 1: rules [\d.]+ ms, tuned [\d.]+ ms", out, re.M)
    written = re.search(r"^cache: (\d+) of (\d+) choices read back", out, re.M)
    assert written and written.group(1) == written.group(2) != "0"
    cached = TuneCache(torch.device("cpu")).tactics()
    assert len(cached) == int(written.group(1)) and all(bucket == 1 for _, bucket in cached)
    options = dict(device="cpu", dtype=torch.float32, backend="triton", self_check=False)
    engine = fastres.optimize(calibrated("resnet18", 1000), **options)  # fmt: skip
    assert engine.backend.tuned == cached  # a default load (tune="cached") applies what was tuned


def test_tune_needs_a_model_unless_clearing(capsys):
    assert main(["tune"]) == 2
    assert "tune needs MODEL" in capsys.readouterr().err


@pytest.mark.slow
def test_compile_for_compiles_the_candidate_space_without_the_interpreter():
    """Re-runs itself without TRITON_INTERPRET (set by conftest) and compiles for sm_80 with ptxas."""
    argv = ["tune", "resnet18", "--compile-for", "sm_80", "--batch", "1", "--image-size", "32"]
    argv += ["--max-candidates", "1", "--no-progress"]
    assert main(argv) == 0


SPILL_PROBE = """
import torch
from fastres.kernels import ConvConfig, ConvLayer
from fastres.tuning.candidates import compile_problem
layer = ConvLayer(torch.randn(256, 256, 3, 3), None, stride=1, padding=1, dtype=torch.float16)
for warps in (4, 8):
    print(compile_problem(layer, (8, 14, 14, 256), layer.clip_config(ConvConfig(128, 256, 64, warps, 3)), 90))
"""


@pytest.mark.slow
def test_a_spilling_candidate_is_dropped_with_a_reason():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    probe = [sys.executable, "-c", SPILL_PROBE]
    done = subprocess.run(probe, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    spilled, clean = done.stdout.strip().splitlines()
    assert spilled.startswith("spills ") and "on sm_90" in spilled  # 128x256 at 4 warps: 255 registers
    assert clean == "None"  # the tile the candidate space offers: 8 warps
