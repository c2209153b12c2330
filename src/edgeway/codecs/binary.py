"""Fixed-layout binary structs (Python :mod:`struct` formats).

Example (a LoRa-style frame: big-endian int16 temperature in 0.01 °C, uint16
humidity in 0.1 %, a float32 battery voltage, one pad byte, a uint8 status)::

    codec: binary
    codec_options:
      format: ">hHfxB"
      fields:
        - {name: temperature, scale: 0.01}
        - {name: humidity, scale: 0.1}
        - {name: battery_v}
        - {name: status}

``fields`` lists one entry per value the format produces (pad bytes ``x`` produce
none; ``4s`` produces one, decoded as UTF-8 text with trailing NULs removed). A
field named ``null`` (YAML ``~``) is read and dropped. ``value * scale + offset``
is stored; a field with neither stays an integer. ``device_id_field`` and
``timestamp_field`` name fields that carry the device id (text or number) and
the timestamp instead of a metric. ``records: true`` reads a payload that is a
sequence of such structs, one reading each. A payload of the wrong length is
refused (``bad_length``): a frame from another firmware version must not be
stored as plausible numbers.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

from pydantic import Field, model_validator

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
from edgeway.limits import DEFAULT_LIMITS, InputLimits
from edgeway.reading import MetricValue, Origin, Reading


class BinaryField(CodecOptions):
    """One value of the struct."""

    name: str | None
    scale: float | None = None
    offset: float | None = None


class BinaryOptions(CodecOptions):
    """Options of the ``binary`` codec."""

    format: str = Field(min_length=1)
    """A :mod:`struct` format, e.g. ``">hhf"`` (start with ``<``/``>``/``!`` to fix byte order)."""
    fields: list[BinaryField] = Field(min_length=1)
    device_id_field: str | None = None
    timestamp_field: str | None = None
    timestamp_unit: TimestampUnit = "auto"
    records: bool = False
    """The payload is a whole number of structs, one reading per struct."""

    @model_validator(mode="after")
    def _check_layout(self) -> BinaryOptions:
        try:
            st = struct.Struct(self.format)
        except struct.error as e:
            raise ValueError(f"format {self.format!r}: {e}") from None
        if st.size == 0:
            raise ValueError(f"format {self.format!r} reads no bytes")
        produced = len(st.unpack(bytes(st.size)))
        if produced != len(self.fields):
            raise ValueError(
                f"format {self.format!r} produces {produced} values but {len(self.fields)} "
                "fields are listed"
            )
        names = [f.name for f in self.fields if f.name is not None]
        if len(names) != len(set(names)):
            raise ValueError("field names must be unique")
        for key in ("device_id_field", "timestamp_field"):
            ref = getattr(self, key)
            if ref is not None and ref not in names:
                raise ValueError(f"{key} {ref!r} is not one of the fields")
        return self


@register_codec
class BinaryCodec(Codec):
    """Decodes fixed-layout binary frames with a :mod:`struct` format, names and scales."""

    name = "binary"
    content_types = ("application/octet-stream",)
    coap_formats = (42,)
    Options = BinaryOptions

    def __init__(
        self, options: Mapping[str, Any] | None = None, *, limits: InputLimits = DEFAULT_LIMITS
    ) -> None:
        super().__init__(options, limits=limits)
        opts: BinaryOptions = self.options
        self._struct = struct.Struct(opts.format)

    def decode_readings(
        self, payload: bytes, *, device_id: str | None, origin: Origin, now: float
    ) -> list[Reading]:
        size = self._struct.size
        if self.options.records:
            if not payload or len(payload) % size:
                raise DecodeError("bad_length", f"{len(payload)} bytes is not a multiple of {size}")
            frames = [payload[i : i + size] for i in range(0, len(payload), size)]
        else:
            if len(payload) != size:
                raise DecodeError("bad_length", f"expected {size} bytes, got {len(payload)}")
            frames = [payload]
        self.limits.check_reading_count(len(frames))  # before any work
        return [self._frame(f, device_id, origin, now) for f in frames]

    def _frame(self, frame: bytes, device_id: str | None, origin: Origin, now: float) -> Reading:
        opts: BinaryOptions = self.options
        values = self._struct.unpack(frame)
        metrics: dict[str, MetricValue] = {}
        ts = now
        dev = device_id
        for spec, raw in zip(opts.fields, values, strict=True):
            if spec.name is None:
                continue
            value: Any = raw
            if isinstance(raw, bytes):
                try:
                    value = raw.rstrip(b"\x00").decode("utf-8")
                except UnicodeDecodeError:
                    raise DecodeError("bad_utf8", f"field {spec.name!r}") from None
            elif spec.scale is not None or spec.offset is not None:
                value = float(raw) * (1.0 if spec.scale is None else spec.scale) + (
                    spec.offset or 0.0
                )
            if spec.name == opts.timestamp_field:
                ts = parse_timestamp(value, opts.timestamp_unit)
            elif spec.name == opts.device_id_field:
                if device_id is None:
                    dev = check_device_id(str(value) if not isinstance(value, str) else value)
            else:
                metrics[spec.name] = metric_value(value, spec.name)
        if dev is None:
            raise DecodeError(
                "no_device_id", "no device id from the address and no device_id_field"
            )
        if not metrics:
            raise DecodeError("no_metrics")
        return Reading(device_id=dev, ts=ts, metrics=metrics, origin=origin)
