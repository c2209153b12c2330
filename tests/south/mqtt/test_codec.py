"""Tests of the sans-IO MQTT codec: golden bytes from the spec, round trips, streaming, errors.

The property tables below are written from the spec (MQTT 5.0 section 2.2.2.2), not copied
from the codec, so the round trip also pins which properties each packet may carry.
"""

from __future__ import annotations

import socket
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeway.south.mqtt.codec import (
    PINGREQ_BYTES,
    PINGRESP_BYTES,
    MqttReader,
    UnsupportedProtocolVersion,
    decode_packet,
    encode,
    encode_puback,
    encode_pubacks,
    encode_pubcomp,
    encode_publish,
    encode_pubrec,
    encode_pubrel,
    validate_topic_filter,
    validate_topic_name,
)
from edgeway.south.mqtt.packets import (
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    PingReq,
    PingResp,
    Properties,
    ProtocolError,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    Subscription,
    UnsubAck,
    Unsubscribe,
    Will,
)

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------------------------
# Golden byte vectors, worked out by hand from the spec's figures.


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


GOLDEN: list[tuple[str, Packet, int, bytes]] = [
    (
        # 3.1.1 figure 3.2 layout: name "MQTT", level 4, flags clean session, keepalive 60.
        "connect-311",
        Connect(4, "abc", clean_start=True, keepalive=60),
        4,
        h("10 0F 0004 4D515454 04 02 003C 0003 616263"),
    ),
    (
        "connect-311-user-pass-will",
        Connect(
            4,
            "c",
            clean_start=False,
            keepalive=10,
            username="u",
            password=b"p",
            will=Will("w", b"x", qos=1, retain=True),
        ),
        4,
        # flags: user 0x80 | password 0x40 | will retain 0x20 | will qos1 0x08 | will 0x04
        h("10 19 0004 4D515454 04 EC 000A 0001 63 0001 77 0001 78 0001 75 0001 70"),
    ),
    (
        "connect-5-session-expiry",
        Connect(5, "abc", keepalive=60, properties=Properties(session_expiry_interval=10)),
        5,
        h("10 15 0004 4D515454 05 02 003C 05 11 0000000A 0003 616263"),
    ),
    ("connack-311", ConnAck(True, 0), 4, h("20 02 01 00")),
    ("connack-5", ConnAck(False, 0x87), 5, h("20 03 00 87 00")),
    (
        "publish-qos1-311",
        Publish("a/b", b"hi", qos=1, packet_id=10),
        4,
        h("32 09 0003 612F62 000A 6869"),
    ),
    (
        "publish-qos1-5",
        Publish("a/b", b"hi", qos=1, packet_id=10),
        5,
        h("32 0A 0003 612F62 000A 00 6869"),
    ),
    (
        "publish-qos0-retain-5-alias",
        Publish("", b"", retain=True, properties=Properties(topic_alias=3)),
        5,
        h("31 06 0000 03 23 0003"),
    ),
    ("puback-311", PubAck(10, 0x10), 4, h("40 02 000A")),
    ("puback-5-short", PubAck(10), 5, h("40 02 000A")),
    ("puback-5-reason", PubAck(10, 0x10), 5, h("40 03 000A 10")),
    (
        "puback-5-reason-string",
        PubAck(10, 0x80, Properties(reason_string="no")),
        5,
        h("40 09 000A 80 05 1F 0002 6E6F"),
    ),
    ("pubrel-311", PubRel(7), 4, h("62 02 0007")),
    (
        "subscribe-311",
        Subscribe(1, [Subscription("a/b", 1), Subscription("c/#", 2)]),
        4,
        h("82 0E 0001 0003 612F62 01 0003 632F23 02"),
    ),
    (
        "subscribe-5-options",
        Subscribe(
            1,
            [Subscription("a/b", 1, no_local=True, retain_as_published=True, retain_handling=2)],
            Properties(subscription_identifiers=[5]),
        ),
        5,
        h("82 0B 0001 02 0B 05 0003 612F62 2D"),
    ),
    ("suback-311", SubAck(1, [0, 1, 0x80]), 4, h("90 05 0001 00 01 80")),
    ("suback-5", SubAck(1, [0, 1, 0x87]), 5, h("90 06 0001 00 00 01 87")),
    ("unsubscribe-311", Unsubscribe(2, ["a"]), 4, h("A2 05 0002 0001 61")),
    ("unsuback-311", UnsubAck(2), 4, h("B0 02 0002")),
    ("unsuback-5", UnsubAck(2, [0, 0x11]), 5, h("B0 05 0002 00 00 11")),
    ("pingreq", PingReq(), 4, h("C0 00")),
    ("pingresp", PingResp(), 5, h("D0 00")),
    ("disconnect-311", Disconnect(), 4, h("E0 00")),
    ("disconnect-5-short", Disconnect(), 5, h("E0 00")),
    ("disconnect-5-reason", Disconnect(0x04), 5, h("E0 01 04")),
    (
        "disconnect-5-props",
        Disconnect(0x8B, Properties(session_expiry_interval=0)),
        5,
        h("E0 07 8B 05 11 00000000"),
    ),
    ("auth-5-short", Auth(), 5, h("F0 00")),
    (
        "auth-5-continue",
        Auth(0x18, Properties(authentication_method="M")),
        5,
        h("F0 06 18 04 15 0001 4D"),
    ),
]


@pytest.mark.parametrize(
    ("packet", "level", "wire"), [g[1:] for g in GOLDEN], ids=[g[0] for g in GOLDEN]
)
def test_golden_encode_and_decode(packet: Packet, level: int, wire: bytes) -> None:
    if isinstance(packet, PubAck) and level == 4:
        # 3.1.1 has no reason code: it is not written and decodes as 0.
        assert encode(packet, level) == wire
        assert decode_packet(wire, level) == PubAck(packet.packet_id)
        return
    assert encode(packet, level) == wire
    assert decode_packet(wire, level) == packet


def test_remaining_length_varint_golden() -> None:
    # Spec 1.5.5: 321 is encoded as 0xC1 0x02; 127 is one byte, 128 is 0x80 0x01.
    for length, field in ((127, "7F"), (128, "8001"), (321, "C102"), (16384, "808001")):
        payload = b"x" * (length - 3)  # topic length (2) + topic "t" (1)
        wire = encode(Publish("t", payload), 4)
        assert wire[: 1 + len(field) // 2] == bytes([0x30]) + h(field)
        assert decode_packet(wire, 4) == Publish("t", payload)


def test_encode_puback_fast_path() -> None:
    assert encode_puback(10, 5) == h("40 02 000A")
    assert encode_puback(10, 4) == h("40 02 000A")
    assert encode_puback(65535, 5, 0x97) == h("40 03 FFFF 97")
    assert encode_puback(1, 4, 0x97) == h("40 02 0001")  # 3.1.1 has no reason code
    assert encode_pubrec(3, 5) == h("50 02 0003")
    assert encode_pubrec(3, 5, 0x10) == h("50 03 0003 10")
    assert encode_pubrel(3, 5) == h("62 02 0003")
    assert encode_pubrel(3, 5, 0x92) == h("62 03 0003 92")
    assert encode_pubcomp(3, 4) == h("70 02 0003")
    for bad in (0, 65536, -1):
        with pytest.raises(ValueError):
            encode_puback(bad, 5)
    with pytest.raises(ValueError):
        encode_puback(1, 5, 0x92)  # a PUBREL/PUBCOMP code, not a PUBACK one
    with pytest.raises(ValueError):
        encode_pubrel(1, 5, 0x10)
    assert PINGREQ_BYTES == encode(PingReq(), 5)
    assert PINGRESP_BYTES == encode(PingResp(), 4)


@given(
    st.lists(st.integers(1, 0xFFFF), max_size=300),
    st.sampled_from([4, 5]),
    st.sampled_from([0, 0x10, 0x80, 0x97, 0x99]),
)
def test_encode_pubacks_is_the_pubacks_one_by_one(pids: list[int], level: int, reason: int) -> None:
    want = b"".join(encode_puback(p, level, reason) for p in pids)
    assert encode_pubacks(pids, level, reason) == want
    assert [(a.packet_id, a.reason_code) for a in MqttReader(protocol_level=level).feed(want)] == [
        (p, reason if level == 5 else 0) for p in pids
    ]


def test_encode_publish_is_what_encode_uses() -> None:
    p = Publish("a", b"b", qos=2, dup=True, packet_id=9, properties=Properties(content_type="c"))
    assert encode(p, 5) == encode_publish(p, 5)
    assert encode(p, 4) == encode_publish(p, 4)


# --------------------------------------------------------------------------------------------
# Every packet type with every property it allows, both versions.

ALLOWED: dict[str, set[str]] = {
    # From the spec's property table (2.2.2.2); "will" = Will Properties in CONNECT.
    "CONNECT": {
        "session_expiry_interval",
        "authentication_method",
        "authentication_data",
        "request_problem_information",
        "request_response_information",
        "receive_maximum",
        "topic_alias_maximum",
        "user_properties",
        "maximum_packet_size",
    },
    "will": {
        "payload_format_indicator",
        "message_expiry_interval",
        "content_type",
        "response_topic",
        "correlation_data",
        "will_delay_interval",
        "user_properties",
    },
    "CONNACK": {
        "session_expiry_interval",
        "assigned_client_identifier",
        "server_keep_alive",
        "authentication_method",
        "authentication_data",
        "response_information",
        "server_reference",
        "reason_string",
        "receive_maximum",
        "topic_alias_maximum",
        "maximum_qos",
        "retain_available",
        "user_properties",
        "maximum_packet_size",
        "wildcard_subscription_available",
        "subscription_identifier_available",
        "shared_subscription_available",
    },
    "PUBLISH": {
        "payload_format_indicator",
        "message_expiry_interval",
        "content_type",
        "response_topic",
        "correlation_data",
        "subscription_identifiers",
        "topic_alias",
        "user_properties",
    },
    "PUBACK": {"reason_string", "user_properties"},
    "PUBREC": {"reason_string", "user_properties"},
    "PUBREL": {"reason_string", "user_properties"},
    "PUBCOMP": {"reason_string", "user_properties"},
    "SUBSCRIBE": {"subscription_identifiers", "user_properties"},
    "SUBACK": {"reason_string", "user_properties"},
    "UNSUBSCRIBE": {"user_properties"},
    "UNSUBACK": {"reason_string", "user_properties"},
    "DISCONNECT": {
        "session_expiry_interval",
        "server_reference",
        "reason_string",
        "user_properties",
    },
    "AUTH": {"authentication_method", "authentication_data", "reason_string", "user_properties"},
}

SAMPLE_VALUES: dict[str, Any] = {
    "payload_format_indicator": 1,
    "message_expiry_interval": 0xFFFFFFFF,
    "content_type": "application/json",
    "response_topic": "reply/to/me",
    "correlation_data": b"\x00\x01corr",
    "subscription_identifiers": [1, 268_435_455],
    "session_expiry_interval": 3600,
    "assigned_client_identifier": "auto-1",
    "server_keep_alive": 30,
    "authentication_method": "SCRAM-SHA-1",
    "authentication_data": b"\xff\x00",
    "request_problem_information": 0,
    "will_delay_interval": 5,
    "request_response_information": 1,
    "response_information": "resp/",
    "server_reference": "other:1883",
    "reason_string": "because ✓",
    "receive_maximum": 100,
    "topic_alias_maximum": 10,
    "topic_alias": 7,
    "maximum_qos": 1,
    "retain_available": 0,
    "user_properties": [("k", "v"), ("k", "v2"), ("ключ", "")],
    "maximum_packet_size": 1 << 20,
    "wildcard_subscription_available": 1,
    "subscription_identifier_available": 0,
    "shared_subscription_available": 1,
}


def full_props(kind: str) -> Properties:
    values = {name: SAMPLE_VALUES[name] for name in ALLOWED[kind]}
    if kind == "SUBSCRIBE":
        values["subscription_identifiers"] = [42]  # only one allowed in SUBSCRIBE
    return Properties(**values)


def all_packets(level: int) -> list[Packet]:
    v5 = level == 5

    def props(kind: str) -> Properties:
        return full_props(kind) if v5 else Properties()

    packets: list[Packet] = [
        Connect(
            level,
            "client-é",
            clean_start=False,
            keepalive=65535,
            username="user",
            password=b"\x00secret",
            will=Will("will/topic", b"\x00gone", qos=2, retain=True, properties=props("will")),
            properties=props("CONNECT"),
        ),
        Connect(level, "", keepalive=0),
        ConnAck(True, 0, props("CONNACK")),
        ConnAck(False, 0x86 if v5 else 4),
        Publish(
            "t/é/1",
            b"\x00" * 300,
            qos=2,
            retain=True,
            dup=True,
            packet_id=65535,
            properties=props("PUBLISH"),
        ),
        Publish("t", b"", qos=0),
        PubAck(1, 0x99 if v5 else 0, props("PUBACK")),
        PubRec(2, 0x10 if v5 else 0, props("PUBREC")),
        PubRel(3, 0x92 if v5 else 0, props("PUBREL")),
        PubComp(4, 0, props("PUBCOMP")),
        Subscribe(
            5,
            [
                Subscription("a/+/c", 0),
                Subscription("$share/g/x/#", 2, retain_handling=1 if v5 else 0),
                Subscription("#", 1, no_local=v5, retain_as_published=v5),
            ],
            props("SUBSCRIBE"),
        ),
        SubAck(5, [0, 2, 0x80] + ([0x9E, 0xA2] if v5 else []), props("SUBACK")),
        Unsubscribe(6, ["a/+/c", "#"], props("UNSUBSCRIBE")),
        UnsubAck(6, [0, 0x11] if v5 else [], props("UNSUBACK")),
        PingReq(),
        PingResp(),
        Disconnect(0x04 if v5 else 0, props("DISCONNECT")),
    ]
    if v5:
        packets.append(Auth(0x19, props("AUTH")))
    return packets


@pytest.mark.parametrize("level", [4, 5])
def test_round_trip_every_packet_type(level: int) -> None:
    packets = all_packets(level)
    assert {type(p) for p in packets} >= {
        Connect, ConnAck, Publish, PubAck, PubRec, PubRel, PubComp, Subscribe, SubAck,
        Unsubscribe, UnsubAck, PingReq, PingResp, Disconnect,
    }  # fmt: skip
    for packet in packets:
        wire = encode(packet, level)
        assert decode_packet(wire, level) == packet, type(packet).__name__
    # All of them in one chunk, through a server-side reader that learns the level.
    reader = MqttReader()
    assert reader.feed(b"".join(encode(p, level) for p in packets)) == packets
    assert reader.protocol_level == level


def test_311_drops_v5_fields() -> None:
    v5_only = Publish("t", b"x", 1, packet_id=1, properties=full_props("PUBLISH"))
    assert decode_packet(encode(v5_only, 4), 4) == Publish("t", b"x", 1, packet_id=1)
    sub = Subscribe(1, [Subscription("a", 1, no_local=True, retain_handling=2)])
    assert encode(sub, 4) == h("82 06 0001 0001 61 01")
    assert encode(Disconnect(0x8E, full_props("DISCONNECT")), 4) == h("E0 00")
    assert encode(UnsubAck(3, [0x11]), 4) == h("B0 02 0003")
    assert encode(PubRec(3, 0x80), 4) == h("50 02 0003")


@pytest.mark.parametrize("kind", sorted(ALLOWED))
def test_every_property_not_allowed_is_refused_on_encode(kind: str) -> None:
    forbidden = set(SAMPLE_VALUES) - ALLOWED[kind]
    assert forbidden
    for name in forbidden:
        props = Properties(**{name: SAMPLE_VALUES[name]})
        packets_by_kind: dict[str, Packet] = {
            "CONNECT": Connect(5, "c", properties=props),
            "will": Connect(5, "c", will=Will("w", b"", properties=props)),
            "CONNACK": ConnAck(properties=props),
            "PUBLISH": Publish("t", properties=props),
            "PUBACK": PubAck(1, properties=props),
            "PUBREC": PubRec(1, properties=props),
            "PUBREL": PubRel(1, properties=props),
            "PUBCOMP": PubComp(1, properties=props),
            "SUBSCRIBE": Subscribe(1, [Subscription("a")], props),
            "SUBACK": SubAck(1, [0], props),
            "UNSUBSCRIBE": Unsubscribe(1, ["a"], props),
            "UNSUBACK": UnsubAck(1, [0], props),
            "DISCONNECT": Disconnect(properties=props),
            "AUTH": Auth(properties=props),
        }
        packet = packets_by_kind[kind]
        with pytest.raises(ValueError, match=name):
            encode(packet, 5)


# --------------------------------------------------------------------------------------------
# Property-based round trip.

MAX_VARINT = 268_435_455
texts = st.text(
    # Any encodable text (codec="utf-8" leaves out lone surrogates) except U+0000.
    alphabet=st.characters(codec="utf-8", exclude_characters="\x00"),
    max_size=12,
)
blobs = st.binary(max_size=40)
packet_ids = st.integers(1, 65535)

ZERO_OR_ONE = {
    "request_problem_information",
    "request_response_information",
    "maximum_qos",
    "retain_available",
    "wildcard_subscription_available",
    "subscription_identifier_available",
    "shared_subscription_available",
}
VALUE_STRATEGIES: dict[str, st.SearchStrategy[Any]] = {
    "payload_format_indicator": st.integers(0, 1),
    "message_expiry_interval": st.integers(0, 0xFFFFFFFF),
    "content_type": texts,
    "response_topic": texts,
    "correlation_data": blobs,
    "session_expiry_interval": st.integers(0, 0xFFFFFFFF),
    "assigned_client_identifier": texts,
    "server_keep_alive": st.integers(0, 65535),
    "authentication_method": texts,
    "authentication_data": blobs,
    "will_delay_interval": st.integers(0, 0xFFFFFFFF),
    "response_information": texts,
    "server_reference": texts,
    "reason_string": texts,
    "receive_maximum": st.integers(1, 65535),
    "topic_alias_maximum": st.integers(0, 65535),
    "topic_alias": st.integers(1, 65535),
    "maximum_packet_size": st.integers(1, 0xFFFFFFFF),
    **{name: st.integers(0, 1) for name in ZERO_OR_ONE},
}


@st.composite
def properties_for(draw: st.DrawFn, kind: str) -> Properties:
    values: dict[str, Any] = {}
    for name in sorted(ALLOWED[kind]):
        if name == "user_properties":
            values[name] = draw(st.lists(st.tuples(texts, texts), max_size=3))
        elif name == "subscription_identifiers":
            size = 1 if kind == "SUBSCRIBE" else 3
            values[name] = draw(st.lists(st.integers(1, MAX_VARINT), max_size=size))
        else:
            values[name] = draw(st.none() | VALUE_STRATEGIES[name])
    return Properties(**values)


V5_CODES = {
    # From each packet's reason code table in the MQTT 5.0 spec.
    "CONNACK": list(h("00 80 81 82 83 84 85 86 87 88 89 8A 8C 90 95 97 99 9A 9B 9C 9D 9F")),
    "PUBACK": list(h("00 10 80 83 87 90 91 97 99")),
    "PUBREL": list(h("00 92")),
    "SUBACK": list(h("00 01 02 80 83 87 8F 91 97 9E A1 A2")),
    "UNSUBACK": list(h("00 11 80 83 87 8F 91")),
    "DISCONNECT": list(
        h("00 04 80 81 82 83 87 89 8B 8D 8E 8F 90 93 94 95 96 97 98 99 9A 9B 9C 9D 9E 9F A0 A1 A2")
    ),
    "AUTH": list(h("00 18 19")),
}


@st.composite
def packets(draw: st.DrawFn, level: int) -> Packet:
    v5 = level == 5

    def props(kind: str) -> Properties:
        return draw(properties_for(kind)) if v5 else Properties()

    def code(kind: str) -> int:
        return draw(st.sampled_from(V5_CODES[kind])) if v5 else 0

    kinds = ["CONNECT", "CONNACK", "PUBLISH", "ACK", "SUBSCRIBE", "SUBACK", "UNSUBSCRIBE"]
    kinds += ["UNSUBACK", "PING", "DISCONNECT"] + (["AUTH"] if v5 else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "CONNECT":
        username = draw(st.none() | texts)
        password = draw(st.none() | blobs) if (v5 or username is not None) else None
        will = None
        if draw(st.booleans()):
            will = Will(
                draw(texts),
                draw(blobs),
                draw(st.integers(0, 2)),
                draw(st.booleans()),
                props("will"),
            )
        return Connect(
            level, draw(texts), draw(st.booleans()), draw(st.integers(0, 65535)), username,
            password, will, props("CONNECT"),
        )  # fmt: skip
    if kind == "CONNACK":
        rc = draw(st.sampled_from(V5_CODES["CONNACK"])) if v5 else draw(st.integers(0, 5))
        return ConnAck(rc == 0 and draw(st.booleans()), rc, props("CONNACK"))
    if kind == "PUBLISH":
        qos = draw(st.integers(0, 2))
        return Publish(
            draw(texts), draw(blobs), qos, draw(st.booleans()), qos > 0 and draw(st.booleans()),
            draw(packet_ids) if qos else None, props("PUBLISH"),
        )  # fmt: skip
    if kind == "ACK":
        ack_classes: list[type[PubAck | PubRec | PubRel | PubComp]] = [
            PubAck,
            PubRec,
            PubRel,
            PubComp,
        ]
        cls = draw(st.sampled_from(ack_classes))
        name = cls.__name__.upper()
        rc = code("PUBACK" if cls in (PubAck, PubRec) else "PUBREL")
        return cls(draw(packet_ids), rc, props(name))
    if kind == "SUBSCRIBE":
        subs = draw(
            st.lists(
                st.builds(
                    Subscription,
                    texts,
                    st.integers(0, 2),
                    st.booleans() if v5 else st.just(False),
                    st.booleans() if v5 else st.just(False),
                    st.integers(0, 2) if v5 else st.just(0),
                ),
                min_size=1,
                max_size=4,
            )
        )
        return Subscribe(draw(packet_ids), subs, props("SUBSCRIBE"))
    if kind == "SUBACK":
        choices = V5_CODES["SUBACK"] if v5 else [0, 1, 2, 0x80]
        return SubAck(
            draw(packet_ids),
            draw(st.lists(st.sampled_from(choices), min_size=1, max_size=4)),
            props("SUBACK"),
        )
    if kind == "UNSUBSCRIBE":
        return Unsubscribe(
            draw(packet_ids), draw(st.lists(texts, min_size=1, max_size=4)), props("UNSUBSCRIBE")
        )
    if kind == "UNSUBACK":
        codes = (
            draw(st.lists(st.sampled_from(V5_CODES["UNSUBACK"]), min_size=1, max_size=4))
            if v5
            else []
        )
        return UnsubAck(draw(packet_ids), codes, props("UNSUBACK"))
    if kind == "PING":
        pings: list[Packet] = [PingReq(), PingResp()]
        return draw(st.sampled_from(pings))
    if kind == "DISCONNECT":
        return Disconnect(code("DISCONNECT"), props("DISCONNECT"))
    return Auth(code("AUTH"), props("AUTH"))


@FAST
@given(st.data())
def test_property_round_trip(data: st.DataObject) -> None:
    level = data.draw(st.sampled_from([4, 5]))
    batch = data.draw(st.lists(packets(level), min_size=1, max_size=5))
    wire = b"".join(encode(p, level) for p in batch)
    reader = MqttReader(protocol_level=level)
    assert reader.feed(wire) == batch
    assert reader.buffered_bytes == 0
    # The same bytes cut into random pieces decode the same.
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    reader = MqttReader(protocol_level=level)
    got: list[Packet] = []
    for start, stop in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        got += reader.feed(wire[start:stop])
    assert got == batch


# --------------------------------------------------------------------------------------------
# Streaming.


@pytest.mark.parametrize("level", [4, 5])
def test_split_at_every_byte_boundary(level: int) -> None:
    for packet in all_packets(level):
        wire = encode(packet, level)
        for cut in range(len(wire) + 1):
            reader = MqttReader(protocol_level=level)
            first = reader.feed(wire[:cut])
            second = reader.feed(wire[cut:])
            assert first + second == [packet], (type(packet).__name__, cut)
            assert reader.buffered_bytes == 0


def test_byte_by_byte_and_large_packet_in_chunks() -> None:
    big = Publish("big", bytes(range(256)) * 4000, qos=1, packet_id=1)  # ~1 MB, 4-byte length
    wire = encode(big, 5) + encode(PubAck(1), 5)
    reader = MqttReader(protocol_level=5)
    got: list[Packet] = []
    for i in range(0, len(wire), 4096):
        got += reader.feed(wire[i : i + 4096])
        assert reader.buffered_bytes < len(wire)
    assert got == [big, PubAck(1)]
    small = encode(Subscribe(3, [Subscription("a/#", 1)]), 5)
    reader = MqttReader(protocol_level=5)
    got = []
    for i in range(len(small)):
        got += reader.feed(small[i : i + 1])
    assert got == [Subscribe(3, [Subscription("a/#", 1)])]


def test_many_packets_in_one_chunk() -> None:
    batch = [Publish(f"d/{i}", b'{"t":21.5}', qos=1, packet_id=i + 1) for i in range(5000)]
    wire = b"".join(encode(p, 4) for p in batch) + encode(PingReq(), 4)[:1]
    reader = MqttReader(protocol_level=4)
    assert reader.feed(wire) == batch
    assert reader.buffered_bytes == 1  # the half PINGREQ waits
    assert reader.feed(b"\x00") == [PingReq()]
    assert reader.feed(b"") == []


@pytest.mark.parametrize("level", [4, 5])
def test_share_empty_properties_opt_in(level: int) -> None:
    batch: list[Packet] = [Publish("a", b"1", 1, packet_id=1), Publish("b", b"2"), PubAck(1)]
    if level == 5:
        batch.append(Publish("c", b"3", properties=Properties(content_type="x")))
    wire = b"".join(encode(p, level) for p in batch)
    shared = MqttReader(protocol_level=level, share_empty_properties=True).feed(wire)
    assert shared == batch
    assert shared[0].properties is shared[1].properties  # type: ignore[union-attr]
    assert shared[2].properties is not shared[0].properties  # type: ignore[union-attr]
    if level == 5:
        assert shared[3].properties == Properties(content_type="x")  # type: ignore[union-attr]
    fresh = MqttReader(protocol_level=level).feed(wire)
    assert fresh == batch
    assert fresh[0].properties is not fresh[1].properties  # type: ignore[union-attr]


def test_server_reader_learns_level_from_connect() -> None:
    reader = MqttReader()
    assert reader.protocol_level is None
    wire = encode(Connect(5, "c"), 5) + encode(
        Publish("t", b"x", properties=Properties(content_type="j")), 5
    )
    assert reader.feed(wire) == [
        Connect(5, "c"),
        Publish("t", b"x", properties=Properties(content_type="j")),
    ]
    assert reader.protocol_level == 5
    reader = MqttReader()
    reader.feed(encode(Connect(4, "c"), 4))
    assert reader.protocol_level == 4
    # A 3.1.1 AUTH (type 15) is a reserved packet type.
    with pytest.raises(ProtocolError) as err:
        reader.feed(h("F0 00"))
    assert err.value.reason_code == 0x81


def test_first_packet_must_be_connect() -> None:
    with pytest.raises(ProtocolError) as err:
        MqttReader().feed(encode(PingReq(), 4))
    assert err.value.reason_code == 0x82


def test_error_keeps_earlier_packets_and_sticks() -> None:
    reader = MqttReader(protocol_level=4)
    good = encode(Publish("a", b"1"), 4)
    with pytest.raises(ProtocolError) as err:
        reader.feed(good + h("36 00"))  # then a PUBLISH with qos 3
    assert err.value.reason_code == 0x81
    assert err.value.packets == [Publish("a", b"1")]
    with pytest.raises(ProtocolError) as again:
        reader.feed(good)
    assert again.value.reason_code == 0x81
    assert again.value.packets == []  # nothing for the caller to act on twice
    reader = MqttReader()
    with pytest.raises(UnsupportedProtocolVersion):
        reader.feed(h("10 0D 0004 4D515454 06 02 003C 0001 61"))
    with pytest.raises(UnsupportedProtocolVersion):
        reader.feed(b"")


def test_decode_packet_wants_exactly_one() -> None:
    wire = encode(PingReq(), 4)
    with pytest.raises(ProtocolError):
        decode_packet(wire + wire, 4)
    with pytest.raises(ProtocolError):
        decode_packet(wire[:1], 4)


# --------------------------------------------------------------------------------------------
# Limits.


def test_oversized_header_refused_before_body_is_buffered() -> None:
    reader = MqttReader(max_packet_size=1 << 20)
    reader.protocol_level = 5
    header = b"\x30" + bytes([0x80, 0x84, 0xE2, 0x04])  # remaining length 10,000,000
    with pytest.raises(ProtocolError) as err:
        reader.feed(header)
    assert err.value.reason_code == 0x95
    assert reader.buffered_bytes == 0
    # The limit counts the whole packet, as MQTT 5's Maximum Packet Size does.
    exact = encode(Publish("t", b"x" * 96), 5)
    assert len(exact) == 102
    assert MqttReader(max_packet_size=102, protocol_level=5).feed(exact) == [
        Publish("t", b"x" * 96)
    ]
    with pytest.raises(ProtocolError) as err:
        MqttReader(max_packet_size=101, protocol_level=5).feed(exact[:2])
    assert err.value.reason_code == 0x95


def test_buffer_never_exceeds_one_packet_plus_chunk() -> None:
    limit = 10_000
    reader = MqttReader(max_packet_size=limit, protocol_level=4)
    packet = Publish("t", b"x" * (limit - 10))
    wire = encode(packet, 4)
    got: list[Packet] = []
    for i in range(0, len(wire), 7):
        got += reader.feed(wire[i : i + 7])
        assert reader.buffered_bytes < limit
    assert got == [packet]
    assert reader.buffered_bytes == 0


def test_constructor_checks() -> None:
    with pytest.raises(ValueError):
        MqttReader(protocol_level=3)
    with pytest.raises(ValueError):
        MqttReader(max_packet_size=1)
    reader = MqttReader()
    reader.protocol_level = 5
    assert reader.protocol_level == 5
    with pytest.raises(ValueError):
        reader.protocol_level = 6


# --------------------------------------------------------------------------------------------
# Malformed and illegal packets, with the v5 reason code that must close the connection.

CONNECT_HEAD_4 = "0004 4D515454 04"
CONNECT_HEAD_5 = "0004 4D515454 05"

MALFORMED: list[tuple[str, int | None, str, int]] = [
    # (name, reader level, hex bytes, reason code)
    ("remaining length over 4 bytes", 4, "30 FF FF FF FF 01", 0x81),
    ("reserved packet type 0", 4, "00 00", 0x81),
    ("auth in 3.1.1", 4, "F0 00", 0x81),
    ("connect flags nonzero", 4, "11 00", 0x81),
    ("pubrel flags 0", 4, "60 02 0001", 0x81),
    ("subscribe flags 0", 4, "80 06 0001 0001 61 00", 0x81),
    ("unsubscribe flags 0", 5, "A0 06 0001 00 0001 61", 0x81),
    ("pingreq flags", 4, "C1 00", 0x81),
    ("publish qos 3", 4, "36 05 0001 61 0001", 0x81),
    ("publish qos 0 dup", 4, "38 03 0001 61", 0x81),
    ("publish topic truncated", 4, "30 03 0005 61", 0x81),
    ("publish body of 1 byte", 4, "30 01 00", 0x81),
    ("publish packet id truncated", 4, "32 04 0001 61 00", 0x81),
    ("publish packet id 0", 4, "32 05 0001 61 0000", 0x82),
    ("publish topic bad utf-8", 4, "30 03 0001 FF", 0x81),
    ("publish topic overlong utf-8", 4, "30 04 0002 C0AF", 0x81),
    ("publish topic surrogate", 4, "30 05 0003 EDA080", 0x81),
    ("publish topic U+0000", 4, "30 03 0001 00", 0x81),
    ("publish v5 missing property length", 5, "30 03 0001 61", 0x81),
    ("publish v5 property length past end", 5, "30 04 0001 61 05", 0x81),
    ("publish v5 unknown property", 5, "30 06 0001 61 02 7F 00", 0x81),
    ("publish v5 property not allowed", 5, "30 09 0001 61 05 11 00000001", 0x81),
    ("publish v5 duplicate property", 5, "30 08 0001 61 04 01 01 01 01", 0x81),
    ("publish v5 truncated property", 5, "30 06 0001 61 02 02 00", 0x81),
    ("publish v5 topic alias 0", 5, "30 07 0001 61 03 23 0000", 0x94),
    ("publish v5 subscription id 0", 5, "30 06 0001 61 02 0B 00", 0x82),
    ("publish v5 property varint 5 bytes", 5, "30 09 0001 61 05 0B FF FF FF FF", 0x81),
    ("publish v5 user property bad utf-8", 5, "30 0B 0001 61 07 26 0001 FF 0001 61", 0x81),
    ("puback 311 length 3", 4, "40 03 0001 00", 0x81),
    ("puback packet id 0", 4, "40 02 0000", 0x82),
    ("puback too short", 5, "40 01 00", 0x81),
    ("puback v5 undefined reason", 5, "40 03 0001 01", 0x81),
    ("pubrel v5 puback-only reason", 5, "62 03 0001 10", 0x81),
    ("puback v5 props trailing", 5, "40 06 0001 00 00 FF FF", 0x81),
    ("connack reserved flags", 4, "20 02 02 00", 0x81),
    ("connack 311 return code 6", 4, "20 02 00 06", 0x81),
    ("connack v5 undefined reason", 5, "20 03 00 01 00", 0x81),
    ("connack v5 maximum qos 2", 5, "20 05 00 00 02 24 02", 0x82),
    ("connack v5 receive maximum 0", 5, "20 06 00 00 03 21 0000", 0x82),
    ("connack 311 trailing", 4, "20 03 00 00 00", 0x81),
    ("connack 311 session present refused", 4, "20 02 01 05", 0x82),
    ("connack v5 session present refused", 5, "20 03 01 80 00", 0x82),
    ("subscribe without filters", 4, "82 02 0001", 0x81),
    ("subscribe v5 without filters", 5, "82 03 0001 00", 0x81),
    ("subscribe packet id 0", 4, "82 06 0000 0001 61 00", 0x82),
    ("subscribe 311 reserved option bits", 4, "82 06 0001 0001 61 04", 0x81),
    ("subscribe 311 qos 3", 4, "82 06 0001 0001 61 03", 0x81),
    ("subscribe v5 reserved option bits", 5, "82 07 0001 00 0001 61 40", 0x81),
    ("subscribe v5 qos 3", 5, "82 07 0001 00 0001 61 03", 0x81),
    ("subscribe v5 retain handling 3", 5, "82 07 0001 00 0001 61 30", 0x81),
    ("subscribe missing options byte", 4, "82 05 0001 0001 61", 0x81),
    ("subscribe v5 two subscription ids", 5, "82 0B 0001 04 0B 01 0B 02 0001 61 00", 0x81),
    ("subscribe v5 filter U+0000", 5, "82 07 0001 00 0001 00 00", 0x81),
    ("suback without codes", 4, "90 02 0001", 0x81),
    ("suback 311 undefined code", 4, "90 03 0001 03", 0x81),
    ("suback v5 undefined code", 5, "90 04 0001 00 03", 0x81),
    ("unsubscribe without filters", 4, "A2 02 0001", 0x81),
    ("unsuback 311 with payload", 4, "B0 03 0001 00", 0x81),
    ("unsuback v5 without codes", 5, "B0 03 0001 00", 0x81),
    ("unsuback v5 undefined code", 5, "B0 04 0001 00 01", 0x81),
    ("pingreq with body", 4, "C0 01 00", 0x81),
    ("pingresp with body", 5, "D0 01 00", 0x81),
    ("disconnect 311 with body", 4, "E0 01 00", 0x81),
    ("disconnect v5 undefined reason", 5, "E0 01 01", 0x81),
    ("disconnect v5 property not allowed", 5, "E0 04 00 02 23 00", 0x81),
    ("auth v5 undefined reason", 5, "F0 01 01", 0x81),
    # CONNECT (reader level None: a server before the first packet)
    ("connect reserved flag", None, f"10 0D {CONNECT_HEAD_4} 03 003C 0001 61", 0x81),
    ("connect will qos without will", None, f"10 0D {CONNECT_HEAD_4} 0A 003C 0001 61", 0x81),
    ("connect will retain without will", None, f"10 0D {CONNECT_HEAD_4} 22 003C 0001 61", 0x81),
    ("connect will qos 3", None, f"10 13 {CONNECT_HEAD_4} 1E 003C 0001 61 0001 77 0001 78", 0x81),
    (
        "connect 311 password without user",
        None,
        f"10 10 {CONNECT_HEAD_4} 42 003C 0001 61 0001 70",
        0x81,
    ),
    ("connect trailing bytes", None, f"10 0E {CONNECT_HEAD_4} 02 003C 0001 61 00", 0x81),
    ("connect truncated client id", None, f"10 0C {CONNECT_HEAD_4} 02 003C 0002 61", 0x81),
    ("connect truncated header", None, "10 07 0004 4D515454 04", 0x81),
    ("connect bad utf-8 client id", None, f"10 0D {CONNECT_HEAD_4} 02 003C 0001 C3", 0x81),
    (
        "connect v5 duplicate property",
        None,
        f"10 12 {CONNECT_HEAD_5} 02 003C 04 17 01 17 01 0001 61",
        0x81,
    ),
    (
        "connect v5 will property not allowed",
        None,
        f"10 19 {CONNECT_HEAD_5} 06 003C 00 0001 61 05 11 00000001 0001 77 0000",
        0x81,
    ),
    (
        "connect v5 request problem info 2",
        None,
        f"10 10 {CONNECT_HEAD_5} 02 003C 02 17 02 0001 61",
        0x82,
    ),
    (
        "connect v5 maximum packet size 0",
        None,
        f"10 13 {CONNECT_HEAD_5} 02 003C 05 27 00000000 0001 61",
        0x82,
    ),
    ("publish before connect", None, "30 03 0001 61", 0x82),
]


@pytest.mark.parametrize(
    ("level", "wire", "code"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed_packets(level: int | None, wire: str, code: int) -> None:
    reader = MqttReader(protocol_level=level)
    with pytest.raises(ProtocolError) as err:
        reader.feed(h(wire))
    assert err.value.reason_code == code, err.value.message
    assert not isinstance(err.value, UnsupportedProtocolVersion)


def test_malformed_vectors_are_malformed_only_by_the_intended_byte() -> None:
    # Guard against typos in the table above: a few rows fixed back into valid packets decode.
    assert MqttReader(protocol_level=4).feed(h("32 05 0001 61 0001")) == [  # qos 3 -> 1
        Publish("a", b"", 1, packet_id=1)
    ]
    assert MqttReader(protocol_level=5).feed(h("30 06 0001 61 02 0B 01")) == [  # sub id 0 -> 1
        Publish("a", b"", properties=Properties(subscription_identifiers=[1]))
    ]
    assert MqttReader(protocol_level=5).feed(h("20 06 00 00 03 21 0001")) == [  # receive max 1
        ConnAck(properties=Properties(receive_maximum=1))
    ]
    assert MqttReader(protocol_level=5).feed(h("82 07 0001 00 0001 61 20")) == [
        Subscribe(1, [Subscription("a", 0, retain_handling=2)])
    ]
    assert MqttReader().feed(h(f"10 0D {CONNECT_HEAD_4} 02 003C 0001 61")) == [Connect(4, "a")]


@pytest.mark.parametrize(
    ("wire", "level", "name", "connack"),
    [
        (h("10 0F 0006 4D5149736470 03 02 003C 0001 61"), 3, "MQIsdp", h("20 02 00 01")),
        (
            h(f"10 0D {CONNECT_HEAD_4.replace(' 04', ' 06')} 02 003C 0001 61"),
            6,
            "MQTT",
            h("20 02 00 01"),
        ),
        (h("10 0D 0004 4D515458 05 02 003C 0001 61"), 5, "MQTX", h("20 03 00 84 00")),
    ],
)
def test_unsupported_protocol_version(wire: bytes, level: int, name: str, connack: bytes) -> None:
    reader = MqttReader()
    with pytest.raises(UnsupportedProtocolVersion) as err:
        reader.feed(wire)
    assert err.value.reason_code == 0x84
    assert err.value.protocol_level == level
    assert err.value.protocol_name == name
    assert err.value.connack() == connack
    assert reader.protocol_level is None


def test_mqtt31_connect_can_be_encoded_for_tests() -> None:
    wire = encode(Connect(3, "a", protocol_name="MQIsdp"), 3)
    assert wire == h("10 0F 0006 4D5149736470 03 02 003C 0001 61")


# --------------------------------------------------------------------------------------------
# Encode refuses what would be an illegal packet.

ILLEGAL: list[tuple[str, Packet, int]] = [
    ("publish qos1 without id", Publish("t", qos=1), 4),
    ("publish qos2 id 0", Publish("t", qos=2, packet_id=0), 5),
    ("publish qos 3", Publish("t", qos=3, packet_id=1), 4),
    ("publish qos0 dup", Publish("t", dup=True), 4),
    ("publish topic U+0000", Publish("a\x00"), 4),
    ("publish topic surrogate", Publish("\ud800"), 4),
    ("publish topic too long", Publish("a" * 65536), 4),
    (
        "publish subscription id 0",
        Publish("t", properties=Properties(subscription_identifiers=[0])),
        5,
    ),
    ("publish topic alias 0", Publish("t", properties=Properties(topic_alias=0)), 5),
    (
        "publish expiry out of range",
        Publish("t", properties=Properties(message_expiry_interval=1 << 32)),
        5,
    ),
    ("publish level 3", Publish("t"), 3),
    ("puback id 0", PubAck(0), 5),
    ("puback undefined reason", PubAck(1, 0x01), 5),
    ("puback undefined reason with props", PubAck(1, 0x01, Properties(reason_string="x")), 5),
    ("pubcomp puback reason", PubComp(1, 0x10), 5),
    ("connect level mismatch", Connect(4, "c"), 5),
    ("connect bad protocol name", Connect(4, "c", protocol_name="MQTX"), 4),
    ("connect 311 password only", Connect(4, "c", password=b"p"), 4),
    ("connect will qos 3", Connect(4, "c", will=Will("w", b"", qos=3)), 4),
    ("connect keepalive", Connect(4, "c", keepalive=70000), 4),
    ("connect receive maximum 0", Connect(5, "c", properties=Properties(receive_maximum=0)), 5),
    (
        "connect request problem 2",
        Connect(5, "c", properties=Properties(request_problem_information=2)),
        5,
    ),
    ("connack 311 code 6", ConnAck(False, 6), 4),
    ("connack v5 undefined", ConnAck(False, 0x01), 5),
    ("connack session present with error", ConnAck(True, 0x80), 5),
    ("subscribe empty", Subscribe(1, []), 4),
    ("subscribe id 0", Subscribe(0, [Subscription("a")]), 4),
    ("subscribe qos 3", Subscribe(1, [Subscription("a", 3)]), 5),
    ("subscribe retain handling 3", Subscribe(1, [Subscription("a", retain_handling=3)]), 5),
    (
        "subscribe two sub ids",
        Subscribe(1, [Subscription("a")], Properties(subscription_identifiers=[1, 2])),
        5,
    ),
    ("suback empty", SubAck(1, []), 4),
    ("suback 311 v5 code", SubAck(1, [0x87]), 4),
    ("unsubscribe empty", Unsubscribe(1, []), 5),
    ("unsuback v5 empty", UnsubAck(1, []), 5),
    ("unsuback v5 undefined", UnsubAck(1, [0x01]), 5),
    ("disconnect undefined", Disconnect(0x01), 5),
    ("auth in 311", Auth(), 4),
    ("auth undefined", Auth(0x01), 5),
    ("string too long", Connect(4, "c" * 65536), 4),
    ("binary too long", Connect(5, "c", password=b"p" * 65536), 5),
    ("user property U+0000", PubAck(1, 0x80, Properties(user_properties=[("a\x00", "b")])), 5),
    ("ack level 6", PubAck(1), 6),
]


@pytest.mark.parametrize(("packet", "level"), [i[1:] for i in ILLEGAL], ids=[i[0] for i in ILLEGAL])
def test_encode_refuses_illegal_packets(packet: Packet, level: int) -> None:
    with pytest.raises(ValueError):
        encode(packet, level)


def test_encode_ignores_packet_id_on_qos0_and_rejects_non_packets() -> None:
    assert encode(Publish("t", packet_id=5), 4) == encode(Publish("t"), 4)
    with pytest.raises(TypeError):
        encode("not a packet", 4)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Topic helpers.


@pytest.mark.parametrize("topic", ["a", "a/b/c", "/", "a//b", "$SYS/x", "ü/€", " ", "a" * 65535])
def test_valid_topic_names(topic: str) -> None:
    validate_topic_name(topic)


@pytest.mark.parametrize(
    ("topic", "code"),
    [("", 0x82), ("a/+", 0x90), ("#", 0x90), ("a/b#", 0x90), ("a\x00b", 0x81), ("é" * 32768, 0x90)],
)
def test_invalid_topic_names(topic: str, code: int) -> None:
    with pytest.raises(ProtocolError) as err:
        validate_topic_name(topic)
    assert err.value.reason_code == code


def test_empty_topic_name_with_alias() -> None:
    validate_topic_name("", alias=True)
    with pytest.raises(ProtocolError):
        validate_topic_name("a/#", alias=True)


@pytest.mark.parametrize(
    "topic_filter",
    [
        "#",
        "+",
        "a/#",
        "a/+/b",
        "+/+",
        "/+",
        "a//#",
        "$SYS/#",
        "$share/g/a/#",
        "$share/g/+",
        "$share/g//",
    ],
)
def test_valid_topic_filters(topic_filter: str) -> None:
    validate_topic_filter(topic_filter)


@pytest.mark.parametrize(
    ("topic_filter", "code"),
    [
        ("", 0x8F),
        ("a/#/b", 0x8F),
        ("a#", 0x8F),
        ("a/b#", 0x8F),
        ("#/", 0x8F),
        ("a+", 0x8F),
        ("a/+b/c", 0x8F),
        ("$share/", 0x8F),
        ("$share//a", 0x8F),
        ("$share/g", 0x8F),
        ("$share/g/", 0x8F),
        ("$share/g+/a", 0x8F),
        ("$share/#/a", 0x8F),
        ("$share/g/a/#/b", 0x8F),
        ("a\x00", 0x81),
        ("a" * 65536, 0x8F),
    ],
)
def test_invalid_topic_filters(topic_filter: str, code: int) -> None:
    with pytest.raises(ProtocolError) as err:
        validate_topic_filter(topic_filter)
    assert err.value.reason_code == code


# --------------------------------------------------------------------------------------------
# Interoperability with an independent implementation: the Mosquitto already running on this
# machine (we only connect to it; nothing is started). It parses what we encode and we parse
# what it sends, in both versions, through QoS 1 and QoS 2 flows.

MOSQUITTO = ("127.0.0.1", 1883)


class RawClient:
    """A blocking socket speaking MQTT through the codec; every read is bounded by a timeout."""

    def __init__(self, level: int) -> None:
        self.level = level
        self.sock = socket.create_connection(MOSQUITTO, timeout=5)
        self.reader = MqttReader(protocol_level=level)
        self.queue: list[Packet] = []

    def send(self, packet: Packet) -> None:
        self.sock.sendall(encode(packet, self.level))

    def recv(self) -> Packet:
        while not self.queue:
            data = self.sock.recv(65536)  # socket.timeout after 5 s: the test fails, never hangs
            if not data:
                raise EOFError("broker closed the connection")
            self.queue += self.reader.feed(data)
        return self.queue.pop(0)

    def close(self) -> None:
        self.sock.close()


def _mosquitto_up() -> bool:
    try:
        socket.create_connection(MOSQUITTO, timeout=1).close()
    except OSError:
        return False
    return True


@pytest.mark.parametrize("level", [4, 5])
def test_interop_with_mosquitto(level: int) -> None:
    if not _mosquitto_up():
        pytest.skip("no Mosquitto on 127.0.0.1:1883")
    v5 = level == 5
    run = uuid.uuid4().hex[:12]
    topic = f"edgeway-codec-test/{run}"
    sub, pub = RawClient(level), RawClient(level)
    try:
        for client, name in ((sub, "sub"), (pub, "pub")):
            client.send(
                Connect(
                    level,
                    f"ew-codec-{name}-{run}",
                    keepalive=30,
                    properties=Properties(
                        session_expiry_interval=0,
                        receive_maximum=10,
                        user_properties=[("who", "edgeway")],
                    )
                    if v5
                    else Properties(),
                )
            )
            connack = client.recv()
            assert isinstance(connack, ConnAck)
            assert connack.reason_code == 0
        sub.send(
            Subscribe(
                1,
                [Subscription(f"{topic}/#", 2)],
                Properties(subscription_identifiers=[7]) if v5 else Properties(),
            )
        )
        suback = sub.recv()
        assert isinstance(suback, SubAck)
        assert (suback.packet_id, suback.reason_codes) == (1, [2])

        sent_props = (
            Properties(
                content_type="application/json",
                response_topic="reply/here",
                correlation_data=b"\x00corr",
                message_expiry_interval=60,
                user_properties=[("k", "v"), ("k", "v2")],
            )
            if v5
            else Properties()
        )
        pub.send(Publish(f"{topic}/q1", b'{"t":21.5}', 1, packet_id=5, properties=sent_props))
        puback = pub.recv()
        assert isinstance(puback, PubAck)
        assert (puback.packet_id, puback.reason_code) == (5, 0)
        got = sub.recv()
        assert isinstance(got, Publish)
        assert (got.topic, got.payload, got.qos) == (f"{topic}/q1", b'{"t":21.5}', 1)
        assert got.packet_id is not None
        if v5:
            assert got.properties.subscription_identifiers == [7]
            assert got.properties.content_type == "application/json"
            assert got.properties.response_topic == "reply/here"
            assert got.properties.correlation_data == b"\x00corr"
            assert got.properties.user_properties == [("k", "v"), ("k", "v2")]
            assert got.properties.message_expiry_interval is not None
            assert got.properties.message_expiry_interval <= 60
        sub.send(PubAck(got.packet_id))

        # QoS 2 both ways: PUBREC/PUBREL/PUBCOMP encoded by us and by Mosquitto.
        pub.send(Publish(f"{topic}/q2", b"\x00\xff" * 200, 2, packet_id=6))
        pubrec = pub.recv()
        assert isinstance(pubrec, PubRec)
        assert pubrec.packet_id == 6
        pub.send(PubRel(6))
        pubcomp = pub.recv()
        assert isinstance(pubcomp, PubComp)
        assert pubcomp.packet_id == 6
        got = sub.recv()
        assert isinstance(got, Publish)
        assert (got.topic, got.payload, got.qos) == (f"{topic}/q2", b"\x00\xff" * 200, 2)
        assert got.packet_id is not None
        sub.send(PubRec(got.packet_id))
        pubrel = sub.recv()
        assert isinstance(pubrel, PubRel)
        assert pubrel.packet_id == got.packet_id
        sub.send(PubComp(got.packet_id))

        sub.send(Unsubscribe(2, [f"{topic}/#"]))
        unsuback = sub.recv()
        assert isinstance(unsuback, UnsubAck)
        assert unsuback.packet_id == 2
        assert unsuback.reason_codes == ([0] if v5 else [])
        sub.send(PingReq())
        assert sub.recv() == PingResp()
        for client in (sub, pub):
            client.send(Disconnect())
    finally:
        sub.close()
        pub.close()


def _serve_one_client(listener: socket.socket, received: list[Packet]) -> None:
    """A minimal MQTT server on the codec: answers what a client needs to finish its flows."""
    conn, _ = listener.accept()
    conn.settimeout(10)  # bounded: a stuck client fails the test instead of hanging it
    reader = MqttReader()
    with conn:
        while True:
            data = conn.recv(65536)
            if not data:
                return
            for p in reader.feed(data):
                received.append(p)
                level = reader.protocol_level
                assert level is not None
                reply: Packet | None = None
                if isinstance(p, Connect):
                    reply = ConnAck()
                elif isinstance(p, Subscribe):
                    reply = SubAck(p.packet_id, [s.qos for s in p.subscriptions])
                elif isinstance(p, Publish) and p.qos == 1:
                    assert p.packet_id is not None
                    reply = PubAck(p.packet_id)
                elif isinstance(p, Publish) and p.qos == 2:
                    assert p.packet_id is not None
                    reply = PubRec(p.packet_id)
                elif isinstance(p, PubRel):
                    reply = PubComp(p.packet_id)
                elif isinstance(p, Unsubscribe):
                    codes = [0] * len(p.topic_filters) if level == 5 else []
                    reply = UnsubAck(p.packet_id, codes)
                elif isinstance(p, Disconnect):
                    return
                if reply is not None:
                    conn.sendall(encode(reply, level))


@pytest.mark.parametrize("level", [4, 5])
def test_interop_with_paho_client(level: int) -> None:
    import threading

    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties as PahoProperties
    from paho.mqtt.subscribeoptions import SubscribeOptions

    v5 = level == 5
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    received: list[Packet] = []
    server = threading.Thread(target=_serve_one_client, args=(listener, received), daemon=True)
    server.start()
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id="paho-é",
        protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
    )
    try:
        client.username_pw_set("user", "pässword")
        will_props = None
        connect_props = None
        sub_props = None
        pub_props = None
        if v5:
            will_props = PahoProperties(PacketTypes.WILLMESSAGE)  # type: ignore[no-untyped-call]
            will_props.WillDelayInterval = 5
            will_props.ContentType = "text/plain"
            connect_props = PahoProperties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            connect_props.SessionExpiryInterval = 30
            connect_props.ReceiveMaximum = 7
            connect_props.UserProperty = ("who", "paho")
            sub_props = PahoProperties(PacketTypes.SUBSCRIBE)  # type: ignore[no-untyped-call]
            sub_props.SubscriptionIdentifier = 5
            pub_props = PahoProperties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            pub_props.ContentType = "application/json"
            pub_props.ResponseTopic = "reply/to"
            pub_props.CorrelationData = b"\x01\x02"
            pub_props.MessageExpiryInterval = 30
            pub_props.UserProperty = [("k", "v"), ("k", "w")]
        client.will_set("will/t", b"gone", qos=1, retain=True, properties=will_props)
        client.connect("127.0.0.1", port, keepalive=20, properties=connect_props)
        client.loop_start()
        if v5:
            options = SubscribeOptions(
                qos=2, noLocal=True, retainAsPublished=True, retainHandling=1
            )
            client.subscribe("a/+/c", options=options, properties=sub_props)
        else:
            client.subscribe("a/+/c", qos=2)  # paho reads ``options`` only for MQTT 5
        client.publish("a/b/c", b'{"t":1}', qos=1, properties=pub_props).wait_for_publish(10)
        client.publish("a/b/c", b"\x00two", qos=2).wait_for_publish(10)
        client.unsubscribe("a/+/c")
        client.disconnect()
        server.join(10)
        assert not server.is_alive()
    finally:
        client.loop_stop()
        listener.close()

    by_type: dict[type, list[Packet]] = {}
    for p in received:
        by_type.setdefault(type(p), []).append(p)
    (connect,) = by_type[Connect]
    assert isinstance(connect, Connect)
    assert (connect.protocol_level, connect.client_id, connect.keepalive) == (level, "paho-é", 20)
    assert (connect.username, connect.password) == ("user", "pässword".encode())
    assert connect.will is not None
    assert (connect.will.topic, connect.will.payload, connect.will.qos, connect.will.retain) == (
        "will/t",
        b"gone",
        1,
        True,
    )
    (subscribe,) = by_type[Subscribe]
    assert isinstance(subscribe, Subscribe)
    assert subscribe.subscriptions == [
        Subscription(
            "a/+/c", 2, no_local=v5, retain_as_published=v5, retain_handling=1 if v5 else 0
        )
    ]
    publishes = by_type[Publish]
    assert [(p.topic, p.payload, p.qos) for p in publishes if isinstance(p, Publish)] == [
        ("a/b/c", b'{"t":1}', 1),
        ("a/b/c", b"\x00two", 2),
    ]
    assert len(by_type[PubRel]) == 1
    (unsubscribe,) = by_type[Unsubscribe]
    assert isinstance(unsubscribe, Unsubscribe)
    assert unsubscribe.topic_filters == ["a/+/c"]
    assert len(by_type[Disconnect]) == 1
    if v5:
        assert connect.properties.session_expiry_interval == 30
        assert connect.properties.receive_maximum == 7
        assert connect.properties.user_properties == [("who", "paho")]
        assert connect.will.properties.will_delay_interval == 5
        assert connect.will.properties.content_type == "text/plain"
        assert subscribe.properties.subscription_identifiers == [5]
        first = publishes[0]
        assert isinstance(first, Publish)
        assert first.properties.content_type == "application/json"
        assert first.properties.response_topic == "reply/to"
        assert first.properties.correlation_data == b"\x01\x02"
        assert first.properties.message_expiry_interval == 30
        assert first.properties.user_properties == [("k", "v"), ("k", "w")]
