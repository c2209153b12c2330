"""Device-side adapters. Importing this package registers the built-in ones.

The embedded MQTT broker lives in ``edgeway.south.mqtt``; the other adapters
are one module each and register themselves with
:func:`edgeway.south.base.register_adapter`.
"""

from __future__ import annotations

import importlib

_BUILTIN = ("coap", "http", "modbus", "opcua", "serial", "mqtt_client", "ble")

for _name in _BUILTIN:
    try:
        importlib.import_module(f"edgeway.south.{_name}")
    except ModuleNotFoundError as _e:  # not written yet, or an optional extra missing
        if _e.name != f"edgeway.south.{_name}":
            raise
