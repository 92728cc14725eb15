"""The package's import graph (tools/module_graph.py): layers pointing down, no cycles, adapters on top."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ADAPTERS = {"lightning_trt_rtx.callbacks", "lightning_trt_rtx.plugin", "lightning_trt_rtx.__main__"}


@pytest.fixture(scope="module")
def module_graph():
    spec = importlib.util.spec_from_file_location("module_graph", ROOT / "tools" / "module_graph.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["module_graph"] = module  # dataclasses look their module up by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules["module_graph"]


def test_the_package_has_no_import_cycles_and_no_part_imports_an_adapter(module_graph):
    graph = module_graph.build(ROOT / "lightning_trt_rtx")
    assert "lightning_trt_rtx.session" in graph.lines and "lightning_trt_rtx.callbacks" in graph.imports
    assert graph.cycles == []
    # nor as a type checker sees it (prewarm types what it needs of a session with a Protocol of its own)
    assert module_graph.build(ROOT / "lightning_trt_rtx", types=True).cycles == []
    for adapter in ADAPTERS:
        importers = graph.importers(adapter) | {m for m, deps in graph.type_only.items() if adapter in deps}
        # the package's __init__ names the public classes (type-only: they are imported on first use)
        assert importers <= ADAPTERS | {"lightning_trt_rtx"}, f"{adapter} is imported by {sorted(importers)}"
    # the session sits above every part it drives, the backend at the bottom
    assert graph.layers["lightning_trt_rtx._backend"] == 0
    for adapter in ADAPTERS - {"lightning_trt_rtx.__main__"}:
        assert graph.layers[adapter] > graph.layers["lightning_trt_rtx.session"]
    assert "lightning_trt_rtx.session" in graph.imports["lightning_trt_rtx.callbacks"]


def test_cycles_layers_and_type_only_imports_are_read_from_the_source(module_graph, tmp_path, capsys):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("from pkg import low\n")
    (package / "low.py").write_text("import os\n")
    (package / "a.py").write_text("from pkg import low\n\ndef later():\n    from pkg.b import thing\n")
    (package / "b.py").write_text("from . import a\nthing = 1\n")
    (package / "c.py").write_text(
        "from typing import TYPE_CHECKING\nimport pkg.b\nif TYPE_CHECKING:\n    from pkg.top import Top\n"
    )
    (package / "top.py").write_text("from pkg.c import x\n")
    graph = module_graph.build(package)
    assert graph.cycles == [["pkg.a", "pkg.b"]]  # a function's import runs too
    assert graph.imports["pkg.c"] == {"pkg.b"} and graph.type_only["pkg.c"] == {"pkg.top"}
    assert graph.imports["pkg"] == {"pkg.low"}  # ``from pkg import low`` is low, not the package itself
    assert graph.layers == {"pkg.low": 0, "pkg": 1, "pkg.a": 1, "pkg.b": 1, "pkg.c": 2, "pkg.top": 3}
    assert graph.lines["pkg.c"] == 4
    assert module_graph.main([str(package)]) == 0
    out = capsys.readouterr().out
    assert "import cycles (1):\n  a <-> b" in out and "6 modules, 13 lines, 4 layers" in out
    assert module_graph.main([str(tmp_path)]) == 2  # not a package
    # as a type checker sees it, c's type-only import of top (which imports c) is a cycle too
    assert module_graph.build(package, types=True).cycles == [["pkg.a", "pkg.b"], ["pkg.c", "pkg.top"]]
    assert module_graph.main(["--types", str(package)]) == 0
    assert "import cycles (2):\n  a <-> b\n  c <-> top" in capsys.readouterr().out
