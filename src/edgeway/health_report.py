"""A periodic health summary of the gateway, sent to every sink as a record.

Configuration::

    gateway:
      id: site-a-gw1
      health_interval: 60s      # 0 (the default): off

Every ``health_interval`` the gateway stores one record of its own in the
outbox, for every sink, so the cloud sees each gateway's health through the
path it already reads (HTTP, MQTT, NATS, AMQP, PostgreSQL, file), durably and
in order, and a gap in the series says the gateway (or its uplink) was down::

    {"device_id": "site-a-gw1", "tags": {"record_type": "health"},
     "metrics": {"ready": true, "healthy": true, "problems": "",
                 "uptime_s": 3600.2, "devices_connected": 42,
                 "outbox_pending": 0, "outbox_dropped": 0, "outbox_bytes": 0,
                 "sinks_total": 2, "sinks_connected": 2,
                 "sink.cloud.pending": 0, "sink.cloud.connected": true, ...,
                 "version": "0.1.0"}}

Its ``device_id`` is the gateway id and ``tags.record_type`` is ``health``
(command records say ``command``), so a consumer tells them from device data.
The MQTT sink's retained birth/death (:mod:`edgeway.sinks.mqtt_presence`)
answers "is it alive now"; this series answers "how has it been".
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from edgeway import __version__
from edgeway.reading import MetricValue, Origin, Reading

log = logging.getLogger(__name__)

PROBLEMS_TEXT_MAX = 512
"""Characters of the joined problem list kept in a record: enough for a few
problems by name; a long list is cut (the admin API has all of them)."""

ORIGIN = Origin("gateway", "health")


def summarize(status: Mapping[str, Any], problems: Sequence[str]) -> dict[str, MetricValue]:
    """Flat metrics from :meth:`Gateway.status` and :meth:`Gateway.health_problems`."""
    broker = status.get("broker") or {}
    outbox: Mapping[str, Mapping[str, int]] = status.get("outbox") or {}
    sinks: Mapping[str, Mapping[str, Any]] = status.get("sinks") or {}
    out: dict[str, MetricValue] = {
        "ready": bool(status.get("ready")),
        "healthy": not problems,
        "problems": "; ".join(problems)[:PROBLEMS_TEXT_MAX],
        "uptime_s": float(status.get("uptime_s") or 0.0),
        "devices_connected": int(broker.get("clients_connected", 0)),
        "outbox_pending": sum(c.get("pending", 0) for c in outbox.values()),
        "outbox_dropped": sum(c.get("dropped", 0) for c in outbox.values()),
        "sinks_total": len(sinks),
        "sinks_connected": sum(1 for s in sinks.values() if s.get("connected")),
        "version": __version__,
    }
    for name, state in sinks.items():
        out[f"sink.{name}.connected"] = bool(state.get("connected"))
        out[f"sink.{name}.pending"] = int(outbox.get(name, {}).get("pending", 0))
    return out


class HealthReporter:
    """Stores a health record every ``interval`` seconds until cancelled."""

    def __init__(
        self,
        gateway_id: str,
        interval: float,
        summary: Callable[[], dict[str, MetricValue]],
        emit: Callable[[Sequence[Reading]], Any],
    ) -> None:
        self.gateway_id = gateway_id
        self.interval = interval
        self.summary = summary
        self.emit = emit
        self.sent = 0

    def record(self) -> Reading:
        """This moment's health record."""
        return Reading(
            self.gateway_id, time.time(), self.summary(), ORIGIN, {"record_type": "health"}
        )

    async def run(self) -> None:
        """The first record at once (a start is news), then one per interval."""
        while True:
            try:
                fut = self.emit([self.record()])
                if isinstance(fut, asyncio.Future):
                    await fut
                self.sent += 1
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a full disk, a closed outbox: try again next time
                log.warning("health record not stored: %s", e)
            await asyncio.sleep(self.interval)
