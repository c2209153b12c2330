"""The component shape: metric declarations on stats dataclasses, the status
document made from them, and every part of the gateway fitting the shape."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edgeway.config import parse_config
from edgeway.gateway import Gateway, StartupError
from edgeway.outbox.stats import OutboxSinkStats, OutboxStats
from edgeway.pipeline.figures import PipelineStats
from edgeway.runtime.component import (
    OMIT_NONE,
    Component,
    MetricKind,
    counter,
    gauge,
    keyed,
    metric_samples,
    status_dict,
)
from edgeway.sinks.base import SinkState
from edgeway.south.base import AdapterStats
from edgeway.south.mqtt.stats import BrokerStats


@dataclass(slots=True)
class _Leaf:
    name: str
    hits: int = field(default=0, metadata=counter("leaf_hits", "Hits"))


@dataclass(slots=True)
class _Stats:
    level: float = field(default=0.0, metadata=gauge("level", "A level"))
    by_reason: dict[str, int] = field(
        default_factory=dict, metadata=counter("errors", "Errors", label="reason")
    )
    events: dict[str, int] = field(default_factory=dict, metadata=counter("ev", "Event"))
    leaves: list[_Leaf] = field(default_factory=list, metadata=keyed("leaf", "name"))
    not_exported: int = 7
    note: str | None = field(default=None, metadata=OMIT_NONE)


def test_metric_samples_follow_the_field_declarations() -> None:
    stats = _Stats(
        level=2.5,
        by_reason={"b": 2, "a": 1},
        events={"x_total": 3},
        leaves=[_Leaf("one", 4), _Leaf("two", 5)],
    )
    got = [
        (s.spec.name, s.spec.kind, s.labels, s.value)
        for s in metric_samples(stats, (("sink", "s1"),))
    ]
    sink = ("sink", "s1")
    assert got == [
        ("level", MetricKind.GAUGE, (sink,), 2.5),
        ("errors", MetricKind.COUNTER, (sink, ("reason", "a")), 1.0),
        ("errors", MetricKind.COUNTER, (sink, ("reason", "b")), 2.0),
        ("ev_x_total", MetricKind.COUNTER, (sink,), 3.0),
        ("leaf_hits", MetricKind.COUNTER, (sink, ("leaf", "one")), 4.0),
        ("leaf_hits", MetricKind.COUNTER, (sink, ("leaf", "two")), 5.0),
    ]


def test_status_dict_leaves_out_absent_optional_figures_only() -> None:
    assert "note" not in status_dict(_Stats())
    assert status_dict(_Stats(note="x"))["note"] == "x"
    assert status_dict(_Stats())["not_exported"] == 7


@pytest.mark.parametrize(
    "stats_type", [BrokerStats, OutboxSinkStats, SinkState, AdapterStats, PipelineStats]
)
def test_every_number_a_component_reports_is_a_metric_or_said_not_to_be(
    stats_type: type,
) -> None:
    """A new figure is exported unless its field is listed here as status-only:
    a typed field cannot be exported under the wrong type by a stale key list."""
    status_only = {
        "AdapterState.rejected",
        "AdapterStats.rejected",
        "SinkState.batches_sent",
        "PipelineStats.default_route_readings",
        "PipelineStats.rejected_full",
    }
    for f in dataclasses.fields(stats_type):
        if f.type in ("int", "float", "bool") and "metric" not in f.metadata:
            assert f"{stats_type.__name__}.{f.name}" in status_only, f.name


def test_outbox_sink_stats_keep_the_accounting_identity() -> None:
    counts = {
        "accepted": 10,
        "delivered": 4,
        "dropped_max_bytes": 1,
        "dropped_max_age": 2,
        "dropped_dead_letter": 0,
        "rejected_full": 5,
    }
    s = OutboxSinkStats.from_counts(counts)
    assert (s.dropped, s.pending) == (3, 3)
    assert s.accepted == s.delivered + s.pending + s.dropped
    names = {x.spec.name for x in metric_samples(OutboxStats(sinks={"c": s}, retired={"r": s}))}
    assert "outbox_pending" in names
    # Retired sinks are in the status, not in the metrics.
    assert all(
        x.labels == (("sink", "c"),) for x in metric_samples(OutboxStats({"c": s}, {"r": s}))
    )


async def test_every_part_of_a_running_gateway_is_a_component(tmp_path: Path) -> None:
    cfg = parse_config(
        f"""
gateway: {{id: gw-c, data_dir: "{tmp_path}"}}
mqtt: {{listeners: [{{bind: "127.0.0.1:0", allow_anonymous: true}}]}}
http_ingest: {{listen: "127.0.0.1:0", allow_anonymous: true}}
sinks: [{{name: files, url: "file://{tmp_path}/out"}}]
"""
    )

    gw = Gateway(cfg)
    task = asyncio.create_task(gw.run())
    try:
        await asyncio.wait_for(gw.ready.wait(), 20)
        parts = gw.components()
        assert [p.name for p in parts] == ["http", "mqtt", "pipeline", "outbox", "files"]
        for part in parts:
            assert isinstance(part, Component), part
            assert part.health().ok, part.name
            assert dataclasses.is_dataclass(part.stats()), part.name
        names = {s.spec.name for s in gw.metric_samples()}
        assert {"uptime_seconds", "mqtt_connections", "outbox_pending", "sink_connected"} <= names
        assert "adapter_connected" in names and "pipeline_received_readings" in names
    finally:
        gw.request_stop()
        await asyncio.wait_for(task, 10)


async def test_an_adapter_that_cannot_start_stops_the_gateway_with_one_line(
    tmp_path: Path,
) -> None:
    """A port already in use is the operator's to fix: the gateway does not
    come up, and the error names the adapter (the CLI prints it in one line)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = parse_config(
            f"""
gateway: {{id: gw-c, data_dir: "{tmp_path}"}}
mqtt: {{enabled: false}}
http_ingest: {{listen: "127.0.0.1:{port}", allow_anonymous: true}}
"""
        )
        gw = Gateway(cfg)
        with pytest.raises(ExceptionGroup) as caught:
            await asyncio.wait_for(gw.run(), 20)
    matched, _ = caught.value.split(StartupError)
    assert matched is not None
    (error,) = matched.exceptions
    assert str(error).startswith("http_ingest adapter http: ")
    assert not gw.ready.is_set()
