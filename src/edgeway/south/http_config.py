"""The HTTP ingest listener's configuration section (``http_ingest:``;
docs/protocols/http.md).
"""

from __future__ import annotations

import re
from typing import Any, Literal, Self

from pydantic import Field, field_validator, model_validator

from edgeway.config_types import (
    Duration,
    HostPort,
    InputLimitsSection,
    Size,
    TlsConfig,
    _check_codec,
    _Model,
)


class HttpIngestSection(_Model):
    """HTTP ingest (``edgeway.south.http``): ``POST /devices/{device_id}/telemetry``."""

    enabled: bool = True
    """Run the HTTP ingest listener (the section's presence turns it on)."""
    name: str = Field(default="http", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    """Adapter name: the readings' origin and the name in logs and the status."""
    listen: HostPort = "127.0.0.1:8080"
    """``HOST:PORT``; port 0 picks a free port (logged at start)."""
    tls: TlsConfig | None = None
    """Serve HTTPS with this certificate (``require_client_cert`` for mutual TLS)."""
    tokens: dict[str, str] = Field(default_factory=dict)
    """Bearer token per device id; the key ``"*"`` is a token valid for every
    device (a trusted upstream). A value ``sha256:<64 hex digits>`` is the
    SHA-256 of the token, so the file need not hold the token itself."""
    allow_anonymous: bool = False
    """Accept requests without a token. Off by default: nothing is reachable
    without credentials unless the operator says so (guarantee 5)."""
    max_body_size: Size = 256 * 1024
    """Largest request body (413 beyond). 256 KiB: a SenML pack or JSON array
    of about a thousand readings; each body is held in memory until the outbox
    has it, for every device uploading at once."""
    rate_limit: float | None = Field(default=None, gt=0)
    """Requests per second per device (token bucket, 429 beyond); absent: no limit."""
    rate_burst: int = Field(default=10, ge=1)
    """Requests a device may send at once before ``rate_limit`` applies."""
    retry_after: Duration = 5.0
    """Seconds sent in Retry-After with 429 and 503."""
    ack_timeout: Duration = 30.0
    """Longest wait for the outbox before answering 503 (the reading may
    still be stored; the device's retry is then a duplicate the cloud drops)."""
    default_codec: str = "json"
    """Codec for a request without Content-Type."""
    codec_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Options for the codec of each content type, by codec name."""
    command_poll_max: Duration = Field(default=60.0, gt=0, le=3600)
    """Longest ``wait`` of a command long-poll (``GET /devices/{id}/commands``)."""
    max_command_polls: int = Field(default=10_000, ge=1)
    """Devices long-polling for commands at once (503 beyond): one poll holds a
    connection and about a kilobyte."""
    commands_allow_anonymous: bool = False
    """Let devices without a token poll commands and post results. Off even with
    ``allow_anonymous``: whoever polls takes the device's commands."""
    unregistered: Literal["allow", "refuse"] = "allow"
    """Devices the registry does not know: ``allow`` (listed as unregistered) or
    ``refuse`` (403). See docs/devices.md."""
    input_limits: InputLimitsSection | None = None
    """Overrides of the top-level ``input_limits`` for this adapter (only the keys given)."""

    @field_validator("tokens")
    @classmethod
    def _check_tokens(cls, v: dict[str, str]) -> dict[str, str]:
        for device, token in v.items():
            if token.startswith("sha256:") and not re.fullmatch(r"sha256:[0-9a-fA-F]{64}", token):
                raise ValueError(f"{device}: sha256: must be followed by 64 hex digits")
            if len(token) < 16:
                raise ValueError(f"{device}: a token needs at least 16 characters")
        return v

    @model_validator(mode="after")
    def _check_codecs(self) -> Self:
        _check_codec(self.default_codec, self.codec_options.get(self.default_codec, {}))
        for name, options in self.codec_options.items():
            _check_codec(name, options)
        return self
