"""The BTHome Bluetooth LE configuration section (``ble:``; docs/protocols/ble.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from edgeway.config_types import (
    _Model,
)


class BleDevice(_Model):
    address: str = Field(pattern=r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")
    """Bluetooth address ``AA:BB:CC:DD:EE:FF``."""
    device_id: str = Field(min_length=1, max_length=128)
    """Device id of its readings."""


class BleSection(_Model):
    """BTHome v2 advertisements received by ``edgeway.south.ble``."""

    enabled: bool = True
    """Scan for BTHome advertisements."""
    adapter: str | None = None
    """Bluetooth adapter (``hci0``); absent: the system default."""
    devices: list[BleDevice] = Field(default_factory=list)
    """Known devices by address."""
    allow_unknown: bool = False
    """Also take advertisements from unlisted devices (device id
    ``bthome-<address without colons>``)."""
    scanning_mode: Literal["active", "passive"] = "passive"
    """``passive`` listens only; ``active`` also asks for scan responses."""
