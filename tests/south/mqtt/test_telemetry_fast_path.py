"""The flat-object fast path of telemetry decoding gives the same readings as
the general path: same metrics, arrival time, origin and correlation id."""

from __future__ import annotations

import time

import pytest

from edgeway.reading import Origin
from edgeway.south.mqtt.telemetry import TelemetryError, decode_telemetry


def test_flat_object_with_and_without_correlation() -> None:
    origin = Origin("mqtt", "devices/d1/telemetry", "c1")
    before = time.time()
    (r,) = decode_telemetry(
        b'{"temp": 21.5, "n": 3, "on": true, "mode": "auto"}',
        "d1",
        "devices/d1/telemetry",
        "c1",
        None,
        origin,
    )
    assert r.metrics == {"temp": 21.5, "n": 3, "on": True, "mode": "auto"}
    assert before <= r.ts <= time.time()
    assert r.origin is origin and r.tags == {} and r.priority == 0
    (r,) = decode_telemetry(b'{"v": 1}', "d1", "devices/d1/telemetry", "c1", b"corr-9", origin)
    assert r.origin.message_id == "corr-9" and r.origin.address == origin.address
    assert origin.message_id is None  # the shared origin is not changed


def test_objects_the_fast_path_does_not_take() -> None:
    # null skipped, nested flattened, ts and msg_id honoured: the general path.
    (r,) = decode_telemetry(b'{"a": null, "b": {"c": 1}, "d": 2}', "d", "t", "c")
    assert r.metrics == {"b.c": 1, "d": 2}
    (r,) = decode_telemetry(b'{"v": 1, "msg_id": "m1", "ts": 1732550400}', "d", "t", "c")
    assert (r.metrics, r.ts, r.origin.message_id) == ({"v": 1}, 1732550400.0, "m1")
    with pytest.raises(TelemetryError) as ei:
        decode_telemetry(b'{"a": 1, "b": [1]}', "d", "t", "c")
    assert ei.value.reason == "unsupported_value"


def test_tags_object_becomes_reading_tags() -> None:
    (r,) = decode_telemetry(
        b'{"temp": 21.5, "tags": {"site": "north", "type": "boiler", "floor": 3}}',
        "d1",
        "devices/d1/telemetry",
        "c1",
    )
    assert r.metrics == {"temp": 21.5}
    assert r.tags == {"site": "north", "type": "boiler", "floor": "3"}
    (plain,) = decode_telemetry(b'{"temp": 1}', "d1", "devices/d1/telemetry", "c1")
    assert plain.tags == {}


@pytest.mark.parametrize(
    "payload",
    [
        b'{"temp": 1, "tags": ["a"]}',
        b'{"temp": 1, "tags": {"a": {"b": 1}}}',
        b'{"temp": 1, "tags": {"a": "' + b"x" * 300 + b'"}}',
        b'{"temp": 1, "tags": {' + b",".join(b'"t%d": "v"' % i for i in range(40)) + b"}}",
    ],
)
def test_bad_tags_are_refused_with_a_reason(payload: bytes) -> None:
    with pytest.raises(TelemetryError) as ei:
        decode_telemetry(payload, "d1", "devices/d1/telemetry", "c1")
    assert ei.value.reason == "bad_tags"
