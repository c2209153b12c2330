"""Broker semantics over real sockets with the raw codec client (v3.1.1 and v5)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mqtt_harness import RawClient, running_broker

from edgeway.south.mqtt.packets import (
    UnsubAck,
    Unsubscribe,
)


@pytest.mark.parametrize("level", [4, 5])
@pytest.mark.parametrize("pub_qos", [0, 1, 2])
@pytest.mark.parametrize("sub_qos", [0, 1, 2])
async def test_qos_both_directions(tmp_path: Path, level: int, pub_qos: int, sub_qos: int) -> None:
    async with running_broker(tmp_path) as rb:
        sub, _ = await RawClient.connect(rb.port, "sub", level=level)
        ack = await sub.subscribe("a/+", qos=sub_qos)
        assert ack.reason_codes == [sub_qos]
        pub, _ = await RawClient.connect(rb.port, "pub", level=level)
        await pub.publish("a/b", b"hello", qos=pub_qos)
        got = await sub.receive_publish()
        assert (got.topic, got.payload, got.qos) == ("a/b", b"hello", min(pub_qos, sub_qos))
        assert got.retain is False
        await sub.nothing()
        await pub.disconnect()
        await sub.disconnect()


async def test_retained_set_deliver_clear(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        pub, _ = await RawClient.connect(rb.port, "pub")
        await pub.publish("r/1", b"one", qos=1, retain=True)
        await pub.publish("r/2", b"two", qos=0, retain=True)
        sub, _ = await RawClient.connect(rb.port, "sub")
        await sub.subscribe("r/#", qos=1)
        got = sorted(
            [await sub.receive_publish(), await sub.receive_publish()], key=lambda p: p.topic
        )
        assert [(p.topic, p.payload, p.retain, p.qos) for p in got] == [
            ("r/1", b"one", True, 1),
            ("r/2", b"two", True, 0),
        ]
        # A live message is not flagged retain (retain as published is off).
        await pub.publish("r/1", b"uno", qos=1, retain=True)
        p = await sub.receive_publish()
        assert (p.payload, p.retain) == (b"uno", False)
        # Empty payload clears.
        await pub.publish("r/1", b"", qos=1, retain=True)
        await sub.receive_publish()
        sub2, _ = await RawClient.connect(rb.port, "sub2")
        await sub2.subscribe("r/#")
        p = await sub2.receive_publish()
        assert p.topic == "r/2"
        await sub2.nothing()
        assert rb.broker.stats().retained == 1


async def test_unsubscribe(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        c, _ = await RawClient.connect(rb.port, "c")
        await c.subscribe("x")
        c.send(Unsubscribe(c.pid(), ["x", "y"]))
        ack = await c.expect(UnsubAck)
        assert ack.reason_codes == [0x00, 0x11]
        await c.publish("x", b"1")
        await c.nothing()
