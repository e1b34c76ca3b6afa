"""The int8 and fp8 engines on a real GPU, at a batch where the rule table picks its "large" 8-bit config
(on sm_90 two warpgroups, BM128_BN128_BK64_w8_s3, which the interpreter cannot exercise: it ignores
num_warps): its error against the float64 model held to the error of the same quantized arithmetic
simulated on the CPU (quantize.simulate_int8), as float engines are held to eager's own error."""

import copy

import pytest
import torch
from e2e import calibrated
from fastres.kernels.conv_configs import device_arch

import fastres
from fastres.quantize import FP8, INT8, simulate_int8
from fastres.testing import random_images

pytestmark = pytest.mark.gpu

# The engine and the simulation round differently (its fp16 stem and head, fp32 epilogues: a code one
# step apart at a tie, compounding over depth), so on a random-weight net the two stray from each other
# about as far as either strays from float64 (under the interpreter, resnet18 at 32 px: engine/simulation
# error ratio 0.9 for int8, 1.04 for fp8). Twice the simulation's error is the bound, as for float.
MAX_ERROR_RATIO = 2.0


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_quantized_engine_on_the_gpu_matches_its_simulation(dtype):
    fmt = {"int8": INT8, "fp8": FP8}[dtype]
    if dtype == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs sm_89+")
    model = calibrated("resnet18", 10)
    calibration = random_images(16, 128, 128, seed=3)
    engine = fastres.optimize(model, device="cuda", dtype=dtype, backend="triton", calibration=calibration)
    batch, size = 32, 128
    arch = device_arch(torch.device("cuda"))
    configs = {spec.config for spec in engine.backend.kernel_specs(batch, size, size, arch)}
    if arch >= 90:
        assert any("_w8_" in c for c in configs), configs  # the two-warpgroup config is what runs
    x = random_images(batch, size, size, seed=4)
    with torch.inference_mode():
        logits = engine(x.cuda()).cpu().double()
        simulated = simulate_int8(engine.plan, engine.backend.scales, x.float(), fmt=fmt).double()
        reference = copy.deepcopy(model).double()(x.double())  # the cached model stays float32
    assert torch.isfinite(logits).all()
    ours, simulation = ((t - reference).abs().max().item() for t in (logits, simulated))
    assert ours <= MAX_ERROR_RATIO * simulation, f"{dtype}: error {ours:.4g}, simulated {simulation:.4g}"
