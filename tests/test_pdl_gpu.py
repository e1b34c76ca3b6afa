"""PDL on a real sm_90 GPU: a plan captured into a CUDA graph with programmatic launches, replayed on fresh
inputs, bitwise equal to the same plan launched without PDL and within bounds of the torch backend."""

import ctypes

import pytest
import torch
from e2e import assert_parity, calibrated
from fastres.kernels.pdl import PDL_ENV

import fastres
from fastres.testing import random_images

pytestmark = pytest.mark.gpu


def _programmatic_edges(graph: torch.cuda.CUDAGraph) -> int | None:
    """Edges of the captured graph whose type is programmatic (cuGraphGetEdges_v2), None if unreadable."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        get_edges = cuda.cuGraphGetEdges_v2
    except (OSError, AttributeError):
        return None
    raw = ctypes.c_void_p(graph.raw_cuda_graph())
    count = ctypes.c_size_t(0)
    if get_edges(raw, None, None, None, ctypes.byref(count)) != 0:
        return None
    nodes = (ctypes.c_void_p * count.value)
    data = (ctypes.c_uint8 * (8 * count.value))()  # CUgraphEdgeData: from_port, to_port, type, 5 reserved
    if get_edges(raw, nodes(), nodes(), data, ctypes.byref(count)) != 0:
        return None
    return sum(data[8 * i + 2] == 1 for i in range(count.value))  # CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC


def test_pdl_graph_replays_bitwise_equal_to_launches_without_pdl(monkeypatch):
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90 or later")
    model = calibrated("resnet18", 10)
    inputs = [random_images(2, 64, 64, seed=70 + i).cuda().half() for i in range(6)]
    monkeypatch.setenv(PDL_ENV, "0")
    plain = fastres.optimize(model, device="cuda", backend="triton", cuda_graphs=False)
    without = [plain(x) for x in inputs]
    monkeypatch.setenv(PDL_ENV, "1")
    backend_engine = fastres.optimize(model, device="cuda", backend="triton", cuda_graphs=False)
    backend = backend_engine.backend
    static = inputs[0].clone()
    workspace = backend.make_workspace(2, 64, 64)
    backend.run(static, workspace)  # warm-up: compiles, allocates nothing later
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph(keep_graph=True)
    except TypeError:
        graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = backend.run(static, workspace)
    edges = _programmatic_edges(graph) if hasattr(graph, "raw_cuda_graph") else None
    if edges is not None:
        assert edges > 0, "no programmatic edge survived the capture"
    for _ in range(3):
        for x, expected in zip(inputs, without, strict=True):
            static.copy_(x)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(logits, expected), "PDL graph replay differs from launches without PDL"
    # Within the team's bound of eager's own error against float64 (tests/e2e.py), with PDL on.
    assert_parity(backend_engine, model, random_images(2, 64, 64, seed=9), torch.float16, device="cuda")
