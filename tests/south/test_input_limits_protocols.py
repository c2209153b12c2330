"""One set of input limits, refused the same way by every protocol, with real peers:
paho-mqtt v5 sees PUBACK 0x99, an HTTP client 400 with a JSON reason, aiocoap 4.00;
each refusal is counted with its reason."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import paho.mqtt.client as paho
import pytest
from ingest_doubles import RecordingIngest
from paho.mqtt.enums import CallbackAPIVersion

from edgeway.codecs.base import DecodeError
from edgeway.config import (
    CoapSection,
    HttpIngestSection,
    InputLimitsSection,
    ListenerConfig,
    MqttSection,
)
from edgeway.devices.auth import AllowAll
from edgeway.ingest import MemoryIngest
from edgeway.reading import Origin
from edgeway.south.coap import CoapAdapter
from edgeway.south.http import HttpIngestAdapter
from edgeway.south.mqtt.broker import Broker

# Small limits, so each payload below breaks exactly one of them.
LIMITS = InputLimitsSection(
    max_readings_per_message=50,
    max_metrics_per_reading=20,
    max_name_length=40,
    max_string_length=100,
    max_flattened_size=10_000,
)


def payloads(now: float) -> dict[str, bytes]:
    """Reason -> a payload refused for it (``accepted``: one that is not)."""
    nested = {"p" * 30: {f"a{i}": i for i in range(20)}}  # 20 names of 34 characters
    return {
        "accepted": orjson.dumps({"v": 1, "ts": now - 5}),
        "too_many_readings": orjson.dumps([{"v": i} for i in range(51)]),
        "too_many_metrics": orjson.dumps({f"m{i}": i for i in range(21)}),
        "name_too_long": orjson.dumps({"n" * 41: 1}),
        "value_too_long": orjson.dumps({"v": "x" * 101}),
        # 20 readings of 20 flattened metrics: ~17,000 characters from ~3,000 bytes.
        "too_large": orjson.dumps([nested] * 20),
        "timestamp_out_of_range": orjson.dumps({"v": 1, "ts": now + 86400}),
        "bad_timestamp": b'{"v": 1, "ts": 1e300}',
    }


REFUSED = [r for r in payloads(0) if r != "accepted"]
ORIGIN = Origin("test")


# ---------------------------------------------------------------- MQTT v5


@contextlib.asynccontextmanager
async def mqtt_broker(tmp_path: Path, ingest: MemoryIngest) -> AsyncIterator[tuple[Broker, int]]:
    allow = AllowAll()
    broker = Broker(
        MqttSection(input_limits=LIMITS),
        ingest=ingest,
        authenticator=allow,
        authoriser=allow,
        data_dir=tmp_path,
        gateway_id="gw",
    )
    await broker.start()
    listener = ListenerConfig(bind="127.0.0.1:0", allow_anonymous=True)
    server = await asyncio.get_running_loop().create_server(
        broker.protocol_factory(listener), "127.0.0.1", 0
    )
    try:
        yield broker, server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await broker.stop()
        await server.wait_closed()


@pytest.mark.parametrize("protocol", [paho.MQTTv5, paho.MQTTv311])
async def test_mqtt_client_gets_0x99_and_the_broker_counts_the_reason(
    tmp_path: Path, protocol: int
) -> None:
    """v5: PUBACK 0x99 for each refused message; 3.1.1 has no refusal code (a
    normal PUBACK). Either way nothing refused is stored, and each is counted."""
    ingest = MemoryIngest()
    async with mqtt_broker(tmp_path, ingest) as (broker, port):
        acks: dict[int, int] = {}
        done = threading.Event()
        connected = threading.Event()
        sent = payloads(time.time())
        c = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id="dev-1",
            protocol=protocol,
        )

        def on_publish(client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
            acks[mid] = rc.value if protocol == paho.MQTTv5 else 0
            if len(acks) == len(sent):
                done.set()

        c.on_publish = on_publish
        c.on_connect = lambda *a: connected.set()
        c.connect("127.0.0.1", port)
        c.loop_start()
        try:
            assert await asyncio.to_thread(connected.wait, 5)
            mids = {
                reason: c.publish("devices/d1/telemetry", payload, qos=1).mid
                for reason, payload in sent.items()
            }
            assert await asyncio.to_thread(done.wait, 10)
        finally:
            await asyncio.to_thread(c.disconnect)
            await asyncio.to_thread(c.loop_stop)
        refusal = 0x99 if protocol == paho.MQTTv5 else 0
        assert {reason: acks[mid] for reason, mid in mids.items()} == {
            reason: 0 if reason == "accepted" else refusal for reason in sent
        }
        stats = broker.stats().flat()
    assert [r.metrics for r in ingest.readings] == [{"v": 1}]
    for reason in REFUSED:
        assert stats[f"decode_errors_{reason}"] == 1, reason


# ---------------------------------------------------------------- HTTP


async def test_http_client_gets_400_with_the_reason(tmp_path: Path) -> None:
    ingest = RecordingIngest()
    adapter = HttpIngestAdapter(
        HttpIngestSection(listen="127.0.0.1:0", allow_anonymous=True, input_limits=LIMITS),
        ingest=ingest,
        gateway_id="gw",
        data_dir=tmp_path,
    )
    task = asyncio.create_task(adapter.run())
    try:
        async with asyncio.timeout(10):
            await adapter.ready.wait()
        got = {}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{adapter.port}") as client:
            for reason, payload in payloads(time.time()).items():
                r = await client.post(
                    "/devices/d1/telemetry",
                    content=payload,
                    headers={"Content-Type": "application/json"},
                )
                got[reason] = (r.status_code, r.json().get("reason", ""))
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert got == {
        reason: (200, "") if reason == "accepted" else (400, reason) for reason in payloads(0)
    }
    assert [r.metrics for r in ingest.readings] == [{"v": 1}]
    assert adapter.decode_errors.by_reason() == dict.fromkeys(REFUSED, 1)


# ---------------------------------------------------------------- CoAP


async def test_coap_client_gets_4_00_with_the_reason() -> None:
    aiocoap = pytest.importorskip("aiocoap")
    ingest = RecordingIngest()
    adapter = CoapAdapter(CoapSection(listen="127.0.0.1:0", input_limits=LIMITS), ingest=ingest)
    task = asyncio.create_task(adapter.run())
    ctx = await aiocoap.Context.create_client_context()
    try:
        async with asyncio.timeout(10):
            await adapter.ready.wait()
        got = {}
        for reason, payload in payloads(time.time()).items():
            msg = aiocoap.Message(
                code=aiocoap.Code.POST,
                uri=f"coap://127.0.0.1:{adapter.port}/devices/d1/telemetry",
                payload=payload,
            )
            msg.opt.content_format = 50
            async with asyncio.timeout(15):
                r = await ctx.request(msg).response
            got[reason] = (str(r.code), r.payload.decode().split(":")[0])
    finally:
        await ctx.shutdown()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    ok = str(aiocoap.Code.CHANGED)
    assert got == {
        reason: (ok, "") if reason == "accepted" else (str(aiocoap.Code.BAD_REQUEST), reason)
        for reason in payloads(0)
    }
    assert [r.metrics for r in ingest.readings] == [{"v": 1}]
    assert adapter.decode_errors.by_reason() == dict.fromkeys(REFUSED, 1)


def test_payloads_are_within_one_packet_and_body() -> None:
    """Each payload breaks a limit on its own, not the body or packet size."""
    assert max(len(p) for p in payloads(time.time()).values()) < 10_000
    assert json.loads(payloads(0)["too_large"])[0]  # a JSON array of objects


# ------------------------------------------------- client mode and serial lines


def test_mqtt_client_subscriptions_decode_with_the_connection_limits(tmp_path: Path) -> None:
    from edgeway.config import parse_config
    from edgeway.south.mqtt_client import MqttClientAdapter

    config = parse_config(
        """
input_limits: {max_string_length: 50}
mqtt_client:
  - name: plant
    url: mqtt://127.0.0.1:1883
    preset: zigbee2mqtt
    input_limits: {max_name_length: 10}
"""
    )
    adapter = MqttClientAdapter(
        config.mqtt_client[0], ingest=RecordingIngest(), gateway_id="gw", data_dir=tmp_path
    )
    (route,) = adapter.routes
    assert (route.codec.limits.max_name_length, route.codec.limits.max_string_length) == (10, 50)
    with pytest.raises(DecodeError) as e:
        route.codec.decode(b'{"temperature_c": 21}', device_id="d", origin=ORIGIN, now=0.0)
    assert e.value.reason == "name_too_long"


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"temperature_inside_the_cabinet=21.5", "name_too_long"),
        (b"state=" + b"x" * 60, "value_too_long"),
        (b'{"v": 1, "ts": 1}', "timestamp_out_of_range"),
    ],
)
def test_serial_lines_keep_within_the_port_limits(line: bytes, reason: str) -> None:
    from edgeway.config import SerialPortConfig
    from edgeway.south.serial import SerialAdapter

    fmt = "json" if line.startswith(b"{") else "kv"
    config = SerialPortConfig(
        name="s1",
        device_id="dev-s",
        port="/dev/null",
        format=fmt,
        input_limits=InputLimitsSection(max_name_length=20, max_string_length=50),
    )
    adapter = SerialAdapter(config, ingest=RecordingIngest())
    with pytest.raises(DecodeError) as e:
        adapter.decode_line(line, time.time())
    assert e.value.reason == reason
    ok = b'{"t": 21.5}' if fmt == "json" else b"t=21.5"
    assert adapter.decode_line(ok, time.time())[0].metrics == {"t": 21.5}


async def test_opcua_string_values_and_source_timestamps_keep_within_the_limits() -> None:
    """OPC-UA values come from the server: a String node's value longer than
    max_string_length, or a source timestamp from a clock a day ahead, is
    refused and counted like a payload."""
    import datetime as dt
    from types import SimpleNamespace

    from edgeway.config import OpcUaServerConfig
    from edgeway.south.opcua import OpcUaAdapter

    ingest = RecordingIngest()
    adapter = OpcUaAdapter(
        OpcUaServerConfig(
            name="line3",
            device_id="line-3",
            endpoint="opc.tcp://127.0.0.1:4840",
            nodes=[{"metric": "state", "node_id": "ns=2;s=State"}],  # type: ignore[list-item]
            input_limits=InputLimitsSection(max_string_length=100),
        ),
        ingest=ingest,
    )
    now = dt.datetime.now(dt.UTC)

    def change(ts: dt.datetime) -> Any:
        return SimpleNamespace(StatusCode=None, SourceTimestamp=ts)

    await adapter.handle_change(1, "x" * 101, change(now))
    await adapter.handle_change(1, "running", change(now + dt.timedelta(days=1)))
    await adapter.handle_change(1, "running", change(now))
    assert [r.metrics for r in ingest.readings] == [{"state": "running"}]
    assert adapter.decode_errors.by_reason() == {"value_too_long": 1, "timestamp_out_of_range": 1}
