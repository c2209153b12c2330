"""Device presence without sockets: batching, bounds under a flood of made-up
device ids, the lifecycle event limiter, pollers, and the ingest gate."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgeway.devices.presence import EVENT_BURST, DeviceIngest, DevicePresence
from edgeway.devices.registry import DeviceRegistry
from edgeway.ingest import IngestStatus, MemoryIngest
from edgeway.reading import Origin, Reading
from edgeway.south.base import AdapterState


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[DeviceRegistry]:
    reg = DeviceRegistry(tmp_path / "devices.db", durability="os", max_unregistered=50)
    await reg.open()
    try:
        yield reg
    finally:
        await reg.close()


def readings(devices: Sequence[str], adapter: str = "mqtt", **metrics: Any) -> list[Reading]:
    return [Reading(d, 1.0, {"t": 1, **metrics}, Origin(adapter)) for d in devices]


async def test_many_readings_one_write_per_device(registry: DeviceRegistry) -> None:
    presence = DevicePresence(registry)
    for _ in range(500):
        presence.seen_readings(readings(["a", "b"]))
    presence.seen_readings(readings(["a"], firmware_version="3.0"))
    commits = registry.db.commits
    assert await presence.flush() == 2
    assert registry.db.commits - commits <= 2  # status + idle sweep
    a = await registry.get("a")
    assert a is not None and a.firmware == "3.0" and a.online and a.protocols == ("mqtt",)


async def test_a_flood_of_made_up_ids_is_bounded_in_memory_and_on_disk(
    registry: DeviceRegistry,
) -> None:
    presence = DevicePresence(registry, max_pending=1000)
    await registry.add({"id": "real"})
    for k in range(100):
        presence.seen_readings(readings([f"fake-{k}-{i}" for i in range(100)]))
    presence.seen_readings(readings(["real"]))  # full: dropped now, counted
    assert len(presence._seen) == 1000
    assert presence.stats.pending_dropped == 100 * 100 - 1000 + 1
    await presence.flush()
    # At most max_unregistered records were made; the rest counted.
    assert registry.unregistered == 50
    assert registry.unregistered_refused == 1000 - 50
    presence.seen_readings(readings(["real"]))  # seen again at its next message
    await presence.flush()
    real = await registry.get("real")
    assert real is not None and real.online


async def test_events_the_devices_cause_are_rate_limited_operators_are_not(
    registry: DeviceRegistry,
) -> None:
    emitted: list[Reading] = []
    presence = DevicePresence(registry, emit=emitted.extend, events_per_second=1.0)
    for i in range(EVENT_BURST + 500):
        presence.auth_failed(f"x{i}", "mqtt", "10.0.0.1:5555", "bad password")
    presence.registry_changed("op-1", "disabled")
    await asyncio.sleep(0)  # events go out at the end of the loop turn
    assert len(emitted) == EVENT_BURST + 1
    assert presence.stats.events_suppressed == 500
    last = emitted[-1]
    assert last.device_id == "op-1" and last.metrics == {"event": "revoked", "reason": "disabled"}
    assert last.tags == {"record_type": "device_event"} and last.priority == 1
    assert emitted[0].metrics["reason"] == "bad password"


@dataclass
class FakePollerConfig:
    device_id: str


class Poller:
    """An adapter's face as presence sees it (section, config, state)."""

    section = "modbus"

    def __init__(self) -> None:
        self.config = FakePollerConfig("plc-9")
        self.state = AdapterState()


async def test_poller_errors_and_lost_connection(registry: DeviceRegistry) -> None:
    emitted: list[Reading] = []
    presence = DevicePresence(registry, emit=emitted.extend)
    poller = Poller()
    presence.watch_pollers(lambda: [poller])  # type: ignore[list-item, return-value]
    poller.state.connected = True
    presence.seen_readings(readings(["plc-9"], adapter="modbus"))
    await presence.flush()
    poller.state.record_error("ModbusIOException: no response")
    poller.state.connected = False
    await presence.flush()
    d = await registry.get("plc-9")
    assert d is not None and not d.online and d.disconnect_reason == "error"
    assert d.last_error == "ModbusIOException: no response"
    await asyncio.sleep(0)
    assert [e.metrics["event"] for e in emitted] == ["connected", "disconnected"]


async def test_gate_refuses_disabled_and_unregistered_where_asked(
    registry: DeviceRegistry,
) -> None:
    presence = DevicePresence(registry)
    inner = MemoryIngest()
    gate = DeviceIngest(inner, presence, registry, {"http": True, "coap": False}.get)
    await registry.add({"id": "ok"})
    await registry.add({"id": "off"})
    await registry.disable("off")
    assert await gate.submit(readings(["ok"], "http")) is IngestStatus.ACCEPTED
    assert await gate.submit(readings(["off"], "http")) is IngestStatus.REJECTED_DEVICE
    assert await gate.submit(readings(["nobody"], "http")) is IngestStatus.REJECTED_DEVICE
    assert await gate.submit(readings(["nobody"], "coap")) is IngestStatus.ACCEPTED
    assert await gate.submit(readings(["off"], "coap")) is IngestStatus.REJECTED_DEVICE
    # MQTT is not gated here (checked once per connection).
    assert await gate.submit(readings(["off"], "mqtt")) is IngestStatus.ACCEPTED
    assert [r.device_id for r in inner.readings] == ["ok", "nobody", "off"]
    assert gate.refused == 3
    # Enabled again: the flags cache follows at once.
    await registry.enable("off")
    assert await gate.submit(readings(["off"], "http")) is IngestStatus.ACCEPTED


async def test_a_failed_flush_keeps_its_news_for_the_next(
    registry: DeviceRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    presence = DevicePresence(registry)
    presence.connected("d1", "mqtt", "10.0.0.7:40000")
    real = registry.record_status

    async def disk_error(updates: object) -> int:
        raise sqlite3.OperationalError("disk I/O error")  # what a failing disk gives

    monkeypatch.setattr(registry, "record_status", disk_error)
    with pytest.raises(sqlite3.OperationalError):
        await presence.flush()
    monkeypatch.setattr(registry, "record_status", real)
    assert await presence.flush() == 1
    d = await registry.get("d1")
    assert d is not None and d.online and d.last_connect is not None
