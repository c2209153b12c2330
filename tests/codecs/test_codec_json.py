"""The json and cbor codecs: field mapping, flattening, timestamps, device ids."""

from __future__ import annotations

import cbor2
import orjson
import pytest

from edgeway.codecs.base import DecodeError, get_codec
from edgeway.reading import Origin

ORIGIN = Origin("test", "devices/x/telemetry")
NOW = 1_800_000_000.0


def decode(
    payload: object,
    options: dict[str, object] | None = None,
    device_id: str | None = "d1",
    codec: str = "json",
):  # type: ignore[no-untyped-def]
    raw = orjson.dumps(payload) if codec == "json" else cbor2.dumps(payload)
    return get_codec(codec, options).decode(raw, device_id=device_id, origin=ORIGIN, now=NOW)


def reason(
    payload: object,
    options: dict[str, object] | None = None,
    device_id: str | None = "d1",
    codec: str = "json",
) -> str:
    with pytest.raises(DecodeError) as e:
        decode(payload, options, device_id, codec)
    return e.value.reason


@pytest.mark.parametrize("codec", ["json", "cbor"])
def test_plain_object_all_fields_are_metrics(codec: str) -> None:
    [r] = decode({"temp": 21.5, "on": True, "mode": "auto", "n": 3}, codec=codec)
    assert r.device_id == "d1"
    assert r.ts == NOW
    assert r.metrics == {"temp": 21.5, "on": True, "mode": "auto", "n": 3}
    assert r.origin == ORIGIN


def test_reserved_fields_are_not_metrics_and_payload_device_id_used_when_address_has_none() -> None:
    [r] = decode(
        {"device_id": "boiler-7", "ts": 1700000000000, "msg_id": 42, "temp": 71.5}, device_id=None
    )
    assert r.device_id == "boiler-7"
    assert r.ts == 1700000000.0
    assert r.metrics == {"temp": 71.5}
    assert r.origin.message_id == "42"


def test_address_device_id_wins_over_payload() -> None:
    # The address (URL, topic) is what was authenticated; a body cannot speak for another device.
    [r] = decode({"device_id": "someone-else", "temp": 1})
    assert r.device_id == "d1"
    assert r.metrics == {"temp": 1}


def test_metrics_envelope_shape() -> None:
    [r] = decode({"ts": "2023-11-14T22:13:20Z", "metrics": {"temp": 21.5, "hum": 40}})
    assert r.ts == 1700000000.0
    assert r.metrics == {"temp": 21.5, "hum": 40}


def test_nested_objects_flatten_nulls_and_arrays_skipped() -> None:
    # A Tasmota SENSOR message.
    payload = {
        "Time": "2024-01-05T10:00:00",
        "ENERGY": {"Total": 12.5, "Power": 40, "Today": None},
        "AM2301": {"Temperature": 21.3, "Humidity": 45.1},
        "TempUnit": "C",
        "Colors": [1, 2, 3],
    }
    [r] = decode(payload, {"timestamp": "Time", "separator": "_"})
    assert r.metrics == {
        "ENERGY_Total": 12.5,
        "ENERGY_Power": 40,
        "AM2301_Temperature": 21.3,
        "AM2301_Humidity": 45.1,
        "TempUnit": "C",
    }
    assert r.ts == 1704448800.0


def test_jmespath_mapping() -> None:
    payload = {
        "meta": {"serial": "SN-9", "time": 1700000000},
        "sensors": [{"kind": "t", "value": 21.5}, {"kind": "h", "value": 40}],
    }
    options = {
        "device_id": "meta.serial",
        "timestamp": "meta.time",
        "timestamp_unit": "s",
        "metrics": {
            "temperature": "sensors[?kind=='t'].value | [0]",
            "humidity": "sensors[?kind=='h'].value | [0]",
            "missing": "sensors[?kind=='x'].value | [0]",
        },
    }
    [r] = decode(payload, options, device_id=None)
    assert (r.device_id, r.ts) == ("SN-9", 1700000000.0)
    assert r.metrics == {"temperature": 21.5, "humidity": 40}


def test_array_gives_one_reading_each_and_records_envelope() -> None:
    # (Times within input_limits' plausible range around NOW.)
    rs = decode([{"ts": NOW - 2, "a": 1}, {"ts": NOW - 1, "a": 2}])
    assert [(r.ts, r.metrics) for r in rs] == [(NOW - 2, {"a": 1}), (NOW - 1, {"a": 2})]
    rs = decode({"gw": "x", "data": [{"a": 1}, {"a": 2}]}, {"records": "data"})
    assert [r.metrics for r in rs] == [{"a": 1}, {"a": 2}]


def test_exclude_and_values_options() -> None:
    [r] = decode({"a": 1, "b": 2, "rssi": -70}, {"exclude": ["rssi"]})
    assert r.metrics == {"a": 1, "b": 2}
    [r] = decode({"hdr": {"x": 1}, "body": {"a": 1}}, {"values": "body"})
    assert r.metrics == {"a": 1}


@pytest.mark.parametrize(
    ("payload", "options", "device_id", "expected"),
    [
        ("not an object", None, "d1", "not_an_object"),
        (42, None, "d1", "not_an_object"),
        ([1, 2], None, "d1", "not_an_object"),
        ([], None, "d1", "empty_array"),
        ({}, None, "d1", "no_metrics"),
        ({"a": None}, None, "d1", "no_metrics"),
        ({"a": 1}, None, None, "no_device_id"),
        ({"device_id": 5, "a": 1}, None, None, "no_device_id"),
        ({"device_id": "a/b", "a": 1}, None, None, "bad_device_id"),
        ({"ts": "noon", "a": 1}, None, "d1", "bad_timestamp"),
        ({"a": "x" * 5000}, None, "d1", "value_too_long"),
        (
            {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": {"j": 1}}}}}}}}}},
            None,
            "d1",
            "too_deep",
        ),
        ({"a": "x"}, {"metrics": {"s": "sum(a)"}}, "d1", "mapping_error"),
        ({"x": 1}, {"records": "data"}, "d1", "no_records"),
    ],
)
def test_rejections(
    payload: object, options: dict[str, object] | None, device_id: str | None, expected: str
) -> None:
    assert reason(payload, options, device_id) == expected


def test_invalid_json() -> None:
    codec = get_codec("json")
    for raw in (b"", b"{", b"{'a': 1}", b"\xff\xfe", b'{"a": NaN}', b'{"a": 1e999}'):
        with pytest.raises(DecodeError) as e:
            codec.decode(raw, device_id="d1", origin=ORIGIN, now=NOW)
        assert e.value.reason == "invalid_json"


def test_integer_beyond_64_bits() -> None:
    codec = get_codec("json")
    # orjson reads an integer beyond 64 bits as a float; CBOR keeps it an integer, refused.
    [r] = codec.decode(b'{"a": 1208925819614629174706176}', device_id="d1", origin=ORIGIN, now=NOW)
    assert r.metrics == {"a": 1.2089258196146292e24}
    with pytest.raises(DecodeError) as e:
        get_codec("cbor").decode(cbor2.dumps({"a": 2**80}), device_id="d1", origin=ORIGIN, now=NOW)
    assert e.value.reason == "bad_value"


def test_cbor_specifics() -> None:
    codec = get_codec("cbor")
    good = cbor2.dumps({"a": 1})
    for raw, expected in [
        (b"", "cbor_error"),
        (b"\xff", "cbor_error"),
        (good + b"\x00", "trailing_data"),
        (cbor2.dumps({"a": b"bytes"}), "bad_value"),
        (cbor2.dumps({1: 5}), "bad_key"),
    ]:
        with pytest.raises(DecodeError) as e:
            codec.decode(raw, device_id="d1", origin=ORIGIN, now=NOW)
        assert e.value.reason == expected, raw
    # A CBOR epoch date/time (tag 1) is a timestamp.
    raw = bytes.fromhex("a2627473c11a6553f100617401")  # {"ts": 1(1700000000), "t": 1}
    [r] = codec.decode(raw, device_id="d1", origin=ORIGIN, now=NOW)
    assert (r.ts, r.metrics) == (1700000000.0, {"t": 1})


@pytest.mark.parametrize("codec", ["json", "cbor"])
def test_tags_option_gives_tags_routes_can_match(codec: str) -> None:
    from edgeway.config import RouteMatch
    from edgeway.pipeline.routes import RouteMatcher

    options: dict[str, object] = {
        "tags": {"type": "type", "site": "meta.site", "rev": "meta.rev", "up": "meta.up"}
    }
    payload = {"temp": 80.5, "type": "thermometer", "meta": {"site": "plant-a", "rev": 3}}
    [r] = decode(payload, options, codec=codec)
    # Plain-field tag paths are not metrics; nested ones leave their object's other fields.
    assert r.metrics == {"temp": 80.5, "meta.site": "plant-a", "meta.rev": 3}
    assert r.tags == {"type": "thermometer", "site": "plant-a", "rev": "3"}  # absent: no tag
    [flag] = decode({"v": 1, "meta": {"up": True}}, options, codec=codec)
    assert flag.tags == {"up": "true"}
    matcher = RouteMatcher(RouteMatch(device_types=["therm*"], tags={"site": "plant-*"}))
    assert matcher.matches(r) and not matcher.matches(flag)
    # Without the option nothing changes: "type" is a metric like any other field.
    [plain] = decode(payload, codec=codec)
    assert plain.tags == {} and plain.metrics["type"] == "thermometer"


def test_bad_tags() -> None:
    options: dict[str, object] = {"tags": {"type": "type"}}
    assert reason({"v": 1, "type": {"a": 1}}, options) == "bad_tag"
    assert reason({"v": 1, "type": "x" * 257}, options) == "bad_tag"
    with pytest.raises(ValueError, match="not a JMESPath"):
        get_codec("json", {"tags": {"type": "a[?"}})
    with pytest.raises(ValueError, match="tag names"):
        get_codec("json", {"tags": {"": "a"}})
