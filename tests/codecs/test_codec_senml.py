"""SenML (RFC 8428) in JSON and CBOR: the RFC's own examples and the resolution rules."""

from __future__ import annotations

import cbor2
import orjson
import pytest

from edgeway.codecs.base import DecodeError, get_codec
from edgeway.reading import Origin

ORIGIN = Origin("test", "/devices/x/telemetry")
NOW = 1_800_000_000.0

# RFC 8428 §5.1.1, §5.1.2, §5.1.3 and §5.1.5, verbatim.
RFC_5_1_1 = b'[{"n":"urn:dev:ow:10e2073a01080063","u":"Cel","v":23.1}]'
RFC_5_1_2 = b"""[
     {"bn":"urn:dev:ow:10e2073a01080063:","n":"voltage","u":"V","v":120.1},
     {"n":"current","u":"A","v":1.2}
   ]"""
RFC_5_1_3 = b"""[
     {"bn":"urn:dev:ow:10e2073a0108006:","bt":1.276020076001e+09,
      "bu":"A","bver":5,
      "n":"voltage","u":"V","v":120.1},
     {"n":"current","t":-5,"v":1.2},
     {"n":"current","t":-4,"v":1.3},
     {"n":"current","t":-3,"v":1.4},
     {"n":"current","t":-2,"v":1.5},
     {"n":"current","t":-1,"v":1.6},
     {"n":"current","v":1.7}
   ]"""
RFC_5_1_5 = b"""[
     {"bn":"urn:dev:ow:10e2073a01080063:","bt":1.320067464e+09,
      "bu":"%RH","v":20},
     {"u":"lon","v":24.30621},
     {"u":"lat","v":60.07965},
     {"t":60,"v":20.3},
     {"u":"lon","t":60,"v":24.30622},
     {"u":"lat","t":60,"v":60.07965},
     {"t":120,"v":20.7},
     {"u":"lon","t":120,"v":24.30623},
     {"u":"lat","t":120,"v":60.07966},
     {"u":"%EL","t":150,"v":98},
     {"t":180,"v":21.2},
     {"u":"lon","t":180,"v":24.30628},
     {"u":"lat","t":180,"v":60.07967}
   ]"""
# RFC 8428 §6: the §5.1.2 pack in CBOR, as printed in the RFC (its base name has 15 hex digits).
RFC_CBOR = bytes.fromhex(
    "82a421781b75726e3a6465763a6f773a3130653230373361303130383030363a"
    "0067766f6c7461676501615602fb405e066666666666a3006763757272656e74"
    "01614102fb3ff3333333333333"
)


def decode(
    payload: bytes, device_id: str | None = None, codec: str = "senml+json", now: float = NOW
):  # type: ignore[no-untyped-def]
    return get_codec(codec).decode(payload, device_id=device_id, origin=ORIGIN, now=now)


RFC_NOW = 1.33e9
"""The RFC's examples date from 2010-2011: decoded as if received then (at NOW,
their times are older than input_limits.max_timestamp_age allows)."""


def test_rfc_single_datapoint_name_is_the_device() -> None:
    [r] = decode(RFC_5_1_1)
    assert r.device_id == "urn:dev:ow:10e2073a01080063"
    assert r.metrics == {"Cel": 23.1}
    assert r.ts == NOW  # no time: "now"
    assert r.tags == {"unit:Cel": "Cel"}


def test_rfc_multiple_datapoints() -> None:
    [r] = decode(RFC_5_1_2)
    assert r.device_id == "urn:dev:ow:10e2073a01080063"
    assert r.metrics == {"voltage": 120.1, "current": 1.2}
    assert r.tags == {"unit:voltage": "V", "unit:current": "A"}


def test_rfc_multiple_measurements_relative_times() -> None:
    rs = decode(RFC_5_1_3, now=RFC_NOW)
    bt = 1.276020076001e09
    assert {r.device_id for r in rs} == {"urn:dev:ow:10e2073a0108006"}
    by_ts = {round(r.ts - bt, 3): r.metrics for r in rs}
    assert by_ts == {
        0.0: {"voltage": 120.1, "current": 1.7},
        -5.0: {"current": 1.2},
        -4.0: {"current": 1.3},
        -3.0: {"current": 1.4},
        -2.0: {"current": 1.5},
        -1.0: {"current": 1.6},
    }
    assert rs[1].tags == {"unit:current": "A"}  # base unit


def test_rfc_multiple_data_types_named_by_unit() -> None:
    rs = decode(RFC_5_1_5, now=RFC_NOW)
    assert [r.ts - 1.320067464e09 for r in rs] == [0, 60, 120, 150, 180]
    assert rs[0].metrics == {"%RH": 20, "lon": 24.30621, "lat": 60.07965}
    assert rs[3].metrics == {"%EL": 98}


def test_rfc_cbor_example() -> None:
    [r] = decode(RFC_CBOR, codec="senml+cbor")
    assert r.device_id == "urn:dev:ow:10e2073a0108006"
    assert r.metrics == {"voltage": 120.1, "current": 1.2}


def test_address_device_id_and_relative_time() -> None:
    rs = decode(b'[{"n":"temp","v":21.5,"t":-10},{"n":"temp","v":21.7}]', device_id="d1")
    assert [(r.device_id, r.ts, r.metrics) for r in rs] == [
        ("d1", NOW - 10, {"temp": 21.5}),
        ("d1", NOW, {"temp": 21.7}),
    ]


def test_value_kinds_base_value_and_sum() -> None:
    pack = [
        {"bn": "dev1/", "bv": 100, "bs": 1000, "n": "level", "v": 5},
        {"n": "state", "vs": "running"},
        {"n": "door", "vb": False},
        {"n": "blob", "vd": "AQID"},
        {"n": "energy", "s": 12},
        {"n": "flow", "v": 1, "s": 50},
    ]
    [r] = decode(orjson.dumps(pack))
    assert r.device_id == "dev1"
    assert r.metrics == {
        "level": 105,
        "state": "running",
        "door": False,
        "blob": "AQID",
        "energy": 1012,
        "flow": 101,
        "flow_sum": 1050,
    }
    cbor_pack = [{-2: "dev1/", 0: "blob", 8: b"\x01\x02\x03"}, {0: "x", 2: 1, 99: "ignored"}]
    [r] = decode(cbor2.dumps(cbor_pack), codec="senml+cbor")
    assert r.metrics == {"blob": "AQID", "x": 1}


def test_several_devices_in_one_pack() -> None:
    pack = [{"bn": "a:", "n": "t", "v": 1}, {"bn": "b:", "n": "t", "v": 2}]
    rs = decode(orjson.dumps(pack))
    assert [(r.device_id, r.metrics) for r in rs] == [("a", {"t": 1}), ("b", {"t": 2})]


@pytest.mark.parametrize(
    ("pack", "expected"),
    [
        ({"n": "x", "v": 1}, "senml_error"),
        ([], "empty_array"),
        ([1], "senml_error"),
        ([{"bn": "d:", "n": "x", "v": 1, "new_": 1}], "senml_must_understand"),
        ([{"bver": 11, "bn": "d:", "n": "x", "v": 1}], "senml_version"),
        ([{"bn": "d:", "n": "x", "v": "1"}], "senml_error"),
        ([{"bn": "d:", "n": "x", "v": True}], "senml_error"),
        ([{"bn": "d:", "n": "x", "v": 1, "vs": "a"}], "senml_error"),
        ([{"bn": "d:", "n": "x", "vb": 1}], "senml_error"),
        ([{"bn": "d:", "n": "bad name", "v": 1}], "senml_bad_name"),
        ([{"bn": "d:", "n": "x"}], "no_metrics"),
        ([{"n": "", "v": 1}], "no_device_id"),
        ([{"bn": "d:", "n": "x", "v": 1, "bt": "now"}], "senml_error"),
        ([{"bn": "d:", "n": "x", "v": 1, "t": 1e300}], "bad_timestamp"),
    ],
)
def test_rejections(pack: object, expected: str) -> None:
    with pytest.raises(DecodeError) as e:
        decode(orjson.dumps(pack))
    assert e.value.reason == expected
