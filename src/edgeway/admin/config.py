"""The admin API's configuration section (``admin:``; docs/admin-api.md)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from edgeway.config_types import (
    HostPort,
    TlsConfig,
    _is_ip,
    _Model,
    is_loopback,
    parse_host_port,
)

_ALLOWED_HOST_RE = re.compile(
    r"^\.?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$"
)


class AdminSection(_Model):
    """The local admin API (health, status, Prometheus metrics); see docs/admin-api.md."""

    enabled: bool = True
    """Serve the admin API."""
    listen: HostPort = "127.0.0.1:9180"
    """``HOST:PORT``; keep it on loopback or behind a proxy."""
    auth: Literal["tokens", "none"] | None = None
    """``tokens``: every endpoint but the health probes needs a bearer token
    (``edgeway tokens create``). ``none``: no tokens, allowed only when
    ``listen`` is a loopback address. Absent: ``none`` on a loopback
    ``listen`` (logged at start), ``tokens`` on any other."""
    metrics_public: bool = False
    """Serve ``/metrics`` without a token (for a Prometheus without credentials)."""
    allowed_hosts: list[str] = Field(default_factory=list)
    """Extra names accepted in the ``Host`` header (the listener's own address
    and localhost names always are); ``.example.com`` also accepts its
    subdomains. Other names get 421: a defence against DNS rebinding."""
    tls: TlsConfig | None = None
    """Serve the admin API and the HMI over HTTPS with this certificate (the
    session cookie is then ``Secure``)."""
    trend_points: int = Field(default=3600, ge=60, le=10_000_000)
    """Points kept per trended metric for the HMI (3600: an hour at 1 Hz;
    604800: a week). 16 bytes a point, in memory."""
    trend_series: int = Field(default=2000, ge=0, le=1_000_000)
    """Trended metrics at most; memory is at most ``trend_points * trend_series
    * 16`` bytes. Beyond it, new metrics show their latest value only."""

    @field_validator("allowed_hosts")
    @classmethod
    def _check_allowed_hosts(cls, v: list[str]) -> list[str]:
        out = []
        for name in v:
            host = name.strip().lower().rstrip(".")
            if not (_ALLOWED_HOST_RE.match(host) or _is_ip(host.strip("[]"))):
                raise ValueError(f"expected a host name or address without port, got {name!r}")
            out.append(host.strip("[]"))
        return out

    @field_validator("auth")
    @classmethod
    def _check_auth(cls, v: str | None, info: ValidationInfo) -> str | None:
        listen = info.data.get("listen")
        if v == "none" and listen is not None and not is_loopback(parse_host_port(listen)[0]):
            raise ValueError(
                f"'none' (no tokens) is only allowed on a loopback admin.listen, got {listen!r}: "
                "create tokens with 'edgeway tokens create' and set auth: tokens"
            )
        return v

    @property
    def tokens_required(self) -> bool:
        """Whether requests need a bearer token (``auth``, or its default for ``listen``)."""
        if self.auth is not None:
            return self.auth == "tokens"
        return not is_loopback(parse_host_port(self.listen)[0])
