"""One set of limits on what a device message may turn into, for every adapter and codec.

Configuration (top level, for every adapter; an adapter's own ``input_limits``
overrides single keys)::

    input_limits:
      max_readings_per_message: 10000
      max_metrics_per_reading: 1024
      max_name_length: 256
      max_string_length: 4096
      max_flattened_size: 1MiB
      max_timestamp_age: 3650d
      max_timestamp_ahead: 1h
    http_ingest:
      input_limits: {max_readings_per_message: 100}

Every path from payload bytes to readings ends in
:meth:`InputLimits.check_readings` (the codecs' :meth:`Codec.decode
<edgeway.codecs.base.Codec.decode>`, the embedded broker's telemetry decoder
and its byte-level fast path). Flattening nested objects, the one place where
a small payload can grow (a long key prefix repeated on every leaf), spends a
:class:`FlattenBudget` as it goes, so it stops within the limit instead of
building the whole thing first. A refused message raises :class:`DecodeError`
with a stable reason: ``too_many_readings``, ``too_many_metrics``,
``name_too_long``, ``value_too_long``, ``too_large``,
``timestamp_out_of_range``; adapters count it and answer with their protocol's
refusal (MQTT v5 PUBACK 0x99, HTTP 400, CoAP 4.00).

Sizes are in characters (Python string lengths): a metric name and a string
value count their length, a number or a boolean :data:`VALUE_SIZE`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from edgeway.reading import Reading

VALUE_SIZE = 8
"""What a number or a boolean counts towards the flattened size: a float64,
as sinks store it."""


class DecodeError(ValueError):
    """A payload that does not decode. `reason` is a short stable slug used as a counter label
    (e.g. "invalid_json", "not_an_object", "bad_timestamp", "cbor_error", "too_large")."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass(frozen=True, slots=True)
class InputLimits:
    """What one device message may expand to; see the module docstring."""

    max_readings_per_message: int = 10_000
    """SenML packs, JSON arrays and Sparkplug births carry several readings;
    one message is one ingest submission, held in memory until the outbox
    commits it. 10,000 is a day of 10 s samples sent in one go."""
    max_metrics_per_reading: int = 1024
    """A Zigbee2MQTT or Tasmota message has tens of metrics; a Sparkplug
    birth a few hundred. More is a data dump, and every metric is a column or
    a field in every sink."""
    max_name_length: int = 256
    """Characters in a metric name, after nested objects are flattened into
    dotted names. Names are repeated in every stored row; 256 is the longest
    tag name most time-series databases take (InfluxDB keys 64 KiB, but
    Prometheus and TimescaleDB users keep them far shorter)."""
    max_string_length: int = 4096
    """Characters in a string value. Telemetry strings are states and short
    labels; a longer one is almost always a payload meant for another topic."""
    max_flattened_size: int = 1 << 20
    """Characters of metric names and string values (plus ``VALUE_SIZE`` per
    number) over all readings of one message: what it costs in the outbox and
    on every sink. 1 MiB matches the broker's default maximum packet size, so
    a message is never stored larger than it could have been sent; flattening
    ``{"k..256": {"a": 1, "b": 1, ...}}`` would otherwise store ~40 times its size."""
    max_timestamp_age: float = 3650 * 86400.0
    """Seconds a reading's time may lie before the gateway's clock: 10 years
    takes any backfill from a logger, and refuses the 1970 of a device whose
    clock was never set."""
    max_timestamp_ahead: float = 3600.0
    """Seconds a reading's time may lie after the gateway's clock. An hour
    covers drift and a wrong daylight-saving setting; beyond, the device's
    clock is wrong, and one such reading would sort after a day of correct
    ones in every sink. (The window step also caps what one future reading
    can do to lateness.)"""
    unchecked_payload_size: int = dataclasses.field(init=False, repr=False, compare=False)
    """Largest JSON payload whose flat readings cannot break a limit other
    than the timestamp's (every name and string is shorter than the payload,
    and a metric takes at least 4 bytes of it): the broker's fast path skips
    the per-metric check below it. Derived; not configurable."""

    def __post_init__(self) -> None:
        size = min(self.max_name_length, self.max_string_length, 4 * self.max_metrics_per_reading)
        # n <= size / 4 metrics of at most size + VALUE_SIZE characters each.
        while size > 0 and (size // 4) * (size + VALUE_SIZE) > self.max_flattened_size:
            size //= 2
        object.__setattr__(self, "unchecked_payload_size", size)

    def budget(self) -> FlattenBudget:
        """A fresh flattened-size budget for one message."""
        return FlattenBudget(self.max_flattened_size)

    def check_timestamp(self, ts: float, now: float) -> None:
        """:class:`DecodeError` ``timestamp_out_of_range`` unless ``ts`` is plausible at ``now``."""
        if not now - self.max_timestamp_age <= ts <= now + self.max_timestamp_ahead:
            raise DecodeError(
                "timestamp_out_of_range",
                f"{ts:.0f} is {ts - now:+.0f} s from the gateway's clock "
                f"(allowed -{self.max_timestamp_age:.0f} to +{self.max_timestamp_ahead:.0f})",
            )

    def check_reading_count(self, count: int) -> None:
        """:class:`DecodeError` ``too_many_readings`` when one message holds more than
        :attr:`max_readings_per_message`; decoders call it before decoding the items."""
        if count > self.max_readings_per_message:
            raise DecodeError("too_many_readings", f"{count} > {self.max_readings_per_message}")

    def check_name(self, name: str) -> None:
        """:class:`DecodeError` ``name_too_long`` for a metric name (or a flattening prefix)."""
        if len(name) > self.max_name_length:
            raise DecodeError(
                "name_too_long",
                f"{name[:64]!r}...: {len(name)} characters > {self.max_name_length}",
            )

    def check_readings(
        self, readings: list[Reading], now: float, text_bound: int | None = None
    ) -> list[Reading]:
        """Check every limit on the readings of one message; return them, or raise
        :class:`DecodeError`. Work is linear in the metrics, and stops at the
        first one over a limit.

        ``text_bound``, when given, is at least the characters of all string
        values together (a JSON payload's length: every string value is a
        token of it); then, when it alone proves the string and size limits,
        the values are not looked at, only counted (the broker's hot path)."""
        if text_bound is not None and self._within(readings, now, text_bound):
            return readings
        self.check_reading_count(len(readings))
        max_metrics = self.max_metrics_per_reading
        max_name = self.max_name_length
        max_string = self.max_string_length
        size = 0
        for r in readings:
            if r.ts != now:
                self.check_timestamp(r.ts, now)
            metrics = r.metrics
            if len(metrics) > max_metrics:
                raise DecodeError("too_many_metrics", f"{len(metrics)} > {max_metrics}")
            for name, value in metrics.items():
                if len(name) > max_name:
                    self.check_name(name)
                if type(value) is str:
                    if len(value) > max_string:
                        raise DecodeError(
                            "value_too_long", f"{name[:64]!r}: {len(value)} characters"
                        )
                    size += len(name) + len(value)
                else:
                    size += len(name) + VALUE_SIZE
            for key, text in r.tags.items():
                size += len(key) + len(text)
            if size > self.max_flattened_size:
                raise DecodeError(
                    "too_large", f"flattened size over {self.max_flattened_size} characters"
                )
        return readings

    def flat_object_within(self, metrics: dict[str, Any], payload_size: int) -> bool:
        """True when ``metrics``, a JSON object of ``payload_size`` bytes that is its
        own reading (numbers, booleans and strings only, no nesting), keeps every
        limit but the timestamp's. Its names and strings are tokens of the
        payload, so its length bounds them all together; one name can be no
        longer than the payload less 5 bytes per metric (``"":0,`` for each
        other one, braces, quotes, colon and value for its own), and only when
        that allows a name too long are the names measured (in C). False: use
        :meth:`check_readings`."""
        n = len(metrics)
        max_name = self.max_name_length
        return (
            n <= self.max_metrics_per_reading
            and payload_size <= self.max_string_length
            and payload_size + VALUE_SIZE * n <= self.max_flattened_size
            and (payload_size - 5 * n <= max_name or max(map(len, metrics)) <= max_name)
        )

    def _within(self, readings: list[Reading], now: float, text_bound: int) -> bool:
        """True when every limit holds, judged from name lengths (summed in C),
        counts and ``text_bound``; False when that cannot tell (the exact check
        then decides and names the limit)."""
        if text_bound > self.max_string_length:
            return False
        if len(readings) > self.max_readings_per_message:
            return False
        max_name = self.max_name_length
        low = now - self.max_timestamp_age
        high = now + self.max_timestamp_ahead
        size = text_bound
        for r in readings:
            metrics = r.metrics
            names = sum(map(len, metrics))
            if (
                len(metrics) > self.max_metrics_per_reading
                or (names > max_name and max(map(len, metrics)) > max_name)
                or not low <= r.ts <= high
                or r.tags
            ):
                return False
            size += names + VALUE_SIZE * len(metrics)
        return size <= self.max_flattened_size


class FlattenBudget:
    """Characters a message may still flatten into (see :attr:`InputLimits.max_flattened_size`).

    Spent leaf by leaf while nested objects are flattened, so a payload that
    would expand beyond the limit is refused after at most that much work."""

    __slots__ = ("left",)

    def __init__(self, size: int) -> None:
        self.left = size

    def spend(self, name: str, value: object) -> None:
        """Count one flattened metric; :class:`DecodeError` ``too_large`` when over."""
        self.left -= len(name) + (len(value) if type(value) is str else VALUE_SIZE)
        if self.left < 0:
            raise DecodeError("too_large", "nested objects flatten beyond max_flattened_size")


DEFAULT_LIMITS = InputLimits()
"""The limits an adapter or codec uses when its configuration names none."""
