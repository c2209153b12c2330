"""The pipeline's typed figures (``Pipeline.stats()``): readings and bytes in
and out, per route and per sink, each field saying how it is exported.

The fuller report, with every step's figures and the outbox's counters per sink,
is :meth:`Pipeline.report` (``stats.json``, ``edgeway stats``, ``/api/status``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgeway.runtime.component import counter, keyed


@dataclass(slots=True)
class RouteStats:
    """What one route took and produced."""

    name: str
    received_readings: int = field(
        default=0, metadata=counter("route_received_readings", "Readings a route took")
    )
    sent_readings: int = field(
        default=0, metadata=counter("route_sent_readings", "Readings a route produced")
    )
    received_bytes: int = field(
        default=0, metadata=counter("route_received_bytes", "Bytes a route took")
    )
    sent_bytes: int = field(
        default=0, metadata=counter("route_sent_bytes", "Bytes a route produced")
    )
    failed: int = 0
    """Submits in which a step of the route raised (the readings went on unchanged)."""


@dataclass(slots=True)
class SinkFlowStats:
    """What the pipeline handed the outbox for one sink (the cloud's side of the
    bandwidth report; delivery is ``edgeway_outbox_delivered_total``)."""

    sent_readings: int = field(
        default=0,
        metadata=counter("sink_pipeline_sent_readings", "Readings the pipeline stored for a sink"),
    )
    sent_bytes: int = field(
        default=0,
        metadata=counter(
            "sink_pipeline_sent_bytes", "Bytes (as sent records) the pipeline stored for a sink"
        ),
    )


@dataclass(slots=True)
class PipelineStats:
    """Readings and bytes through the pipeline, per route and per sink."""

    received_readings: int = field(
        default=0, metadata=counter("pipeline_received_readings", "Pipeline readings from devices")
    )
    received_bytes: int = field(
        default=0, metadata=counter("pipeline_received_bytes", "Pipeline bytes from devices")
    )
    sent_readings: int = field(
        default=0, metadata=counter("pipeline_sent_readings", "Pipeline readings towards sinks")
    )
    sent_bytes: int = field(
        default=0, metadata=counter("pipeline_sent_bytes", "Pipeline bytes towards sinks")
    )
    default_route_readings: int = 0
    """Readings no route took (they went to the default sinks)."""
    rejected_full: int = 0
    """Submits the outbox refused as full."""
    routes: list[RouteStats] = field(default_factory=list, metadata=keyed("route", "name"))
    sinks: dict[str, SinkFlowStats] = field(default_factory=dict, metadata=keyed("sink"))
