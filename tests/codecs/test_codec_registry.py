"""The codec registry, option validation and the shared timestamp/value helpers."""

from __future__ import annotations

import datetime as dt

import pytest

from edgeway.codecs.base import (
    DecodeError,
    codec_for_coap_format,
    codec_for_content_type,
    codec_names,
    get_codec,
    metric_value,
    parse_timestamp,
)
from edgeway.reading import Origin


def test_builtin_codecs_are_registered() -> None:
    assert set(codec_names()) >= {
        "json",
        "senml+json",
        "senml+cbor",
        "cbor",
        "binary",
        "sparkplug_b",
        "plain",
    }


def test_unknown_codec_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match=r"unknown codec 'xml'.*json"):
        get_codec("xml")


def test_unknown_option_is_named() -> None:
    with pytest.raises(ValueError, match=r"codec 'json' options: tiemstamp: unknown key"):
        get_codec("json", {"tiemstamp": "t"})


def test_bad_option_value_is_named() -> None:
    with pytest.raises(ValueError, match=r"timestamp_unit"):
        get_codec("json", {"timestamp_unit": "fortnights"})
    with pytest.raises(ValueError, match=r"not a JMESPath expression"):
        get_codec("json", {"metrics": {"t": "a[["}})
    with pytest.raises(ValueError, match=r"produces 3 values but 2 fields"):
        get_codec("binary", {"format": ">hhf", "fields": [{"name": "a"}, {"name": "b"}]})
    with pytest.raises(ValueError, match=r"metric: Field required"):
        get_codec("plain", {})


@pytest.mark.parametrize(
    ("content_type", "name"),
    [
        ("application/json", "json"),
        ("application/json; charset=utf-8", "json"),
        ("Application/SenML+JSON", "senml+json"),
        ("application/senml+cbor", "senml+cbor"),
        ("application/cbor", "cbor"),
        ("text/plain", "plain"),
        ("application/octet-stream", "binary"),
    ],
)
def test_codec_for_content_type(content_type: str, name: str) -> None:
    cls = codec_for_content_type(content_type)
    assert cls is not None and cls.name == name


def test_codec_for_unknown_content_type_is_none() -> None:
    assert codec_for_content_type("application/xml") is None
    assert codec_for_coap_format(9999) is None


@pytest.mark.parametrize(
    ("fmt", "name"), [(50, "json"), (60, "cbor"), (110, "senml+json"), (112, "senml+cbor")]
)
def test_codec_for_coap_format(fmt: int, name: str) -> None:
    cls = codec_for_coap_format(fmt)
    assert cls is not None and cls.name == name


@pytest.mark.parametrize(
    ("value", "unit", "expected"),
    [
        (1700000000, "auto", 1700000000.0),
        (1700000000.5, "auto", 1700000000.5),
        (1700000000123, "auto", 1700000000.123),
        (1700000000123456, "auto", 1700000000.123456),
        (1700000000123456789, "auto", 1700000000.123456789),
        (1700000000123, "ms", 1700000000.123),
        (5, "s", 5.0),
        ("1700000000", "auto", 1700000000.0),
        ("2023-11-14T22:13:20Z", "auto", 1700000000.0),
        ("2023-11-14T22:13:20.250+00:00", "iso8601", 1700000000.25),
        ("2023-11-14T23:13:20+01:00", "auto", 1700000000.0),
        ("2023-11-14T22:13:20", "auto", 1700000000.0),  # naive: UTC
        (dt.datetime(2023, 11, 14, 22, 13, 20, tzinfo=dt.UTC), "auto", 1700000000.0),
    ],
)
def test_parse_timestamp(value: object, unit: str, expected: float) -> None:
    assert parse_timestamp(value, unit) == pytest.approx(expected, abs=1e-6)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "unit"),
    [
        (True, "auto"),
        (-1, "auto"),
        (float("nan"), "auto"),
        (float("inf"), "s"),
        (1e300, "s"),
        ("yesterday", "auto"),
        (1700000000, "iso8601"),
        ({"t": 1}, "auto"),
        (None, "auto"),
        (10**40, "auto"),
    ],
)
def test_bad_timestamp(value: object, unit: str) -> None:
    with pytest.raises(DecodeError) as e:
        parse_timestamp(value, unit)  # type: ignore[arg-type]
    assert e.value.reason == "bad_timestamp"


def test_metric_value_limits() -> None:
    assert metric_value(1, "a") == 1
    assert metric_value(True, "a") is True
    assert metric_value("on", "a") == "on"
    for bad, reason in [
        (float("nan"), "bad_value"),
        (2**70, "bad_value"),
        (b"x", "bad_value"),
    ]:
        with pytest.raises(DecodeError) as e:
            metric_value(bad, "a")
        assert e.value.reason == reason
    # A string's length is one of the input limits, checked on the whole message.
    assert metric_value("x" * 5000, "a") == "x" * 5000
    with pytest.raises(DecodeError) as e:
        get_codec("json").decode(
            b'{"a": "' + b"x" * 5000 + b'"}', device_id="d", origin=Origin("t"), now=1.8e9
        )
    assert e.value.reason == "value_too_long"


def test_decode_error_carries_reason_and_detail() -> None:
    e = DecodeError("invalid_json", "line 1")
    assert isinstance(e, ValueError)
    assert (e.reason, e.detail, str(e)) == ("invalid_json", "line 1", "invalid_json: line 1")
