"""Sparkplug B: a payload encoded by hand, births teaching aliases, data, deaths."""

from __future__ import annotations

import pytest

from edgeway.codecs import sparkplug
from edgeway.codecs.base import DecodeError, get_codec
from edgeway.codecs.sparkplug import (
    BOOLEAN,
    DOUBLE,
    INT16,
    INT64,
    SparkplugCodec,
    SparkplugMetric,
    decode_payload,
    encode_payload,
)
from edgeway.reading import Origin

NOW = 1_800_000_000.0

# An NBIRTH written out field by field from sparkplug_b.proto (not by our encoder).
NBIRTH = bytes.fromhex(
    "08"
    "80d095ffbc31"  # 1 timestamp = 1700000000000 (varint)
    "12"
    "0b"  # 2 metrics, 11 bytes
    "0a05" + b"bdSeq".hex() + "2008"
    "5800"  # name, datatype 8 UInt64, long_value 0
     + "12"
    "16"  # 2 metrics, 22 bytes
    "0a0b" + b"Temperature".hex() + "1001"
    "2009"
    "65"
    "0000ac41"  # alias 1, Float, 21.5
     + "12"
    "10"  # 2 metrics, 16 bytes
    "0a08" + b"Inputs/A".hex() + "1002"
    "200b"
    "7001"  # alias 2, Boolean, true
     + "12"
    "12"  # 2 metrics, 18 bytes
    "0a06" + b"Offset".hex() + "1003"
    "2002"
    "50"
    "fbffffff0f"  # alias 3, Int16, -5
     + "12"
    "1a"  # 2 metrics, 26 bytes
    "0a14" + b"Node Control/Rebirth".hex() + "200b"
    "7000"  # a control metric: not stored
     + "18"
    "00"  # 3 seq = 0
)
# NDATA by alias only, without datatypes (Sparkplug 3.0: data messages should omit them).
NDATA = bytes.fromhex(
    "08"
    "e8d795ffbc31"  # timestamp 1700000001000
    "12"
    "07"
    "1001"
    "65"
    "0000b041"  # alias 1, float 22.0
    "12"
    "08"
    "1003"
    "50"
    "feffffff0f"  # alias 3, int_value 0xFFFFFFFE -> Int16 -2
    "18"
    "01"
)


def origin(topic: str) -> Origin:
    return Origin("mqtt_client", topic)


def decode(codec: SparkplugCodec, topic: str, payload: bytes, now: float = NOW):  # type: ignore[no-untyped-def]
    return codec.decode(payload, device_id=None, origin=origin(topic), now=now)


def test_hand_encoded_birth_matches_our_encoder() -> None:
    p = decode_payload(NBIRTH)
    assert p.timestamp == 1700000000000 and p.seq == 0
    assert [m.name for m in p.metrics] == [
        "bdSeq",
        "Temperature",
        "Inputs/A",
        "Offset",
        "Node Control/Rebirth",
    ]
    again = encode_payload(
        [
            SparkplugMetric("bdSeq", datatype=8, value=0),
            SparkplugMetric("Temperature", alias=1, datatype=9, value=21.5),
            SparkplugMetric("Inputs/A", alias=2, datatype=BOOLEAN, value=True),
            SparkplugMetric("Offset", alias=3, datatype=INT16, value=-5),
            SparkplugMetric("Node Control/Rebirth", datatype=BOOLEAN, value=False),
        ],
        timestamp=1700000000000,
        seq=0,
    )
    assert again == NBIRTH


def test_birth_then_data_by_alias_then_death() -> None:
    codec = get_codec("sparkplug_b")
    assert isinstance(codec, SparkplugCodec)
    [r] = decode(codec, "spBv1.0/plant1/NBIRTH/edge-7", NBIRTH)
    assert r.device_id == "edge-7"
    assert r.ts == 1700000000.0
    assert r.metrics == {"Temperature": 21.5, "Inputs/A": True, "Offset": -5, "online": True}
    assert dict(codec.aliases("plant1", "edge-7")) == {1: "Temperature", 2: "Inputs/A", 3: "Offset"}

    [r] = decode(codec, "spBv1.0/plant1/NDATA/edge-7", NDATA)
    assert (r.device_id, r.ts) == ("edge-7", 1700000001.0)
    assert r.metrics == {"Temperature": 22.0, "Offset": -2}

    [r] = decode(
        codec,
        "spBv1.0/plant1/NDEATH/edge-7",
        encode_payload([SparkplugMetric("bdSeq", datatype=8, value=0)]),
    )
    assert r.metrics == {"online": False}
    assert r.ts == NOW
    assert dict(codec.aliases("plant1", "edge-7")) == {}
    with pytest.raises(DecodeError) as e:
        decode(codec, "spBv1.0/plant1/NDATA/edge-7", NDATA)
    assert e.value.reason == "unknown_alias"


def test_device_messages_and_metric_timestamps() -> None:
    codec = get_codec(
        "sparkplug_b", {"device_device_id": "{group}.{node}.{device}", "state_metric": None}
    )
    dbirth = encode_payload(
        [
            SparkplugMetric("rpm", alias=10, datatype=DOUBLE, value=1500.0),
            SparkplugMetric("count", alias=11, datatype=INT64, value=-3),
            SparkplugMetric("label", alias=12, datatype=12, value="pump"),
            SparkplugMetric("missing", alias=13, datatype=DOUBLE, is_null=True),
        ],
        timestamp=1700000000000,
    )
    [r] = decode(codec, "spBv1.0/g/DBIRTH/n1/pump-2", dbirth)
    assert r.device_id == "g.n1.pump-2"
    assert r.metrics == {"rpm": 1500.0, "count": -3, "label": "pump"}
    ddata = encode_payload(
        [
            SparkplugMetric(alias=10, timestamp=1700000002000, value=1510.0, datatype=DOUBLE),
            SparkplugMetric(alias=10, timestamp=1700000003000, value=1520.0, datatype=DOUBLE),
            SparkplugMetric(alias=11, timestamp=1700000003000, value=-4, datatype=INT64),
        ],
        timestamp=1700000004000,
    )
    rs = decode(codec, "spBv1.0/g/DDATA/n1/pump-2", ddata)
    assert [(r.ts, r.metrics) for r in rs] == [
        (1700000002.0, {"rpm": 1510.0}),
        (1700000003.0, {"rpm": 1520.0, "count": -4}),
    ]
    assert decode(codec, "spBv1.0/g/DDEATH/n1/pump-2", encode_payload([])) == []


def test_commands_and_state_give_no_readings() -> None:
    codec = get_codec("sparkplug_b")
    assert (
        decode(
            codec,
            "spBv1.0/g/NCMD/n1",
            encode_payload([SparkplugMetric("Node Control/Rebirth", datatype=BOOLEAN, value=True)]),
        )
        == []
    )
    assert decode(codec, "spBv1.0/STATE/host-1", b'{"online": true}') == []


@pytest.mark.parametrize(
    ("topic", "payload", "expected"),
    [
        ("plant/x", b"", "sparkplug_topic"),
        ("spBv1.0/g/NDATA/n1/dev", b"", "sparkplug_topic"),
        ("spBv1.0/g/DDATA/n1", b"", "sparkplug_topic"),
        ("spBv1.0/g/XDATA/n1", b"", "sparkplug_topic"),
        ("spBv1.0/g/NDATA/n1", b"\x08", "protobuf_error"),
        ("spBv1.0/g/NDATA/n1", b"\x0b", "protobuf_error"),  # wire type 3 (group)
        ("spBv1.0/g/NDATA/n1", b"\x12\x05\x0a", "protobuf_error"),
        ("spBv1.0/g/NDATA/n1", b"\x12\x02\x10\x05", "unknown_alias"),
        ("spBv1.0/g/NDATA/n1", b"\x12\x00", "protobuf_error"),  # neither name nor alias
        (
            "spBv1.0/g/NDATA/n1",
            b"\x12\x05\x0a\x01a\x58\x01" + b"\x08" + b"\xff" * 9 + b"\x01",
            "bad_timestamp",
        ),
    ],
)
def test_rejections(topic: str, payload: bytes, expected: str) -> None:
    with pytest.raises(DecodeError) as e:
        decode(get_codec("sparkplug_b"), topic, payload)  # type: ignore[arg-type]
    assert e.value.reason == expected


def test_command_targets_are_bounded_and_deaths_mark_only_their_node(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sans-IO: the device ids kept for commands stay within MAX_TARGETS (the
    oldest forgotten, with its node's index), and an NDEATH makes that node and
    its devices unreachable, no other node's."""
    monkeypatch.setattr(sparkplug, "MAX_TARGETS", 4)
    codec = get_codec("sparkplug_b")
    assert isinstance(codec, SparkplugCodec)
    data = encode_payload([SparkplugMetric(name="x", datatype=DOUBLE, value=1.0)], seq=1)
    decode(codec, "spBv1.0/g/NDATA/n1", data)
    decode(codec, "spBv1.0/g/DDATA/n1/a", data)
    decode(codec, "spBv1.0/g/DDATA/n2/b", data)
    decode(codec, "spBv1.0/g/NDATA/n2", data)
    assert all(codec.online(d) for d in ("n1", "n1.a", "n2.b", "n2"))
    decode(codec, "spBv1.0/g/DDATA/n2/c", data)  # a fifth: n1 (the oldest) goes
    assert (
        not codec.online("n1") and codec.encode_command("n1", "x", {"value": 1}, now_ms=1) is None
    )
    assert codec.online("n2.c")
    decode(codec, "spBv1.0/g/NDEATH/n2", encode_payload([], seq=2))
    assert not any(codec.online(d) for d in ("n2", "n2.b", "n2.c"))
    assert codec.online("n1.a")
    assert codec.encode_command("n2.b", "x", {"value": 1}, now_ms=1) is None
    topic, _ = codec.encode_command("n1.a", "x", {"value": 2.5}, now_ms=1) or ("", b"")
    assert topic == "spBv1.0/g/DCMD/n1/a"
