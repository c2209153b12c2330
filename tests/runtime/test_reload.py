"""Live reconfiguration of a running gateway (in-process), with paho-mqtt
devices and file sinks read back from disk."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgeway.config import parse_config
from edgeway.gateway import Gateway
from edgeway.runtime.reload import ConfigHistory, ReloadError, plan


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def records(path: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for f in sorted(path.glob("*.jsonl")) if path.is_dir() else [path]:
        if f.exists():
            out += [orjson.loads(line) for line in f.read_bytes().splitlines() if line.strip()]
    return out


class Device:
    """A paho device publishing QoS 1 telemetry; counts PUBACKed messages."""

    def __init__(self, port: int, device_id: str) -> None:
        self.device_id = device_id
        self.acked: set[int] = set()
        self.disconnects = 0
        self.connected = threading.Event()
        self._mids: dict[int, int] = {}
        self._early: set[int] = set()
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5
        )
        self.client.on_connect = lambda *a: self.connected.set()
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.connected.wait(5)

    def _on_disconnect(self, *a: Any) -> None:
        self.disconnects += 1

    def _on_publish(self, _c: Any, _u: Any, mid: int, *a: Any) -> None:
        # Never call into paho while holding our lock (paho calls this with
        # its own lock held: holding ours around publish() deadlocked).
        with self._lock:
            n = self._mids.pop(mid, None)
            if n is None:
                self._early.add(mid)  # acknowledged before publish() returned
            else:
                self.acked.add(n)

    def publish(self, n: int) -> None:
        info = self.client.publish(
            f"devices/{self.device_id}/telemetry", orjson.dumps({"n": n}), qos=1
        )
        with self._lock:
            if info.mid in self._early:
                self._early.discard(info.mid)
                self.acked.add(n)
            else:
                self._mids[info.mid] = n

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def config(tmp: Path, port: int, extra: str = "", sinks: str | None = None) -> str:
    sinks = sinks if sinks is not None else f'  - {{name: a, url: "file://{tmp / "a"}"}}\n'
    return f"""
gateway: {{id: gw-r, data_dir: "{tmp / "data"}"}}
mqtt:
  listeners: [{{bind: "127.0.0.1:{port}", allow_anonymous: true}}]
sinks:
{sinks}{extra}"""


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[tuple[Gateway, int]]:
    port = free_port()
    text = config(tmp_path, port)
    gw = Gateway(parse_config(text, "t.yaml"), config_text=text, reload_grace=0.2)
    task = asyncio.create_task(gw.run())
    await asyncio.wait_for(gw.ready.wait(), 10)
    yield gw, port
    gw.request_stop()
    await asyncio.wait_for(task, 10)


async def wait_for(cond: Any, within: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not cond():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_add_change_and_remove_sinks(running: tuple[Gateway, int], tmp_path: Path) -> None:
    gw, port = running
    dev = await asyncio.to_thread(Device, port, "d1")
    try:
        await asyncio.to_thread(dev.publish, 1)
        await wait_for(lambda: len(records(tmp_path / "a")) == 1)
        # Add sink b: new readings reach both; the device stays connected.
        two = (
            f'  - {{name: a, url: "file://{tmp_path / "a"}"}}\n'
            f'  - {{name: b, url: "file://{tmp_path / "b"}"}}\n'
        )
        changes = await gw.apply_text(config(tmp_path, port, sinks=two), "test")
        assert changes == ["data path (sinks)"]
        await asyncio.to_thread(dev.publish, 2)
        await wait_for(lambda: len(records(tmp_path / "b")) == 1)
        await wait_for(lambda: len(records(tmp_path / "a")) == 2)
        # Change a's URL: what a has pending (and everything after) goes to a2.
        gw.sinks[0].send_batch = _refuse  # type: ignore[method-assign]
        await asyncio.to_thread(dev.publish, 3)
        await wait_for(lambda: len(records(tmp_path / "b")) == 2)
        await asyncio.sleep(0.2)
        assert len(records(tmp_path / "a")) == 2  # 3 is pending for a
        moved = (
            f'  - {{name: a, url: "file://{tmp_path / "a2"}"}}\n'
            f'  - {{name: b, url: "file://{tmp_path / "b"}"}}\n'
        )
        await gw.apply_text(config(tmp_path, port, sinks=moved), "test")
        await wait_for(lambda: [r["metrics"]["n"] for r in records(tmp_path / "a2")] == [3])
        # Remove b while it has a reading pending: it stays counted.
        gw.sinks[1].send_batch = _refuse  # type: ignore[method-assign]
        await asyncio.to_thread(dev.publish, 4)
        await wait_for(lambda: len(records(tmp_path / "a2")) == 2)
        only_a = f'  - {{name: a, url: "file://{tmp_path / "a2"}"}}\n'
        await gw.apply_text(config(tmp_path, port, sinks=only_a), "test")
        retired = gw.status()["outbox_retired"]
        assert retired["b"]["pending"] == 1
        assert dev.disconnects == 0
        assert gw.reloads == 3
    finally:
        await asyncio.to_thread(dev.stop)


async def _refuse(records: Any) -> None:
    from edgeway.sinks.base import RetryableSinkError

    raise RetryableSinkError("refusing on purpose")


async def test_route_change_applies_to_new_readings(
    running: tuple[Gateway, int], tmp_path: Path
) -> None:
    gw, port = running
    dev = await asyncio.to_thread(Device, port, "d2")
    try:
        route = """routes:
  - name: scale
    match: {devices: ["d2"]}
    steps:
      - transform: {n: {scale: 10}}
"""
        await gw.apply_text(config(tmp_path, port, extra=route), "test")
        await asyncio.to_thread(dev.publish, 7)
        await wait_for(lambda: len(records(tmp_path / "a")) == 1)
        assert records(tmp_path / "a")[0]["metrics"]["n"] == 70
        assert dev.disconnects == 0
    finally:
        await asyncio.to_thread(dev.stop)


async def test_listener_added_and_removed_unchanged_one_keeps_clients(
    running: tuple[Gateway, int], tmp_path: Path
) -> None:
    gw, port = running
    dev = await asyncio.to_thread(Device, port, "d3")
    second = free_port()
    try:
        text = config(tmp_path, port).replace(
            f'listeners: [{{bind: "127.0.0.1:{port}", allow_anonymous: true}}]',
            f'listeners: [{{bind: "127.0.0.1:{port}", allow_anonymous: true}}, '
            f'{{bind: "127.0.0.1:{second}", allow_anonymous: true}}]',
        )
        assert await gw.apply_text(text, "test") == [f"mqtt listener 127.0.0.1:{second} added"]
        other = await asyncio.to_thread(Device, second, "d4")
        await asyncio.to_thread(other.publish, 1)
        await wait_for(lambda: len(records(tmp_path / "a")) == 1)
        # Remove the second listener: its client is disconnected, d3 stays.
        await gw.apply_text(config(tmp_path, port), "test")
        await wait_for(lambda: other.disconnects >= 1)
        assert dev.disconnects == 0
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", second), timeout=1).close()
        await asyncio.to_thread(other.stop)
    finally:
        await asyncio.to_thread(dev.stop)


async def test_invalid_config_is_refused_and_the_old_one_runs(
    running: tuple[Gateway, int], tmp_path: Path
) -> None:
    gw, port = running
    bad = config(tmp_path, port, extra="routes: [{name: r, sinks: [nope]}]\n")
    with pytest.raises(ReloadError) as e:
        await gw.apply_text(bad, "test")
    assert any("nope" in str(i) for i in e.value.issues)
    with pytest.raises(ReloadError) as e:
        await gw.apply_text(config(tmp_path, port, extra="gateway_typo: 1\n"), "test")
    assert e.value.issues
    # A change that needs a restart is refused whole.
    restart = config(tmp_path, port).replace("id: gw-r", "id: gw-other")
    with pytest.raises(ReloadError, match="need a restart: gateway"):
        await gw.apply_text(restart, "test")
    assert gw.config.gateway.id == "gw-r" and gw.reloads == 0 and gw.reload_failures == 1


async def test_config_that_fails_to_start_is_rolled_back(
    running: tuple[Gateway, int], tmp_path: Path
) -> None:
    gw, port = running
    dev = await asyncio.to_thread(Device, port, "d5")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    taken = busy.getsockname()[1]
    try:
        # A new sink and an HTTP ingest on a port that is taken: the listener
        # fails, so the sink change is undone too.
        two = (
            f'  - {{name: a, url: "file://{tmp_path / "a"}"}}\n'
            f'  - {{name: b, url: "file://{tmp_path / "b"}"}}\n'
        )
        text = config(
            tmp_path,
            port,
            sinks=two,
            extra=f'http_ingest: {{listen: "127.0.0.1:{taken}", allow_anonymous: true}}\n',
        )
        with pytest.raises(ReloadError) as e:
            await gw.apply_text(text, "test")
        assert e.value.rolled_back
        assert [s.name for s in gw.sinks] == ["a"]
        assert gw.outbox is not None and set(gw.outbox.counters()) == {"a"}
        assert not any(a.section == "http_ingest" for a in gw.adapters)
        await asyncio.to_thread(dev.publish, 1)
        await wait_for(lambda: len(records(tmp_path / "a")) == 1)
        assert dev.disconnects == 0
    finally:
        busy.close()
        await asyncio.to_thread(dev.stop)


async def test_unhealthy_after_apply_is_rolled_back(
    running: tuple[Gateway, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The health gate: a problem that appears after the change (here: a
    stand-in for a listener that stops serving) undoes it."""
    gw, port = running
    real = Gateway.health_problems

    def problems(self: Gateway) -> list[str]:
        out = real(self)
        if any(s.name == "b" for s in self.sinks):
            out.append("http_ingest:http is not serving")
        return out

    monkeypatch.setattr(Gateway, "health_problems", problems)
    two = (
        f'  - {{name: a, url: "file://{tmp_path / "a"}"}}\n'
        f'  - {{name: b, url: "file://{tmp_path / "b"}"}}\n'
    )
    with pytest.raises(ReloadError, match="unhealthy after the change"):
        await gw.apply_text(config(tmp_path, port, sinks=two), "test")
    assert [s.name for s in gw.sinks] == ["a"]


async def test_nothing_lost_under_load_during_20_reloads(
    running: tuple[Gateway, int], tmp_path: Path
) -> None:
    gw, port = running
    devices = [await asyncio.to_thread(Device, port, f"load-{i}") for i in range(4)]
    stop = threading.Event()

    def publish_all() -> None:
        n = 0
        while not stop.is_set():
            for d in devices:
                d.publish(n)
            n += 1
            stop.wait(0.002)

    publisher = threading.Thread(target=publish_all)
    publisher.start()
    try:
        for i in range(20):
            extra = f"pipeline: {{stats_interval: {6 + i}s}}\n"
            changes = await gw.apply_text(config(tmp_path, port, extra=extra), "test")
            assert changes == ["data path (pipeline)"]
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.to_thread(publisher.join)
    await asyncio.sleep(0.5)
    try:
        acked = {(d.device_id, n) for d in devices for n in d.acked}
        assert len(acked) > 200
        await wait_for(
            lambda: acked <= {(r["device_id"], r["metrics"]["n"]) for r in records(tmp_path / "a")},
            within=20,
        )
        assert all(d.disconnects == 0 for d in devices)
        assert gw.reloads == 20
    finally:
        for d in devices:
            await asyncio.to_thread(d.stop)


async def test_history_keeps_applied_configs(running: tuple[Gateway, int], tmp_path: Path) -> None:
    gw, port = running
    for i in range(3):
        await gw.apply_text(
            config(tmp_path, port, extra=f"log: {{level: {'info' if i % 2 else 'debug'}}}\n"),
            f"t{i}",
        )
    entries = ConfigHistory(tmp_path / "data").entries()
    assert [e.source for e in entries[:4]] == ["t2", "t1", "t0", "start"]
    assert entries[0].sha256 != entries[1].sha256
    # Roll back to the one before: the log level of t1.
    changes = await gw.rollback()
    assert changes == ["log"] and gw.config.log.level == "info"
    assert ConfigHistory(tmp_path / "data").entries()[0].source == f"rollback:{entries[1].number}"


async def test_input_limits_apply_to_the_broker_without_a_restart(
    running: tuple[Gateway, int], tmp_path: Path
) -> None:
    gw, port = running
    assert gw.broker is not None and gw.broker.input_limits.max_name_length == 256
    changes = await gw.apply_text(
        config(tmp_path, port, extra="input_limits: {max_name_length: 8}\n"), "test"
    )
    assert "mqtt input_limits" in changes
    assert gw.broker.input_limits.max_name_length == 8
    refused = gw.broker.stats().flat().get("decode_errors_name_too_long", 0)
    dev = await asyncio.to_thread(Device, port, "d1")
    try:
        info = dev.client.publish("devices/d1/telemetry", b'{"temperature": 1}', qos=1)
        await asyncio.to_thread(info.wait_for_publish, 5)
        await wait_for(
            lambda: gw.broker.stats().flat().get("decode_errors_name_too_long", 0) > refused
        )
    finally:
        await asyncio.to_thread(dev.stop)


def test_plan_names_restart_only_changes() -> None:
    old = parse_config("mqtt: {limits: {max_packet_size: 1MiB}}\n", "a")
    new = parse_config("mqtt: {limits: {max_packet_size: 2MiB}}\n", "b")
    assert plan(old, new).restart_needed == ["mqtt.limits"]
    same = plan(old, old)
    assert same.empty and not same.restart_needed
