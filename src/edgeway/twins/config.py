"""The device twins' configuration section (``twins:``; docs/twins.md)."""

from __future__ import annotations

from pydantic import Field

from edgeway.config_types import Size, _Model


class TwinsSection(_Model):
    """Device twins: desired and reported state per device (``edgeway.twins``, docs/twins.md)."""

    enabled: bool = True
    """Keep twins (DATA_DIR/twins.db) and serve them over MQTT, HTTP and the admin API."""
    max_bytes: Size = Field(default=64 * 1024, ge=2, le=16 * 1024 * 1024)
    """Largest JSON encoding of one document (desired or reported); a patch
    that would make it larger is refused (``too_large``)."""
    max_depth: int = Field(default=8, ge=1, le=64)
    """Deepest nesting of objects and arrays in a document (``too_deep``)."""
