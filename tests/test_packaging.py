"""What the package declares matches what it ships and uses."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

from edgeway.extras import OptionalLibrary

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _top_level_imports(src: Path) -> set[str]:
    names: set[str] = set()
    for path in src.rglob("*.py"):
        names |= _top_level_imports_of(path)
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


def _extras() -> dict[str, list[str]]:
    project = _pyproject()["project"]
    assert isinstance(project, dict)
    extras = project["optional-dependencies"]
    assert isinstance(extras, dict)
    return extras


def _dist_name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


# Modules that come with a declared distribution as part of it (pydantic pins
# its own pydantic-core exactly; declaring it too could only conflict).
_PART_OF = {"pydantic-core": "pydantic"}


def test_every_third_party_import_is_declared() -> None:
    # An import of a library that only another package (or the test extra)
    # brings works on this machine and fails on a user's (paho-mqtt was one).
    project = _pyproject()["project"]
    assert isinstance(project, dict)
    runtime = {_dist_name(r) for r in project["dependencies"]}
    for name in ("sinks", "protocols", "ble", "ml"):
        runtime |= {_dist_name(r) for r in _extras()[name]}
    dists = packages_distributions()
    undeclared = {}
    for module in _top_level_imports(ROOT / "src" / "edgeway"):
        if module in sys.stdlib_module_names or module == "edgeway":
            continue
        names = {d.lower().replace("_", "-") for d in dists.get(module, [])}
        names = {_PART_OF.get(n, n) for n in names}
        assert names, f"{module} is imported but not installed here"
        if not names & runtime:
            undeclared[module] = sorted(names)
    assert undeclared == {}, (
        f"imported, not in dependencies or sinks/protocols/ble/ml: {undeclared}"
    )


def _optional_libraries() -> list[tuple[str, OptionalLibrary]]:
    """(the module that imports it, the library) for every optional library."""
    from edgeway.sinks.amqp import AmqpSink
    from edgeway.sinks.nats import NatsSink
    from edgeway.sinks.postgres import PostgresSink
    from edgeway.south import SECTION_LIBRARIES, SECTION_MODULES

    out = [(f"south/{SECTION_MODULES[s]}.py", lib) for s, lib in SECTION_LIBRARIES.items()]
    out += [
        ("sinks/amqp.py", AmqpSink.library),
        ("sinks/nats.py", NatsSink.library),
        ("sinks/postgres.py", PostgresSink.library),
    ]
    return out


def test_every_optional_library_is_used_and_in_its_extra() -> None:
    # A stale entry refuses a working configuration: mqtt_client once asked
    # for paho-mqtt after it had moved to edgeway's own MQTT codec.
    for module, lib in _optional_libraries():
        imported = _top_level_imports_of(ROOT / "src" / "edgeway" / module)
        assert lib.module in imported, f"{module} never imports {lib.module}"
        extra = {_dist_name(r) for r in _extras()[lib.extra]}
        assert lib.package.lower() in extra, f"{lib.package} is not in the {lib.extra} extra"


def _top_level_imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names
