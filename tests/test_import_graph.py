"""The module import graph: no cycles, and the configuration schema loads no component.

A cycle among modules works until someone imports them in another order (then a
name is missing from a half-initialised module); it also means the two cannot be
understood or tested apart. The graph is built from the source with ``ast``:
module-level imports only, since an import under ``if TYPE_CHECKING`` never runs
and one inside a function runs after every module finished loading.
"""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "edgeway"


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported_names(body: list[ast.stmt], package: str) -> list[str]:
    """Dotted names imported by the statements that run when the module loads
    (``from a import b`` gives ``a.b``: a submodule when ``b`` is one)."""
    out: list[str] = []
    for node in body:
        match node:
            case ast.If(test=test, body=then, orelse=orelse):
                if not _is_type_checking(test):
                    out += _imported_names(then, package)
                out += _imported_names(orelse, package)
            case ast.Try(body=tried, handlers=handlers, orelse=orelse, finalbody=final):
                out += _imported_names([*tried, *orelse, *final], package)
                for handler in handlers:
                    out += _imported_names(handler.body, package)
            case ast.Import(names=names):
                out += [a.name for a in names]
            case ast.ImportFrom(module=module, names=names, level=level):
                base = module or ""
                if level:
                    up = package.split(".")[: len(package.split(".")) - level + 1]
                    base = ".".join([*up, *([module] if module else [])])
                out += [base] + [f"{base}.{a.name}" for a in names]
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the edgeway modules it imports at load time, including the
    packages above them (importing ``a.b.c`` runs ``a/b/__init__.py``), except
    its own packages (always initialised before it)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
        edges: set[str] = set()
        for target in _imported_names(ast.parse(path.read_text("utf-8")).body, package):
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix in modules:
                    edges.add(prefix)
        graph[name] = edges - own
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component: list[str] = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_among_edgeway_modules() -> None:
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_module_level_imports_only() -> None:
    body = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "import edgeway.reading\n"
        "from edgeway.south import base\n"
        "if TYPE_CHECKING:\n    import edgeway.gateway\n"
        "def f():\n    import edgeway.cli\n"
        "try:\n    import edgeway.limits\nexcept ImportError:\n    pass\n"
    ).body
    names = _imported_names(body, "edgeway")
    assert "edgeway.reading" in names and "edgeway.south.base" in names
    assert "edgeway.limits" in names
    assert "edgeway.gateway" not in names and "edgeway.cli" not in names


LEAVES = {"edgeway", "edgeway.limits", "edgeway.reading", "edgeway.lazy", "edgeway.extras"}
"""Modules the schema may load besides packages and configuration modules:
value types with no component behind them."""


def test_the_configuration_schema_loads_no_component_code() -> None:
    # A fresh interpreter: what importing edgeway.config really loads.
    code = "import sys, edgeway.config; print(*sorted(m for m in sys.modules if 'edgeway' in m))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(SRC)},
        timeout=60,
    ).stdout.split()
    modules = _modules()
    assert "edgeway.config" in out
    for name in out:
        is_package = name not in modules or modules[name].name == "__init__.py"  # or namespace
        is_config = name.endswith(("config", "_config", "config_types"))
        assert is_package or is_config or name in LEAVES, f"edgeway.config loads {name}"


@pytest.mark.parametrize("package", ["edgeway.outbox", "edgeway.pipeline"])
def test_lazy_package_exports_resolve(package: str) -> None:
    """Each name a package re-exports lazily (edgeway/lazy.py) resolves, and
    an unknown name is still an AttributeError."""
    module = importlib.import_module(package)
    for name in module.__all__:
        assert getattr(module, name) is not None, name
    with pytest.raises(AttributeError):
        _ = module.no_such_name
