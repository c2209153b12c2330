"""Fuzzing the MQTT reader: whatever bytes arrive, ``feed`` raises nothing but ProtocolError,
returns in bounded time and never buffers more than one maximum-size packet plus the chunk.

Inputs: random bytes, and valid packet streams mutated by flipping, inserting and deleting
bytes (these reach much deeper into the decoders than random bytes do).
"""

from __future__ import annotations

import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeway.south.mqtt.codec import MqttReader, encode
from edgeway.south.mqtt.packets import (
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    PingReq,
    Properties,
    ProtocolError,
    PubAck,
    Publish,
    PubRel,
    SubAck,
    Subscribe,
    Subscription,
    UnsubAck,
    Unsubscribe,
    Will,
)

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MAX_PACKET = 4096


def seed_packets(level: int) -> list[Packet]:
    v5 = level == 5
    props = (
        Properties(
            content_type="a/json",
            user_properties=[("k", "v")],
            subscription_identifiers=[3],
            message_expiry_interval=9,
        )
        if v5
        else Properties()
    )
    packets: list[Packet] = [
        Connect(
            level,
            "cid",
            username="u",
            password=b"p",
            will=Will(
                "w/t", b"bye", 1, True, Properties(will_delay_interval=3) if v5 else Properties()
            ),
            properties=Properties(receive_maximum=10, session_expiry_interval=60)
            if v5
            else Properties(),
        ),
        ConnAck(
            False,
            0,
            Properties(maximum_qos=1, assigned_client_identifier="x") if v5 else Properties(),
        ),
        Publish("s/1/t", b'{"t":1}', 1, packet_id=7, properties=props),
        Publish("s/1/t", b"", 0, retain=True),
        PubAck(7, 0x10 if v5 else 0, Properties(reason_string="r") if v5 else Properties()),
        PubRel(8),
        Subscribe(9, [Subscription("a/+", 1, no_local=v5, retain_handling=2 if v5 else 0)]),
        SubAck(9, [1, 0x80]),
        Unsubscribe(10, ["a/+", "#"]),
        UnsubAck(10, [0, 0x11] if v5 else []),
        PingReq(),
        Disconnect(0x04 if v5 else 0, Properties(reason_string="bye") if v5 else Properties()),
    ]
    if v5:
        packets.append(Auth(0x18, Properties(authentication_method="M", authentication_data=b"d")))
    return packets


SEEDS = {level: b"".join(encode(p, level) for p in seed_packets(level)) for level in (4, 5)}


def feed_all(level: int | None, chunks: list[bytes]) -> None:
    """Feed chunks; assert the reader's contract on every call."""
    reader = MqttReader(max_packet_size=MAX_PACKET, protocol_level=level)
    for chunk in chunks:
        started = time.perf_counter()
        try:
            reader.feed(chunk)
        except ProtocolError as exc:
            assert 0x80 <= exc.reason_code <= 0xA2
            return
        finally:
            # Never hangs: a small chunk is decoded in far less than a second.
            assert time.perf_counter() - started < 1.0
        assert reader.buffered_bytes <= MAX_PACKET + len(chunk)
        assert reader.buffered_bytes < MAX_PACKET  # only an incomplete, allowed packet waits


@FUZZ
@given(
    st.sampled_from([None, 4, 5]),
    st.lists(st.binary(max_size=300), max_size=6),
)
def test_random_bytes(level: int | None, chunks: list[bytes]) -> None:
    feed_all(level, chunks)


@FUZZ
@given(
    st.sampled_from([None, 4, 5]),
    st.lists(st.binary(max_size=80), max_size=4),
)
def test_random_bytes_after_connect(level: int | None, chunks: list[bytes]) -> None:
    # A first CONNECT moves the reader past the "first packet" gate into the other decoders.
    connect = encode(Connect(level or 4, "c"), level or 4)
    feed_all(level, [connect, *chunks])


mutation = st.tuples(
    st.sampled_from(["flip", "set", "insert", "delete"]),
    st.integers(min_value=0),
    st.integers(0, 255),
)


@FUZZ
@given(st.sampled_from([4, 5]), st.lists(mutation, min_size=1, max_size=4), st.integers(1, 64))
def test_mutated_valid_streams(
    level: int, mutations: list[tuple[str, int, int]], chunk_size: int
) -> None:
    data = bytearray(SEEDS[level])
    for op, index, value in mutations:
        i = index % (len(data) + 1)
        if op == "insert":
            data.insert(i, value)
        elif i < len(data):
            if op == "flip":
                data[i] ^= 1 << (value % 8)
            elif op == "set":
                data[i] = value
            else:
                del data[i]
    wire = bytes(data)
    chunks = [wire[i : i + chunk_size] for i in range(0, len(wire), chunk_size)]
    feed_all(None, chunks)  # starts at CONNECT, as a server does
    feed_all(level, chunks)


def test_seed_streams_are_valid() -> None:
    for level in (4, 5):
        reader = MqttReader(max_packet_size=MAX_PACKET)
        assert reader.feed(SEEDS[level]) == seed_packets(level)


def test_slow_drip_of_a_huge_announced_packet_is_refused_at_the_header() -> None:
    reader = MqttReader(max_packet_size=MAX_PACKET, protocol_level=5)
    try:
        for byte in b"\x30\xff\xff\xff\x7f":  # remaining length 268,435,455
            reader.feed(bytes([byte]))
    except ProtocolError as exc:
        assert exc.reason_code == 0x95
    else:
        raise AssertionError("the 256 MB announcement was accepted")
    assert reader.buffered_bytes == 0
