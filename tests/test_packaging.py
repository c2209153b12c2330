"""What the package declares matches what it ships and uses."""

from __future__ import annotations

import ast
import re
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _top_level_imports(src: Path) -> set[str]:
    names: set[str] = set()
    for path in src.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def test_license_file_is_the_one_pyproject_names() -> None:
    project = _pyproject()["project"]
    assert isinstance(project, dict)
    assert project["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text


def test_every_runtime_dependency_is_imported_by_edgeway() -> None:
    # A runtime dependency edgeway's own code never imports costs every
    # installation a download (httpx was one: only the tests use it).
    project = _pyproject()["project"]
    assert isinstance(project, dict)
    dist_of: dict[str, set[str]] = {}
    for module, dists in packages_distributions().items():
        for dist in dists:
            dist_of.setdefault(dist.lower().replace("_", "-"), set()).add(module)
    imported = _top_level_imports(ROOT / "src" / "edgeway")
    unused = []
    for requirement in project["dependencies"]:
        name = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        modules = dist_of.get(name)
        assert modules, f"{name} is not installed in this environment"
        if not modules & imported:
            unused.append(name)
    assert unused == [], f"runtime dependencies edgeway never imports: {unused}"
