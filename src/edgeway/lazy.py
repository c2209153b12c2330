"""Package re-exports loaded on first use (PEP 562).

A package whose ``__init__`` imports its submodules makes every import of any
submodule load them all: importing ``edgeway.outbox.config`` (a section model
the root schema needs) would load the whole outbox, and the outbox imports the
schema back. With :func:`lazy_exports` the package's names are imported when
first read, so a configuration module can live inside its component's package
without the schema loading the component.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_exports(package: str, where: Mapping[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` that imports ``name`` from the submodule
    ``where[name]`` (relative to ``package``) the first time it is read."""

    def __getattr__(name: str) -> object:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    return __getattr__
