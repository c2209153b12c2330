"""The binary struct and plain-text codecs."""

from __future__ import annotations

import struct

import pytest

from edgeway.codecs.base import DecodeError, get_codec
from edgeway.reading import Origin

ORIGIN = Origin("test", "sensors/x")
NOW = 1_800_000_000.0

FRAME_OPTIONS = {
    "format": ">hHfxB",
    "fields": [
        {"name": "temperature", "scale": 0.01},
        {"name": "humidity", "scale": 0.1},
        {"name": "battery_v"},
        {"name": "status"},
    ],
}


def test_binary_frame_with_scales() -> None:
    codec = get_codec("binary", FRAME_OPTIONS)
    frame = struct.pack(">hHfxB", -1234, 456, 3.25, 7)
    [r] = codec.decode(frame, device_id="node-1", origin=ORIGIN, now=NOW)
    assert r.device_id == "node-1"
    assert r.metrics["temperature"] == pytest.approx(-12.34)
    assert r.metrics["humidity"] == pytest.approx(45.6)
    assert r.metrics["battery_v"] == 3.25
    assert r.metrics["status"] == 7 and isinstance(r.metrics["status"], int)


def test_binary_device_id_timestamp_skip_and_records() -> None:
    codec = get_codec(
        "binary",
        {
            "format": "<4sIhH",
            "fields": [
                {"name": "dev"},
                {"name": "t"},
                {"name": "temp", "scale": 0.1, "offset": -40},
                {"name": None},
            ],
            "device_id_field": "dev",
            "timestamp_field": "t",
            "timestamp_unit": "s",
            "records": True,
        },
    )
    payload = struct.pack("<4sIhH", b"ab\x00\x00", 1700000000, 612, 9) + struct.pack(
        "<4sIhH", b"cdef", 1700000060, 600, 9
    )
    rs = codec.decode(payload, device_id=None, origin=ORIGIN, now=NOW)
    assert [(r.device_id, r.ts) for r in rs] == [("ab", 1700000000.0), ("cdef", 1700000060.0)]
    assert rs[0].metrics == {"temp": pytest.approx(21.2)}


def test_binary_rejections() -> None:
    codec = get_codec("binary", FRAME_OPTIONS)
    for payload, expected, device_id in [
        (b"\x00" * 3, "bad_length", "d"),
        (b"\x00" * 12, "bad_length", "d"),
        (struct.pack(">hHfxB", 1, 1, 1.0, 1), "no_device_id", None),
        (struct.pack(">hHfxB", 1, 1, float("nan"), 1), "bad_value", "d"),
    ]:
        with pytest.raises(DecodeError) as e:
            codec.decode(payload, device_id=device_id, origin=ORIGIN, now=NOW)
        assert e.value.reason == expected


def test_binary_option_errors() -> None:
    with pytest.raises(ValueError, match=r"format .>q\?z.: bad char"):
        get_codec("binary", {"format": ">q?z", "fields": [{"name": "a"}]})
    with pytest.raises(ValueError, match="not one of the fields"):
        get_codec("binary", {"format": ">h", "fields": [{"name": "a"}], "device_id_field": "b"})


@pytest.mark.parametrize(
    ("payload", "kind", "expected"),
    [
        (b"21.5", "auto", 21.5),
        (b" 42\n", "auto", 42),
        (b"ON", "auto", True),
        (b"off", "auto", False),
        (b"running", "auto", "running"),
        (b"1e3", "number", 1000.0),
        (b"true", "bool", True),
        (b"21.5", "string", "21.5"),
    ],
)
def test_plain(payload: bytes, kind: str, expected: object) -> None:
    [r] = get_codec("plain", {"metric": "v", "type": kind}).decode(
        payload, device_id="d1", origin=ORIGIN, now=NOW
    )
    assert r.metrics == {"v": expected}
    assert type(r.metrics["v"]) is type(expected)
    assert (r.device_id, r.ts) == ("d1", NOW)


@pytest.mark.parametrize(
    ("payload", "kind", "device_id", "expected"),
    [
        (b"ERR", "number", "d1", "not_a_number"),
        (b"nan", "number", "d1", "not_a_number"),
        (b"2", "bool", "d1", "not_a_bool"),
        (b"  ", "auto", "d1", "empty_payload"),
        (b"\xff", "auto", "d1", "bad_utf8"),
        (b"1", "auto", None, "no_device_id"),
    ],
)
def test_plain_rejections(payload: bytes, kind: str, device_id: str | None, expected: str) -> None:
    with pytest.raises(DecodeError) as e:
        get_codec("plain", {"metric": "v", "type": kind}).decode(
            payload, device_id=device_id, origin=ORIGIN, now=NOW
        )
    assert e.value.reason == expected
