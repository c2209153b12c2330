"""MQTT 5 features: subscription options, identifiers, aliases, expiry, properties,
shared subscriptions, packet size limits, ACL and malformed input."""

from __future__ import annotations

import asyncio
from pathlib import Path

from mqtt_harness import RawClient, running_broker, wait_until

from edgeway.config import MqttLimits, MqttSection
from edgeway.devices.auth import Principal
from edgeway.south.mqtt.codec import encode
from edgeway.south.mqtt.packets import (
    Disconnect,
    Properties,
    Publish,
    Subscription,
)


async def test_shared_subscription_splits_exactly_once(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        a, _ = await RawClient.connect(rb.port, "a")
        b, _ = await RawClient.connect(rb.port, "b", level=4)
        plain, _ = await RawClient.connect(rb.port, "plain")
        assert (await a.subscribe("$share/g/jobs/+", qos=1)).reason_codes == [1]
        assert (await b.subscribe("$share/g/jobs/+", qos=1)).reason_codes == [1]
        await plain.subscribe("jobs/#", qos=1)
        pub, _ = await RawClient.connect(rb.port, "p")
        n = 20
        for i in range(n):
            await pub.publish("jobs/x", b"%d" % i, qos=1)
        got_plain = [(await plain.receive_publish()).payload for _ in range(n)]
        assert len(got_plain) == n
        got_a = [(await a.receive_publish()).payload for _ in range(n // 2)]
        got_b = [(await b.receive_publish()).payload for _ in range(n // 2)]
        await a.nothing(0.1)
        await b.nothing(0.1)
        assert sorted(got_a + got_b, key=int) == [b"%d" % i for i in range(n)]


async def test_no_local(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        c, _ = await RawClient.connect(rb.port, "c")
        await c.subscribe(Subscription("t", 0, no_local=True))
        other, _ = await RawClient.connect(rb.port, "o")
        await other.subscribe("t")
        await c.publish("t", b"mine")
        assert (await other.receive_publish()).payload == b"mine"
        await c.nothing(0.2)
        await other.publish("t", b"theirs")
        assert (await c.receive_publish()).payload == b"theirs"


async def test_retain_handling_and_retain_as_published(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        pub, _ = await RawClient.connect(rb.port, "p")
        await pub.publish("r", b"kept", qos=1, retain=True)
        c, _ = await RawClient.connect(rb.port, "c")
        # 2: never send retained at subscribe.
        await c.subscribe(Subscription("r", 1, retain_handling=2))
        await c.nothing(0.2)
        # 1: only if the subscription is new (it exists now).
        await c.subscribe(Subscription("r", 1, retain_handling=1))
        await c.nothing(0.2)
        await c.subscribe(Subscription("r/#", 1, retain_handling=1))
        p = await c.receive_publish()
        assert (p.payload, p.retain) == (b"kept", True)
        # 0: always; and retain as published keeps the flag on live messages.
        d, _ = await RawClient.connect(rb.port, "d")
        await d.subscribe(Subscription("r", 1, retain_as_published=True))
        assert (await d.receive_publish()).retain is True
        await pub.publish("r", b"live", qos=1, retain=True)
        p = await d.receive_publish()
        assert (p.payload, p.retain) == (b"live", True)


async def test_subscription_identifiers_and_overlap(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        c, _ = await RawClient.connect(rb.port, "c")
        await c.subscribe(
            Subscription("a/+", 0), properties=Properties(subscription_identifiers=[7])
        )
        await c.subscribe(
            Subscription("a/#", 2), properties=Properties(subscription_identifiers=[9])
        )
        await c.subscribe(Subscription("a/b", 1))
        pub, _ = await RawClient.connect(rb.port, "p")
        await pub.publish("a/b", b"x", qos=2)
        p = await c.receive_publish()
        assert p.qos == 2  # the highest granted QoS, one delivery
        assert sorted(p.properties.subscription_identifiers) == [7, 9]
        await c.nothing(0.2)
        await pub.publish("a/c", b"y", qos=1)
        p = await c.receive_publish()
        assert sorted(p.properties.subscription_identifiers) == [7, 9]


async def test_wildcards_do_not_match_dollar_topics(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        c, _ = await RawClient.connect(rb.port, "c")
        await c.subscribe("#", "+/x")
        d, _ = await RawClient.connect(rb.port, "d")
        await d.subscribe("$SYS/#")
        pub, _ = await RawClient.connect(rb.port, "p")
        await pub.publish("$SYS/x", b"1")
        assert (await d.receive_publish()).topic == "$SYS/x"
        await c.nothing(0.2)


async def test_topic_alias_inbound(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        sub, _ = await RawClient.connect(rb.port, "s")
        await sub.subscribe("long/topic/name")
        c, ack = await RawClient.connect(rb.port, "c")
        assert ack.properties.topic_alias_maximum == 64
        await c.publish("long/topic/name", b"1", properties=Properties(topic_alias=3))
        await c.publish("", b"2", properties=Properties(topic_alias=3))
        got = [await sub.receive_publish() for _ in range(2)]
        assert [(p.topic, p.payload) for p in got] == [
            ("long/topic/name", b"1"),
            ("long/topic/name", b"2"),
        ]
        assert got[1].properties.topic_alias is None
        # Out of range alias: DISCONNECT 0x94. Unknown alias: 0x82.
        c.send(Publish("x", b"", properties=Properties(topic_alias=65)))
        got2 = await c.closed()
        assert isinstance(got2[-1], Disconnect) and got2[-1].reason_code == 0x94
        c, _ = await RawClient.connect(rb.port, "c")
        c.send(Publish("", b"", properties=Properties(topic_alias=5)))
        got2 = await c.closed()
        assert isinstance(got2[-1], Disconnect) and got2[-1].reason_code == 0x82


async def test_topic_alias_outbound(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        sub, _ = await RawClient.connect(rb.port, "s", properties=Properties(topic_alias_maximum=1))
        await sub.subscribe("t/#")
        pub, _ = await RawClient.connect(rb.port, "p")
        for topic in ("t/a", "t/a", "t/b", "t/a"):
            await pub.publish(topic, b"x")
        got = [await sub.receive_publish() for _ in range(4)]
        assert [(p.topic, p.properties.topic_alias) for p in got] == [
            ("t/a", 1),
            ("", 1),
            ("t/b", None),  # aliases used up: full topic, no alias
            ("", 1),
        ]


async def test_message_expiry(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        sub, _ = await RawClient.connect(
            rb.port, "s", properties=Properties(session_expiry_interval=60)
        )
        await sub.subscribe("t", qos=1)
        await sub.disconnect()
        pub, _ = await RawClient.connect(rb.port, "p")
        await pub.publish("t", b"short", qos=1, properties=Properties(message_expiry_interval=1))
        await pub.publish("t", b"long", qos=1, properties=Properties(message_expiry_interval=100))
        await asyncio.sleep(1.2)  # let the first expire while queued
        sub, _ = await RawClient.connect(
            rb.port, "s", clean=False, properties=Properties(session_expiry_interval=60)
        )
        p = await sub.receive_publish()
        assert p.payload == b"long"
        assert p.properties.message_expiry_interval is not None
        assert 95 <= p.properties.message_expiry_interval <= 99
        await sub.nothing(0.2)
        assert rb.broker.stats().dropped_by_reason["expired"] == 1


async def test_request_response_and_user_properties_pass_through(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        responder, _ = await RawClient.connect(rb.port, "responder")
        await responder.subscribe("svc/req")
        requester, _ = await RawClient.connect(rb.port, "requester")
        await requester.subscribe("svc/resp/requester")
        props = Properties(
            response_topic="svc/resp/requester",
            correlation_data=b"\x01\x02",
            user_properties=[("a", "1"), ("a", "2")],
            content_type="application/json",
            payload_format_indicator=1,
        )
        await requester.publish("svc/req", b"{}", qos=1, properties=props)
        req = await responder.receive_publish()
        assert req.properties.response_topic == "svc/resp/requester"
        assert req.properties.correlation_data == b"\x01\x02"
        assert req.properties.user_properties == [("a", "1"), ("a", "2")]
        assert req.properties.content_type == "application/json"
        assert req.properties.payload_format_indicator == 1
        await responder.publish(
            req.properties.response_topic,
            b"ok",
            properties=Properties(correlation_data=req.properties.correlation_data),
        )
        resp = await requester.receive_publish()
        assert (resp.payload, resp.properties.correlation_data) == (b"ok", b"\x01\x02")


async def test_payload_format_invalid(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        sub, _ = await RawClient.connect(rb.port, "s")
        await sub.subscribe("t")
        c, _ = await RawClient.connect(rb.port, "c")
        ack = await c.publish(
            "t", b"\xff\xfe", qos=1, properties=Properties(payload_format_indicator=1)
        )
        assert ack.reason_code == 0x99
        await sub.nothing(0.2)


async def test_outbound_maximum_packet_size(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        sub, _ = await RawClient.connect(
            rb.port, "s", properties=Properties(maximum_packet_size=100)
        )
        await sub.subscribe("t", qos=1)
        pub, _ = await RawClient.connect(rb.port, "p")
        await pub.publish("t", b"x" * 200, qos=1)
        await pub.publish("t", b"small", qos=1)
        p = await sub.receive_publish()
        assert p.payload == b"small"
        assert rb.broker.stats().dropped_by_reason["packet_too_large"] == 1


async def test_inbound_packet_too_large(tmp_path: Path) -> None:
    cfg = MqttSection(limits=MqttLimits(max_packet_size=1000))
    async with running_broker(tmp_path, config=cfg) as rb:
        c, ack = await RawClient.connect(rb.port, "c")
        assert ack.properties.maximum_packet_size == 1000
        c.send(Publish("t", b"x" * 2000))
        got = await c.closed()
        assert isinstance(got[-1], Disconnect) and got[-1].reason_code == 0x95
        c4, _ = await RawClient.connect(rb.port, "c4", level=4)
        c4.send(Publish("t", b"x" * 2000))
        assert await c4.closed() == []


async def test_malformed_packet_disconnects_with_0x81(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        other, _ = await RawClient.connect(rb.port, "other")
        await other.subscribe("t")
        c, _ = await RawClient.connect(rb.port, "c")
        # A PUBLISH that is fine followed by a SUBSCRIBE with reserved flag bits wrong.
        c.send_raw(encode(Publish("t", b"before"), 5) + b"\x80\x03\x00\x01\x00")
        got = await c.closed()
        assert isinstance(got[-1], Disconnect) and got[-1].reason_code == 0x81
        # The PUBLISH before the bad packet was handled; other clients are unaffected.
        assert (await other.receive_publish()).payload == b"before"
        await other.publish("t", b"after")
        assert (await other.receive_publish()).payload == b"after"
        assert rb.broker.stats().events["protocol_errors"] == 1
        # 3.1.1: just closed. Garbage before CONNECT: closed.
        c4, _ = await RawClient.connect(rb.port, "c4", level=4)
        c4.send_raw(b"\x30\xff\xff\xff\xff\x7f")
        assert await c4.closed() == []
        reader, writer = await asyncio.open_connection("127.0.0.1", rb.port)
        writer.write(b"\x00\x00\x00\x00")
        async with asyncio.timeout(5):
            assert await reader.read(100) == b""
        writer.close()


async def test_packets_before_connack_wait_for_authentication(tmp_path: Path) -> None:
    gate = asyncio.Event()

    class SlowAuth:
        async def authenticate(self, info):  # type: ignore[no-untyped-def]
            from edgeway.devices.auth import AuthDecision

            await gate.wait()
            return AuthDecision(True, Principal(info.client_id, info.username))

    async with running_broker(tmp_path, authenticator=SlowAuth()) as rb:
        from edgeway.south.mqtt.packets import ConnAck, Connect, PubAck, SubAck, Subscribe

        reader, writer = await asyncio.open_connection("127.0.0.1", rb.port)
        c = RawClient(reader, writer, 5)
        c.send(Connect(5, "slow"))
        c.send(Subscribe(1, [Subscription("t", 1)]))
        c.send(Publish("t", b"self", 1, False, False, 2))
        await c.nothing(0.2)
        gate.set()
        assert isinstance(await c.recv(), ConnAck)
        assert isinstance(await c.recv(), SubAck)
        kinds = {type(await c.recv()) for _ in range(2)}
        assert kinds == {PubAck, Publish}


class DenyingAuthoriser:
    def may_publish(self, principal: Principal, topic: str) -> bool:
        return not topic.startswith("secret")

    def may_subscribe(self, principal: Principal, topic_filter: str) -> bool:
        return not topic_filter.startswith("secret")


async def test_acl_denials(tmp_path: Path) -> None:
    async with running_broker(tmp_path, authoriser=DenyingAuthoriser()) as rb:
        c, _ = await RawClient.connect(rb.port, "c")
        ack = await c.subscribe("secret/#", "ok/#", qos=1)
        assert ack.reason_codes == [0x87, 1]
        c4, _ = await RawClient.connect(rb.port, "c4", level=4)
        ack = await c4.subscribe("secret/#", "ok/#", qos=1)
        assert ack.reason_codes == [0x80, 1]
        # Shared subscriptions are authorised on the filter without $share/g/.
        ack = await c.subscribe("$share/g/secret/x", qos=1)
        assert ack.reason_codes == [0x87]
        spy, _ = await RawClient.connect(rb.port, "spy")
        await spy.subscribe("#")
        ack5 = await c.publish("secret/x", b"no", qos=1)
        assert ack5.reason_code == 0x87
        ack4 = await c4.publish("secret/x", b"no", qos=1)
        assert ack4.reason_code == 0  # 3.1.1 has no refusal code
        rec = await c.publish("secret/y", b"no", qos=2)
        assert rec.reason_code == 0x87
        await spy.nothing(0.2)
        assert rb.broker.stats().dropped_by_reason["not_authorised"] == 3


async def test_stop_sends_server_shutting_down(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        c, _ = await RawClient.connect(rb.port, "c")
        c4, _ = await RawClient.connect(rb.port, "c4", level=4)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await rb.broker.stop()
        assert loop.time() - t0 < 2.0
        got = await c.closed()
        assert isinstance(got[-1], Disconnect) and got[-1].reason_code == 0x8B
        assert await c4.closed() == []
        await wait_until(lambda: not rb.broker.connections)


async def test_max_topic_levels(tmp_path: Path) -> None:
    cfg = MqttSection(limits=MqttLimits(max_topic_levels=3))
    async with running_broker(tmp_path, config=cfg) as rb:
        c, _ = await RawClient.connect(rb.port, "c")
        ack = await c.subscribe("a/b/c", "a/b/c/d", "$share/g/a/b/c", "a/#")
        assert ack.reason_codes == [0, 0x8F, 0, 0]
        assert (await c.publish("a/b/c/d", b"deep", qos=1)).reason_code == 0x90
        await c.nothing(0.2)
        c4, _ = await RawClient.connect(rb.port, "c4", level=4)
        assert (await c4.subscribe("a/b/c/d")).reason_codes == [0x80]
        await c4.publish("a/b/c", b"ok", qos=1)
        assert (await c.receive_publish()).payload == b"ok"
        assert rb.broker.stats().dropped_by_reason["too_many_topic_levels"] == 1
