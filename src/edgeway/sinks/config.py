"""A sink's configuration entry (``sinks:``); each type validates its own
``options`` (edgeway.sinks.base, docs/sinks/).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from edgeway.config_types import (
    Duration,
    _Model,
)


class SinkConfig(_Model):
    """A cloud-side sink. ``url``'s scheme picks the type (http, https, mqtt,
    mqtts, nats, amqp, postgresql, file); ``options`` holds the type's own
    settings, validated by that sink type at start-up."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    """Unique name; appears in counters, logs and dead letters."""
    url: str
    """The scheme picks the type: http, https, mqtt, mqtts, nats, amqp, postgresql, file."""
    options: dict[str, Any] = Field(default_factory=dict)
    """The sink type's own settings; see docs/sinks/."""
    probe_interval: Duration = 1.0
    """While the sink backs off after a connection failure, check this often
    whether its remote side accepts a TCP connection again, and retry at once
    when it does (0: no probe; the retry waits out the backoff, up to 60 s).
    1 s starts a drain within about a second of the cloud's return for one
    connection attempt a second, which a server that is down does not notice."""
