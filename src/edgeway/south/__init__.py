"""Device-side adapters.

The embedded MQTT broker lives in ``edgeway.south.mqtt``; the other adapters
are one module each and register themselves with
:func:`edgeway.south.base.register_adapter`. Modules are imported on demand,
by config section (``SECTION_MODULES``), so start-up only pays for the
protocols that are configured; add a new adapter to that table.
"""

from __future__ import annotations

from edgeway.extras import OptionalLibrary

SECTION_MODULES: dict[str, str] = {
    "coap": "coap",
    "http_ingest": "http",
    "modbus": "modbus",
    "opcua": "opcua",
    "serial": "serial",
    "mqtt_client": "mqtt_client",
    "ble": "ble",
}

SECTION_LIBRARIES: dict[str, OptionalLibrary] = {
    "coap": OptionalLibrary("aiocoap", "aiocoap", "protocols"),
    "modbus": OptionalLibrary("pymodbus", "pymodbus", "protocols"),
    "opcua": OptionalLibrary("asyncua", "asyncua", "protocols"),
    "serial": OptionalLibrary("serial_asyncio", "pyserial-asyncio", "protocols"),
    "ble": OptionalLibrary("bleak", "bleak", "ble"),
}
"""The optional library each adapter imports when it runs (``edgeway check``
and start-up refuse a configured adapter whose library is missing)."""
