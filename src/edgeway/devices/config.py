"""The device registry's configuration section (``devices:``; docs/devices.md)."""

from __future__ import annotations

from pydantic import Field

from edgeway.config_types import Duration, _Model


class DevicesSection(_Model):
    """The device registry and device status (``edgeway.devices``; docs/devices.md)."""

    enabled: bool = True
    """Keep the registry (``devices.db``) and every device's status."""
    flush_interval: Duration = Field(default=2.0, gt=0, le=60)
    """How often status (last seen, online, ...) is written: one write per device
    that changed per interval, never one per reading."""
    offline_after: Duration = 300.0
    """A device without a connection (HTTP, CoAP, pollers) is offline after this
    long without a message; 0: never by silence."""
    max_unregistered: int = Field(default=10_000, ge=0)
    """Records kept for devices seen but not registered; beyond it they are
    counted, not recorded (ids on the wire are the sender's choice)."""
    events: bool = False
    """Send lifecycle events (connected, disconnected, auth_failed, registered,
    revoked) up through the outbox to every sink (``record_type:
    device_event``). Off by default: it adds records of a new type to what the
    cloud receives, which its receiver must expect."""
    events_per_second: float = Field(default=200.0, gt=0)
    """Most lifecycle events per second (burst 1,000); the rest are counted."""
