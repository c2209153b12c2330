"""What the broker does when the gateway itself stops (docs/protocols/mqtt-broker.md):
wills are not sent, v5 clients are told 0x8B, and what is queued for an
offline persistent session survives the restart."""

from __future__ import annotations

from pathlib import Path

from mqtt_harness import RawClient, running_broker

from edgeway.south.mqtt.packets import Disconnect, Properties, Will

SESSION = Properties(session_expiry_interval=3600)


async def test_no_wills_when_the_gateway_stops(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        # An offline persistent session that would queue a will if one were sent.
        w, _ = await RawClient.connect(rb.port, "w", properties=SESSION)
        await w.subscribe("will/#", qos=1)
        await w.disconnect()
        v5, _ = await RawClient.connect(rb.port, "a5", will=Will("will/a5", b"gone", 1))
        v311, _ = await RawClient.connect(rb.port, "a3", level=4, will=Will("will/a3", b"gone", 1))
        pub, _ = await RawClient.connect(rb.port, "p")
        await pub.publish("will/control", b"queued", qos=1)  # shows the queue works
        broker = rb.broker
    # running_broker stopped the broker: v5 got DISCONNECT 0x8B, nobody's will went out.
    (d,) = [p for p in await v5.closed() if isinstance(p, Disconnect)]
    assert d.reason_code == 0x8B
    assert await v311.closed() == []
    assert broker.stats().flat().get("wills_published", 0) == 0  # counters appear once non-zero
    async with running_broker(tmp_path) as rb:
        w, ack = await RawClient.connect(rb.port, "w", clean=False, properties=SESSION)
        assert ack.session_present
        p = await w.receive_publish()
        assert (p.topic, p.payload) == ("will/control", b"queued")
        await w.nothing(0.3)  # and no will behind it
