"""int8 and fp8 on the Triton path for the family's variants: ResNet-D (deep stem, pooled projections)
and dilated ResNets (output stride 8), under the interpreter.

Each engine is checked op by op against `simulate_int8`, the quantized arithmetic run on the torch
backend, teacher-forced: every simulated op reads the engine's own output of the ops before it, so
each op is judged on its own inputs (a code flipped upstream by the fp16 stem cannot blur a layer's
check). An 8-bit output then equals the simulation's code for code, but where fp32 rounding meets a
tie (at most one step); a floating-point output (the stem convs, the last conv, the head) is within
the fp16 layer bound. End to end, the engine's logits are compared with float64 as the simulation's
are.
"""

from __future__ import annotations

import pytest
import torch
from fastres.kernels import ConvLayer
from fastres.kernels.conv_int8 import Int8ConvLayer
from test_dilation import SMALL, dilated_model
from test_resnetd import ODD, TINY_D

import fastres
from fastres.numerics import LAYER_RTOL, relative_error
from fastres.quantize import FP8, INT8, simulate_int8
from fastres.testing import make_calibrated_model, random_images

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FORMATS = {"int8": INT8, "fp8": FP8}
CASES = [
    pytest.param("basic", "int8", id="resnet-d-basic-int8"),  # the standalone pooled 1x1 s2 conv
    pytest.param("bottleneck", "int8", id="resnet-d-bottleneck-int8"),  # the K-concatenated pooled one
    pytest.param("basic", "fp8", id="resnet-d-basic-fp8"),
    pytest.param("bottleneck", "fp8", id="resnet-d-bottleneck-fp8"),
]
MIN_EQUAL_CODES = 0.99  # the share of an 8-bit output on the very code of the simulation


def code_index(values: torch.Tensor, scale: float, fmt) -> torch.Tensor:
    """The position of each value on the format's grid (int8: the code; e4m3: its ordinal, sign-magnitude
    bits made monotonic), so that |index difference| counts steps."""
    v = fmt.round(values.double() / scale)
    if fmt is INT8:
        return v.to(torch.int64)
    bits = v.to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int64)
    return torch.where(bits >= 128, -(bits - 128), bits)


def assert_ops_match_the_simulation(engine, x: torch.Tensor, fmt) -> None:
    backend, plan = engine.backend, engine.plan
    producer = {op.name: op.output for op in plan.ops}
    ours: dict[str, torch.Tensor] = {}
    workspace = backend.make_workspace(x.shape[0], x.shape[2], x.shape[3])
    with torch.inference_mode():
        backend.run(x.to(DEVICE, backend.input_float_dtype), workspace, observer=lambda n, t: ours.update({n: t.float().cpu()}))  # noqa: E501
    checked: list[str] = []

    def teacher_forced(name: str, simulated: torch.Tensor) -> None:
        mine, scale = ours[name], backend.scales.get(producer[name])
        if scale is None:
            assert relative_error(mine, simulated) <= LAYER_RTOL[torch.float16], name
        else:
            steps = (code_index(mine, scale, fmt) - code_index(simulated, scale, fmt)).abs()
            assert steps.max() <= 1, f"{name}: {int((steps > 1).sum())} values more than one step apart"
            assert (steps == 0).double().mean() >= MIN_EQUAL_CODES, name
        checked.append(name)
        simulated.copy_(mine)  # the next ops read what the engine's next ops read

    with torch.inference_mode():
        simulate_int8(plan, backend.scales, x, observer=teacher_forced, fmt=fmt)
    assert checked == [op.name for op in plan.ops]


def assert_end_to_end(engine, model, x: torch.Tensor, fmt) -> None:
    with torch.inference_mode():
        logits = engine(x.to(DEVICE)).cpu()
        reference = model.double()(x.double()).float()
        simulated = simulate_int8(engine.plan, engine.backend.scales, x, fmt=fmt)
    assert torch.isfinite(logits).all()
    # The fp16 stem flips a few codes that the simulation (fp32) does not, and each flip travels on:
    # the engine is then as far from float64 as its simulation, not equal to it.
    assert relative_error(logits, reference) <= 2 * relative_error(simulated, reference)


@pytest.mark.interpreter
@pytest.mark.parametrize("block, dtype", CASES)
def test_8bit_resnet_d_matches_its_simulation(block, dtype):
    model = make_calibrated_model(TINY_D[block], 10, calibration_images=4, image_size=48)
    calibration = random_images(8, *ODD, seed=5)
    engine = fastres.optimize(model, device=DEVICE, dtype=dtype, backend="triton", calibration=calibration)
    layers = engine.backend.layers
    # The deep stem's 2nd and 3rd convs stay fp16, up to the max-pool that quantizes; the rest is 8-bit.
    float_convs = [n for n, layer in layers.items() if type(layer) is ConvLayer]
    assert float_convs == ["conv1.3", "conv1.6"]
    pooled = [n for n, layer in layers.items() if isinstance(layer, Int8ConvLayer) and layer.avg_pool]
    assert len(pooled) == 3
    x = random_images(2, *ODD, seed=8)
    assert_ops_match_the_simulation(engine, x, FORMATS[dtype])
    assert_end_to_end(engine, model, x, FORMATS[dtype])


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_8bit_dilated_resnet_matches_its_simulation(dtype):
    model = dilated_model(SMALL, 8)
    calibration = random_images(8, 45, 61, seed=5)
    engine = fastres.optimize(model, device=DEVICE, dtype=dtype, backend="triton", calibration=calibration)
    layers = engine.backend.layers.values()
    assert {layer.dilation for layer in layers if isinstance(layer, Int8ConvLayer)} == {1, 2, 4}
    x = random_images(2, 45, 61, seed=46)
    assert_ops_match_the_simulation(engine, x, FORMATS[dtype])
    assert_end_to_end(engine, model, x, FORMATS[dtype])
