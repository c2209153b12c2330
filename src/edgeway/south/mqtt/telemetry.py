"""Telemetry topics: which publishes enter the pipeline, and how they decode.

Configuration::

    mqtt:
      telemetry_topics:
        - "devices/{device_id}/telemetry"
        - "site/+/{device_id}/data"

``{device_id}`` is exactly one topic level and becomes the reading's device
id; ``+`` matches one level and ``#`` (last) any remainder, as in MQTT.

Payload (JSON, decoded with orjson)::

    {"temp": 21.5, "on": true, "mode": "auto", "ts": 1732550400.5, "msg_id": "m-17",
     "motor": {"rpm": 1200, "amps": 3.1}}

- metrics are numbers, booleans and strings; a nested object is flattened
  with ``.`` (``motor.rpm``), because the Reading model is flat and dotted
  names survive every sink; ``null`` values are skipped (a device saying "no
  value now"); arrays are refused (their meaning is not defined here);
- ``ts`` is optional: epoch seconds, milliseconds, microseconds or
  nanoseconds (picked by magnitude: a number above 1e11 is milliseconds, i.e.
  after 1973 in ms and after year 5138 in s) or an ISO 8601 string (no zone =
  UTC), read by the codecs' own :func:`~edgeway.codecs.base.parse_timestamp`;
  absent = arrival time;
- ``msg_id`` is optional and becomes ``Origin.message_id`` (MQTT v5
  correlation data wins when present);
- ``tags`` is optional: an object of short strings (``{"site": "north",
  "type": "boiler"}``) that becomes the reading's tags, which routes match on
  (``match.tags``, ``match.device_types`` reads the ``type`` tag); at most
  ``MAX_TAGS`` of them;
- an array of such objects is several readings from one message.

The readings of one payload must keep within the gateway's
:class:`~edgeway.limits.InputLimits` (``input_limits``: readings per message,
metrics per reading, name and string length, flattened size, plausible
timestamps), checked as for every codec; nested objects spend the flattened
size budget as they are flattened, so a payload that would expand beyond it
stops there.

A payload that fails is refused with a short reason (``invalid_json``,
``not_an_object``, ``bad_timestamp``, ``bad_tags``, ``unsupported_value``,
``no_metrics``, or a limit's: ``too_many_readings``, ``too_many_metrics``,
``name_too_long``, ``value_too_long``, ``too_large``, ``timestamp_out_of_range``)
that the broker counts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import orjson

from edgeway.codecs.base import parse_timestamp
from edgeway.limits import DEFAULT_LIMITS, DecodeError, FlattenBudget, InputLimits
from edgeway.reading import MetricValue, Origin, Reading
from edgeway.south.mqtt.topics import CACHED_TOPIC_MAX

TELEMETRY_CACHE_MAX = 100_000
"""Topics whose pattern match is remembered (positive or negative). A topic
is ~50 bytes; 100,000 covers a site's devices. Cleared whole when full.
Topics longer than :data:`~edgeway.south.mqtt.topics.CACHED_TOPIC_MAX` are not kept."""

MAX_TAGS = 32
"""Tags one reading may carry: tags are metadata for routing, not data; the
bound keeps a payload from turning into a large per-row tag blob."""

MAX_TAG_LENGTH = 256
"""Characters in one tag name or value."""

MAX_FLATTEN_DEPTH = 8
"""Nesting allowed in a metrics object; deeper is refused, which bounds the
work one payload can cause."""


TelemetryError = DecodeError
"""A telemetry payload that cannot become readings: the codecs' error, so
``reason`` counts the same way for every adapter."""


class _Pattern:
    __slots__ = ("device_index", "levels", "tail")

    def __init__(self, pattern: str) -> None:
        levels = pattern.split("/")
        self.tail = levels[-1] == "#"
        if self.tail:
            levels = levels[:-1]
        self.levels = levels
        idx = [i for i, lv in enumerate(levels) if lv == "{device_id}"]
        if len(idx) != 1:
            raise ValueError(f"telemetry topic {pattern!r} must contain {{device_id}} exactly once")
        self.device_index = idx[0]

    def match(self, levels: list[str]) -> str | None:
        n = len(self.levels)
        if len(levels) < n or (not self.tail and len(levels) != n):
            return None
        for i, want in enumerate(self.levels):
            got = levels[i]
            if i == self.device_index:
                if not got:
                    return None
            elif want != "+" and want != got:
                return None
        return levels[self.device_index]


class TelemetryTopics:
    """Matches topic names against the configured telemetry patterns."""

    __slots__ = ("_cache", "_patterns")

    def __init__(self, patterns: Sequence[str]) -> None:
        self._patterns = [_Pattern(p) for p in patterns]
        self._cache: dict[str, str | None] = {}

    def device_id(self, topic: str) -> str | None:
        """The device id if ``topic`` is a telemetry topic, else None."""
        cache = self._cache
        try:
            return cache[topic]
        except KeyError:
            pass
        result: str | None = None
        if not topic.startswith("$"):
            levels = topic.split("/")
            for p in self._patterns:
                result = p.match(levels)
                if result is not None:
                    break
        if len(topic) > CACHED_TOPIC_MAX:
            return result
        if len(cache) >= TELEMETRY_CACHE_MAX:
            cache.clear()
        cache[topic] = result
        return result


def _flatten(
    obj: dict[str, Any],
    prefix: str,
    out: dict[str, MetricValue],
    depth: int,
    limits: InputLimits,
    budget: FlattenBudget,
) -> None:
    # The limits act while names grow and leaves are added: a long prefix
    # repeated on many leaves stops at the limit instead of being built whole.
    max_name = limits.max_name_length
    for k, v in obj.items():
        name = prefix + k
        if len(name) > max_name:
            limits.check_name(name)
        t = type(v)
        if t is float or t is int or t is str or t is bool:
            if len(out) >= limits.max_metrics_per_reading:
                raise DecodeError("too_many_metrics", f"more than {limits.max_metrics_per_reading}")
            budget.spend(name, v)
            out[name] = v
        elif v is None:
            continue
        elif t is dict:
            if depth >= MAX_FLATTEN_DEPTH:
                raise TelemetryError("unsupported_value", f"{name!r}: nested too deep")
            _flatten(v, name + ".", out, depth + 1, limits, budget)
        else:
            raise TelemetryError("unsupported_value", f"{name!r}: {t.__name__}")


def reading_from(
    obj: Any,
    device_id: str,
    now: float,
    origin: Origin,
    correlation: str | None,
    limits: InputLimits = DEFAULT_LIMITS,
    budget: FlattenBudget | None = None,
) -> Reading:
    """One reading from one decoded JSON object (see :func:`decode_telemetry`),
    or raise :class:`TelemetryError`.

    Only flattening is limited here (``budget``: the message's, or a fresh
    one); the caller applies :meth:`InputLimits.check_readings` to the result."""
    if type(obj) is not dict:
        raise TelemetryError("not_an_object", type(obj).__name__)
    if obj and "ts" not in obj and "msg_id" not in obj and "tags" not in obj:
        # The usual payload, a flat object of numbers, booleans and strings,
        # is its own metrics dict: orjson built it for us alone, so no copy.
        for v in obj.values():
            t = type(v)
            if not (t is float or t is int or t is str or t is bool):
                break
        else:
            if correlation is not None:
                origin = Origin(origin.adapter, origin.address, origin.client_id, correlation)
            return Reading(device_id, now, obj, origin)
    ts = now
    msg_id: str | None = None
    tags: dict[str, str] | None = None
    metrics: dict[str, MetricValue] = {}
    # One pass over the top level (the hot path: flat objects of numbers).
    for k, v in obj.items():
        if k == "ts":
            ts = parse_timestamp(v)
            continue
        if k == "msg_id":
            if v is not None:
                msg_id = str(v)
            continue
        if k == "tags":
            tags = _tags(v)
            continue
        t = type(v)
        if t is float or t is int or t is str or t is bool:
            metrics[k] = v
        elif v is None:
            continue
        elif t is dict:
            if budget is None:
                budget = limits.budget()
            _flatten(v, k + ".", metrics, 1, limits, budget)
        else:
            raise TelemetryError("unsupported_value", f"{k!r}: {t.__name__}")
    if not metrics:
        raise TelemetryError("no_metrics")
    if correlation is not None:
        msg_id = correlation
    if msg_id is not None:
        origin = Origin(origin.adapter, origin.address, origin.client_id, msg_id)
    if tags:
        return Reading(device_id, ts, metrics, origin, tags)
    return Reading(device_id, ts, metrics, origin)


def _tags(v: Any) -> dict[str, str] | None:
    """The ``tags`` object of a payload: string (or number/bool) values only."""
    if v is None:
        return None
    if type(v) is not dict:
        raise TelemetryError("bad_tags", f"tags must be an object, not {type(v).__name__}")
    if len(v) > MAX_TAGS:
        raise TelemetryError("bad_tags", f"more than {MAX_TAGS} tags")
    out: dict[str, str] = {}
    for name, value in v.items():
        t = type(value)
        if t is str:
            text = value
        elif t is int or t is float or t is bool:
            text = orjson.dumps(value).decode()
        else:
            raise TelemetryError("bad_tags", f"tag {name[:32]!r}: {t.__name__}")
        if len(name) > MAX_TAG_LENGTH or len(text) > MAX_TAG_LENGTH:
            raise TelemetryError("bad_tags", f"tag {name[:32]!r}: longer than {MAX_TAG_LENGTH}")
        out[name] = text
    return out


def decode_telemetry(
    payload: bytes,
    device_id: str,
    topic: str,
    client_id: str,
    correlation_data: bytes | None = None,
    origin: Origin | None = None,
    limits: InputLimits = DEFAULT_LIMITS,
) -> list[Reading]:
    """Decode one telemetry payload into readings within ``limits``, or raise
    :class:`TelemetryError`.

    ``origin`` may be passed in (``Origin("mqtt", topic, client_id)``) by a
    caller that caches it per topic: it is immutable and costs more to build
    than the rest of a small reading.
    """
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError as e:
        raise TelemetryError("invalid_json", str(e)[:80]) from None
    now = time.time()
    if origin is None:
        origin = Origin("mqtt", topic, client_id)
    correlation: str | None = None
    if correlation_data is not None:
        try:
            correlation = correlation_data.decode("utf-8")
        except UnicodeDecodeError:
            correlation = correlation_data.hex()
    budget = limits.budget()
    if isinstance(data, list):
        if not data:
            raise TelemetryError("no_metrics", "empty array")
        limits.check_reading_count(len(data))  # before any work
        readings = [
            reading_from(o, device_id, now, origin, correlation, limits, budget) for o in data
        ]
    else:
        readings = [reading_from(data, device_id, now, origin, correlation, limits, budget)]
    # Every string value is a token of the payload: its length bounds them all.
    return limits.check_readings(readings, now, len(payload))
