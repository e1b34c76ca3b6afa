"""The package's shape: layers point one way and no module imports itself back through another.

Imports are read from the source (module level and inside functions alike: a lazy import still makes a
cycle that only holds by luck of ordering), so these tests need none of the optional extras.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE, KERNELS = ROOT / "fastres", ROOT / "kernels"
MAX_MODULE_LINES = 450


def _module_name(path: Path) -> str:
    if path.is_relative_to(KERNELS):
        parts = ["fastres", "kernels", *path.relative_to(KERNELS).with_suffix("").parts]
    else:
        parts = ["fastres", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    files = [*PACKAGE.rglob("*.py"), *KERNELS.rglob("*.py")]
    return {_module_name(p): p for p in files}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """fastres modules `name` imports, resolved to the most specific module that exists."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [f"{prefix}.{alias.name}" for alias in node.names] + [prefix]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    sources = _sources()
    known = set(sources)
    return {name: _imports(name, path, known) for name, path in sources.items()}


def test_import_graph_has_no_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_kernels_import_nothing_from_fastres():
    graph = _graph()
    for name, deps in graph.items():
        if name.startswith("fastres.kernels"):
            outside = sorted(d for d in deps if not d.startswith("fastres.kernels"))
            assert not outside, f"{name} imports {outside}: kernels/ must import nothing from fastres"


def test_cycle_detection_sees_a_lazy_import(tmp_path):
    # The detector itself: a function-level import back to the importer is a cycle.
    pkg = tmp_path / "fastres"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import g\n")
    known = {"fastres", "fastres.a", "fastres.b"}
    assert _imports("fastres.b", pkg / "b.py", known) == {"fastres.a"}
    assert _imports("fastres.a", pkg / "a.py", known) == {"fastres.b"}


def test_no_module_is_too_long_to_read():
    long = {
        name: n
        for name, path in _sources().items()
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them along a seam): {long}"


def test_the_engine_and_the_kernels_agree_on_dtypes():
    pytest.importorskip("triton")
    from fastres.kernels.launch import SUPPORTED_DTYPES as KERNEL_DTYPES

    from fastres.api import SUPPORTED_DTYPES

    assert SUPPORTED_DTYPES == KERNEL_DTYPES


def test_every_package_is_shipped():
    """setuptools installs only the listed packages: one left out imports from a checkout (editable
    installs find it by path) and fails from a built wheel. fastres.backends once was."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "fastres").rglob("__init__.py")
    }
    found |= {"fastres.kernels"}  # shipped from kernels/ (package-dir)
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"
