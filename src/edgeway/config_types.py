"""The configuration's shared value types: a leaf module.

Durations (``"250ms"``, ``"5m"``), sizes (``"512KiB"``), ``HOST:PORT``, TLS
file references, the input limits every adapter may override, and the base of
every section model (:class:`_Model`: unknown keys are errors). The root schema
(:mod:`edgeway.config`) and every component's own configuration module import
these; this module imports none of them, so no component's code is loaded to
read a configuration and no import cycle can run through here.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from edgeway.limits import DEFAULT_LIMITS, InputLimits

_LIMITS = DEFAULT_LIMITS

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|kb|kib|mb|mib|gb|gib|k|m|g)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    None: 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
}


def _parse_duration(value: Any) -> Any:
    """Accept seconds as a number or a string like ``"250ms"``, ``"10s"``, ``"5m"``, ``"7d"``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 10s, 5m or 2h")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ValueError(f"expected a duration such as 10s, 5m or 2h, got {value!r}")


def _parse_size(value: Any) -> Any:
    """Accept bytes as an integer or a string like ``"256KiB"``, ``"1MB"``, ``"2GiB"``."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512KiB or 2GiB")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            unit = m.group(2).lower() if m.group(2) else None
            return int(float(m.group(1)) * _SIZE_UNITS[unit])
    raise ValueError(f"expected a size such as 512KiB or 2GiB, got {value!r}")


Duration = Annotated[float, BeforeValidator(_parse_duration), Field(ge=0)]
"""Seconds; YAML may say ``10``, ``"10s"``, ``"250ms"``, ``"5m"``."""


Size = Annotated[int, BeforeValidator(_parse_size), Field(ge=0)]
"""Bytes; YAML may say ``1048576``, ``"1MiB"``, ``"512KiB"``."""


def parse_host_port(value: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[::1]:1883`` for IPv6, ``:1883`` for all interfaces)."""
    if not isinstance(value, str) or ":" not in value:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    host, _, port_s = value.rpartition(":")
    host = host.strip("[]")
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValueError(f"expected HOST:PORT with a port 0-65535, got {value!r}")
    if host == "":
        host = "0.0.0.0"
    return host, int(port_s)


def _check_host_port(value: str) -> str:
    parse_host_port(value)
    return value


HostPort = Annotated[str, AfterValidator(_check_host_port)]
"""``HOST:PORT`` checked at load time (``[::1]:1883``, ``:1883`` for all interfaces)."""


def _public_keys(value: dict[str, str]) -> dict[str, str]:
    from edgeway.signing import check_public_keys

    check_public_keys(value)
    return value


PublicKeys = Annotated[dict[str, str], AfterValidator(_public_keys)]
"""Trusted Ed25519 public keys by name (PEM, or base64 of the 32 raw bytes);
one that does not parse is a configuration error naming its key."""


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=False, validate_default=True, use_attribute_docstrings=True
    )


class InputLimitsSection(_Model):
    """What one device message may turn into (``edgeway.limits``; reasons in
    docs/limits.md). The top-level section applies to every adapter; an
    adapter's own ``input_limits`` overrides the keys it names."""

    max_readings_per_message: int = Field(default=_LIMITS.max_readings_per_message, ge=1)
    """Readings one message may expand to (JSON arrays, SenML packs, Sparkplug births)."""
    max_metrics_per_reading: int = Field(default=_LIMITS.max_metrics_per_reading, ge=1)
    """Metrics in one reading, after nested objects are flattened."""
    max_name_length: int = Field(default=_LIMITS.max_name_length, ge=1)
    """Characters in a metric name, after flattening (``motor.rpm``)."""
    max_string_length: int = Field(default=_LIMITS.max_string_length, ge=1)
    """Characters in a string value."""
    max_flattened_size: Size = Field(default=_LIMITS.max_flattened_size, ge=1)
    """Characters of names and strings (8 per number) over all readings of one
    message, counted while nested objects flatten: 1 MiB, the broker's default
    maximum packet size."""
    max_timestamp_age: Duration = _LIMITS.max_timestamp_age
    """How far before the gateway's clock a reading's time may lie (10 years)."""
    max_timestamp_ahead: Duration = _LIMITS.max_timestamp_ahead
    """How far after the gateway's clock a reading's time may lie (1 hour)."""

    def build(self) -> InputLimits:
        """The limits as the codecs and adapters use them."""
        return InputLimits(**self.model_dump())

    def over(self, base: InputLimitsSection) -> InputLimitsSection:
        """``base`` with the keys set in this section replacing its own."""
        return base.model_copy(update={k: getattr(self, k) for k in self.model_fields_set})


def input_limits(section: InputLimitsSection | None) -> InputLimits:
    """An adapter's limits: its resolved ``input_limits``, or the defaults when it
    was built without a whole configuration (tests, tools)."""
    return section.build() if section is not None else DEFAULT_LIMITS


class TlsConfig(_Model):
    cert: Path
    """Server certificate (PEM, full chain)."""
    key: Path
    """Private key of the certificate (PEM)."""
    ca: Path | None = None
    """CA bundle used to verify client certificates."""
    require_client_cert: bool = False
    """Refuse clients without a certificate signed by ``ca`` (see docs/security.md)."""
    crl: Path | None = None
    """Certificate revocation list of ``ca`` (PEM, e.g. ``DATA_DIR/ca/crl.pem``
    from ``edgeway ca``), checked at every handshake; MQTT and HTTP ingest
    listeners read it again when the file changes (within a second: the
    latest CRL alone is in force), the admin listener at start. See
    docs/ca.md."""
    min_version: Literal["1.2", "1.3"] = "1.2"
    """Lowest TLS version accepted; 1.2 is the floor."""

    @field_validator("require_client_cert")
    @classmethod
    def _check_ca(cls, v: bool, info: Any) -> bool:
        if v and info.data.get("ca") is None:
            raise ValueError(
                "require_client_cert needs tls.ca (the CA that signs client certificates)"
            )
        return v


def _check_codec(name: str, options: dict[str, Any]) -> None:
    """Validate a codec name and its options at load time (errors then carry the line)."""
    from edgeway.codecs.base import get_codec

    try:
        get_codec(name, options)
    except KeyError as e:
        raise ValueError(str(e.args[0])) from None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
