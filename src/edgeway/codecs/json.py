"""JSON telemetry with field mapping.

Example::

    codec: json
    codec_options:
      device_id: meta.serial          # JMESPath; used when the address names no device
      timestamp: time                 # JMESPath to the timestamp (absent: receive time)
      timestamp_unit: ms              # auto | s | ms | us | ns | iso8601
      metrics:                        # metric name -> JMESPath (absent: every other field)
        temperature: sensors[?kind=='t'].value | [0]
        humidity: sensors[?kind=='h'].value | [0]

A payload is one reading object or an array of them. Without ``metrics``,
every field of the object except the device id, timestamp and message id
fields becomes a metric; nested objects are flattened with ``separator``
(``{"AM2301": {"Temperature": 21}}`` gives ``AM2301.Temperature``); ``null``
and arrays are skipped (Zigbee2MQTT reports unknown values as ``null``). If the
object has a ``metrics`` key holding an object and ``values`` is not set, that
object holds the metrics: ``{"ts": 1700000000, "metrics": {"temp": 21.5}}``.

Paths that are plain field names (``time``, ``device_id``) are read with a
dictionary lookup; anything else is a compiled JMESPath expression. Timestamps
may be epoch seconds, milliseconds, microseconds or nanoseconds (``auto``
picks by magnitude) or ISO 8601 strings.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jmespath
import jmespath.exceptions
import orjson
from pydantic import Field, field_validator

from edgeway.codecs.base import (
    Codec,
    CodecOptions,
    DecodeError,
    TimestampUnit,
    check_device_id,
    metric_value,
    parse_timestamp,
    register_codec,
)
from edgeway.limits import DEFAULT_LIMITS, FlattenBudget, InputLimits
from edgeway.reading import MetricValue, Origin, Reading

MAX_DEPTH = 8
"""Deepest nesting flattened into metric names. Device payloads nest two or
three levels (Tasmota ``ENERGY.Total``); deeper structures are data dumps,
and each level makes a longer metric name in every stored row."""

MAX_TAG_LENGTH = 256
"""Longest tag name or value taken from a payload. Tags are labels (site,
type, firmware), stored with every record a route produces; a longer value is
a payload mistake, refused (``bad_tag``) rather than copied into every row."""

_PLAIN_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

Getter = Callable[[Any], Any]


def compile_path(path: str) -> Getter:
    """A getter for a JMESPath expression; a plain field name is a dict lookup (fast path)."""
    if _PLAIN_FIELD.match(path):

        def get_field(obj: Any) -> Any:
            return obj.get(path) if isinstance(obj, dict) else None

        return get_field
    expr = jmespath.compile(path)

    def get_path(obj: Any) -> Any:
        try:
            return expr.search(obj)
        except (jmespath.exceptions.JMESPathError, TypeError, ValueError) as e:
            # Functions in an expression (sum, max, ...) meet types the payload chose.
            raise DecodeError("mapping_error", f"{path}: {e}") from None

    return get_path


def _check_path(value: str | None) -> str | None:
    if value is not None:
        try:
            jmespath.compile(value)
        except jmespath.exceptions.JMESPathError as e:
            raise ValueError(f"not a JMESPath expression: {value!r} ({e})") from None
    return value


class JsonOptions(CodecOptions):
    """Options of the ``json`` and ``cbor`` codecs."""

    device_id: str | None = "device_id"
    """JMESPath to the device id; only used when the adapter's address names no device."""
    timestamp: str | None = "ts"
    """JMESPath to the timestamp; absent field: the receive time."""
    timestamp_unit: TimestampUnit = "auto"
    message_id: str | None = "msg_id"
    """JMESPath to the device's own message id (named back in receipts)."""
    values: str | None = None
    """JMESPath to the object whose fields are the metrics (default: the reading object)."""
    metrics: dict[str, str] | None = None
    """Metric name -> JMESPath. Absent: every field (see module doc)."""
    exclude: list[str] = Field(default_factory=list)
    """Field names never taken as metrics when ``metrics`` is absent."""
    records: str | None = None
    """JMESPath to the list of reading objects inside an envelope (e.g. ``data``)."""
    separator: str = Field(default=".", min_length=1, max_length=4)
    tags: dict[str, str] = Field(default_factory=dict)
    """Tag name -> JMESPath. Strings, numbers and booleans found there become the
    reading's tags (routes match them: ``match.tags``; ``match.device_types``
    reads the ``type`` tag), not metrics. An absent or null field sets no tag."""

    _check = field_validator("device_id", "timestamp", "message_id", "values", "records")(
        _check_path
    )

    @field_validator("tags")
    @classmethod
    def _check_tags(cls, v: dict[str, str]) -> dict[str, str]:
        for name, path in v.items():
            if not name or len(name) > MAX_TAG_LENGTH:
                raise ValueError(f"tag names are 1 to {MAX_TAG_LENGTH} characters: {name!r}")
            _check_path(path)
        return v

    @field_validator("metrics")
    @classmethod
    def _check_metrics(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is not None:
            if not v:
                raise ValueError("needs at least one metric (or leave it out)")
            for path in v.values():
                _check_path(path)
        return v


class ObjectMapper:
    """Turns decoded JSON-like objects into readings according to :class:`JsonOptions`.

    Shared by the ``json`` and ``cbor`` codecs and by adapter presets.
    """

    def __init__(self, options: JsonOptions, limits: InputLimits = DEFAULT_LIMITS) -> None:
        self.options = options
        self.limits = limits
        self._device_id = compile_path(options.device_id) if options.device_id else None
        self._ts = compile_path(options.timestamp) if options.timestamp else None
        self._msg_id = compile_path(options.message_id) if options.message_id else None
        self._values = compile_path(options.values) if options.values else None
        self._records = compile_path(options.records) if options.records else None
        self._metrics = (
            {name: compile_path(p) for name, p in options.metrics.items()}
            if options.metrics
            else None
        )
        self._tags = {name: compile_path(p) for name, p in options.tags.items()}
        # Fields that name the device, time, message or a tag are not metrics.
        reserved = set(options.exclude)
        for p in (options.device_id, options.timestamp, options.message_id, *options.tags.values()):
            if p and _PLAIN_FIELD.match(p):
                reserved.add(p)
        self._reserved = frozenset(reserved)

    def map(self, doc: Any, *, device_id: str | None, origin: Origin, now: float) -> list[Reading]:
        """Map a decoded document (an object or an array of objects) to readings."""
        if self._records is not None:
            doc = self._records(doc)
            if doc is None:
                raise DecodeError("no_records", f"{self.options.records} not found")
        budget = self.limits.budget()
        if isinstance(doc, dict):
            return [
                self.map_object(doc, device_id=device_id, origin=origin, now=now, budget=budget)
            ]
        if isinstance(doc, list):
            if not doc:
                raise DecodeError("empty_array")
            self.limits.check_reading_count(len(doc))  # before any work
            return [
                self.map_object(o, device_id=device_id, origin=origin, now=now, budget=budget)
                for o in doc
            ]
        raise DecodeError("not_an_object", f"expected an object or array, got {_kind(doc)}")

    def map_object(
        self,
        obj: Any,
        *,
        device_id: str | None,
        origin: Origin,
        now: float,
        budget: FlattenBudget | None = None,
    ) -> Reading:
        """Map one reading object; nested objects spend ``budget`` (the message's) as they flatten."""
        if budget is None:
            budget = self.limits.budget()
        if not isinstance(obj, dict):
            raise DecodeError("not_an_object", f"expected an object, got {_kind(obj)}")
        if device_id is None:
            device_id = check_device_id(self._device_id(obj) if self._device_id else None)
        ts = now
        if self._ts is not None:
            raw_ts = self._ts(obj)
            if raw_ts is not None:
                ts = parse_timestamp(raw_ts, self.options.timestamp_unit)
        if self._msg_id is not None:
            mid = self._msg_id(obj)
            if mid is not None and isinstance(mid, str | int) and not isinstance(mid, bool):
                origin = dataclasses.replace(origin, message_id=str(mid))
        metrics: dict[str, MetricValue] = {}
        if self._metrics is not None:
            for name, get in self._metrics.items():
                self._add(metrics, name, get(obj), 0, budget)
        else:
            source = obj
            if self._values is not None:
                source = self._values(obj)
            elif isinstance(obj.get("metrics"), dict):
                source = obj["metrics"]
            if not isinstance(source, dict):
                raise DecodeError(
                    "not_an_object", f"metrics: expected an object, got {_kind(source)}"
                )
            reserved = self._reserved if source is obj else frozenset()
            for key, value in source.items():
                if not isinstance(key, str):
                    raise DecodeError("bad_key", f"metric names are strings, got {_kind(key)}")
                if key not in reserved:
                    self._add(metrics, key, value, 0, budget)
        if not metrics:
            raise DecodeError("no_metrics")
        if not self._tags:
            return Reading(device_id=device_id, ts=ts, metrics=metrics, origin=origin)
        return Reading(
            device_id=device_id, ts=ts, metrics=metrics, origin=origin, tags=self._read_tags(obj)
        )

    def _read_tags(self, obj: dict[str, Any]) -> dict[str, str]:
        tags: dict[str, str] = {}
        for name, get in self._tags.items():
            value = get(obj)
            if value is None:
                continue
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, str | int | float):
                text = str(value)
            else:
                raise DecodeError("bad_tag", f"{name}: expected a string, got {_kind(value)}")
            if len(text) > MAX_TAG_LENGTH:
                raise DecodeError("bad_tag", f"{name}: longer than {MAX_TAG_LENGTH} characters")
            tags[name] = text
        return tags

    def _add(
        self, out: dict[str, MetricValue], name: str, value: Any, depth: int, budget: FlattenBudget
    ) -> None:
        # Limits are checked as names grow and leaves are added (not on the
        # result): a long prefix repeated on many leaves stops at the limit.
        if value is None or isinstance(value, list):
            return
        limits = self.limits
        if len(name) > limits.max_name_length:
            limits.check_name(name)
        if isinstance(value, dict):
            if depth >= MAX_DEPTH:
                raise DecodeError("too_deep", f"{name!r}: nested deeper than {MAX_DEPTH}")
            sep = self.options.separator
            for key, sub in value.items():
                if not isinstance(key, str):
                    raise DecodeError("bad_key", f"metric names are strings, got {_kind(key)}")
                self._add(out, f"{name}{sep}{key}", sub, depth + 1, budget)
            return
        if len(out) >= limits.max_metrics_per_reading and name not in out:
            raise DecodeError("too_many_metrics", f"more than {limits.max_metrics_per_reading}")
        out[name] = v = metric_value(value, name)
        budget.spend(name, v)


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def loads_json(payload: bytes) -> Any:
    """Parse JSON (orjson: strict RFC 8259, UTF-8, nesting limit 1024)."""
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError as e:
        raise DecodeError("invalid_json", str(e)[:200]) from None


@register_codec
class JsonCodec(Codec):
    """JSON reading objects (or arrays of them) with optional JMESPath field mapping."""

    name = "json"
    content_types: ClassVar[tuple[str, ...]] = ("application/json", "text/json")
    coap_formats = (50,)
    Options = JsonOptions

    def __init__(
        self, options: Mapping[str, Any] | None = None, *, limits: InputLimits = DEFAULT_LIMITS
    ) -> None:
        super().__init__(options, limits=limits)
        self.mapper = ObjectMapper(self.options, self.limits)

    def decode_readings(
        self, payload: bytes, *, device_id: str | None, origin: Origin, now: float
    ) -> list[Reading]:
        return self.mapper.map(loads_json(payload), device_id=device_id, origin=origin, now=now)
