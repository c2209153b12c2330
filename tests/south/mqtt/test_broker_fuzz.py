"""Random and mutated input to a connection never escapes it.

A connection is driven through its asyncio.Protocol methods with an in-memory
transport, so hundreds of cases run in a second; the broker must stay usable
for other clients afterwards, which a real socket client then checks.
"""

from __future__ import annotations

import asyncio
import logging
import random
from pathlib import Path

import pytest
from mqtt_harness import MemoryTransport, RawClient, running_broker, wait_until

from edgeway.config import ListenerConfig
from edgeway.south.mqtt.codec import encode
from edgeway.south.mqtt.packets import (
    Connect,
    Properties,
    PubAck,
    Publish,
    PubRel,
    Subscribe,
    Subscription,
    Unsubscribe,
)


def _valid_stream(level: int) -> list[bytes]:
    pkts = [
        Connect(level, "fuzz", True, 30),
        Subscribe(1, [Subscription("a/#", 2), Subscription("$share/g/b/+", 1)]),
        Publish("a/b", b'{"v": 1}', 1, False, False, 2),
        Publish("devices/x/telemetry", b'{"v": 1}', 2, True, False, 3),
        PubRel(3),
        PubAck(1),
        Unsubscribe(4, ["a/#"]),
        Publish(
            "a/c",
            b"x",
            0,
            False,
            False,
            None,
            Properties(topic_alias=1) if level == 5 else Properties(),
        ),
    ]
    return [encode(p, level) for p in pkts]


def _mutate(rng: random.Random, data: bytearray) -> bytearray:
    for _ in range(rng.randint(0, 4)):
        pos = rng.randrange(max(len(data), 1))
        kind = rng.choice(("flip", "insert", "delete", "junk"))
        if kind == "flip" and data:
            data[pos] ^= rng.randint(1, 255)
        elif kind == "insert":
            data.insert(pos, rng.randint(0, 255))
        elif kind == "delete" and data:
            del data[pos]
        else:
            data += rng.randbytes(rng.randint(0, 64))
    return data


CASES = 400


async def test_mutated_streams_stay_inside_the_connection(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="edgeway")
    rng = random.Random(20261125)
    listener = ListenerConfig(bind="127.0.0.1:0", allow_anonymous=True)
    async with running_broker(tmp_path) as rb:
        watcher, _ = await RawClient.connect(rb.port, "watcher")
        await watcher.subscribe("ok")
        for case in range(CASES):
            level = rng.choice((4, 5))
            data = _mutate(rng, bytearray(b"".join(_valid_stream(level))))
            split = rng.randint(1, 64)
            proto = rb.broker.protocol_factory(listener)()
            t = MemoryTransport()
            proto.connection_made(t)
            for i in range(0, len(data), split):
                proto.data_received(bytes(data[i : i + split]))
                await asyncio.sleep(0)  # let authentication complete
            proto.connection_lost(None)
            assert rb.broker.counters.get("delivery_errors", 0) == 0, case
        # Nothing escaped: the broker still serves a real client.
        pub, _ = await RawClient.connect(rb.port, "after")
        await pub.publish("ok", b"fine", qos=1)
        assert (await watcher.receive_publish()).payload == b"fine"
        assert rb.broker.stats().events["protocol_errors"] > CASES // 4
    # Bad input is a protocol error, never an internal error caught at the boundary.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_slow_subscriber_is_queued_bounded_and_drained(tmp_path: Path) -> None:
    """While a subscriber's transport asks to pause writing, its messages queue
    (bounded by max_queued_messages, oldest QoS 0 dropped first) and flow again
    on resume_writing."""
    from edgeway.config import MqttLimits, MqttSection
    from edgeway.south.mqtt.codec import MqttReader

    cfg = MqttSection(limits=MqttLimits(max_queued_messages=10))
    async with running_broker(tmp_path, config=cfg) as rb:
        listener = ListenerConfig(bind="127.0.0.1:0", allow_anonymous=True)
        proto = rb.broker.protocol_factory(listener)()
        t = MemoryTransport()
        proto.connection_made(t)
        proto.data_received(encode(Connect(5, "slow"), 5))
        proto.data_received(encode(Subscribe(1, [Subscription("t", 0)]), 5))
        await wait_until(lambda: len(t.out) >= 9)  # CONNACK and SUBACK, after authentication
        reader = MqttReader(protocol_level=5)
        assert [type(p).__name__ for p in reader.feed(bytes(t.out))] == ["ConnAck", "SubAck"]
        t.out.clear()
        proto.pause_writing()
        pub, _ = await RawClient.connect(rb.port, "p")
        for i in range(15):
            await pub.publish("t", b"%d" % i)
        await pub.publish("sync", b"", qos=1)  # all 15 routed by now
        assert t.out == b""
        assert rb.broker.stats().dropped_by_reason["queue_full"] == 5
        proto.resume_writing()
        rb.broker.flush_writes()
        got = [p.payload for p in reader.feed(bytes(t.out)) if isinstance(p, Publish)]
        assert got == [b"%d" % i for i in range(5, 15)]
        proto.connection_lost(None)
