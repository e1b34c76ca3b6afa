"""Test-session setup.

Without a GPU, Triton kernels run under Triton's interpreter. TRITON_INTERPRET must be set before
triton is first imported, so it is decided here, before any test module is collected.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


# On CUDA the first-use self-check moves drifting layers to cuDNN (or the engine to the torch backend)
# with only a warning, which would hide a Triton bug from the GPU tests: there it is an error. A test
# that expects the warning catches it with pytest.warns, which overrides this filter inside its block.
SELF_CHECK_IS_AN_ERROR = pytest.mark.filterwarnings("error::fastres.tuning.selfcheck.SelfCheckWarning")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none visible to torch)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(SELF_CHECK_IS_AN_ERROR if HAS_CUDA else skip_gpu)


@pytest.fixture(autouse=True)
def _no_tf32():
    """Parity tests compare against IEEE fp32: TF32 is off inside each test, restored after."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
