"""SenML (RFC 8428) packs in JSON and CBOR.

Example (HTTP or CoAP pick these codecs from the Content-Type
``application/senml+json`` / ``application/senml+cbor`` or Content-Format
110 / 112; MQTT subscriptions name them)::

    codec: senml+json
    codec_options:
      separators: ":/"

Resolution follows RFC 8428 §4.6: base name, base time, base unit, base value
and base sum carry forward to the records after the one that sets them; the
record's name is base name + name, its time base time + time (a resolved time
below 2**28 is relative to the receive time, so ``"t": -5`` means five seconds
ago), its value base value + value. ``bver`` above 10 and any field ending in
``_`` (must-understand extensions) reject the pack.

How a resolved name becomes a device id and a metric name:

1. When the adapter names the device (``/devices/{device_id}/telemetry``, a
   topic placeholder), every record belongs to that device.
2. Otherwise the device is the record's *base name* with trailing separators
   (``separators``, default ``:`` and ``/``) removed:
   ``"bn": "urn:dev:ow:10e2073a01080063:"`` gives ``urn:dev:ow:10e2073a01080063``.
   A record without a base name is itself named after the device
   (RFC 8428 §5.1.1: ``"n": "urn:dev:ow:10e2073a01080063"``).
3. The metric is the record's own ``n``; a record without ``n`` (RFC 8428
   §5.1.5: one device reporting ``%RH``, ``lat`` and ``lon``) is named after
   its unit, or ``value`` when it has none.

Records that resolve to the same device and time become one reading. A record
with a sum ``s`` as well as a value stores the sum as ``<metric>_sum``; a sum
alone is stored as the metric. Units go to the reading's tags as
``unit:<metric>``. Data values (``vd``) are kept as base64url text. Records
with neither value nor sum only set base fields.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Mapping
from typing import Any

from pydantic import Field

from edgeway.codecs.base import (
    Codec,
    CodecOptions,
    DecodeError,
    check_device_id,
    metric_value,
    parse_timestamp,
    register_codec,
)
from edgeway.codecs.cbor import loads_cbor
from edgeway.codecs.json import loads_json
from edgeway.reading import MetricValue, Origin, Reading

SENML_VERSION = 10
"""The SenML version RFC 8428 defines; a pack that asks for more is refused (§4.4)."""

RELATIVE_TIME_LIMIT = 2**28
"""RFC 8428 §4.5.3: resolved times below 2**28 are relative to now."""

_NAME_RE = re.compile(r"^[A-Za-z0-9][-A-Za-z0-9:./_]*$")
"""RFC 8428 §4.5.1: names start with a letter or digit; then letters, digits, ``-:./_``."""

CBOR_LABELS: dict[int, str] = {
    -1: "bver",
    -2: "bn",
    -3: "bt",
    -4: "bu",
    -5: "bv",
    -16: "bs",
    0: "n",
    1: "u",
    2: "v",
    3: "vs",
    4: "vb",
    5: "s",
    6: "t",
    7: "ut",
    8: "vd",
}
"""RFC 8428 §6 Table 6: CBOR integer labels."""


class SenmlOptions(CodecOptions):
    """Options of the ``senml+json`` and ``senml+cbor`` codecs."""

    separators: str = Field(default=":/", max_length=8)
    """Characters stripped from the end of a base name to make the device id."""


class _Group:
    __slots__ = ("metrics", "tags")

    def __init__(self) -> None:
        self.metrics: dict[str, MetricValue] = {}
        self.tags: dict[str, str] = {}


def _number(rec: Mapping[str, Any], key: str) -> float | int | None:
    value = rec.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DecodeError("senml_error", f"{key}: expected a number, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise DecodeError("senml_error", f"{key}: {value} is not a finite number")
    return value


def _text(rec: Mapping[str, Any], key: str) -> str | None:
    value = rec.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise DecodeError("senml_error", f"{key}: expected a string, got {type(value).__name__}")
    return value


def resolve_pack(
    records: Any,
    *,
    device_id: str | None,
    origin: Origin,
    now: float,
    separators: str = ":/",
) -> list[Reading]:
    """Resolve a SenML pack (records with string labels) into readings; see the module doc."""
    if not isinstance(records, list):
        raise DecodeError("senml_error", "a SenML pack is an array of records")
    if not records:
        raise DecodeError("empty_array")
    bn, bu = "", None
    bt: float = 0.0
    bv: float = 0.0
    bs: float = 0.0
    groups: dict[tuple[str, float], _Group] = {}
    for rec in records:
        if not isinstance(rec, dict):
            raise DecodeError("senml_error", "a record is not an object/map")
        for key in rec:
            if not isinstance(key, str):
                raise DecodeError("senml_error", f"unknown label {key!r}")
            if key.endswith("_"):
                raise DecodeError("senml_must_understand", f"field {key!r} is not understood")
        bver = rec.get("bver")
        if bver is not None:
            if isinstance(bver, bool) or not isinstance(bver, int):
                raise DecodeError("senml_error", "bver: expected an integer")
            if bver > SENML_VERSION:
                raise DecodeError("senml_version", f"version {bver} > {SENML_VERSION}")
        if (v := _text(rec, "bn")) is not None:
            bn = v
        if (n := _number(rec, "bt")) is not None:
            bt = float(n)
        if (v := _text(rec, "bu")) is not None:
            bu = v
        if (n := _number(rec, "bv")) is not None:
            bv = float(n)
        if (n := _number(rec, "bs")) is not None:
            bs = float(n)

        values = [k for k in ("v", "vs", "vb", "vd") if rec.get(k) is not None]
        if len(values) > 1:
            raise DecodeError("senml_error", f"more than one value field: {values}")
        raw_sum = _number(rec, "s")
        if not values and raw_sum is None:
            continue  # a record that only sets base fields

        name = _text(rec, "n") or ""
        full = bn + name
        if full and not _NAME_RE.match(full):
            raise DecodeError("senml_bad_name", f"{full[:64]!r}")
        unit = _text(rec, "u") or bu
        if device_id is not None:
            dev = device_id
        else:
            stem = bn.rstrip(separators) if bn else name.rstrip(separators)
            dev = check_device_id(stem or None)
        metric = (name if bn or device_id is not None else "") or unit or "value"

        t = _number(rec, "t")
        when = bt + (float(t) if t is not None else 0.0)
        if abs(when) < RELATIVE_TIME_LIMIT:
            when = now + when
        ts = parse_timestamp(when, "s")

        group = groups.get((dev, ts))
        if group is None:
            group = groups[(dev, ts)] = _Group()
        if values:
            key = values[0]
            raw = rec[key]
            value: Any
            if key == "v":
                n = _number(rec, "v")
                assert n is not None
                value = bv + n if bv else n
            elif key == "vs":
                value = _text(rec, "vs")
            elif key == "vb":
                value = raw
                if not isinstance(value, bool):
                    raise DecodeError("senml_error", "vb: expected a boolean")
            else:  # vd: base64url text in JSON, a byte string in CBOR
                if isinstance(raw, bytes):
                    value = base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
                else:
                    value = _text(rec, "vd")
            group.metrics[metric] = metric_value(value, metric)
        if raw_sum is not None:
            total = bs + raw_sum if bs else raw_sum
            group.metrics[f"{metric}_sum" if values else metric] = metric_value(total, metric)
        if unit is not None:
            group.tags[f"unit:{metric}"] = unit
    if not groups:
        raise DecodeError("no_metrics")
    return [
        Reading(device_id=dev, ts=ts, metrics=g.metrics, origin=origin, tags=g.tags)
        for (dev, ts), g in groups.items()
    ]


@register_codec
class SenmlJsonCodec(Codec):
    """SenML packs in JSON (``application/senml+json``, CoAP Content-Format 110)."""

    name = "senml+json"
    content_types = ("application/senml+json",)
    coap_formats = (110,)
    Options = SenmlOptions

    def decode_readings(
        self, payload: bytes, *, device_id: str | None, origin: Origin, now: float
    ) -> list[Reading]:
        return resolve_pack(
            loads_json(payload),
            device_id=device_id,
            origin=origin,
            now=now,
            separators=self.options.separators,
        )


@register_codec
class SenmlCborCodec(Codec):
    """SenML packs in CBOR with integer labels (``application/senml+cbor``, Content-Format 112)."""

    name = "senml+cbor"
    content_types = ("application/senml+cbor",)
    coap_formats = (112,)
    Options = SenmlOptions

    def decode_readings(
        self, payload: bytes, *, device_id: str | None, origin: Origin, now: float
    ) -> list[Reading]:
        doc = loads_cbor(payload)
        if not isinstance(doc, list):
            raise DecodeError("senml_error", "a SenML pack is an array of records")
        records: list[Any] = []
        for rec in doc:
            if not isinstance(rec, dict):
                raise DecodeError("senml_error", "a record is not a map")
            out: dict[str, Any] = {}
            for key, value in rec.items():
                if isinstance(key, int) and not isinstance(key, bool):
                    label = CBOR_LABELS.get(key)
                    if label is None:
                        # RFC 8428 §6: unknown labels are ignored unless must-understand;
                        # negative labels < -16 and labels > 8 are reserved for extensions.
                        continue
                    out[label] = value
                elif isinstance(key, str):
                    out[key] = value
                else:
                    raise DecodeError("senml_error", f"unknown label {key!r:.32}")
            records.append(out)
        return resolve_pack(
            records,
            device_id=device_id,
            origin=origin,
            now=now,
            separators=self.options.separators,
        )
