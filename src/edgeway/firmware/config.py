"""The firmware updates' configuration section (``firmware:``; docs/firmware.md)."""

from __future__ import annotations

from pydantic import Field

from edgeway.config_types import PublicKeys, Size, _Model


class FirmwareSection(_Model):
    """Firmware images and update campaigns (``edgeway.firmware``, docs/firmware.md)."""

    enabled: bool = True
    """Keep firmware images (DATA_DIR/firmware) and run campaigns."""
    max_image_size: Size = Field(default=256 * 1024 * 1024, ge=1024)
    """Largest image accepted by an upload."""
    keys: PublicKeys = Field(default_factory=dict)
    """Trusted Ed25519 public keys by name (PEM, or base64 of the 32 raw bytes)."""
    require_signature: bool = True
    """Refuse images without a valid signature (turn off only to try the feature)."""
    download_base: str | None = None
    """The URL devices download images from, up to ``/firmware/{image}``
    (``http://gateway.site:8080``: the HTTP ingest listener as devices reach it).
    Absent: the command carries no URL; devices that know the gateway's address
    build it themselves."""
    mqtt_chunks: bool = True
    """Serve images in chunks over the embedded MQTT broker
    (``devices/{id}/firmware/get`` -> ``devices/{id}/firmware/chunk``)."""
    mqtt_chunk_max: Size = Field(default=32 * 1024, ge=256, le=1024 * 1024)
    """Largest chunk sent over MQTT (also kept under each client's maximum
    packet size)."""
