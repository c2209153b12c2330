"""The codec interface: payload bytes in, :class:`~edgeway.reading.Reading`s out.

Example (a codec is named wherever an adapter takes a payload; ``options`` are
the codec's own settings, validated when the adapter starts)::

    mqtt_client:
      - name: plant
        url: mqtt://broker.plant.local:1883
        subscriptions:
          - topic: "plant/+/sensors/{device_id}"
            codec: json
            codec_options:
              timestamp: {field: time, unit: ms}

A codec is sans-IO and synchronous: ``decode`` gets the payload and what the
adapter knows (the device id from the address, if any; the origin; the
current time), and returns readings or raises :class:`DecodeError` with a
short, stable ``reason`` that adapters count per adapter and device. A codec
never raises anything else for bad input (every decoder has a hypothesis test
that feeds it arbitrary bytes).

Codecs register with :func:`register_codec`; :func:`get_codec` builds one by
name with validated options. ``content_types`` and ``coap_formats`` let HTTP
and CoAP adapters pick a codec from the request's Content-Type or
Content-Format.
"""

from __future__ import annotations

import abc
import datetime as _dt
import math
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

# DecodeError is defined with the limits (a refused limit raises it too) and
# re-exported here, where every codec and adapter has always imported it from.
from edgeway.limits import DEFAULT_LIMITS, InputLimits
from edgeway.limits import DecodeError as DecodeError
from edgeway.reading import MetricValue, Origin, Reading

MAX_DEVICE_ID_LENGTH = 128
"""Same bound as ``gateway.id``: ids travel in every record and topic."""


class NoOptions(BaseModel):
    """Options model of a codec that takes none."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class CodecOptions(BaseModel):
    """Base for codec option models: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


_O = TypeVar("_O", bound=BaseModel)


def validate_options(model: type[_O], options: Mapping[str, Any] | None, codec: str) -> _O:
    """Validate ``options`` against ``model``; a :class:`ValueError` names the key at fault."""
    try:
        return model.model_validate(dict(options or {}))
    except ValidationError as e:
        parts = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(options)"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            parts.append(f"{key}: {msg}")
        raise ValueError(f"codec {codec!r} options: " + "; ".join(parts)) from None


class Codec(abc.ABC):
    """Turns one payload into readings.

    Subclasses set ``name``, ``content_types``, ``coap_formats`` and
    ``Options`` (a pydantic model with ``extra="forbid"``), and implement
    :meth:`decode`. Instances may keep state (the Sparkplug codec learns metric
    aliases from births), so an adapter builds one instance per subscription
    or endpoint and never shares it between gateways.
    """

    name: ClassVar[str]
    content_types: ClassVar[tuple[str, ...]] = ()
    coap_formats: ClassVar[tuple[int, ...]] = ()
    Options: ClassVar[type[BaseModel]] = NoOptions

    def __init__(
        self, options: Mapping[str, Any] | None = None, *, limits: InputLimits = DEFAULT_LIMITS
    ) -> None:
        self.options: Any = validate_options(self.Options, options, self.name)
        self.limits = limits

    def decode(
        self, payload: bytes, *, device_id: str | None, origin: Origin, now: float
    ) -> list[Reading]:
        """Decode one payload. ``device_id`` None: take it from the payload.

        Raises :class:`DecodeError` (and nothing else) when the payload is bad
        or its readings break one of :attr:`limits` (checked here for every codec).
        """
        readings = self.decode_readings(payload, device_id=device_id, origin=origin, now=now)
        return self.limits.check_readings(readings, now)

    @abc.abstractmethod
    def decode_readings(
        self, payload: bytes, *, device_id: str | None, origin: Origin, now: float
    ) -> list[Reading]:
        """The codec's own decoding (:meth:`decode` applies the limits to its result)."""


_REGISTRY: dict[str, type[Codec]] = {}
_C = TypeVar("_C", bound=type[Codec])


def register_codec(cls: _C) -> _C:
    """Class decorator: register a codec type under its ``name``."""
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin() -> None:
    import edgeway.codecs  # noqa: F401  (imports and registers the built-in codecs)


def codec_names() -> list[str]:
    """Names of every registered codec, sorted."""
    _load_builtin()
    return sorted(_REGISTRY)


def codec_class(name: str) -> type[Codec]:
    """The codec type registered as ``name``; :class:`KeyError` naming the known ones."""
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown codec {name!r}; known codecs: {', '.join(sorted(_REGISTRY))}"
        ) from None


def get_codec(
    name: str, options: Mapping[str, Any] | None = None, *, limits: InputLimits = DEFAULT_LIMITS
) -> Codec:
    """Build codec ``name`` with ``options`` and input ``limits``.

    :class:`KeyError` for an unknown name, :class:`ValueError` for bad options
    (the message names the key).
    """
    return codec_class(name)(options, limits=limits)


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def codec_for_content_type(content_type: str) -> type[Codec] | None:
    """The codec for an HTTP Content-Type (parameters such as charset ignored)."""
    _load_builtin()
    media = _media_type(content_type)
    for cls in _REGISTRY.values():
        if media in cls.content_types:
            return cls
    return None


def codec_for_coap_format(fmt: int) -> type[Codec] | None:
    """The codec for a CoAP Content-Format number (RFC 7252 §12.3 registry)."""
    _load_builtin()
    for cls in _REGISTRY.values():
        if fmt in cls.coap_formats:
            return cls
    return None


# --------------------------------------------------------------------------
# helpers shared by the codecs

TimestampUnit = Literal["auto", "s", "ms", "us", "ns", "iso8601"]

_UNIT_SCALE = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}

# "auto" picks the unit by magnitude. Epoch seconds pass 1e11 in the year 5138,
# milliseconds pass 1e14 in 5138 too, so the thresholds never misread a
# plausible timestamp of one unit as another.
_AUTO_THRESHOLDS = ((1e17, 1e-9), (1e14, 1e-6), (1e11, 1e-3))

MAX_TIMESTAMP = 253402300800.0
"""9999-12-31T23:59:59Z + 1 s: the largest instant ISO 8601 (and most sinks) can carry."""


def parse_timestamp(value: Any, unit: TimestampUnit = "auto") -> float:
    """Turn a timestamp (epoch number in ``unit``, or an ISO 8601 string) into epoch seconds.

    Naive ISO 8601 times are taken as UTC. :class:`DecodeError` ``bad_timestamp``
    for anything else, for a negative time and for one beyond year 9999.
    """
    t = type(value)
    if unit == "auto" and (t is float or (t is int and -(2**63) < value < 2**63)):
        # The usual case (a JSON number), without the general path's isinstance
        # chain: the broker's fast path reads a "ts" per message.
        seconds = float(value)
        magnitude = abs(seconds)
        if magnitude >= 1e11:
            seconds *= 1e-3 if magnitude < 1e14 else 1e-6 if magnitude < 1e17 else 1e-9
        if not 0 <= seconds < MAX_TIMESTAMP:  # NaN fails too
            raise DecodeError("bad_timestamp", f"out of range: {value!r:.64}")
        return seconds
    if isinstance(value, bool):
        raise DecodeError("bad_timestamp", "a boolean is not a timestamp")
    if isinstance(value, _dt.datetime):  # CBOR tag 0/1 decode to datetime
        when = value if value.tzinfo is not None else value.replace(tzinfo=_dt.UTC)
        try:
            ts = when.timestamp()
        except (OverflowError, ValueError, OSError):
            raise DecodeError("bad_timestamp", "datetime out of range") from None
    elif isinstance(value, str):
        text = value.strip()
        if unit != "iso8601":
            try:
                number = float(text)
            except ValueError:
                number = None
            if number is not None:
                return parse_timestamp(number, unit)
        try:
            when = _dt.datetime.fromisoformat(text.replace("z", "Z"))
        except ValueError:
            raise DecodeError("bad_timestamp", f"not ISO 8601: {value[:64]!r}") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=_dt.UTC)
        ts = when.timestamp()
    elif isinstance(value, int | float):
        if unit == "iso8601":
            raise DecodeError("bad_timestamp", "expected an ISO 8601 string")
        number = float(value) if not isinstance(value, int) or abs(value) < 2**63 else math.inf
        if unit == "auto":
            scale = 1.0
            for threshold, s in _AUTO_THRESHOLDS:
                if abs(number) >= threshold:
                    scale = s
                    break
        else:
            scale = _UNIT_SCALE[unit]
        ts = number * scale
    else:
        raise DecodeError("bad_timestamp", f"expected a number or a string, got {_kind(value)}")
    if not math.isfinite(ts) or ts < 0 or ts >= MAX_TIMESTAMP:
        raise DecodeError("bad_timestamp", f"out of range: {value!r:.64}")
    return ts


def metric_value(value: Any, name: str) -> MetricValue:
    """Check one metric value: a finite number, a bool or a string (its length is one of
    the :class:`~edgeway.limits.InputLimits`, checked on the whole message)."""
    if isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        # Integers beyond 64 bits do not fit any sink's column type.
        if not -(2**63) <= value < 2**64:
            raise DecodeError("bad_value", f"{name!r}: integer out of 64-bit range")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise DecodeError("bad_value", f"{name!r}: {value} is not a finite number")
        return value
    raise DecodeError(
        "bad_value", f"{name!r}: expected a number, bool or string, got {_kind(value)}"
    )


def check_device_id(device_id: Any) -> str:
    """A device id taken from a payload: a non-empty string of bounded length, no ``/+#``
    (it becomes an MQTT topic level in receipts and commands)."""
    if not isinstance(device_id, str) or not device_id:
        raise DecodeError("no_device_id", f"expected a non-empty string, got {_kind(device_id)}")
    if len(device_id) > MAX_DEVICE_ID_LENGTH:
        raise DecodeError("bad_device_id", f"longer than {MAX_DEVICE_ID_LENGTH} characters")
    if any(c in device_id for c in "/+#\x00"):
        raise DecodeError("bad_device_id", f"{device_id[:64]!r} contains '/', '+', '#' or NUL")
    return device_id


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__
