"""Sparkplug B commands (NCMD/DCMD) through MQTT client mode: a real Mosquitto,
the real command queue, an edge node played by paho, and the command payloads
decoded by Google's protobuf runtime from the Sparkplug B schema (built here
from its field list, so the test does not trust edgeway's own decoder)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from ingest_doubles import RecordingIngest
from test_mqtt_client import Mosquitto, Start, broker, publish, start  # noqa: F401  (fixtures)
from test_mqtt_client_commands import Device, commandable, finished, service  # noqa: F401

from edgeway.codecs.sparkplug import (
    BOOLEAN,
    DOUBLE,
    INT32,
    INT64,
    STRING,
    SparkplugCodec,
    SparkplugMetric,
    encode_payload,
)
from edgeway.commands.model import CommandState
from edgeway.commands.service import CommandService
from edgeway.config import MqttClientSubscription
from edgeway.south.mqtt_client import MqttClientAdapter

descriptor_pb2 = pytest.importorskip("google.protobuf.descriptor_pb2")
from google.protobuf import descriptor_pool, message_factory  # noqa: E402

# org.eclipse.tahu.protobuf.Payload (sparkplug_b.proto), the fields commands use.
_METRIC_FIELDS = [
    ("name", 1, "STRING"),
    ("alias", 2, "UINT64"),
    ("timestamp", 3, "UINT64"),
    ("datatype", 4, "UINT32"),
    ("is_null", 7, "BOOL"),
    ("int_value", 10, "UINT32"),
    ("long_value", 11, "UINT64"),
    ("float_value", 12, "FLOAT"),
    ("double_value", 13, "DOUBLE"),
    ("boolean_value", 14, "BOOL"),
    ("string_value", 15, "STRING"),
]


def _payload_class() -> Any:
    fdp = descriptor_pb2.FileDescriptorProto(
        name="sparkplug_b_test.proto", package="org.eclipse.tahu.protobuf", syntax="proto2"
    )
    payload = fdp.message_type.add(name="Payload")
    payload.field.add(name="timestamp", number=1, type=4, label=1)  # uint64, optional
    payload.field.add(
        name="metrics",
        number=2,
        type=11,
        label=3,
        type_name=".org.eclipse.tahu.protobuf.Payload.Metric",
    )
    payload.field.add(name="seq", number=3, type=4, label=1)
    metric = payload.nested_type.add(name="Metric")
    types = descriptor_pb2.FieldDescriptorProto.Type
    for name, number, kind in _METRIC_FIELDS:
        metric.field.add(name=name, number=number, type=types.Value(f"TYPE_{kind}"), label=1)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("org.eclipse.tahu.protobuf.Payload")
    )


Payload = _payload_class()
ADAPTERS: dict[int, MqttClientAdapter] = {}

NBIRTH = encode_payload(
    [
        SparkplugMetric(name="bdSeq", datatype=INT64, value=0),
        SparkplugMetric(name="Node Control/Rebirth", alias=1, datatype=BOOLEAN, value=False),
        SparkplugMetric(name="Temp", alias=2, datatype=DOUBLE, value=21.5),
    ],
    timestamp=1_700_000_000_000,
    seq=0,
)
DBIRTH = encode_payload(
    [
        SparkplugMetric(name="Outputs/Run", alias=10, datatype=BOOLEAN, value=False),
        SparkplugMetric(name="Speed", alias=11, datatype=INT32, value=0),
    ],
    timestamp=1_700_000_000_001,
    seq=1,
)
# A node without aliases: its device's metrics are written by name.
NBIRTH_2 = encode_payload([SparkplugMetric(name="bdSeq", datatype=INT64, value=0)], seq=0)
DBIRTH_2 = encode_payload([SparkplugMetric(name="Mode", datatype=STRING, value="auto")], seq=1)


@pytest.fixture
async def births(broker: Mosquitto, start: Start, service: CommandService) -> int:  # noqa: F811
    """A connection with the ``sparkplug_b`` preset that has heard two edge
    nodes' births; returns the broker's port (the adapter: ``ADAPTERS[port]``)."""
    port = broker.port
    adapter = await commandable(start, service, port, preset="sparkplug_b")
    await publish(
        port,
        ("spBv1.0/plant/NBIRTH/node1", NBIRTH),
        ("spBv1.0/plant/DBIRTH/node1/pump1", DBIRTH),
        ("spBv1.0/plant/NBIRTH/node2", NBIRTH_2),
        ("spBv1.0/plant/DBIRTH/node2/valve", DBIRTH_2),
    )
    async with asyncio.timeout(10):
        await adapter.wait_for(
            lambda: {"node1", "node1.pump1", "node2", "node2.valve"} <= set(adapter.command_devices)
        )
    ADAPTERS[port] = adapter
    return port


def _metric(payload: bytes) -> Any:
    msg = Payload.FromString(payload)
    assert msg.timestamp > 1_700_000_000_000  # a command carries its time (ms)
    (m,) = msg.metrics
    return m


async def test_dcmd_and_ncmd_by_alias_with_the_births_datatypes(
    births: int,
    service: CommandService,  # noqa: F811
) -> None:
    async with Device(
        births, "spBv1.0/plant/DCMD/#", "spBv1.0/plant/NCMD/#", client_id="node1"
    ) as node:
        run, _ = await service.submit(
            "node1.pump1", "run", {"metric": "Outputs/Run", "value": True}
        )
        topic, payload = await node.next()
        assert topic == "spBv1.0/plant/DCMD/node1/pump1"
        m = _metric(payload)
        # Known alias: sent by alias only (Sparkplug 3.0), with the birth's datatype.
        assert (m.alias, m.HasField("name"), m.datatype) == (10, False, BOOLEAN)
        assert m.boolean_value is True
        done = await finished(service, run)
        assert done.state is CommandState.SUCCEEDED
        assert done.result == {"delivered_to": "broker", "topic": topic}

        speed, _ = await service.submit("node1.pump1", "Speed", {"value": 1200})
        topic, payload = await node.next()
        m = _metric(payload)
        assert (topic, m.alias, m.datatype, m.int_value) == (
            "spBv1.0/plant/DCMD/node1/pump1",
            11,
            INT32,
            1200,
        )
        assert (await finished(service, speed)).state is CommandState.SUCCEEDED

        rebirth, _ = await service.submit(
            "node1", "rebirth", {"metric": "Node Control/Rebirth", "value": True}
        )
        topic, payload = await node.next()
        m = _metric(payload)
        assert (topic, m.alias, m.datatype, m.boolean_value) == (
            "spBv1.0/plant/NCMD/node1",
            1,
            BOOLEAN,
            True,
        )
        assert (await finished(service, rebirth)).state is CommandState.SUCCEEDED


async def test_metrics_by_name_and_values_the_birth_refuses(
    births: int,
    service: CommandService,  # noqa: F811
) -> None:
    async with Device(births, "spBv1.0/plant/DCMD/#", client_id="node2") as node:
        # No aliases in this node's births: by name; a metric no birth named
        # takes its datatype from the JSON value.
        cmd, _ = await service.submit(
            "node2.valve", "set", {"metrics": {"Mode": "manual", "Opening": 42.5}}
        )
        topic, payload = await node.next()
        assert topic == "spBv1.0/plant/DCMD/node2/valve"
        msg = Payload.FromString(payload)
        got = {m.name: (m.HasField("alias"), m.datatype) for m in msg.metrics}
        assert got == {"Mode": (False, STRING), "Opening": (False, DOUBLE)}
        assert [m.string_value for m in msg.metrics if m.name == "Mode"] == ["manual"]
        assert [m.double_value for m in msg.metrics if m.name == "Opening"] == [42.5]
        assert (await finished(service, cmd)).state is CommandState.SUCCEEDED

        # The birth says Speed is an INT32: a string or an out-of-range number
        # fails at once and nothing is published.
        for params, why in [
            ({"value": "fast"}, "an integer is expected"),
            ({"value": 2**40}, "out of range"),
            ({}, "needs params.value"),
        ]:
            bad, _ = await service.submit("node1.pump1", "Speed", params)
            done = await finished(service, bad)
            assert done.state is CommandState.FAILED and why in (done.error or ""), done
        assert node.messages.empty()


async def test_a_dead_device_gets_its_commands_after_its_next_birth(
    births: int,
    service: CommandService,  # noqa: F811
) -> None:
    adapter = ADAPTERS[births]
    codec = adapter.routes[0].codec
    ingest = adapter.ingest
    assert isinstance(codec, SparkplugCodec) and isinstance(ingest, RecordingIngest)

    async def send(topic: str, payload: bytes) -> None:
        """Publish as the edge node; wait until the connection decoded it
        (births and deaths each give a reading: ``online`` true or false)."""
        n = len(ingest.readings)
        await publish(births, (topic, payload))
        await ingest.wait_readings(n + 1)

    death = encode_payload([], seq=2)
    await send("spBv1.0/plant/DDEATH/node1/pump1", death)
    assert not codec.online("node1.pump1") and codec.online("node1")
    async with Device(births, "spBv1.0/plant/DCMD/#", client_id="node1") as node:
        cmd, _ = await service.submit("node1.pump1", "Speed", {"value": 5})
        # Dead: the command waits (the timer tries every 0.25 s), nothing is sent.
        waited = await service.wait(cmd.id, 0.6)
        assert waited.state is CommandState.QUEUED and waited.attempts == 0, waited
        assert node.messages.empty()
        await send("spBv1.0/plant/DBIRTH/node1/pump1", DBIRTH)
        topic, payload = await node.next()
        assert topic == "spBv1.0/plant/DCMD/node1/pump1" and _metric(payload).int_value == 5
        assert (await finished(service, cmd)).state is CommandState.SUCCEEDED
    # A node's death takes its devices with it, until they are born again.
    await send("spBv1.0/plant/NDEATH/node1", death)
    assert not codec.online("node1") and not codec.online("node1.pump1")
    await send("spBv1.0/plant/NBIRTH/node1", NBIRTH)
    assert codec.online("node1") and not codec.online("node1.pump1")
    assert codec.online("node2.valve")


def test_sparkplug_commands_config_is_checked() -> None:
    with pytest.raises(ValueError, match="needs codec sparkplug_b"):
        MqttClientSubscription(topic="a/{device_id}", command_payload="sparkplug_b")
    with pytest.raises(ValueError, match="takes no command_topic"):
        MqttClientSubscription(
            topic="spBv1.0/#",
            codec="sparkplug_b",
            command_payload="sparkplug_b",
            command_topic="x/{device_id}",
        )
