"""The embedded broker's typed figures (``Broker.stats()``).

Each field says how it is exported: levels are gauges (``edgeway_mqtt_<name>``),
everything else counts since start (``edgeway_mqtt_<name>_total``). Events the
broker counts by name (``connections_total``, ``protocol_errors``, ...) and drops
and decode failures by reason are mappings, exported one metric per key as
before (``edgeway_mqtt_dropped_<reason>_total``). ``/api/status`` shows them
flat (:meth:`BrokerStats.flat`), as it always has.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from edgeway.runtime.component import counter, gauge


def _level(name: str) -> Any:
    return field(default=0, metadata=gauge(f"mqtt_{name}", f"MQTT broker {name}"))


def _count(name: str) -> Any:
    return field(default=0, metadata=counter(f"mqtt_{name}", f"MQTT broker {name}"))


@dataclass(slots=True)
class BrokerStats:
    """The broker's levels and counters."""

    connections: int = _level("connections")
    """Open TCP/WebSocket connections (CONNECT done or not)."""
    clients_connected: int = _level("clients_connected")
    """Clients past CONNECT."""
    sessions: int = _level("sessions")
    persistent_sessions: int = _level("persistent_sessions")
    subscriptions: int = _level("subscriptions")
    retained: int = _level("retained")
    retained_bytes: int = _level("retained_bytes")
    messages_in: int = _count("messages_in")
    messages_out: int = _count("messages_out")
    readings_in: int = _count("readings_in")
    dropped: int = _count("dropped")
    """Messages dropped, all reasons together (by reason: ``dropped_by_reason``)."""
    decode_errors: int = _count("decode_errors")
    queued: int = _level("queued")
    """Messages queued for sessions (offline or slow)."""
    queued_bytes: int = _level("queued_bytes")
    inflight: int = _level("inflight")
    log_lines_suppressed: int = _count("log_lines_suppressed")
    events: dict[str, int] = field(default_factory=dict, metadata=counter("mqtt", "MQTT broker"))
    """Events counted by name (``connections_total``, ``protocol_errors``, ...)."""
    dropped_by_reason: dict[str, int] = field(
        default_factory=dict, metadata=counter("mqtt_dropped", "MQTT broker dropped")
    )
    decode_errors_by_reason: dict[str, int] = field(
        default_factory=dict, metadata=counter("mqtt_decode_errors", "MQTT broker decode_errors")
    )

    def flat(self) -> dict[str, int]:
        """One level of keys, as ``/api/status`` shows the broker: the figures,
        the events by name, ``dropped_<reason>`` and ``decode_errors_<reason>``."""
        figures = ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))
        out: dict[str, int] = {name: v for name, v in figures if isinstance(v, int)}
        out.update(self.events)
        out.update({f"dropped_{k}": v for k, v in self.dropped_by_reason.items()})
        out.update({f"decode_errors_{k}": v for k, v in self.decode_errors_by_reason.items()})
        return out
