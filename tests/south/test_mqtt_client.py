"""MQTT client mode against a real Mosquitto (/usr/sbin/mosquitto on a free loopback port)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.publish as paho_publish
import pytest
from ingest_doubles import RecordingIngest

from certs import (
    CertFiles,
    tls_certs,  # noqa: F401  (fixture)
)
from edgeway.codecs.sparkplug import BOOLEAN, DOUBLE, SparkplugMetric, encode_payload
from edgeway.config import MqttClientConfig, parse_config
from edgeway.ingest import IngestStatus
from edgeway.south.base import adapter_class
from edgeway.south.mqtt.codec import MqttReader, encode
from edgeway.south.mqtt.packets import (
    MQTT_5,
    ConnAck,
    Connect,
    PingReq,
    Properties,
    ProtocolError,
    PubAck,
    Publish,
    SubAck,
    Subscribe,
)
from edgeway.south.mqtt_client import MqttClientAdapter, topic_matches

MOSQUITTO = "/usr/sbin/mosquitto"
TIMEOUT = 10.0
"""Bound for any wait on the local broker (loopback answers in well under 1 ms)."""
DOCS = Path(__file__).resolve().parents[2] / "docs" / "protocols" / "mqtt-client.md"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Mosquitto:
    """A Mosquitto process on a free loopback port; restartable on the same port."""

    def __init__(self, directory: Path, extra: str = "") -> None:
        self.port = free_port()
        self.conf = directory / "mosquitto.conf"
        # max_queued_messages 0: unlimited (the default 1000 silently drops, MEASUREMENTS.md).
        # "user root": started as root, Mosquitto would switch to "mosquitto", who cannot
        # read pytest's tmp files.
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nmax_queued_messages 0\nset_tcp_nodelay true\n"
            f"user root\n{extra or 'allow_anonymous true'}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"mosquitto exited: {self.proc.stderr.read().decode() if self.proc.stderr else ''}"
                )
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)  # polling a port: there is no event to wait on
        raise TimeoutError("mosquitto did not start listening")

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(TIMEOUT)
            if self.proc.stderr is not None:
                self.proc.stderr.close()
            self.proc = None


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    m = Mosquitto(tmp_path)
    m.start()
    try:
        yield m
    finally:
        m.stop()


Start = Callable[..., Any]


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Start]:
    """Factory: run an MqttClientAdapter until the test ends."""
    tasks: list[asyncio.Task[None]] = []

    async def _start(
        port: int, ingest: Any = None, wait: bool = True, **options: Any
    ) -> MqttClientAdapter:
        options.setdefault("name", "ext")
        options.setdefault("url", f"mqtt://127.0.0.1:{port}")
        adapter = MqttClientAdapter(
            MqttClientConfig.model_validate(options),
            ingest=ingest if ingest is not None else RecordingIngest(),
            gateway_id="gw1",
            data_dir=tmp_path,
        )
        tasks.append(asyncio.create_task(adapter.run()))
        if wait:
            async with asyncio.timeout(TIMEOUT):
                await adapter.ready.wait()
        return adapter

    try:
        yield _start
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def publish(port: int, *messages: tuple[str, bytes | str], qos: int = 1, **kw: Any) -> None:
    """Publish with paho (one connection, in order), off the event loop."""
    msgs = [{"topic": t, "payload": p, "qos": qos} for t, p in messages]
    await asyncio.to_thread(paho_publish.multiple, msgs, hostname="127.0.0.1", port=port, **kw)


def metrics(ingest: RecordingIngest) -> list[tuple[str, dict[str, Any]]]:
    return [(r.device_id, r.metrics) for r in ingest.readings]


def test_topic_matching() -> None:
    assert topic_matches("a/+/c", "a/b/c")
    assert topic_matches("a/#", "a/b/c") and topic_matches("a/#", "a")
    assert not topic_matches("a/+", "a/b/c")
    assert not topic_matches("+/x", "$SYS/x")
    assert not topic_matches("a/b", "a/b/c")


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_topic_pattern_device_ids_and_codec(
    broker: Mosquitto, start: Start, protocol: str
) -> None:
    ingest = RecordingIngest()
    adapter = await start(
        broker.port,
        ingest,
        protocol=protocol,
        subscriptions=[
            {"topic": "plant/+/sensors/{device_id}", "codec_options": {"timestamp": "time"}}
        ],
    )
    await publish(
        broker.port,
        ("plant/hall1/sensors/t-7", json.dumps({"time": 1700000000000, "temp": 21.5})),
        ("plant/hall1/sensors/t-8", b"{not json"),
        ("plant/hall1/other/t-9", b'{"x": 1}'),
        ("plant/hall2/sensors/t-8", b'{"temp": 19}'),
    )
    await ingest.wait_readings(2)
    assert metrics(ingest) == [("t-7", {"temp": 21.5}), ("t-8", {"temp": 19})]
    r = ingest.readings[0]
    assert r.ts == 1700000000.0
    assert (r.origin.adapter, r.origin.address, r.origin.client_id) == (
        "mqtt_client",
        "plant/hall1/sensors/t-7",
        "ext",
    )
    assert adapter.decode_errors.counts == {("t-8", "invalid_json"): 1}
    await asyncio.sleep(0)  # one loop turn: the last done-callback counts its readings
    assert adapter.state.readings == 2 and adapter.state.connected


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_puback_only_after_the_ingest_future_resolves(
    broker: Mosquitto, start: Start, protocol: str
) -> None:
    ingest = RecordingIngest(auto=False)
    adapter = await start(
        broker.port, ingest, protocol=protocol, subscriptions=[{"topic": "d/{device_id}"}]
    )
    await publish(broker.port, ("d/a", b'{"n": 1}'))
    await ingest.wait_pending(1)

    # The ingest never resolved: no PUBACK went out, so after a reconnect Mosquitto redelivers.
    adapter.request_reconnect()
    await ingest.wait_pending(2)
    assert [b[0].metrics for b in ingest.batches] == [{"n": 1}, {"n": 1}]
    async with asyncio.timeout(TIMEOUT):  # redelivery comes right after CONNACK, before SUBACK
        await adapter.wait_for(lambda: adapter.connections == 2)

    # Now resolve the redelivered one: it is acknowledged and not delivered again. A marker
    # published after the next reconnect proves it (a redelivery would arrive before it).
    ingest.pending[1].set_result(IngestStatus.ACCEPTED)
    await asyncio.sleep(0)  # let the done-callback send the PUBACK
    adapter.request_reconnect()
    async with asyncio.timeout(TIMEOUT):
        await adapter.wait_for(lambda: adapter.connections == 3)
    ingest.auto = True
    await publish(broker.port, ("d/b", b'{"marker": 1}'))
    await ingest.wait_readings(3)
    assert [b[0].metrics for b in ingest.batches] == [{"n": 1}, {"n": 1}, {"marker": 1}]


async def test_outbox_full_keeps_the_message_at_the_broker(broker: Mosquitto, start: Start) -> None:
    ingest = RecordingIngest(status=IngestStatus.REJECTED_FULL)
    adapter = await start(broker.port, ingest, subscriptions=[{"topic": "d/{device_id}"}])
    await publish(broker.port, ("d/a", b'{"n": 1}'))
    await ingest.wait_readings(1)
    # Refused: not acknowledged; the adapter reconnects and the broker redelivers, until there is room.
    ingest.status = IngestStatus.ACCEPTED
    await ingest.wait_readings(2)
    assert [b[0].metrics for b in ingest.batches][:2] == [{"n": 1}, {"n": 1}]
    assert adapter.state.rejected >= 1


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_recovers_after_one_failed_ingest(
    broker: Mosquitto, start: Start, protocol: str, caplog: pytest.LogCaptureFixture
) -> None:
    """One failed outbox commit must not stop the adapter: the message is redelivered
    after a reconnect and everything published after it still arrives."""
    ingest = RecordingIngest(auto=False)
    adapter = await start(
        broker.port, ingest, protocol=protocol, subscriptions=[{"topic": "d/{device_id}"}]
    )
    await publish(broker.port, ("d/a", b'{"n": 0}'))
    await ingest.wait_pending(1)
    ingest.auto = True
    with caplog.at_level(logging.WARNING, logger="edgeway.south.mqtt_client"):
        ingest.pending[0].set_exception(sqlite3.OperationalError("disk I/O error"))
        # Well past the in-flight window either side grants (Mosquitto 20 for 3.1.1,
        # our receive_maximum 100 for MQTT 5): without recovery those stop arriving.
        n = 300
        await publish(broker.port, *[("d/a", json.dumps({"n": i})) for i in range(1, n + 1)])
        await ingest.wait_readings(n + 1)
        async with asyncio.timeout(TIMEOUT):
            while {r.metrics["n"] for r in ingest.readings[1:]} != set(range(n + 1)):
                await ingest.wait_readings(len(ingest.readings) + 1)
    assert adapter.state.errors >= 1 and adapter.connections >= 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("ingest failed" in m and "disk I/O error" in m for m in warnings), warnings


class ScriptedBroker:
    """An MQTT 5 server on a free port that speaks through edgeway's codec and
    does what a test tells it: CONNACK (with properties), SUBACK, then
    ``after_suback`` bytes. Records every packet it reads and its CONNECTs."""

    def __init__(self, connack: ConnAck, after_suback: bytes = b"") -> None:
        self.connack = connack
        self.after_suback = after_suback
        self.packets: list[Any] = []
        self.connects = 0
        self._changed = asyncio.Event()
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(TIMEOUT):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    async def _client(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        reader = MqttReader()
        try:
            while data := await r.read(65536):
                for packet in reader.feed(data):
                    self.packets.append(packet)
                    if isinstance(packet, Connect):
                        self.connects += 1
                        w.write(encode(self.connack, MQTT_5))
                    elif isinstance(packet, Subscribe):
                        granted = [sub.qos for sub in packet.subscriptions]
                        w.write(encode(SubAck(packet.packet_id, granted), MQTT_5))
                        w.write(self.after_suback)
                self._changed.set()
        except (ConnectionError, ProtocolError):
            pass
        finally:
            w.close()
            self._changed.set()


async def test_keepalive_pings_and_a_silent_broker_is_dropped(start: Start) -> None:
    # The broker asks for a 1 s keepalive (MQTT 5 Server Keep Alive) and then
    # never answers a PINGREQ: after 1.5 keepalives without a packet the adapter
    # drops the connection (a cut link shows no error) and connects again.
    broker = ScriptedBroker(ConnAck(properties=Properties(server_keep_alive=1)))
    port = await broker.start()
    try:
        adapter = await start(port, subscriptions=[{"topic": "d/{device_id}"}])
        await broker.wait_for(lambda: any(isinstance(p, PingReq) for p in broker.packets))
        async with asyncio.timeout(TIMEOUT):
            await adapter.wait_for(lambda: adapter.connections == 2)
        assert broker.connects == 2
        assert adapter.state.errors >= 1
    finally:
        await broker.close()


async def test_a_malformed_packet_from_the_broker_drops_the_connection(
    start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    # A PUBLISH whose topic length runs past the packet, then a good one: the
    # adapter drops the connection at the bad one (the codec's error, logged on
    # one line) and connects again; nothing after it is taken.
    bad = b"\x30\x03\x00\x09d"
    good = encode(Publish("d/x", b'{"n": 1}'), MQTT_5)
    broker = ScriptedBroker(ConnAck(), after_suback=bad + good)
    port = await broker.start()
    ingest = RecordingIngest()
    try:
        with caplog.at_level(logging.WARNING, logger="edgeway.south.mqtt_client"):
            adapter = await start(port, ingest, subscriptions=[{"topic": "d/{device_id}"}])
            async with asyncio.timeout(TIMEOUT):
                await adapter.wait_for(lambda: adapter.connections == 2)
        assert ingest.readings == []
        lost = [r.getMessage() for r in caplog.records if "connection lost" in r.getMessage()]
        assert lost and "bad packet from the broker" in lost[0] and "\n" not in lost[0]
    finally:
        await broker.close()


async def test_pubacks_of_one_read_go_out_in_order(start: Start) -> None:
    # 50 QoS 1 messages in one write: each is acknowledged once, in order.
    burst = b"".join(
        encode(Publish(f"d/dev{i % 3}", b'{"n": %d}' % i, qos=1, packet_id=i + 1), MQTT_5)
        for i in range(50)
    )
    broker = ScriptedBroker(ConnAck(), after_suback=burst)
    port = await broker.start()
    ingest = RecordingIngest()
    try:
        await start(port, ingest, subscriptions=[{"topic": "d/{device_id}"}])
        acked = lambda: [p.packet_id for p in broker.packets if isinstance(p, PubAck)]  # noqa: E731
        await broker.wait_for(lambda: len(acked()) >= 50)
        assert acked() == list(range(1, 51))
        assert [r.metrics["n"] for r in ingest.readings] == list(range(50))
    finally:
        await broker.close()


async def test_reading_pauses_while_a_submit_waits_for_the_outbox(
    broker: Mosquitto, start: Start
) -> None:
    # A broker with a backlog sends as fast as we acknowledge; reading on while
    # the outbox stores would let ingest take the event loop from the sinks.
    ingest = RecordingIngest(auto=False)
    adapter = await start(broker.port, ingest, subscriptions=[{"topic": "d/{device_id}"}])
    conn = adapter._conn
    assert conn is not None and conn._transport is not None
    await publish(broker.port, ("d/a", b'{"n": 1}'))
    await ingest.wait_pending(1)
    assert not conn._transport.is_reading()
    ingest.pending[0].set_result(IngestStatus.ACCEPTED)
    await asyncio.sleep(0)  # the done-callback
    assert conn._transport.is_reading()
    ingest.auto = True
    await publish(broker.port, ("d/a", b'{"n": 2}'))
    await ingest.wait_readings(2)


def test_a_connect_the_codec_refuses_stops_start_up(tmp_path: Path) -> None:
    config = MqttClientConfig.model_validate(
        {
            "name": "ext",
            "url": "mqtt://127.0.0.1:1883",
            "protocol": "3.1.1",
            "password": "no user",
            "subscriptions": [{"topic": "d/{device_id}"}],
        }
    )
    with pytest.raises(ValueError, match=r"mqtt_client ext: .*password without a user name"):
        MqttClientAdapter(config, ingest=RecordingIngest(), gateway_id="gw1", data_dir=tmp_path)


def test_on_uvloop(tmp_path: Path) -> None:
    """``edgeway run`` runs on uvloop, whose transports are its own classes."""
    uvloop = pytest.importorskip("uvloop")

    async def run() -> None:
        broker = Mosquitto(tmp_path, extra="allow_anonymous true")
        broker.start()
        ingest = RecordingIngest()
        adapter = MqttClientAdapter(
            MqttClientConfig.model_validate(
                {
                    "name": "ext",
                    "url": f"mqtt://127.0.0.1:{broker.port}",
                    "subscriptions": [{"topic": "d/{device_id}"}],
                }
            ),
            ingest=ingest,
            gateway_id="gw1",
            data_dir=tmp_path,
        )
        task = asyncio.create_task(adapter.run())
        try:
            async with asyncio.timeout(TIMEOUT):
                await adapter.ready.wait()
            await publish(broker.port, *[("d/a", json.dumps({"n": i})) for i in range(100)])
            await ingest.wait_readings(100)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            broker.stop()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run())


async def test_shared_subscription_splits_the_load(broker: Mosquitto, start: Start) -> None:
    ingest = RecordingIngest()  # shared; origin.client_id tells the adapters apart
    adapters = [
        await start(
            broker.port,
            ingest,
            name=f"gw{i}",
            shared_group="edgeway",
            subscriptions=[{"topic": "s/{device_id}"}],
        )
        for i in range(2)
    ]
    assert adapters[0].subscription_filters == ["$share/edgeway/s/+"]
    assert adapters[0].client_id != adapters[1].client_id
    n = 40
    await publish(broker.port, *[(f"s/dev{i % 4}", json.dumps({"i": i})) for i in range(n)])
    await ingest.wait_readings(n)
    seen = [r.metrics["i"] for r in ingest.readings]
    assert sorted(seen) == list(range(n))  # every message once, none twice
    shares = {
        name: sum(r.origin.client_id == name for r in ingest.readings) for name in ("gw0", "gw1")
    }
    assert all(shares.values()), f"both gateways got a share: {shares}"


async def test_reconnects_after_the_broker_restarts(broker: Mosquitto, start: Start) -> None:
    ingest = RecordingIngest()
    adapter = await start(broker.port, ingest, subscriptions=[{"topic": "d/{device_id}"}])
    broker.stop()
    async with asyncio.timeout(TIMEOUT):
        await adapter.wait_for(lambda: not adapter.state.connected)
    assert adapter.state.last_error is not None
    broker.start()
    async with asyncio.timeout(TIMEOUT * 2):
        await adapter.wait_for(lambda: adapter.connections == 2)
    await publish(broker.port, ("d/x", b'{"after": 1}'))
    await ingest.wait_readings(1)
    assert metrics(ingest) == [("x", {"after": 1})]


async def test_tls_and_credentials(tmp_path: Path, start: Start, tls_certs: CertFiles) -> None:  # noqa: F811
    passwd = tmp_path / "passwd"
    await asyncio.to_thread(
        subprocess.run,
        ["mosquitto_passwd", "-b", "-c", str(passwd), "gw", "pw-of-the-gateway"],
        check=True,
        capture_output=True,
    )
    port = free_port()
    tls_broker = Mosquitto(
        tmp_path,
        extra=(
            f"allow_anonymous false\npassword_file {passwd}\n"
            f"listener {port} 127.0.0.1\ncafile {tls_certs.ca_cert}\n"
            f"certfile {tls_certs.server_cert}\nkeyfile {tls_certs.server_key}\n"
        ),
    )
    tls_broker.start()
    try:
        ingest = RecordingIngest()
        await start(
            port,
            ingest,
            url=f"mqtts://localhost:{port}",
            username="gw",
            password="pw-of-the-gateway",
            tls={"ca": str(tls_certs.ca_cert)},
            subscriptions=[{"topic": "d/{device_id}"}],
        )
        wrong = await start(
            port,
            RecordingIngest(),
            wait=False,
            name="wrong",
            url=f"mqtts://localhost:{port}",
            username="gw",
            password="nope",
            tls={"ca": str(tls_certs.ca_cert)},
            subscriptions=[{"topic": "d/+"}],
        )
        await publish(
            tls_broker.port,
            ("d/secure", b'{"ok": 1}'),
            auth={"username": "gw", "password": "pw-of-the-gateway"},
        )
        await ingest.wait_readings(1)
        assert metrics(ingest) == [("secure", {"ok": 1})]
        async with asyncio.timeout(TIMEOUT):
            await wrong.wait_for(lambda: wrong.state.last_error is not None)
        assert not wrong.state.connected and wrong.connections == 0
        assert "refused" in wrong.state.last_error
    finally:
        tls_broker.stop()


async def test_preset_zigbee2mqtt(broker: Mosquitto, start: Start) -> None:
    ingest = RecordingIngest()
    await start(broker.port, ingest, preset="zigbee2mqtt")
    await publish(
        broker.port,
        ("zigbee2mqtt/bridge/state", b'{"state":"online"}'),
        ("zigbee2mqtt/bridge", b'{"state":"online"}'),
        (
            "zigbee2mqtt/kitchen-sensor",
            b'{"battery":98,"humidity":45.2,"linkquality":120,"temperature":21.5,"voltage":2995,'
            b'"last_seen":"2024-01-05T10:00:00.000Z","update":{"state":"idle"},"update_available":null}',
        ),
        ("zigbee2mqtt/kitchen-sensor/availability", b'{"state":"online"}'),
        ("zigbee2mqtt/lamp", b'{"state":"ON","brightness":254,"color":{"x":0.3,"y":0.3}}'),
    )
    await ingest.wait_readings(2)
    assert metrics(ingest) == [
        (
            "kitchen-sensor",
            {
                "battery": 98,
                "humidity": 45.2,
                "linkquality": 120,
                "temperature": 21.5,
                "voltage": 2995,
                "update.state": "idle",
            },
        ),
        ("lamp", {"state": "ON", "brightness": 254, "color.x": 0.3, "color.y": 0.3}),
    ]
    assert ingest.readings[0].ts == 1704448800.0


async def test_preset_tasmota(broker: Mosquitto, start: Start) -> None:
    ingest = RecordingIngest()
    await start(broker.port, ingest, preset="tasmota")
    await publish(
        broker.port,
        ("tele/plug-1/STATE", b'{"Time":"2024-01-05T10:00:00","POWER":"ON"}'),
        (
            "tele/plug-1/SENSOR",
            b'{"Time":"2024-01-05T10:00:00","ENERGY":{"TotalStartTime":"2023-01-01T00:00:00","Total":12.5,'
            b'"Yesterday":0.3,"Today":0.1,"Power":40,"Voltage":230,"Current":0.17},'
            b'"AM2301":{"Temperature":21.3,"Humidity":45.1,"DewPoint":8.9},"TempUnit":"C"}',
        ),
    )
    await ingest.wait_readings(1)
    [(device, m)] = metrics(ingest)
    assert device == "plug-1"
    assert m["ENERGY.Power"] == 40 and m["AM2301.Temperature"] == 21.3 and m["TempUnit"] == "C"
    assert "Time" not in m


async def test_preset_shelly(broker: Mosquitto, start: Start) -> None:
    ingest = RecordingIngest()
    await start(broker.port, ingest, preset="shelly")
    await publish(
        broker.port,
        (
            "shellyplus1pm-441793a3f0c4/status/switch:0",
            b'{"id":0,"source":"timer","output":true,"apower":8.9,"voltage":237.5,"current":0.068,'
            b'"aenergy":{"total":6.532,"by_minute":[45.199,47.141,88.397],"minute_ts":1654511972},'
            b'"temperature":{"tC":23.5,"tF":74.4}}',
        ),
    )
    await ingest.wait_readings(1)
    [(device, m)] = metrics(ingest)
    assert device == "shellyplus1pm-441793a3f0c4"
    assert m == {
        "switch:0.output": True,
        "switch:0.apower": 8.9,
        "switch:0.voltage": 237.5,
        "switch:0.current": 0.068,
        "switch:0.aenergy.total": 6.532,
        "switch:0.aenergy.minute_ts": 1654511972,
        "switch:0.temperature.tC": 23.5,
        "switch:0.temperature.tF": 74.4,
    }


async def test_preset_sparkplug_b(broker: Mosquitto, start: Start) -> None:
    ingest = RecordingIngest()
    await start(broker.port, ingest, preset="sparkplug_b")
    birth = encode_payload(
        [
            SparkplugMetric("bdSeq", datatype=8, value=0),
            SparkplugMetric("Pressure", alias=1, datatype=DOUBLE, value=1.5),
            SparkplugMetric("Running", alias=2, datatype=BOOLEAN, value=True),
        ],
        timestamp=1700000000000,
        seq=0,
    )
    data = encode_payload(
        [SparkplugMetric(alias=1, value=1.75, datatype=DOUBLE)], timestamp=1700000001000, seq=1
    )
    await publish(
        broker.port,
        ("spBv1.0/plant/NBIRTH/edge-1", birth),
        ("spBv1.0/plant/NDATA/edge-1", data),
        ("spBv1.0/plant/NCMD/edge-1", encode_payload([])),
    )
    await ingest.wait_readings(2)
    assert metrics(ingest) == [
        ("edge-1", {"Pressure": 1.5, "Running": True, "online": True}),
        ("edge-1", {"Pressure": 1.75}),
    ]


def test_registered_for_its_section() -> None:
    assert adapter_class("mqtt_client") is MqttClientAdapter


def test_docs_example_loads() -> None:
    text = DOCS.read_text(encoding="utf-8")
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.DOTALL)
    assert blocks, "docs/protocols/mqtt-client.md has a yaml example"
    for block in blocks:
        cfg = parse_config(block, str(DOCS))
        assert cfg.mqtt_client
