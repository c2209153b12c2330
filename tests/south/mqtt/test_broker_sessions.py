"""Sessions: persistence, takeover, expiry, wills, keep alive, restart, limits."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from mqtt_harness import RawClient, running_broker, wait_until

from edgeway.config import MqttLimits, MqttSection
from edgeway.south.mqtt.packets import (
    Disconnect,
    Properties,
    PubAck,
    Publish,
    PubRec,
    PubRel,
    Will,
)


async def test_persistent_session_redelivery_v311(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        sub, ack = await RawClient.connect(rb.port, "s", level=4, clean=False)
        assert ack.session_present is False
        await sub.subscribe("t/#", qos=1)
        await sub.disconnect()
        pub, _ = await RawClient.connect(rb.port, "p", level=4)
        for i in range(3):
            await pub.publish(f"t/{i}", b"%d" % i, qos=1)
        await pub.publish("t/q0", b"q0", qos=0)  # QoS 0 is not queued offline
        sub, ack = await RawClient.connect(rb.port, "s", level=4, clean=False)
        assert ack.session_present is True
        got = [await sub.receive_publish() for _ in range(3)]
        assert [p.payload for p in got] == [b"0", b"1", b"2"]
        await sub.nothing(0.2)


async def test_unacked_inflight_redelivered_with_dup(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        props = Properties(session_expiry_interval=300)
        sub, _ = await RawClient.connect(rb.port, "s", properties=props)
        await sub.subscribe("t", qos=2)
        pub, _ = await RawClient.connect(rb.port, "p")
        await pub.publish("t", b"one", qos=1)
        await pub.publish("t", b"two", qos=2)
        first = await sub.expect(Publish)
        second = await sub.expect(Publish)
        assert (first.dup, second.dup) == (False, False)
        # Acknowledge the second only half-way (PUBREC), then fail abruptly.
        assert second.packet_id is not None
        sub.send(PubRec(second.packet_id))
        await sub.expect(PubRel)
        sub.abort()
        sub, ack = await RawClient.connect(rb.port, "s", clean=False, properties=props)
        assert ack.session_present
        again = await sub.expect(Publish)
        assert (again.payload, again.dup, again.packet_id) == (b"one", True, first.packet_id)
        rel = await sub.expect(PubRel)
        assert rel.packet_id == second.packet_id


async def test_clean_start_discards_session(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        props = Properties(session_expiry_interval=300)
        sub, _ = await RawClient.connect(rb.port, "s", properties=props)
        await sub.subscribe("t", qos=1)
        await sub.disconnect()
        sub, ack = await RawClient.connect(rb.port, "s", clean=True, properties=props)
        assert ack.session_present is False
        pub, _ = await RawClient.connect(rb.port, "p")
        await pub.publish("t", b"x", qos=1)
        await sub.nothing(0.2)


async def test_session_expiry(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        sub, _ = await RawClient.connect(
            rb.port, "s", properties=Properties(session_expiry_interval=1)
        )
        await sub.subscribe("t", qos=1)
        await sub.disconnect()
        assert "s" in rb.broker.sessions
        await wait_until(lambda: "s" not in rb.broker.sessions)
        sub, ack = await RawClient.connect(rb.port, "s", clean=False)
        assert ack.session_present is False


async def test_session_takeover(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        old, _ = await RawClient.connect(rb.port, "same")
        new, _ = await RawClient.connect(rb.port, "same")
        got = await old.closed()
        assert len(got) == 1 and isinstance(got[0], Disconnect)
        assert got[0].reason_code == 0x8E
        await new.subscribe("t")
        await new.publish("t", b"still here")
        p = await new.receive_publish()
        assert p.payload == b"still here"
        old311, _ = await RawClient.connect(rb.port, "same3", level=4)
        _new311, _ = await RawClient.connect(rb.port, "same3", level=4)
        assert await old311.closed() == []
        assert rb.broker.stats().clients_connected == 2


async def test_will_on_abrupt_close_not_on_disconnect(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        watcher, _ = await RawClient.connect(rb.port, "w")
        await watcher.subscribe("will/#", qos=1)
        will = Will("will/a", b"gone", 1, False, Properties(user_properties=[("k", "v")]))
        c, _ = await RawClient.connect(rb.port, "a", will=will)
        c.abort()
        p = await watcher.receive_publish()
        assert (p.topic, p.payload, p.qos) == ("will/a", b"gone", 1)
        assert p.properties.user_properties == [("k", "v")]
        c, _ = await RawClient.connect(rb.port, "b", will=Will("will/b", b"x"))
        await c.disconnect()
        await watcher.nothing(0.3)
        # v5 DISCONNECT 0x04: disconnect with will message.
        c, _ = await RawClient.connect(rb.port, "c", will=Will("will/c", b"asked"))
        await c.disconnect(0x04)
        p = await watcher.receive_publish()
        assert p.payload == b"asked"


async def test_will_delay_cancelled_by_reconnect_and_sent_after(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        watcher, _ = await RawClient.connect(rb.port, "w")
        await watcher.subscribe("will/#")
        props = Properties(session_expiry_interval=60)
        will = Will("will/d", b"late", properties=Properties(will_delay_interval=1))
        c, _ = await RawClient.connect(rb.port, "d", will=will, properties=props)
        c.abort()
        await asyncio.sleep(0.2)
        c, ack = await RawClient.connect(rb.port, "d", clean=False, will=will, properties=props)
        assert ack.session_present
        await watcher.nothing(1.5)  # reconnected in time: no will
        t0 = time.monotonic()
        c.abort()
        p = await watcher.receive_publish(wait=4)
        assert p.payload == b"late"
        assert time.monotonic() - t0 >= 0.9


async def test_keepalive_timeout_closes_and_sends_will(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        watcher, _ = await RawClient.connect(rb.port, "w")
        await watcher.subscribe("will/#")
        c, _ = await RawClient.connect(rb.port, "k", keepalive=1, will=Will("will/k", b"ka"))
        t0 = time.monotonic()
        got = await c.closed(wait=5)
        elapsed = time.monotonic() - t0
        assert [type(p) for p in got] == [Disconnect] and got[0].reason_code == 0x8D  # type: ignore[union-attr]
        assert 1.4 <= elapsed <= 3.0
        p = await watcher.receive_publish()
        assert p.payload == b"ka"


async def test_server_keep_alive_and_assigned_client_id(tmp_path: Path) -> None:
    cfg = MqttSection(limits=MqttLimits(max_keepalive=30))
    async with running_broker(tmp_path, config=cfg) as rb:
        _c, ack = await RawClient.connect(rb.port, "", keepalive=600)
        assert ack.properties.server_keep_alive == 30
        assert ack.properties.assigned_client_identifier
        assert ack.properties.assigned_client_identifier.startswith("edgeway-")
        # 3.1.1: an empty id with clean session 0 is refused (return code 2).
        _, ack = await RawClient.connect(rb.port, "", level=4, clean=False, expect_ok=False)
        assert ack.reason_code == 2
        _c4, ack = await RawClient.connect(rb.port, "", level=4, clean=True)
        assert ack.reason_code == 0


async def test_connect_timeout(tmp_path: Path) -> None:
    cfg = MqttSection(limits=MqttLimits(connect_timeout=0.5))
    async with running_broker(tmp_path, config=cfg) as rb:
        reader, writer = await asyncio.open_connection("127.0.0.1", rb.port)
        t0 = time.monotonic()
        async with asyncio.timeout(5):
            assert await reader.read(10) == b""
        assert time.monotonic() - t0 >= 0.4
        writer.close()


async def test_max_connections(tmp_path: Path) -> None:
    cfg = MqttSection(limits=MqttLimits(max_connections=2))
    async with running_broker(tmp_path, config=cfg) as rb:
        a, _ = await RawClient.connect(rb.port, "a")
        _b, _ = await RawClient.connect(rb.port, "b", level=4)
        _, ack = await RawClient.connect(rb.port, "c", expect_ok=False)
        assert ack.reason_code == 0x97
        _, ack = await RawClient.connect(rb.port, "d", level=4, expect_ok=False)
        assert ack.reason_code == 3
        await a.disconnect()
        await wait_until(lambda: rb.broker.connected_count() == 1)
        await RawClient.connect(rb.port, "c")


async def test_restart_keeps_retained_and_persistent_session(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        pub, _ = await RawClient.connect(rb.port, "p")
        await pub.publish("cfg/a", b"retained", qos=1, retain=True)
        sub, _ = await RawClient.connect(
            rb.port, "s", properties=Properties(session_expiry_interval=3600)
        )
        await sub.subscribe("q/#", qos=1)
        await sub.disconnect()
        await pub.publish("q/1", b"queued", qos=1, properties=Properties(content_type="text"))
        # An in-flight message that the subscriber never acknowledged:
        sub2, _ = await RawClient.connect(rb.port, "s2", level=4, clean=False)
        await sub2.subscribe("q/#", qos=2)
        await pub.publish("q/2", b"inflight", qos=2)
        p = await sub2.expect(Publish)
        assert p.payload == b"inflight"  # and never acknowledged
    async with running_broker(tmp_path) as rb:
        s = rb.broker.stats().flat()
        assert s["retained"] == 1 and s["sessions"] == 2
        sub, ack = await RawClient.connect(
            rb.port, "s", clean=False, properties=Properties(session_expiry_interval=3600)
        )
        assert ack.session_present
        p = await sub.receive_publish()
        assert (p.topic, p.payload, p.properties.content_type) == ("q/1", b"queued", "text")
        assert (await sub.receive_publish()).payload == b"inflight"  # queued for "s" too
        sub2, ack = await RawClient.connect(rb.port, "s2", level=4, clean=False)
        assert ack.session_present
        p = await sub2.receive_publish()
        assert (p.payload, p.dup, p.qos) == (b"inflight", True, 2)
        # Subscriptions came back too.
        pub, _ = await RawClient.connect(rb.port, "p")
        await pub.publish("q/3", b"live", qos=1)
        assert (await sub.receive_publish()).payload == b"live"
        watcher, _ = await RawClient.connect(rb.port, "w")
        await watcher.subscribe("cfg/#")
        p = await watcher.receive_publish()
        assert (p.payload, p.retain) == (b"retained", True)


async def test_offline_queue_bounded_and_counted(tmp_path: Path) -> None:
    cfg = MqttSection(limits=MqttLimits(max_queued_messages=5))
    async with running_broker(tmp_path, config=cfg) as rb:
        sub, _ = await RawClient.connect(rb.port, "s", level=4, clean=False)
        await sub.subscribe("t", qos=1)
        await sub.disconnect()
        pub, _ = await RawClient.connect(rb.port, "p")
        for i in range(8):
            await pub.publish("t", b"%d" % i, qos=1)
        assert rb.broker.stats().dropped_by_reason["queue_full"] == 3
        sub, _ = await RawClient.connect(rb.port, "s", level=4, clean=False)
        got = [(await sub.receive_publish()).payload for _ in range(5)]
        assert got == [b"3", b"4", b"5", b"6", b"7"]


async def test_inflight_window_limited_by_client_receive_maximum(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        sub, _ = await RawClient.connect(rb.port, "s", properties=Properties(receive_maximum=2))
        await sub.subscribe("t", qos=1)
        pub, _ = await RawClient.connect(rb.port, "p")
        for i in range(5):
            await pub.publish("t", b"%d" % i, qos=1)
        a = await sub.expect(Publish)
        b = await sub.expect(Publish)
        await sub.nothing(0.2)  # window full
        assert a.packet_id is not None and b.packet_id is not None
        sub.send(PubAck(a.packet_id))
        c = await sub.expect(Publish)
        assert c.payload == b"2"
        sub.send(PubAck(b.packet_id))
        assert c.packet_id is not None
        sub.send(PubAck(c.packet_id))
        assert [(await sub.receive_publish()).payload for _ in range(2)] == [b"3", b"4"]


async def test_client_exceeding_receive_maximum_is_disconnected(tmp_path: Path) -> None:
    cfg = MqttSection(limits=MqttLimits(receive_maximum=2))
    async with running_broker(tmp_path, config=cfg) as rb:
        c, ack = await RawClient.connect(rb.port, "c")
        assert ack.properties.receive_maximum == 2
        for pid in (1, 2, 3):
            c.send(Publish("t", b"x", 2, False, False, pid))
        got = await c.closed()
        assert isinstance(got[-1], Disconnect) and got[-1].reason_code == 0x93


async def test_qos2_duplicate_before_pubrel_not_delivered_twice(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        sub, _ = await RawClient.connect(rb.port, "s")
        await sub.subscribe("t", qos=2)
        pub, _ = await RawClient.connect(
            rb.port, "p", properties=Properties(session_expiry_interval=60)
        )
        pub.send(Publish("t", b"once", 2, False, False, 9))
        await pub.expect(PubRec)
        pub.abort()
        pub, _ = await RawClient.connect(
            rb.port, "p", clean=False, properties=Properties(session_expiry_interval=60)
        )
        pub.send(Publish("t", b"once", 2, False, True, 9))
        rec = await pub.expect(PubRec)
        assert rec.packet_id == 9
        pub.send(PubRel(9))
        await pub.recv()
        assert (await sub.receive_publish()).payload == b"once"
        await sub.nothing(0.3)


async def test_connack_refused_for_unsupported_version(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        reader, writer = await asyncio.open_connection("127.0.0.1", rb.port)
        # MQIsdp 3.1 CONNECT (level 3)
        body = b"\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x01x"
        writer.write(bytes([0x10, len(body)]) + body)
        async with asyncio.timeout(5):
            assert await reader.read(10) == b"\x20\x02\x00\x01"
            assert await reader.read(10) == b""
        writer.close()


async def test_will_sent_when_session_ends_before_will_delay(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        watcher, _ = await RawClient.connect(rb.port, "w")
        await watcher.subscribe("will/#")
        will = Will("will/e", b"ended", properties=Properties(will_delay_interval=600))
        c, _ = await RawClient.connect(
            rb.port, "e", will=will, properties=Properties(session_expiry_interval=1)
        )
        c.abort()
        p = await watcher.receive_publish(wait=4)  # at session end (1 s), not after 600 s
        assert p.payload == b"ended"
        await wait_until(lambda: "e" not in rb.broker.sessions)


async def test_disconnect_cannot_turn_session_expiry_on(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        c, _ = await RawClient.connect(rb.port, "c")  # session expiry 0
        c.send(Disconnect(0, Properties(session_expiry_interval=60)))
        got = await c.closed()
        assert isinstance(got[-1], Disconnect) and got[-1].reason_code == 0x82
        # The other way round is allowed: a persistent session ends at DISCONNECT.
        c, _ = await RawClient.connect(
            rb.port, "d", properties=Properties(session_expiry_interval=60)
        )
        await c.subscribe("t", qos=1)
        await c.disconnect(0, Properties(session_expiry_interval=0))
        await wait_until(lambda: "d" not in rb.broker.sessions)


async def test_will_needs_publish_permission(tmp_path: Path) -> None:
    class NoWills:
        def may_publish(self, principal: object, topic: str) -> bool:
            return not topic.startswith("will/")

        def may_subscribe(self, principal: object, topic_filter: str) -> bool:
            return True

    async with running_broker(tmp_path, authoriser=NoWills()) as rb:  # type: ignore[arg-type]
        watcher, _ = await RawClient.connect(rb.port, "w")
        await watcher.subscribe("#")
        c, _ = await RawClient.connect(rb.port, "c", will=Will("will/c", b"x"))
        c.abort()
        await wait_until(lambda: rb.broker.stats().flat().get("dropped_will_not_authorised") == 1)
        await watcher.nothing(0.1)


async def test_gateway_originated_publish(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        dev, _ = await RawClient.connect(rb.port, "dev1", level=4, clean=False)
        await dev.subscribe("devices/dev1/receipts", qos=1)
        rb.broker.publish("devices/dev1/receipts", b'{"confirmed": ["m1"]}', qos=1)
        p = await dev.receive_publish()
        assert (p.topic, p.qos, p.payload) == ("devices/dev1/receipts", 1, b'{"confirmed": ["m1"]}')
        await dev.disconnect()
        # Offline persistent session: queued for later.
        rb.broker.publish("devices/dev1/receipts", b"later", qos=1)
        rb.broker.publish("devices/dev1/config", b"cfg", qos=1, retain=True)
        dev, _ = await RawClient.connect(rb.port, "dev1", level=4, clean=False)
        assert (await dev.receive_publish()).payload == b"later"
        await dev.subscribe("devices/dev1/config", qos=1)
        p = await dev.receive_publish()
        assert (p.payload, p.retain) == (b"cfg", True)
        s = rb.broker.stats().flat()
        for key in ("connections", "messages_in", "messages_out", "dropped", "decode_errors"):
            assert key in s
