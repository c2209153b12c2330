"""Fleet configuration's section (``fleet:``; docs/fleet.md): configurations
pushed by the cloud, signed.
"""

from __future__ import annotations

from pydantic import Field

from edgeway.config_types import PublicKeys, _Model


class FleetSection(_Model):
    """Configurations pushed by the cloud, signed (``edgeway.runtime.fleet``, docs/fleet.md)."""

    enabled: bool = True
    """Take ``config.apply`` commands addressed to this gateway's id (from any
    cloud downlink: the MQTT, NATS or HTTP sink's commands). They are refused
    unless ``keys`` holds the key that signed them."""
    keys: PublicKeys = Field(default_factory=dict)
    """Trusted Ed25519 public keys by name (PEM, or base64 of the 32 raw bytes).
    A pushed configuration must keep at least one of them, so that the next one
    can still be verified."""
