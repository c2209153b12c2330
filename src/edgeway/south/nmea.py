"""NMEA 0183 sentences from GPS receivers: GGA and RMC, checksum validated.

Used by the serial adapter with ``format: nmea``::

    serial:
      - {name: gps, device_id: truck-7-gps, port: /dev/ttyACM0, baudrate: 9600, format: nmea}

Sans-IO: :func:`parse_sentence` takes one line and returns the metrics (and,
for RMC, the fix time) or raises :class:`~edgeway.codecs.base.DecodeError`.
Other sentence types (GSV, GSA, VTG, ...) return ``None``: receivers send
them every second and they are not errors.

Metrics: ``latitude``/``longitude`` (decimal degrees, south and west
negative), ``altitude`` (metres above mean sea level), ``fix_quality``
(0 none, 1 GPS, 2 DGPS, 4 RTK fixed, 5 RTK float, ...), ``satellites``,
``hdop``; from RMC ``fix_valid``, ``speed_knots`` and ``course``
(degrees true). A sentence without a fix carries no position.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass

from edgeway.codecs.base import DecodeError
from edgeway.reading import MetricValue

MAX_SENTENCE = 82
"""NMEA 0183's own limit: 82 characters from ``$`` to the line end. Many
receivers exceed it slightly in proprietary sentences, so the caller's line
limit is larger; GGA and RMC always fit."""


@dataclass(slots=True, frozen=True)
class Fix:
    """What one GGA or RMC sentence says."""

    sentence: str
    """``GGA`` or ``RMC``."""
    metrics: dict[str, MetricValue]
    ts: float | None = None
    """Epoch seconds of the fix (RMC has date and time; GGA only a time of day)."""


def checksum(body: str) -> int:
    """XOR of the characters between ``$`` and ``*``."""
    c = 0
    for ch in body:
        c ^= ord(ch)
    return c


def _split(line: str) -> list[str]:
    line = line.strip()
    if not line.startswith(("$", "!")):
        raise DecodeError("not_nmea", f"does not start with '$': {line[:20]!r}")
    star = line.rfind("*")
    if star < 0:
        raise DecodeError("no_checksum", line[:20])
    body, given = line[1:star], line[star + 1 :]
    try:
        expected = int(given[:2], 16)
    except ValueError:
        raise DecodeError("bad_checksum", f"not hex: {given[:4]!r}") from None
    if len(given) != 2 or checksum(body) != expected:
        raise DecodeError("bad_checksum", f"{given!r} != {checksum(body):02X}")
    return body.split(",")


def _coord(value: str, hemi: str, degree_digits: int) -> float | None:
    if not value:
        return None
    try:
        deg = int(value[:degree_digits])
        minutes = float(value[degree_digits:])
    except ValueError:
        raise DecodeError("bad_field", f"coordinate {value!r}") from None
    if minutes >= 60 or deg > (90 if degree_digits == 2 else 180):
        raise DecodeError("bad_field", f"coordinate {value!r}")
    out = deg + minutes / 60.0
    if hemi in ("S", "W"):
        out = -out
    elif hemi not in ("N", "E"):
        raise DecodeError("bad_field", f"hemisphere {hemi!r}")
    return round(out, 7)


def _num(value: str, name: str) -> float | None:
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        raise DecodeError("bad_field", f"{name} {value!r}") from None


def _int(value: str, name: str) -> int | None:
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise DecodeError("bad_field", f"{name} {value!r}") from None


def _position(fields: list[str], at: int, metrics: dict[str, MetricValue]) -> None:
    lat = _coord(fields[at], fields[at + 1], 2)
    lon = _coord(fields[at + 2], fields[at + 3], 3)
    if lat is not None and lon is not None:
        metrics["latitude"] = lat
        metrics["longitude"] = lon


def _gga(f: list[str]) -> Fix:
    if len(f) < 15:
        raise DecodeError("bad_field", f"GGA has {len(f)} fields, expected 15")
    metrics: dict[str, MetricValue] = {}
    quality = _int(f[6], "fix quality") or 0
    metrics["fix_quality"] = quality
    sats = _int(f[7], "satellites")
    if sats is not None:
        metrics["satellites"] = sats
    hdop = _num(f[8], "hdop")
    if hdop is not None:
        metrics["hdop"] = hdop
    if quality > 0:
        _position(f, 2, metrics)
        alt = _num(f[9], "altitude")
        if alt is not None:
            metrics["altitude"] = alt
    return Fix("GGA", metrics)


def _rmc(f: list[str]) -> Fix:
    if len(f) < 10:
        raise DecodeError("bad_field", f"RMC has {len(f)} fields, expected at least 10")
    valid = f[2] == "A"
    metrics: dict[str, MetricValue] = {"fix_valid": valid}
    ts = None
    if valid:
        _position(f, 3, metrics)
        speed = _num(f[7], "speed")
        if speed is not None:
            metrics["speed_knots"] = speed
        course = _num(f[8], "course")
        if course is not None:
            metrics["course"] = course
        ts = _rmc_time(f[1], f[9])
    return Fix("RMC", metrics, ts)


def _rmc_time(hhmmss: str, ddmmyy: str) -> float | None:
    if len(hhmmss) < 6 or len(ddmmyy) != 6:
        return None
    try:
        h, m = int(hhmmss[0:2]), int(hhmmss[2:4])
        sec = float(hhmmss[4:])
        d, mo, y = int(ddmmyy[0:2]), int(ddmmyy[2:4]), int(ddmmyy[4:6])
        # Two-digit years: NMEA 0183 receivers pivot at 1980 (GPS epoch).
        year = 1900 + y if y >= 80 else 2000 + y
        when = _dt.datetime(year, mo, d, h, m, tzinfo=_dt.UTC)
    except ValueError:
        raise DecodeError("bad_field", f"RMC time {hhmmss!r} {ddmmyy!r}") from None
    return when.timestamp() + sec


def parse_sentence(line: str) -> Fix | None:
    """Parse one NMEA line; ``None`` for valid sentences other than GGA and RMC."""
    fields = _split(line)
    kind = fields[0][-3:]
    if kind == "GGA":
        return _gga(fields)
    if kind == "RMC":
        return _rmc(fields)
    return None
