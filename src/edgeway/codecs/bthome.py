"""BTHome v2 service data (BLE advertisements, 16-bit UUID 0xFCD2), unencrypted.

Example (the BLE adapter uses it directly; as a codec it decodes service data
that a bridge forwards, e.g. as raw bytes over MQTT)::

    mqtt_client:
      - name: ble-bridge
        url: mqtt://bridge.local:1883
        subscriptions:
          - {topic: "ble/{device_id}/bthome", codec: bthome}

Layout (https://bthome.io/format/): one *device information* byte (bit 0
encryption, bit 2 trigger-based device, bits 5-7 version = 2), then objects:
an object id byte followed by a little-endian value whose length and factor
the id fixes. Because the length is implied by the id, an unknown id ends
decoding with ``unknown_object``: the rest cannot be framed.

:func:`decode_bthome` is sans-IO; :class:`BTHomeCodec` wraps it as a codec.
Units go into the reading's tags as ``unit:<metric>``; a second object of
the same kind gets ``_2`` (``temperature_2``) and so on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from edgeway.codecs.base import Codec, DecodeError, register_codec
from edgeway.reading import MetricValue, Origin, Reading

SERVICE_UUID = "0000fcd2-0000-1000-8000-00805f9b34fb"
"""BTHome's 16-bit service UUID 0xFCD2 as bleak spells it."""

MAX_PAYLOAD = 255
"""Longest service data accepted: a legacy advertisement carries at most 31
bytes and an extended one 255; anything longer is not from the air."""

Kind = Literal["number", "binary", "event", "text", "raw", "firmware"]


@dataclass(slots=True, frozen=True)
class ObjectType:
    """How one BTHome object id is laid out."""

    name: str
    size: int
    signed: bool = False
    factor: float = 1.0
    unit: str | None = None
    kind: Kind = "number"


def _n(
    name: str, size: int, factor: float = 1.0, unit: str | None = None, *, signed: bool = False
) -> ObjectType:
    return ObjectType(name, size, signed, factor, unit)


def _b(name: str) -> ObjectType:
    return ObjectType(name, 1, kind="binary")


# Object ids of the BTHome v2 format (sensor, binary sensor, event and
# device-information objects); names follow the format's property names.
OBJECTS: dict[int, ObjectType] = {
    0x00: _n("packet_id", 1),
    0x01: _n("battery", 1, 1, "%"),
    0x02: _n("temperature", 2, 0.01, "Cel", signed=True),
    0x03: _n("humidity", 2, 0.01, "%"),
    0x04: _n("pressure", 3, 0.01, "hPa"),
    0x05: _n("illuminance", 3, 0.01, "lx"),
    0x06: _n("mass", 2, 0.01, "kg"),
    0x07: _n("mass_lb", 2, 0.01, "lb"),
    0x08: _n("dewpoint", 2, 0.01, "Cel", signed=True),
    0x09: _n("count", 1),
    0x0A: _n("energy", 3, 0.001, "kWh"),
    0x0B: _n("power", 3, 0.01, "W"),
    0x0C: _n("voltage", 2, 0.001, "V"),
    0x0D: _n("pm2_5", 2, 1, "ug/m3"),
    0x0E: _n("pm10", 2, 1, "ug/m3"),
    0x0F: _b("generic"),
    0x10: _b("power_on"),
    0x11: _b("opening"),
    0x12: _n("co2", 2, 1, "ppm"),
    0x13: _n("tvoc", 2, 1, "ug/m3"),
    0x14: _n("moisture", 2, 0.01, "%"),
    0x15: _b("battery_low"),
    0x16: _b("battery_charging"),
    0x17: _b("carbon_monoxide"),
    0x18: _b("cold"),
    0x19: _b("connectivity"),
    0x1A: _b("door"),
    0x1B: _b("garage_door"),
    0x1C: _b("gas_detected"),
    0x1D: _b("heat"),
    0x1E: _b("light"),
    0x1F: _b("lock"),
    0x20: _b("moisture_detected"),
    0x21: _b("motion"),
    0x22: _b("moving"),
    0x23: _b("occupancy"),
    0x24: _b("plug"),
    0x25: _b("presence"),
    0x26: _b("problem"),
    0x27: _b("running"),
    0x28: _b("safety"),
    0x29: _b("smoke"),
    0x2A: _b("sound"),
    0x2B: _b("tamper"),
    0x2C: _b("vibration"),
    0x2D: _b("window"),
    0x2E: _n("humidity", 1, 1, "%"),
    0x2F: _n("moisture", 1, 1, "%"),
    0x3A: ObjectType("button", 1, kind="event"),
    0x3C: ObjectType("dimmer", 2, kind="event"),
    0x3D: _n("count", 2),
    0x3E: _n("count", 4),
    0x3F: _n("rotation", 2, 0.1, "deg", signed=True),
    0x40: _n("distance", 2, 1, "mm"),
    0x41: _n("distance_m", 2, 0.1, "m"),
    0x42: _n("duration", 3, 0.001, "s"),
    0x43: _n("current", 2, 0.001, "A"),
    0x44: _n("speed", 2, 0.01, "m/s"),
    0x45: _n("temperature", 2, 0.1, "Cel", signed=True),
    0x46: _n("uv_index", 1, 0.1),
    0x47: _n("volume", 2, 0.1, "L"),
    0x48: _n("volume_ml", 2, 1, "mL"),
    0x49: _n("volume_flow_rate", 2, 0.001, "m3/h"),
    0x4A: _n("voltage", 2, 0.1, "V"),
    0x4B: _n("gas", 3, 0.001, "m3"),
    0x4C: _n("gas", 4, 0.001, "m3"),
    0x4D: _n("energy", 4, 0.001, "kWh"),
    0x4E: _n("volume", 4, 0.001, "L"),
    0x4F: _n("water", 4, 0.001, "L"),
    0x50: _n("timestamp", 4, 1, "s"),
    0x51: _n("acceleration", 2, 0.001, "m/s2"),
    0x52: _n("gyroscope", 2, 0.001, "deg/s"),
    0x53: ObjectType("text", 0, kind="text"),
    0x54: ObjectType("raw", 0, kind="raw"),
    0x55: _n("volume_storage", 4, 0.001, "L"),
    0x56: _n("conductivity", 2, 1, "uS/cm"),
    0x57: _n("temperature", 1, 1, "Cel", signed=True),
    0x58: _n("temperature", 1, 0.35, "Cel", signed=True),
    0x59: _n("count", 1, signed=True),
    0x5A: _n("count", 2, signed=True),
    0x5B: _n("count", 4, signed=True),
    0x5C: _n("power", 4, 0.01, "W", signed=True),
    0x5D: _n("current", 2, 0.001, "A", signed=True),
    0x5E: _n("direction", 2, 0.01, "deg"),
    0x5F: _n("precipitation", 2, 0.1, "mm"),
    0x60: _n("channel", 1),
    0x61: _n("rotational_speed", 2, 1, "rpm"),
    0x62: _n("speed", 4, 0.000001, "m/s", signed=True),
    0x63: _n("acceleration", 4, 0.000001, "m/s2", signed=True),
    0x64: _n("light_level", 1),
    0xF0: _n("device_type_id", 2),
    0xF1: ObjectType("firmware_version", 4, kind="firmware"),
    0xF2: ObjectType("firmware_version", 3, kind="firmware"),
}

BUTTON_EVENTS = {
    0x00: "none",
    0x01: "press",
    0x02: "double_press",
    0x03: "triple_press",
    0x04: "long_press",
    0x05: "long_double_press",
    0x06: "long_triple_press",
    0x80: "hold_press",
}
DIMMER_EVENTS = {0x00: "none", 0x01: "rotate_left", 0x02: "rotate_right"}


@dataclass(slots=True)
class BTHomePacket:
    """One decoded advertisement."""

    metrics: dict[str, MetricValue] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    packet_id: int | None = None
    """The device's packet counter: advertisements are repeated, and the
    same packet id twice in a row is the same measurement."""
    trigger_based: bool = False


def _decimals(factor: float) -> int:
    text = f"{factor:.10f}".rstrip("0")
    return len(text.split(".")[1]) if "." in text else 0


def decode_bthome(data: bytes) -> BTHomePacket:
    """Decode unencrypted BTHome v2 service data; :class:`DecodeError` otherwise."""
    if not data:
        raise DecodeError("empty", "no service data")
    if len(data) > MAX_PAYLOAD:
        raise DecodeError("too_large", f"{len(data)} bytes")
    info = data[0]
    version = info >> 5
    if version != 2:
        raise DecodeError("unsupported_version", f"BTHome version {version}, expected 2")
    if info & 0x01:
        raise DecodeError("encrypted", "encrypted BTHome is not supported")
    out = BTHomePacket(trigger_based=bool(info & 0x04))
    seen: dict[str, int] = {}
    i = 1
    while i < len(data):
        oid = data[i]
        i += 1
        obj = OBJECTS.get(oid)
        if obj is None:
            raise DecodeError("unknown_object", f"object id 0x{oid:02X} at byte {i - 1}")
        size = obj.size
        if obj.kind in ("text", "raw"):
            if i >= len(data):
                raise DecodeError("truncated", f"object 0x{oid:02X} has no length byte")
            size = data[i]
            i += 1
        if i + size > len(data):
            raise DecodeError(
                "truncated", f"object 0x{oid:02X} needs {size} bytes, {len(data) - i} left"
            )
        raw = data[i : i + size]
        i += size
        if oid == 0x00:
            out.packet_id = raw[0]
            continue
        n = seen.get(obj.name, 0) + 1
        seen[obj.name] = n
        name = obj.name if n == 1 else f"{obj.name}_{n}"
        _put(out, name, obj, raw)
    return out


def _put(out: BTHomePacket, name: str, obj: ObjectType, raw: bytes) -> None:
    if obj.kind == "binary":
        out.metrics[name] = raw[0] != 0
    elif obj.kind == "event":
        if obj.name == "button":
            out.metrics[name] = BUTTON_EVENTS.get(raw[0], f"unknown_{raw[0]}")
        else:
            out.metrics[name] = DIMMER_EVENTS.get(raw[0], f"unknown_{raw[0]}")
            out.metrics[f"{name}_steps"] = raw[1]
    elif obj.kind == "text":
        out.metrics[name] = raw.decode("utf-8", errors="replace")
    elif obj.kind == "raw":
        out.metrics[name] = raw.hex()
    elif obj.kind == "firmware":
        out.metrics[name] = ".".join(str(b) for b in reversed(raw))
    else:
        value = int.from_bytes(raw, "little", signed=obj.signed)
        if obj.factor == 1.0:
            out.metrics[name] = value
        else:
            out.metrics[name] = round(value * obj.factor, _decimals(obj.factor))
        if obj.unit:
            out.units[name] = obj.unit


@register_codec
class BTHomeCodec(Codec):
    """BTHome v2 service data as a codec (no options; needs the device id from the address)."""

    name: ClassVar[str] = "bthome"

    def decode_readings(
        self, payload: bytes, *, device_id: str | None, origin: Origin, now: float
    ) -> list[Reading]:
        if device_id is None:
            raise DecodeError("no_device_id", "BTHome data does not name its device")
        packet = decode_bthome(payload)
        if not packet.metrics:
            return []
        tags = {f"unit:{k}": v for k, v in packet.units.items()}
        return [
            Reading(device_id=device_id, ts=now, metrics=packet.metrics, origin=origin, tags=tags)
        ]
