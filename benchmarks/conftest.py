"""pytest setup for the benchmark suites (not part of the default `pytest` run: testpaths is tests/).

Run them explicitly: `pytest benchmarks/ --benchmark-only` (or one file). Files here are named
bench_*.py, which pytest's default pattern does not collect, so this conftest collects them.
GPU-only suites carry the `gpu` marker and skip with a reason where torch sees no CUDA GPU.
"""

import pytest
import torch


def pytest_collect_file(parent, file_path):
    # A file named on the command line is collected by pytest itself; only add the ones found by recursion.
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and not parent.session.isinitpath(file_path)
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(
        reason="needs a CUDA GPU (none visible to torch); Triton on the CPU is only the "
        "interpreter, which says nothing about speed"
    )
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
