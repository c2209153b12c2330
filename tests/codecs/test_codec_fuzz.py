"""Property tests: every decoder turns arbitrary input into readings or a DecodeError, never
another exception (guarantee 4 of DESIGN.md: bad input never crashes the gateway)."""

from __future__ import annotations

import math
from typing import Any

import cbor2
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeway.codecs.base import Codec, DecodeError, get_codec
from edgeway.codecs.sparkplug import SparkplugCodec
from edgeway.reading import Origin, Reading

NOW = 1_800_000_000.0
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CODECS: dict[str, dict[str, Any]] = {
    "json": {},
    "cbor": {},
    "senml+json": {},
    "senml+cbor": {},
    "plain": {"metric": "v"},
    "binary": {
        "format": ">hHf",
        "fields": [{"name": "a", "scale": 0.1}, {"name": "b"}, {"name": "c"}],
    },
    "sparkplug_b": {},
}
TOPICS = ["spBv1.0/g/NDATA/n", "spBv1.0/g/NBIRTH/n", "spBv1.0/g/DDATA/n/d", "x/y"]


def check(codec: Codec, payload: bytes, device_id: str | None, topic: str = "t") -> None:
    try:
        readings = codec.decode(payload, device_id=device_id, origin=Origin("fuzz", topic), now=NOW)
    except DecodeError as e:
        assert e.reason and e.reason.replace("_", "").replace("+", "").isalnum()
        return
    for r in readings:
        assert isinstance(r, Reading)
        assert isinstance(r.device_id, str) and r.device_id
        assert math.isfinite(r.ts) and r.ts >= 0
        for name, value in r.metrics.items():
            assert isinstance(name, str)
            assert isinstance(value, bool | int | float | str)
            assert not isinstance(value, float) or math.isfinite(value)
            assert not isinstance(value, str) or len(value) <= codec.limits.max_string_length


@SETTINGS
@given(
    st.sampled_from(sorted(CODECS)),
    st.binary(max_size=512),
    st.sampled_from([None, "d1"]),
    st.sampled_from(TOPICS),
)
def test_arbitrary_bytes(name: str, payload: bytes, device_id: str | None, topic: str) -> None:
    check(get_codec(name, CODECS[name]), payload, device_id, topic)


# Structured documents reach further than random bytes: valid JSON/CBOR of any shape.
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
keys = st.sampled_from(
    [
        "ts",
        "device_id",
        "msg_id",
        "metrics",
        "n",
        "bn",
        "bt",
        "v",
        "vs",
        "vb",
        "vd",
        "s",
        "t",
        "u",
        "bu",
        "bver",
        "a",
        "b_",
    ]
) | st.text(max_size=8)
docs = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(keys, kids, max_size=6),
    max_leaves=30,
)


def _json(doc: Any) -> bytes:
    try:
        return orjson.dumps(doc)
    except orjson.JSONEncodeError:  # integers beyond 64 bits
        return b"null"


@SETTINGS
@given(docs, st.sampled_from([None, "d1"]))
def test_arbitrary_json_documents(doc: Any, device_id: str | None) -> None:
    raw = _json(doc)
    for name in ("json", "senml+json"):
        check(get_codec(name), raw, device_id)
    check(
        get_codec("json", {"metrics": {"x": "a.b[0]", "y": "max(a)"}, "timestamp": "t[0]"}),
        raw,
        device_id,
    )
    tagged = get_codec("json", {"tags": {"type": "type", "a": "a", "ab": "a.b", "m": "max(a)"}})
    check(tagged, raw, device_id)


cbor_keys = keys | st.integers(min_value=-20, max_value=20)
cbor_docs = st.recursive(
    scalars | st.binary(max_size=8),
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(cbor_keys, kids, max_size=6),
    max_leaves=30,
)


@SETTINGS
@given(cbor_docs, st.sampled_from([None, "d1"]))
def test_arbitrary_cbor_documents(doc: Any, device_id: str | None) -> None:
    raw = cbor2.dumps(doc)
    for name in ("cbor", "senml+cbor"):
        check(get_codec(name), raw, device_id)


# Sparkplug: well-formed protobuf framing with arbitrary field contents.
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


fields = st.tuples(
    st.integers(1, 20),
    st.sampled_from([0, 1, 2, 5]),
    st.integers(0, 2**64 - 1),
    st.binary(max_size=16),
)


def _field(number: int, wire: int, n: int, data: bytes) -> bytes:
    key = _varint(number << 3 | wire)
    if wire == 0:
        return key + _varint(n)
    if wire == 1:
        return key + n.to_bytes(8, "little")
    if wire == 5:
        return key + (n & 0xFFFFFFFF).to_bytes(4, "little")
    return key + _varint(len(data)) + data


@SETTINGS
@given(
    st.lists(st.lists(fields, max_size=6), max_size=5),
    st.integers(0, 2**64 - 1),
    st.sampled_from(TOPICS[:3]),
)
def test_arbitrary_sparkplug_metrics(
    metrics: list[list[tuple[int, int, int, bytes]]], ts: int, topic: str
) -> None:
    codec = SparkplugCodec()
    body = b"".join(
        _field(1 if i == 0 else i, 2, 0, b"".join(_field(*f) for f in m))
        for i, m in enumerate(metrics, start=1)
        if True
    )
    payload = _field(1, 0, ts, b"") + b"".join(
        _field(2, 2, 0, b"".join(_field(*f) for f in m)) for m in metrics
    )
    check(codec, payload, None, "spBv1.0/g/NBIRTH/n")
    check(codec, payload, None, topic)
    check(codec, body, None, topic)
