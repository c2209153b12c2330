"""Plain-text payloads: one number, boolean or string per message.

Example (Tasmota ``stat/{device}/POWER`` says ``ON``; a sensor publishes ``21.5``
on ``home/{device_id}/temperature``)::

    codec: plain
    codec_options:
      metric: temperature        # the metric name (required)
      type: number               # auto | number | bool | string

``auto`` reads an integer, then a decimal number, then ``true``/``false``/
``on``/``off`` (any case) as a boolean, and otherwise keeps the text. ``number``
and ``bool`` refuse anything else (``not_a_number``, ``not_a_bool``), so a
sensor that starts sending ``ERR`` is counted, not stored. Surrounding
whitespace is ignored. The device id must come from the address.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from edgeway.codecs.base import (
    Codec,
    CodecOptions,
    DecodeError,
    metric_value,
    register_codec,
)
from edgeway.reading import MetricValue, Origin, Reading

_TRUE = frozenset({"true", "on", "yes"})
_FALSE = frozenset({"false", "off", "no"})


class PlainOptions(CodecOptions):
    """Options of the ``plain`` codec."""

    metric: str = Field(min_length=1, max_length=256)
    type: Literal["auto", "number", "bool", "string"] = "auto"


def _as_number(text: str) -> int | float | None:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _as_bool(text: str) -> bool | None:
    low = text.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    return None


@register_codec
class PlainCodec(Codec):
    """One value per message; the metric name comes from the options."""

    name = "plain"
    content_types = ("text/plain",)
    coap_formats = (0,)
    Options = PlainOptions

    def decode_readings(
        self, payload: bytes, *, device_id: str | None, origin: Origin, now: float
    ) -> list[Reading]:
        opts: PlainOptions = self.options
        if device_id is None:
            raise DecodeError("no_device_id", "a plain payload does not name its device")
        try:
            text = payload.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise DecodeError("bad_utf8") from None
        if not text:
            raise DecodeError("empty_payload")
        value: MetricValue | None
        if opts.type == "string":
            value = text
        elif opts.type == "number":
            value = _as_number(text)
            if value is None:
                raise DecodeError("not_a_number", f"{text[:32]!r}")
        elif opts.type == "bool":
            value = _as_bool(text)
            if value is None:
                raise DecodeError("not_a_bool", f"{text[:32]!r}")
        else:
            value = _as_number(text)
            if value is None:
                value = _as_bool(text)
            if value is None:
                value = text
        return [
            Reading(
                device_id=device_id,
                ts=now,
                metrics={opts.metric: metric_value(value, opts.metric)},
                origin=origin,
            )
        ]
