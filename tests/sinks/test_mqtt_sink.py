"""The MQTT sink against a real Mosquitto started by each test on a free port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import random
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from certs import CertFiles, make_cert_files
from edgeway.config import OutboxSection, SinkConfig
from edgeway.outbox import Outbox, SinkRunner
from edgeway.reading import Reading
from edgeway.sinks.base import (
    PermanentSinkError,
    Record,
    RetryableSinkError,
    SinkOptionsError,
    create_sink,
)
from edgeway.sinks.mqtt import MqttSink, azure_sas_token

MOSQUITTO = "/usr/sbin/mosquitto"
TIMEOUT = 10.0
"""Bound for any wait on a local broker (loopback answers in well under 1 ms)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Mosquitto:
    """A Mosquitto process on a loopback port; restartable on the same port."""

    def __init__(
        self,
        directory: Path,
        extra: str = "",
        tls: CertFiles | None = None,
        unlimited_queue: bool = True,
        nodelay: bool = True,
    ) -> None:
        self.port = free_port()
        self.dir = directory
        # max_queued_messages 0: no limit, so a slow test subscriber never
        # silently loses messages (the default of 1000 does, see MEASUREMENTS.md).
        # set_tcp_nodelay: otherwise Nagle holds back PUBACKs by milliseconds.
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            f"max_queued_messages {0 if unlimited_queue else 1000}",
            f"set_tcp_nodelay {'true' if nodelay else 'false'}",
            # Started as root (CI), Mosquitto would switch to user "mosquitto",
            # who cannot read files under pytest's private tmp directory.
            "user root",
        ]
        if tls is not None:
            lines += [
                f"cafile {tls.ca_cert}",
                f"certfile {tls.server_cert}",
                f"keyfile {tls.server_key}",
                "require_certificate true",
            ]
        self.conf = directory / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n" + extra + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"mosquitto exited: {err}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)  # polling a port that has no event to wait on
        raise TimeoutError("mosquitto did not start listening")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(TIMEOUT)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    m = Mosquitto(tmp_path)
    m.start()
    try:
        yield m
    finally:
        m.kill()


class Subscriber:
    """A paho-mqtt QoS 1 subscriber running in paho's thread."""

    def __init__(self, port: int, topic_filter: str, tls: CertFiles | None = None) -> None:
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        if tls is not None:
            self.client.tls_set(
                ca_certs=str(tls.ca_cert),
                certfile=str(tls.client_cert),
                keyfile=str(tls.client_key),
            )
        subscribed = threading.Event()
        self.client.on_message = lambda _c, _u, m: self.messages.put((m.topic, m.payload))
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.on_connect = lambda c, *_a: c.subscribe(topic_filter, qos=1)
        self.client.connect("localhost" if tls else "127.0.0.1", port)
        self.client.loop_start()
        if not subscribed.wait(TIMEOUT):
            self.close()
            raise TimeoutError("no SUBACK")

    def collect(self, n: int) -> list[tuple[str, bytes]]:
        return [self.messages.get(timeout=TIMEOUT) for _ in range(n)]

    def assert_quiet(self) -> None:
        assert self.messages.empty(), "unexpected extra messages"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def records(n: int, start: int = 0, devices: int = 5) -> list[Record]:
    return [
        Record(
            id=f"gw1:{i}",
            seq=i,
            device_id=f"dev{i % devices}",
            ts=1_700_000_000.0 + i,
            metrics={"temp": 20.0 + i / 10, "ok": True, "n": i},
            tags={"site": "a"} if i % 2 else {},
        )
        for i in range(start, start + n)
    ]


def make_sink(port: int, name: str = "cloud", **options: Any) -> MqttSink:
    sink = create_sink(
        SinkConfig(name=name, url=f"mqtt://127.0.0.1:{port}", options=options), "gw1"
    )
    assert isinstance(sink, MqttSink)
    return sink


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_record_mode_delivers_every_record_with_topic_and_body(
    mosquitto: Mosquitto, protocol: str
) -> None:
    sub = Subscriber(mosquitto.port, "edgeway/#")
    sink = make_sink(mosquitto.port, protocol=protocol)
    try:
        await sink.start()
        batches = [records(300, 0), records(300, 300), records(7, 600)]
        for batch in batches:
            await sink.send_batch(batch)
        got = await asyncio.to_thread(sub.collect, 607)
        sub.assert_quiet()
    finally:
        await sink.close()
        sub.close()
    sent = [r for b in batches for r in b]
    expected = {
        (f"edgeway/gw1/{r.device_id}/telemetry", json.dumps(r.to_json_obj(), sort_keys=True))
        for r in sent
    }
    received = {(t, json.dumps(json.loads(p), sort_keys=True)) for t, p in got}
    assert received == expected
    # QoS 1 from one connection: per-device order is kept.
    for dev in {r.device_id for r in sent}:
        seqs = [json.loads(p)["id"] for t, p in got if t.endswith(f"/{dev}/telemetry")]
        assert seqs == [r.id for r in sent if r.device_id == dev]


def assert_delivered_in_order(got: list[tuple[str, bytes]], sent: list[Record]) -> None:
    """Every record arrived once, each device's records in the order sent."""
    assert sorted(json.loads(p)["id"] for _, p in got) == sorted(r.id for r in sent)
    for dev in {r.device_id for r in sent}:
        seqs = [json.loads(p)["id"] for t, p in got if t.endswith(f"/{dev}/telemetry")]
        assert seqs == [r.id for r in sent if r.device_id == dev]


@contextlib.contextmanager
def broker_and_subscriber(
    tmp_path: Path, extra: str = ""
) -> Iterator[tuple[Mosquitto, Subscriber]]:
    """A Mosquitto with ``extra`` configuration and a subscriber to ``edgeway/#`` on it."""
    broker = Mosquitto(tmp_path, extra=extra)
    broker.start()
    try:
        sub = Subscriber(broker.port, "edgeway/#")
        try:
            yield broker, sub
        finally:
            sub.close()
    finally:
        broker.kill()


async def deliver(
    sink: MqttSink, sub: Subscriber, batches: list[list[Record]]
) -> tuple[list[tuple[str, bytes]], set[str]]:
    """Send ``batches``: what the subscriber got, and the client ids of the
    sink's connections."""
    for batch in batches:
        await asyncio.wait_for(sink.send_batch(batch), TIMEOUT)
    got = await asyncio.to_thread(sub.collect, sum(len(b) for b in batches))
    sub.assert_quiet()
    return got, {c.client._client_id for c in sink._conns if c is not None}


async def test_several_connections_keep_each_devices_order(mosquitto: Mosquitto) -> None:
    """``connections: 3``: each batch shared out over three connections a
    device at a time, each device's records in order on its one connection;
    every record delivered."""
    sub = Subscriber(mosquitto.port, "edgeway/#")
    sink = make_sink(mosquitto.port, connections=3)
    batches = [records(400, 400 * k, devices=48) for k in range(3)]
    try:
        await sink.start()
        got, ids = await deliver(sink, sub, batches)
        assert ids == {"edgeway-gw1-cloud", "edgeway-gw1-cloud-1", "edgeway-gw1-cloud-2"}
    finally:
        await sink.close()
        sub.close()
    assert_delivered_in_order(got, [r for b in batches for r in b])


@pytest.mark.parametrize(
    ("protocol", "extra", "expected"),
    [
        ("5", "", 4),  # Receive Maximum 20: 80 in flight over four
        ("5", "max_inflight_messages 40", 2),
        ("5", "max_inflight_messages 100", 1),
        ("3.1.1", "", 1),  # no Receive Maximum in 3.1.1: one window of 1000
    ],
)
async def test_auto_connections_follow_the_receive_maximum(
    tmp_path: Path, protocol: str, extra: str, expected: int
) -> None:
    """The default ``connections: auto`` opens as many connections as bring
    about 80 publishes in flight under the window the broker grants (at most
    four); a batch keeps each device's order."""
    batches = [records(300, 300 * k, devices=40) for k in range(4)]
    with broker_and_subscriber(tmp_path, extra) as (broker, sub):
        sink = make_sink(broker.port, protocol=protocol)
        try:
            got, ids = await deliver(sink, sub, batches)
            expected_ids = {f"edgeway-gw1-cloud-{i}" for i in range(1, expected)}
            assert ids == {"edgeway-gw1-cloud"} | expected_ids
        finally:
            await sink.close()
    assert_delivered_in_order(got, [r for b in batches for r in b])


@pytest.mark.parametrize(
    ("protocol", "extra", "expected", "behind"),
    [
        ("5", "", 4, 16),  # Receive Maximum 20: 80 in flight, 320 while behind
        ("5", "max_inflight_messages 40", 2, 8),
        ("5", "max_inflight_messages 100", 1, 4),
        ("3.1.1", "", 1, 1),
    ],
)
async def test_auto_opens_more_connections_while_behind(
    tmp_path: Path, protocol: str, extra: str, expected: int, behind: int
) -> None:
    """``connections: auto`` while the sink is behind (a batch of 500
    messages or more): about 320 publishes in flight (at most 16
    connections); batches after it that are small again go out on the usual
    few, the extra connections idle. Each device's order holds throughout."""
    # The first batch connects the first connection, whose window decides.
    small = [records(300, 300 * k, devices=40) for k in range(2)]
    large = [records(2000, 600, devices=100), records(600, 2600, devices=100)]
    after = [records(300, 3200 + 300 * k, devices=40) for k in range(2)]
    with broker_and_subscriber(tmp_path, extra) as (broker, sub):
        sink = make_sink(broker.port, protocol=protocol)
        try:
            got, ids = await deliver(sink, sub, small)
            assert ids == {"edgeway-gw1-cloud"} | {
                f"edgeway-gw1-cloud-{i}" for i in range(1, expected)
            }
            got2, ids = await deliver(sink, sub, large)
            assert ids == {"edgeway-gw1-cloud"} | {
                f"edgeway-gw1-cloud-{i}" for i in range(1, behind)
            }
            extra_conns = [c for c in sink._conns[expected:] if c is not None]
            assert len(extra_conns) == behind - expected
            before = [c.window.writes for c in extra_conns]
            got3, _ids = await deliver(sink, sub, after)
            assert [c.window.writes for c in extra_conns] == before  # idle
        finally:
            await sink.close()
    assert_delivered_in_order(got + got2 + got3, [r for b in small + large + after for r in b])


async def test_auto_goes_on_without_an_extra_connection_the_broker_refuses(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker that takes only so many connections refuses the third and
    fourth that ``auto`` wants: the batch goes out on two, nothing fails or is
    lost. (Mosquitto 2.0 with ``max_connections 2`` takes three here: the
    test's subscriber and two of the sink's.)"""
    batches = [records(200, 200 * k, devices=30) for k in range(3)]
    with broker_and_subscriber(tmp_path, "max_connections 2") as (broker, sub):
        sink = make_sink(broker.port)
        try:
            got, _ids = await deliver(sink, sub, batches)
            assert sink._active == 2
            assert [c is not None for c in sink._conns] == [True, True] + [False] * 14
            assert "going on with 2 connections" in caplog.text
        finally:
            await sink.close()
    assert_delivered_in_order(got, [r for b in batches for r in b])


async def test_auto_sends_a_batch_that_fits_one_window_on_one_connection(
    mosquitto: Mosquitto,
) -> None:
    """At low rates (batches smaller than a window) the first connection takes
    the whole batch in its first write (a connection takes as many devices
    as its window has room for), so a batch waits for one round trip, not for
    the slowest of four."""
    sub = Subscriber(mosquitto.port, "edgeway/#")
    sink = make_sink(mosquitto.port)
    batches = [records(100), records(100, 100)]
    batches += [records(15, 200 + 15 * k, devices=15) for k in range(5)]
    try:
        await deliver(sink, sub, batches[:1])  # the first connects; the second opens the rest
        await deliver(sink, sub, batches[1:2])
        extra = [c for c in sink._conns[1:] if c is not None]
        assert len(extra) == 3
        before = [c.window.writes for c in extra]
        got, _ids = await deliver(sink, sub, batches[2:])
        assert [c.window.writes for c in extra] == before  # all on the first
    finally:
        await sink.close()
        sub.close()
    assert_delivered_in_order(got, [r for b in batches[2:] for r in b])


async def test_a_batch_sent_beside_another_takes_a_free_connection(tmp_path: Path) -> None:
    """``max_batches_in_flight``: with a default Mosquitto (four connections)
    a batch sent while another waits for its PUBACKs goes out on a connection
    the other does not hold, in the same turn of the loop, instead of
    queueing behind it; both arrive."""
    with broker_and_subscriber(tmp_path) as (broker, sub):
        sink = make_sink(broker.port)
        try:
            await deliver(sink, sub, [records(100), records(100, 100)])  # opens all four
            assert sink.max_batches_in_flight() == 4
            conns = [c for c in sink._conns[:4] if c is not None]
            before = [c.window.writes for c in conns]
            first, second = records(1, 500, devices=1), records(1, 501, devices=1)
            second[0].device_id = "other"
            t1 = asyncio.create_task(sink.send_batch(first))
            t2 = asyncio.create_task(sink.send_batch(second))
            await asyncio.wait_for(asyncio.gather(t1, t2), TIMEOUT)
            writes = [c.window.writes - b for c, b in zip(conns, before, strict=True)]
            assert writes == [1, 1, 0, 0], writes  # one each, the second not queued
            got = await asyncio.to_thread(sub.collect, 2)
            assert sorted(json.loads(p)["id"] for _, p in got) == sorted(
                r.id for r in first + second
            )
        finally:
            await sink.close()


async def test_a_batch_beside_another_on_a_refused_extra_connection_is_not_lost(
    tmp_path: Path,
) -> None:
    """The connection a batch sent beside another takes is an extra one the
    broker refuses (Mosquitto with ``max_connections 1``: the subscriber and
    the sink's first): the batch goes out on the first connection once that
    one is free, instead of returning with nothing sent."""
    with broker_and_subscriber(tmp_path, "max_connections 1") as (broker, sub):
        sink = make_sink(broker.port)
        try:
            await deliver(sink, sub, [records(1)])  # connects the first only
            assert sink.max_batches_in_flight() == 4  # extras not tried yet
            first, second = records(1, 500, devices=1), records(1, 501, devices=1)
            second[0].device_id = "other"
            await asyncio.wait_for(
                asyncio.gather(sink.send_batch(first), sink.send_batch(second)), TIMEOUT
            )
            got = await asyncio.to_thread(sub.collect, 2)
            assert sorted(json.loads(p)["id"] for _, p in got) == sorted(
                r.id for r in first + second
            )
            assert sink.max_batches_in_flight() == 1  # learnt
        finally:
            await sink.close()


def test_feed_gives_each_device_whole_largest_first() -> None:
    """A batch over several connections: one group per topic, in the batch's
    order, taken largest first (so the last ones taken are the small ones)."""
    from edgeway.sinks.mqtt import _Feed

    messages = [(b"a", b"1"), (b"b", b"1"), (b"a", b"2"), (b"c", b"1"), (b"a", b"3"), (b"b", b"2")]
    feed = _Feed(messages)
    assert feed.groups.pop() == [(b"a", b"1"), (b"a", b"2"), (b"a", b"3")]
    assert feed.groups.pop() == [(b"b", b"1"), (b"b", b"2")]
    assert feed.groups.pop() == [(b"c", b"1")]
    assert not feed.groups


async def test_closing_closes_each_connections_duplicate_descriptor(
    mosquitto: Mosquitto,
) -> None:
    """Each connection holds a duplicate of its socket's descriptor (for
    TCP_QUICKACK); closing the sink closes every one (not left to the garbage
    collector, or a busy gateway would hold them for a while)."""
    sink = make_sink(mosquitto.port)
    await sink.send_batch(records(100))
    await sink.send_batch(records(100, 100))  # opens the extra connections
    socks = [c.quickack_socket for c in sink._conns if c is not None]
    assert len(socks) == 4 and all(s is not None and s.fileno() >= 0 for s in socks)
    await sink.close()
    assert all(s is not None and s.fileno() == -1 for s in socks)


def test_cloud_presets_allow_one_connection() -> None:
    with pytest.raises(SinkOptionsError, match="one connection"):
        create_sink(
            SinkConfig(
                name="hub",
                url="mqtts://example.azure-devices.net",
                options={"preset": "azure_iot_hub", "password": "sas", "connections": 2},
            ),
            "gw1",
        )


def on_uvloop(coro: Any) -> None:
    """Run ``coro`` on uvloop, as ``edgeway run`` does: its transports are its
    own (one keeps the protocol's ``data_received`` it saw at connect)."""
    uvloop = pytest.importorskip("uvloop")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_pubacks_come_at_once_from_a_broker_with_nagle_on(
    tmp_path: Path, protocol: str
) -> None:
    await pubacks_come_at_once(tmp_path, protocol)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_pubacks_come_at_once_on_uvloop(tmp_path: Path, protocol: str) -> None:
    on_uvloop(pubacks_come_at_once(tmp_path, protocol))


async def pubacks_come_at_once(tmp_path: Path, protocol: str) -> None:
    """Mosquitto at its defaults: Nagle on (no set_tcp_nodelay) and a window of 20
    (its MQTT 5 Receive Maximum). It sends the first PUBACK of a burst and holds
    the rest until we ACK that one; a delayed ACK on our side (40 ms on Linux)
    would cost that much per window (v5) or per batch (3.1.1)."""
    broker = Mosquitto(tmp_path, nodelay=False)
    broker.start()
    sink = make_sink(broker.port, protocol=protocol)
    try:
        await sink.start()
        await sink.send_batch(records(100))  # connects
        assert sink._conns[0] is not None
        assert sink._conns[0].max_inflight == (20 if protocol == "5" else 1000)
        # Our own small writes never wait for the broker's ACKs either.
        sock = sink._conns[0].client._connection._transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        took = []
        for i in range(1, 16):
            t0 = time.perf_counter()
            await sink.send_batch(records(100, start=100 * i))
            took.append(time.perf_counter() - t0)
        # Loopback answers in well under a millisecond; 20 ms leaves room for a
        # loaded machine and is half a single delayed ACK.
        assert statistics.median(took) < 0.020, took
    finally:
        await sink.close()
        broker.kill()


async def test_batch_mode_sends_one_message_per_device(mosquitto: Mosquitto) -> None:
    sub = Subscriber(mosquitto.port, "fleet/#")
    sink = make_sink(mosquitto.port, mode="batch", topic="fleet/{sink}/{gateway_id}/{device_id}")
    batch = records(500, devices=4)
    try:
        await sink.send_batch(batch)
        got = await asyncio.to_thread(sub.collect, 4)
        sub.assert_quiet()
    finally:
        await sink.close()
        sub.close()
    for topic, payload in got:
        dev = topic.rsplit("/", 1)[1]
        assert topic == f"fleet/cloud/gw1/{dev}"
        body = json.loads(payload)
        assert body["gateway_id"] == "gw1"
        assert body["records"] == [r.to_json_obj() for r in batch if r.device_id == dev]


async def test_batch_mode_splits_at_max_message_bytes(mosquitto: Mosquitto) -> None:
    sub = Subscriber(mosquitto.port, "edgeway/#")
    sink = make_sink(mosquitto.port, mode="batch", max_message_bytes=1000)
    batch = records(100, devices=1)
    try:
        await sink.send_batch(batch)
        one = len(json.dumps(batch[0].to_json_obj()))
        n_msgs = len(sink.encode(batch))
        assert n_msgs > 100 * one // 1000
        got = await asyncio.to_thread(sub.collect, n_msgs)
        sub.assert_quiet()
    finally:
        await sink.close()
        sub.close()
    assert all(len(p) <= 1000 for _, p in got)
    ids = [r["id"] for _, p in got for r in json.loads(p)["records"]]
    assert ids == [r.id for r in batch]


async def test_record_larger_than_limit_is_permanent(mosquitto: Mosquitto) -> None:
    sink = make_sink(mosquitto.port, max_message_bytes=50)
    try:
        with pytest.raises(PermanentSinkError, match="max_message_bytes"):
            await sink.send_batch(records(1))
    finally:
        await sink.close()


async def test_broker_down_then_back(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path)
    broker.start()
    sink = make_sink(broker.port, connect_timeout=2)
    try:
        await sink.send_batch(records(50))
        assert sink.state.connected
        broker.kill()
        for _ in range(3):  # down: every call fails fast and retryably, nothing hangs
            with pytest.raises(RetryableSinkError):
                await sink.send_batch(records(50, 50))
        assert not sink.state.connected
        broker.start()
        sub = Subscriber(broker.port, "edgeway/#")
        try:
            await sink.send_batch(records(50, 50))
            got = await asyncio.to_thread(sub.collect, 50)
        finally:
            sub.close()
        assert sorted(json.loads(p)["id"] for _, p in got) == sorted(
            f"gw1:{i}" for i in range(50, 100)
        )
        assert sink.state.connected
    finally:
        await sink.close()
        broker.kill()


async def test_a_broker_back_after_a_long_backoff_is_probed_and_drained_at_once(
    tmp_path: Path,
) -> None:
    """The runner probes the broker's port while it backs off: once the broker
    is back the drain starts within seconds, not at the end of a 30 s backoff."""

    class LongestBackoff(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return b

    class WatchedSink(MqttSink):
        failed = asyncio.Event()

        async def send_batch(self, records: Sequence[Record]) -> None:
            try:
                await super().send_batch(records)
            except Exception:
                self.failed.set()
                raise

    broker = Mosquitto(tmp_path)  # not started: the broker is down
    sink = WatchedSink(
        SinkConfig(name="cloud", url=f"mqtt://127.0.0.1:{broker.port}", options={}), "gw1"
    )
    ob = Outbox(tmp_path / "o.db", gateway_id="gw1", config=OutboxSection(), sink_names=["cloud"])
    await ob.open()
    runner = SinkRunner(ob, sink, backoff_initial=30.0, backoff_max=60.0, rng=LongestBackoff())
    task = asyncio.create_task(runner.run())
    try:
        await ob.submit([Reading(f"dev{i % 3}", 1_700_000_000.0 + i, {"n": i}) for i in range(40)])
        async with asyncio.timeout(TIMEOUT):
            await sink.failed.wait()  # the first attempt failed: a 30 s backoff began
        await asyncio.sleep(1.5)  # the outage lasts a while
        await asyncio.to_thread(broker.start)
        t0 = time.monotonic()
        async with asyncio.timeout(5):  # the broker's PUBACKs within seconds, not 30
            while ob.counters()["cloud"]["delivered"] < 40:
                await ob.wait_for_commit()
        assert time.monotonic() - t0 < 5
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sink.close()
        await ob.close()
        broker.kill()


async def test_broker_killed_mid_batch_fails_the_batch(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path)
    broker.start()
    # A window of 1 makes the batch take one round trip per record, so the kill lands inside it.
    sink = make_sink(broker.port, max_inflight=1, connect_timeout=2)
    sub = Subscriber(broker.port, "edgeway/#")
    try:
        task = asyncio.create_task(sink.send_batch(records(20_000)))
        await asyncio.to_thread(sub.collect, 10)  # the batch is under way
        broker.kill()
        with pytest.raises(RetryableSinkError):
            await asyncio.wait_for(task, TIMEOUT)
        assert not sink.state.connected
        broker.start()
        await sink.send_batch(records(10))
        assert sink.state.connected
    finally:
        sub.close()
        await sink.close()
        broker.kill()


async def test_refused_publish_is_permanent(tmp_path: Path) -> None:
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite allowed/#\n")
    # Mosquitto 2.0.11 closes the connection instead of answering PUBACK 0x87
    # when max_queued_messages is 0, so this broker keeps the default queue.
    broker = Mosquitto(tmp_path, extra=f"acl_file {acl}", unlimited_queue=False)
    broker.start()
    try:
        # Distinct names, hence client ids: the same id would take over the session.
        ok = make_sink(broker.port, name="ok", topic="allowed/{device_id}")
        denied = make_sink(broker.port, name="denied", topic="denied/{device_id}")
        try:
            await ok.send_batch(records(5))
            # MQTT 5: Mosquitto answers PUBACK 0x87 (not authorized).
            with pytest.raises(PermanentSinkError, match="0x87"):
                await denied.send_batch(records(5))
        finally:
            await ok.close()
            await denied.close()
    finally:
        broker.kill()


async def test_persistent_session_and_client_id(mosquitto: Mosquitto) -> None:
    sink = make_sink(mosquitto.port)
    assert sink.client_id == "edgeway-gw1-cloud"
    try:
        await sink.send_batch(records(1))
        await sink.close()
        # Same client id, clean start off: the broker still has the session.
        peer = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id=sink.client_id, protocol=paho.MQTTv5
        )
        present = threading.Event()
        peer.on_connect = lambda _c, _u, flags, _rc, _p: (
            present.set() if flags.session_present else None
        )
        peer.connect("127.0.0.1", mosquitto.port, clean_start=False)
        peer.loop_start()
        try:
            assert await asyncio.to_thread(present.wait, TIMEOUT)
        finally:
            peer.disconnect()
            peer.loop_stop()
    finally:
        await sink.close()


async def test_tls_with_client_certificate(tmp_path: Path) -> None:
    certs = make_cert_files(tmp_path / "certs")
    broker = Mosquitto(tmp_path, tls=certs)
    broker.start()
    sub = Subscriber(broker.port, "edgeway/#", tls=certs)
    sink = create_sink(
        SinkConfig(
            name="cloud",
            url=f"mqtts://localhost:{broker.port}",
            options={
                "ca": str(certs.ca_cert),
                "cert": str(certs.client_cert),
                "key": str(certs.client_key),
            },
        ),
        "gw1",
    )
    no_cert = create_sink(
        SinkConfig(
            name="nocert",
            url=f"mqtts://localhost:{broker.port}",
            options={"ca": str(certs.ca_cert), "connect_timeout": 2},
        ),
        "gw1",
    )
    try:
        await sink.send_batch(records(20))
        got = await asyncio.to_thread(sub.collect, 20)
        assert {json.loads(p)["id"] for _, p in got} == {f"gw1:{i}" for i in range(20)}
        with pytest.raises(RetryableSinkError):
            await no_cert.send_batch(records(1))
    finally:
        await sink.close()
        await no_cert.close()
        sub.close()
        broker.kill()


@pytest.mark.parametrize(
    ("options", "url", "key"),
    [
        ({"colour": "red"}, "mqtt://h", "options.colour"),
        ({"mode": "bulk"}, "mqtt://h", "options.mode"),
        ({"topic": "x/{nope}"}, "mqtt://h", "options.topic"),
        ({"client_id": "{device_id}"}, "mqtt://h", "options.client_id"),
        ({"ca": "/x/ca.pem"}, "mqtt://h", "options.ca"),
        ({"ca": "/nonexistent/ca.pem"}, "mqtts://h", "options.ca"),
        ({"preset": "aws_iot"}, "mqtt://h", "options.preset"),
        ({"preset": "aws_iot"}, "mqtts://h", "options.cert"),
        ({"preset": "azure_iot_hub"}, "mqtts://h", "options.sas_key"),
        ({"preset": "azure_iot_hub", "sas_key": "!!"}, "mqtts://h", "options.sas_key"),
        ({"max_inflight": 0}, "mqtt://h", "options.max_inflight"),
        ({}, "mqtt://h:99999", "url"),
    ],
)
def test_bad_options_name_the_key(options: dict[str, Any], url: str, key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        MqttSink(SinkConfig(name="c", url=url, options=options), "gw1")


def test_url_credentials_and_defaults() -> None:
    sink = MqttSink(SinkConfig(name="c", url="mqtts://us%40er:p%3Ass@broker.example"), "gw1")
    assert (sink.host, sink.port) == ("broker.example", 8883)
    assert (sink.username, sink.password) == ("us@er", "p:ss")
    assert sink.ssl_context is not None
    plain = MqttSink(
        SinkConfig(name="c", url="mqtt://broker.example", options={"protocol": 5}), "g"
    )
    assert plain.port == 1883 and plain.ssl_context is None and plain.mode == "record"


def test_aws_preset(tmp_path: Path) -> None:
    certs = make_cert_files(tmp_path)
    sink = MqttSink(
        SinkConfig(
            name="aws",
            url="mqtts://abc-ats.iot.eu-west-1.amazonaws.com",
            options={
                "preset": "aws_iot",
                "thing_name": "gw-thing",
                "cert": str(certs.client_cert),
                "key": str(certs.client_key),
            },
        ),
        "gw1",
    )
    assert sink.port == 8883
    assert sink.client_id == "gw-thing"
    assert sink.topic_template == "dt/edgeway/{gateway_id}/{device_id}/telemetry"
    assert sink.mode == "batch"
    assert sink.max_message_bytes == 128 * 1024
    assert sink.session_expiry == 3600


def test_azure_preset_and_sas_token() -> None:
    key = "c2VjcmV0LWtleS1mb3ItdGVzdHM="
    sink = MqttSink(
        SinkConfig(
            name="az",
            url="mqtts://myhub.azure-devices.net",
            options={"preset": "azure_iot_hub", "azure_device_id": "gw-1", "sas_key": key},
        ),
        "gw1",
    )
    assert sink.client_id == "gw-1"
    assert sink.username == "myhub.azure-devices.net/gw-1/?api-version=2021-04-12"
    assert sink.topic_template == "devices/gw-1/messages/events/"
    assert sink.mode == "batch"
    token = azure_sas_token("myhub.azure-devices.net/devices/gw-1", key, 1_800_000_000)
    assert token.startswith(
        "SharedAccessSignature sr=myhub.azure-devices.net%2Fdevices%2Fgw-1&sig="
    )
    assert token.endswith("&se=1800000000")
    # The signature is HMAC-SHA256 of "<url-encoded uri>\n<expiry>" with the decoded key.
    import base64
    import hashlib
    import hmac
    import urllib.parse

    sig = urllib.parse.unquote(token.split("sig=")[1].split("&")[0])
    want = hmac.new(
        base64.b64decode(key),
        b"myhub.azure-devices.net%2Fdevices%2Fgw-1\n1800000000",
        hashlib.sha256,
    ).digest()
    assert base64.b64decode(sig) == want


def test_batch_size_options_reach_the_runner() -> None:
    sink = MqttSink(
        SinkConfig(
            name="c",
            url="mqtt://h",
            options={"max_records": 2000, "max_bytes": "2MiB", "max_wait": "20ms"},
        ),
        "gw1",
    )
    assert (sink.max_batch_records, sink.max_batch_bytes, sink.max_wait) == (2000, 2 << 20, 0.02)


async def test_silent_broker_fails_the_batch_after_ack_timeout() -> None:
    """A broker that accepts the connection but never sends PUBACK must not hang the sink."""
    connections: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        await reader.read(1024)  # CONNECT
        writer.write(b"\x20\x02\x00\x00")  # CONNACK 3.1.1, accepted
        while await reader.read(65536):  # swallow every PUBLISH
            pass

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sink = make_sink(port, protocol="3.1.1", ack_timeout=0.5)
    try:
        with pytest.raises(RetryableSinkError, match="PUBACKs missing"):
            await asyncio.wait_for(sink.send_batch(records(10)), TIMEOUT)
        assert not sink.state.connected
        # The next attempt opens a new connection.
        with pytest.raises(RetryableSinkError, match="PUBACKs missing"):
            await asyncio.wait_for(sink.send_batch(records(10)), TIMEOUT)
        assert len(connections) == 2
    finally:
        await sink.close()
        server.close()
        for w in connections:
            w.transport.abort()
        await server.wait_closed()


class LinkProxy:
    """A TCP proxy in front of the broker: cutting it is an outage of the sink's link only."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in list(self.writers):
            w.transport.abort()
        await self.server.wait_closed()
        self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self.writers |= {writer, up_writer}

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            w.transport.abort()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self.writers -= {writer, up_writer}


async def test_outbox_runner_delivers_everything_across_a_link_outage(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """The real outbox and sink runner drive the sink; the link is cut mid-drain.

    Afterwards every stored reading reached the subscriber (duplicates allowed,
    with the same id), in per-device order, and the outbox counts all delivered.
    """
    n, devices = 6000, 10
    sub = Subscriber(mosquitto.port, "edgeway/#")
    proxy = LinkProxy(mosquitto.port)
    await proxy.start()
    outbox = Outbox(
        tmp_path / "outbox.db",
        gateway_id="gw1",
        config=OutboxSection(durability="os"),
        sink_names=["cloud"],
    )
    await outbox.open()
    sink = create_sink(
        SinkConfig(
            name="cloud",
            url=f"mqtt://127.0.0.1:{proxy.port}",
            # A small window keeps the drain slow enough for the cut to land inside it.
            options={"max_records": 200, "max_inflight": 10, "connect_timeout": 2},
        ),
        "gw1",
    )
    runner = SinkRunner(outbox, sink, backoff_initial=0.05, backoff_max=0.2)
    task: asyncio.Task[None] | None = None
    try:
        await sink.start()
        readings = [Reading(f"dev{i % devices}", 1_700_000_000.0 + i, {"i": i}) for i in range(n)]
        await asyncio.gather(*(outbox.submit(readings[i : i + 500]) for i in range(0, n, 500)))
        task = asyncio.create_task(runner.run())
        got = await asyncio.to_thread(sub.collect, 300)  # the drain is under way
        await proxy.cut()
        pending_at_cut = outbox.counters()["cloud"]["pending"]
        await proxy.start()  # same port: the runner's retries reconnect
        async with asyncio.timeout(30):
            while outbox.counters()["cloud"]["pending"]:
                await outbox.wait_for_commit()
        assert pending_at_cut > 0, "the link was cut after the drain had finished"
        counters = outbox.counters()["cloud"]
        assert counters["delivered"] == counters["accepted"] == n
        # Everything PUBACKed reaches the subscriber shortly; wait for the
        # distinct ids (duplicates from retried batches may come too).
        ids = {json.loads(p)["id"] for _, p in got}
        while len(ids) < n:
            try:
                msg = await asyncio.to_thread(sub.messages.get, True, TIMEOUT)
            except queue.Empty:
                break
            got.append(msg)
            ids.add(json.loads(msg[1])["id"])
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await sink.close()
        await outbox.close()
        if proxy.server is not None:
            await proxy.cut()
        sub.close()
    first_seen: dict[str, list[int]] = {}
    seen: set[int] = set()
    for topic, payload in got:
        body = json.loads(payload)
        seq = int(body["id"].split(":")[1])
        assert topic == f"edgeway/gw1/{body['device_id']}/telemetry"
        if seq not in seen:
            seen.add(seq)
            first_seen.setdefault(body["device_id"], []).append(seq)
    assert len(seen) == n, f"{n - len(seen)} readings missing"
    for dev, seqs in first_seen.items():
        assert seqs == sorted(seqs), f"{dev} out of order"


async def test_broker_maximum_packet_size_is_respected(tmp_path: Path) -> None:
    # Mosquitto announces max_packet_size to MQTT 5 clients in CONNACK.
    broker = Mosquitto(tmp_path, extra="max_packet_size 300")
    broker.start()
    sink = make_sink(broker.port)
    big = Record(id="gw1:1", seq=1, device_id="d", ts=1.0, metrics={"s": "x" * 400})
    try:
        await sink.send_batch(records(5))
        with pytest.raises(PermanentSinkError, match="maximum packet size 300"):
            await sink.send_batch([*records(2, 5), big])
        await sink.send_batch(records(2, 10))  # the connection was never broken
        assert sink._conns[0] is not None and sink._conns[0].max_packet_size == 300
    finally:
        await sink.close()
        broker.kill()


class ScriptedBroker:
    """A minimal MQTT server speaking raw bytes: CONNACK, then PUBACKs for
    the PUBLISHes it reads, written in awkward pieces (one byte, a packet and
    a half, PINGRESPs in between), with chosen reason codes. Mosquitto cannot
    be made to split its PUBACKs like this; the sink's bulk PUBACK reader
    must cope with any split (see ``_bulk_pubacks``)."""

    def __init__(self, v5: bool, puback: Any, split: bool = True) -> None:
        self.v5 = v5
        self.split = split
        self.puback = puback  # (index, packet id) -> PUBACK packet bytes
        self.server: asyncio.Server | None = None
        self.received = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _packet(self, r: asyncio.StreamReader) -> tuple[int, bytes]:
        first = (await r.readexactly(1))[0]
        n, mult = 0, 1
        while True:
            b = (await r.readexactly(1))[0]
            n += (b & 0x7F) * mult
            mult *= 128
            if not b & 0x80:
                break
        return first, await r.readexactly(n)

    async def _client(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        sock = w.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            kind, _ = await self._packet(r)
            assert kind == 0x10
            w.write(b"\x20\x03\x00\x00\x00" if self.v5 else b"\x20\x02\x00\x00")
            out = bytearray()
            while True:
                kind, body = await self._packet(r)
                if kind >> 4 != 3:
                    continue
                tlen = int.from_bytes(body[:2], "big")
                mid = int.from_bytes(body[2 + tlen : 4 + tlen], "big")
                out += self.puback(self.received, mid)
                self.received += 1
                if self.received % 7 == 0:
                    out += b"\xd0\x00"  # PINGRESP between PUBACKs
                # Flush in pieces of 1, 3, 5, 7, ... bytes: splits everywhere.
                size = 1 + 2 * (self.received % 4)
                while self.split and len(out) >= size:
                    w.write(bytes(out[:size]))
                    del out[:size]
                    await w.drain()
                if out and r._buffer == b"":  # type: ignore[attr-defined]
                    await asyncio.sleep(0.001)
                    w.write(bytes(out))
                    out.clear()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()


@pytest.mark.parametrize("window", [50, 200])  # 200: above _GATHER_MIN in flight
@pytest.mark.parametrize("v5", [True, False])
async def test_pubacks_split_anywhere_are_all_counted(v5: bool, window: int) -> None:
    await pubacks_split_anywhere(v5, window)


@pytest.mark.parametrize("v5", [True, False])
def test_pubacks_split_anywhere_on_uvloop(v5: bool) -> None:
    on_uvloop(pubacks_split_anywhere(v5, 200))


async def pubacks_split_anywhere(v5: bool, window: int) -> None:
    def puback(i: int, mid: int) -> bytes:
        m = mid.to_bytes(2, "big")
        if not v5 or i % 3 == 0:
            return b"\x40\x02" + m
        if i % 3 == 1:
            return b"\x40\x03" + m + b"\x10"  # success: no matching subscribers
        return b"\x40\x04" + m + b"\x00\x00"  # success, empty properties

    broker = ScriptedBroker(v5, puback)
    port = await broker.start()
    sink = make_sink(port, protocol="5" if v5 else "3.1.1", max_inflight=window)
    try:
        for k in range(4):
            await asyncio.wait_for(sink.send_batch(records(120, k * 120)), 10)
        assert broker.received == 480
    finally:
        await sink.close()
        await broker.close()


async def test_a_refusal_among_split_pubacks_is_reported() -> None:
    def puback(i: int, mid: int) -> bytes:
        code = b"\x87" if i == 61 else b"\x10"  # 0x87 not authorized
        return b"\x40\x03" + mid.to_bytes(2, "big") + code

    # Whole runs of PUBACKs per write: the refusal is read by the bulk path.
    broker = ScriptedBroker(True, puback, split=False)
    port = await broker.start()
    sink = make_sink(port, max_inflight=50)
    try:
        await asyncio.wait_for(sink.send_batch(records(50)), 10)
        with pytest.raises(PermanentSinkError, match="broker refused 1 of 50 messages: 0x87"):
            await asyncio.wait_for(sink.send_batch(records(50, 50)), 10)
        await asyncio.wait_for(sink.send_batch(records(50, 100)), 10)
    finally:
        await sink.close()
        await broker.close()
