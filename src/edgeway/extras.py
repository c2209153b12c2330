"""Optional dependencies: which pip extra brings the library a component needs.

Components whose library is optional (the ``sinks``, ``protocols`` and ``ble``
extras) import it only when they run, so a gateway that does not use them
never needs it. :func:`edgeway.validate.validate` asks :meth:`OptionalLibrary.installed`
for every configured component, so a missing one is a configuration error that
names the extra, not a failure at the first batch.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class OptionalLibrary:
    """A library a component imports when it runs, and how to install it."""

    module: str
    """Top-level module imported (``aiocoap``, ``serial_asyncio``)."""
    package: str
    """Its name on PyPI (``aiocoap``, ``pyserial-asyncio``)."""
    extra: str
    """The edgeway extra that installs it (``protocols``)."""

    def installed(self) -> bool:
        """True when the module can be imported (without importing it)."""
        if self.module in sys.modules:
            # None there means "known missing" (also how tests hide a module).
            return sys.modules[self.module] is not None
        return importlib.util.find_spec(self.module) is not None

    def missing(self) -> str:
        """What to tell the operator when it is not installed."""
        return f"{self.package} is not installed (pip install 'edgeway[{self.extra}]')"
