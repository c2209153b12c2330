"""Device-side adapters.

The embedded MQTT broker lives in ``edgeway.south.mqtt``; the other adapters
are one module each and register themselves with
:func:`edgeway.south.base.register_adapter`. Modules are imported on demand,
by config section (``SECTION_MODULES``), so start-up only pays for the
protocols that are configured; add a new adapter to that table.
"""

from __future__ import annotations

SECTION_MODULES: dict[str, str] = {
    "coap": "coap",
    "http_ingest": "http",
    "modbus": "modbus",
    "opcua": "opcua",
    "serial": "serial",
    "mqtt_client": "mqtt_client",
    "ble": "ble",
}
