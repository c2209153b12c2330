"""Payload codecs. Importing this package registers the built-in ones.

See :mod:`edgeway.codecs.base` for the interface and ``docs/codecs.md`` for
each codec's options.
"""

from __future__ import annotations

import importlib

_BUILTIN = ("json", "senml", "cbor", "binary", "sparkplug", "plain", "bthome")

for _name in _BUILTIN:
    try:
        importlib.import_module(f"edgeway.codecs.{_name}")
    except ModuleNotFoundError as _e:  # not written yet, or an optional extra missing
        if _e.name != f"edgeway.codecs.{_name}":
            raise
