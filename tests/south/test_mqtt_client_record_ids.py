"""Record ids in MQTT client mode that are the same on every gateway (issue 19).

A message that identifies itself (device timestamp, message id or sequence
metric) gets record ids hashed from the message (edgeway.record_ids), so a
broker's redelivery to another gateway of a shared group is a duplicate with
the SAME id, which a sink that drops repeated ids (NATS JetStream's
Nats-Msg-Id, PostgreSQL's primary key) drops. A message identifying nothing
keeps gateway_id:sequence, so two identical bare readings are never merged.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from test_mqtt_client import TIMEOUT, Mosquitto, broker  # noqa: F401  (fixture)
from test_mqtt_client_commands import Device

from edgeway.config import OutboxSection, parse_config
from edgeway.gateway import Gateway
from edgeway.outbox import Outbox
from edgeway.reading import Origin, Reading
from edgeway.record_ids import keyed_record_id, message_key
from edgeway.south.mqtt_client import MqttClientAdapter, identifies_message
from outbox_db import stored_records
from sim_gateway import running

NOW = 1_765_000_000.5


def _reading(
    ts: float, metrics: dict[str, Any], key: str | None = None, device: str = "d1"
) -> Reading:
    return Reading(device, ts, metrics, Origin("mqtt_client", "t", key=key, received=NOW))


def test_keyed_ids_are_uuids_that_change_with_every_part_of_the_reading() -> None:
    k = message_key("site", "devices/d1/telemetry", b'{"ts": 1, "v": 2}')
    assert k == message_key("site", "devices/d1/telemetry", b'{"ts": 1, "v": 2}')
    assert (
        len(
            {
                k,
                message_key("site2", "devices/d1/telemetry", b'{"ts": 1, "v": 2}'),
                message_key("site", "devices/d2/telemetry", b'{"ts": 1, "v": 2}'),
                message_key("site", "devices/d1/telemetry", b'{"ts": 1, "v": 3}'),
            }
        )
        == 4
    )
    base = keyed_record_id(_reading(1.0, {"v": 2, "w": 1}), k)
    assert uuid.UUID(base).version == 8
    # Metrics in another order: the same reading.
    assert keyed_record_id(_reading(1.0, {"w": 1, "v": 2}), k) == base
    others = {
        keyed_record_id(_reading(1.5, {"v": 2, "w": 1}), k),  # device time
        keyed_record_id(_reading(1.0, {"v": 2}), k),  # a route's share of the metrics
        keyed_record_id(_reading(1.0, {"v": 2, "w": 1}, None, "d2"), k),  # device
        keyed_record_id(_reading(1.0, {"v": 2, "w": 1}), k[::-1]),  # message
    }
    assert base not in others and len(others) == 4
    # Stamped with the receive time (no device time), the time is left out:
    # another gateway, receiving it at another instant, gives the same id.
    a = Reading("d1", NOW, {"seq": 7}, Origin("mqtt_client", key=k, received=NOW))
    b = Reading("d1", NOW + 3, {"seq": 7}, Origin("mqtt_client", key=k, received=NOW + 3))
    assert keyed_record_id(a, k) == keyed_record_id(b, k)


def test_which_messages_identify_themselves() -> None:
    plain = Origin("mqtt_client")
    at_now = [Reading("d1", NOW, {"v": 1.0}, plain)]
    assert not identifies_message(at_now, NOW, None)
    assert not identifies_message(at_now, NOW, "seq")  # no such metric
    assert identifies_message([Reading("d1", NOW, {"v": 1.0, "seq": 4}, plain)], NOW, "seq")
    assert identifies_message([Reading("d1", NOW - 2, {"v": 1.0}, plain)], NOW, None)
    with_id = Origin("mqtt_client", message_id="m-1")
    assert identifies_message([Reading("d1", NOW, {"v": 1.0}, with_id)], NOW, None)


async def test_two_outboxes_give_a_keyed_reading_the_same_id(tmp_path: Path) -> None:
    """The outbox uses the message key when there is one, its own numbering otherwise."""
    k = message_key("site", "devices/d1/telemetry", b"x")
    docs = []
    for gw in ("gw-a", "gw-b"):
        path = tmp_path / gw / "outbox.db"
        path.parent.mkdir()
        ob = Outbox(path, gateway_id=gw, config=OutboxSection(), sink_names=["s"])
        await ob.open()
        try:
            fut = ob.submit([_reading(1.0, {"v": 2}, k), _reading(1.0, {"v": 2}, None)])
            async with asyncio.timeout(TIMEOUT):
                await fut
        finally:
            await ob.close()
        docs.append([r.doc["id"] for r in stored_records(path)])
    (a_keyed, a_plain), (b_keyed, b_plain) = docs
    assert a_keyed == b_keyed == keyed_record_id(_reading(1.0, {"v": 2}, k), k)
    assert (a_plain, b_plain) == ("gw-a:2", "gw-b:2")


def _gateway_config(
    tmp_path: Path, gw: str, broker_port: int, nats_prefix: str, stream: str
) -> Any:
    return parse_config(
        f"""
gateway: {{id: {gw}, data_dir: "{tmp_path / gw}"}}
mqtt: {{enabled: false}}
mqtt_client:
  - name: site
    url: mqtt://127.0.0.1:{broker_port}
    subscriptions:
      - {{topic: "devices/{{device_id}}/telemetry"}}
      - {{topic: "counters/{{device_id}}", sequence_metric: n}}
      - {{topic: "legacy/{{device_id}}", record_ids: gateway}}
sinks:
  - name: stream
    url: nats://127.0.0.1:4222
    options: {{subject: "{nats_prefix}.{{device_id}}", stream: {stream}, create_stream: true,
               max_wait: 0.01}}
""",
        f"{gw}.yaml",
    )


async def test_the_same_message_through_two_gateways_is_stored_once_by_jetstream(
    tmp_path: Path,
    broker: Mosquitto,  # noqa: F811
) -> None:
    """Two gateways both receive every message (each its own subscription: what
    a shared group does to a message redelivered to another member, for all of
    them) and publish to one JetStream stream, which drops a repeated
    Nats-Msg-Id. Identified messages are stored once; messages identifying
    nothing once per gateway, and two identical ones are not merged."""
    nats = pytest.importorskip("nats")
    stream = f"R{uuid.uuid4().hex[:12]}"
    prefix = f"r{uuid.uuid4().hex[:12]}"
    cfgs = [_gateway_config(tmp_path, gw, broker.port, prefix, stream) for gw in ("gw-a", "gw-b")]
    nc = await nats.connect("nats://127.0.0.1:4222")
    try:
        # Created ahead, as a fleet's stream is: the gateways find it there.
        await nc.jetstream().add_stream(name=stream, subjects=[f"{prefix}.*"])
        async with running(Gateway(cfgs[0])) as gw_a, running(Gateway(cfgs[1])) as gw_b:
            adapters = [gw.adapters[0] for gw in (gw_a, gw_b)]
            for ad in adapters:
                assert isinstance(ad, MqttClientAdapter)
                async with asyncio.timeout(TIMEOUT):
                    await ad.wait_for(lambda ad=ad: ad.state.connected)
            async with Device(broker.port, "unused/sub", client_id="pub") as pub:
                for i in range(20):  # device time: identified
                    pub.publish(
                        "devices/d1/telemetry", json.dumps({"ts": 1.7e9 + i, "v": i}).encode()
                    )
                for i in range(5):  # a message id, no time: identified
                    pub.publish(
                        "devices/d2/telemetry", json.dumps({"msg_id": f"m{i}", "v": 1}).encode()
                    )
                for i in range(5):  # the sequence metric: identified
                    pub.publish("counters/d3", json.dumps({"n": i, "v": 1}).encode())
                for _ in range(2):  # nothing: two readings, never merged
                    pub.publish("devices/d4/telemetry", b'{"v": 1}')
                for i in range(3):  # record_ids: gateway, though it has a device time
                    pub.publish("legacy/d5", json.dumps({"ts": 1.7e9 + i, "v": i}).encode())
                # Each gateway stores and delivers all 35 readings ...
                async with asyncio.timeout(TIMEOUT * 3):
                    for gw in (gw_a, gw_b):
                        assert gw.outbox is not None
                        while (c := gw.outbox.counters()["stream"])["delivered"] < 35:  # noqa: ASYNC110
                            await asyncio.sleep(0.05)
                        assert c["accepted"] == 35, c
        # ... and the stream keeps one copy of each identified message.
        js = nc.jetstream()
        want = 20 + 5 + 5 + 2 * 2 + 3 * 2
        info = await js.stream_info(stream)
        assert info.state.messages == want, info.state
        ids: dict[str, list[str]] = {}
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(stream, seq)
            doc = json.loads(msg.data)
            assert msg.headers is not None and msg.headers["Nats-Msg-Id"] == doc["id"]
            ids.setdefault(doc["device_id"], []).append(doc["id"])
        for dev in ("d1", "d2", "d3"):
            assert all(uuid.UUID(i).version == 8 for i in ids[dev]), ids[dev]
        assert sorted(i.split(":")[0] for i in ids["d4"]) == ["gw-a", "gw-a", "gw-b", "gw-b"]
        assert sorted(i.split(":")[0] for i in ids["d5"]) == ["gw-a"] * 3 + ["gw-b"] * 3
    finally:
        try:
            await nc.jetstream().delete_stream(stream)
        finally:
            await nc.close()
