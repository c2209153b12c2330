"""Serial line devices (pyserial-asyncio): one line, one reading.

Example::

    serial:
      - name: weather
        device_id: weather-station-1
        port: /dev/ttyUSB0
        baudrate: 19200
        bytesize: 8
        parity: N
        stopbits: 1
        format: csv                     # json | csv | kv | nmea
        csv: {columns: [temperature, humidity, "", pressure], delimiter: ","}
      - {name: gps, device_id: truck-7-gps, port: /dev/ttyACM0, format: nmea}
      - {name: meter, device_id: meter-3, port: /dev/ttyS1, format: kv}

Formats:

- ``json``: one JSON object per line, decoded by the ``json`` codec
  (``codec_options`` are that codec's options).
- ``csv``: values in the order of ``csv.columns``; ``""`` skips a column.
- ``kv``: ``temperature=21.5 humidity=40 status=ok`` (separated by spaces,
  commas or semicolons).
- ``nmea``: NMEA 0183 GGA and RMC sentences from a GPS receiver, checksums
  validated (see :mod:`edgeway.south.nmea`); other sentences are ignored.

Numbers become ints or floats, ``true``/``false`` booleans, anything else a
string. A line that does not parse is counted per device and reason and
dropped. The port is reopened forever with backoff when it goes away (a USB
adapter unplugged); a port that does not exist at start-up is an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from edgeway.codecs.base import Codec, DecodeError, get_codec, metric_value
from edgeway.config_types import input_limits
from edgeway.ingest import Ingest, IngestStatus
from edgeway.reading import MetricValue, Origin, Reading
from edgeway.south.base import Backoff, SouthAdapter, register_adapter
from edgeway.south.cancel import cancel_requested
from edgeway.south.decode_errors import DecodeErrorCounter
from edgeway.south.nmea import parse_sentence
from edgeway.south.serial_config import SerialCsv, SerialPortConfig

log = logging.getLogger(__name__)

_KV_SPLIT = re.compile(r"[\s,;]+")
_INT = re.compile(r"^[+-]?\d+$")


class LineFramer:
    """Bytes in, complete lines out (sans-IO).

    Lines end with ``\\n`` (a preceding ``\\r`` is dropped). A line longer than
    ``max_line`` is discarded up to its end and reported once as ``None`` so the
    caller can count it: memory stays bounded whatever the port sends.
    """

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._buf = bytearray()
        self._discarding = False

    def feed(self, data: bytes) -> list[bytes | None]:
        out: list[bytes | None] = []
        self._buf += data
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > self.max_line:
                    if not self._discarding:
                        out.append(None)
                    self._discarding = True
                    self._buf.clear()
                return out
            line = bytes(self._buf[:nl]).rstrip(b"\r")
            del self._buf[: nl + 1]
            if self._discarding:
                self._discarding = False
                continue
            if len(line) > self.max_line:
                out.append(None)
                continue
            out.append(line)


def parse_value(text: str) -> MetricValue:
    """``"21"`` -> 21, ``"21.5"`` -> 21.5, ``"true"`` -> True, else the text."""
    t = text.strip()
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    if _INT.match(t):
        return int(t)
    try:
        # "nan"/"inf" (what a failed sensor prints) parse too; metric_value refuses them.
        return float(t)
    except ValueError:
        return t


def parse_kv(line: str) -> dict[str, MetricValue]:
    """``key=value`` pairs separated by whitespace, commas or semicolons."""
    metrics: dict[str, MetricValue] = {}
    for part in _KV_SPLIT.split(line.strip()):
        if not part:
            continue
        key, eq, value = part.partition("=")
        if not eq or not key:
            raise DecodeError("bad_kv", f"expected key=value, got {part[:40]!r}")
        metrics[key] = metric_value(parse_value(value), key)
    if not metrics:
        raise DecodeError("empty", "no key=value pairs")
    return metrics


def parse_csv(line: str, csv: SerialCsv) -> dict[str, MetricValue] | None:
    """Values in column order; ``None`` for the header line."""
    values = line.strip().split(csv.delimiter)
    if csv.header and [v.strip() for v in values] == csv.columns:
        return None
    if len(values) != len(csv.columns):
        raise DecodeError("bad_csv", f"{len(values)} columns, expected {len(csv.columns)}")
    metrics: dict[str, MetricValue] = {}
    for name, value in zip(csv.columns, values, strict=True):
        if name and value.strip() != "":
            metrics[name] = metric_value(parse_value(value), name)
    return metrics


@register_adapter
class SerialAdapter(SouthAdapter):
    """Reads one serial port; see the module docstring."""

    section = "serial"
    config_model = SerialPortConfig
    config: SerialPortConfig

    def __init__(
        self,
        config: SerialPortConfig,
        *,
        ingest: Ingest,
        gateway_id: str = "",
        data_dir: Path = Path(),
    ) -> None:
        super().__init__(config, ingest=ingest, gateway_id=gateway_id, data_dir=data_dir)
        self.decode_errors = DecodeErrorCounter()
        self.lines = 0
        self.ignored = 0
        """Valid lines that carry no reading (CSV header, NMEA GSV/GSA/...)."""
        self._codec: Codec | None = None
        self._limits = input_limits(config.input_limits)
        if config.format == "json":
            try:
                self._codec = get_codec("json", config.codec_options, limits=self._limits)
            except (KeyError, ValueError) as e:
                raise ValueError(f"serial {config.name}: {e}") from None
        self._origin = Origin("serial", address=config.port)

    def decode_line(self, raw: bytes, now: float) -> list[Reading]:
        """Turn one line into readings; :class:`DecodeError` when it is bad."""
        cfg = self.config
        if self._codec is not None:
            return self._codec.decode(raw, device_id=cfg.device_id, origin=self._origin, now=now)
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError("not_utf8", "line is not UTF-8 (wrong baud rate?)") from None
        if not line.strip():
            return []
        ts = now
        metrics: dict[str, MetricValue] | None
        if cfg.format == "kv":
            metrics = parse_kv(line)
        elif cfg.format == "csv":
            assert cfg.csv is not None  # the config model guarantees it
            metrics = parse_csv(line, cfg.csv)
        else:
            fix = parse_sentence(line)
            metrics = fix.metrics if fix is not None else None
            if fix is not None and fix.ts is not None:
                ts = fix.ts
        if not metrics:
            return []
        reading = Reading(device_id=cfg.device_id, ts=ts, metrics=metrics, origin=self._origin)
        return self._limits.check_readings([reading], now)

    async def handle_line(self, raw: bytes | None) -> None:
        """Decode one framed line and submit it (``None``: an over-long line)."""
        self.lines += 1
        if raw is None:
            self.decode_errors.record(
                self.state,
                self.config.device_id,
                "line_too_long",
                f"> {self.config.max_line} bytes",
            )
            return
        try:
            readings = self.decode_line(raw, time.time())
        except DecodeError as e:
            self.decode_errors.record(self.state, self.config.device_id, e.reason, e.detail)
            return
        if not readings:
            self.ignored += 1
            return
        status = await self.ingest.submit(readings)
        if status is IngestStatus.ACCEPTED:
            self.state.record_readings(len(readings))
        else:
            self.state.rejected += 1

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        import serial_asyncio

        c = self.config
        reader, writer = await serial_asyncio.open_serial_connection(
            url=c.port,
            baudrate=c.baudrate,
            bytesize=c.bytesize,
            parity=c.parity,
            stopbits=c.stopbits,
        )
        return reader, writer

    def check_port(self) -> None:
        """A port that does not exist at start-up is a configuration error (one line).
        pyserial URLs (``socket://``, ``rfc2217://``) are not checked."""
        port = self.config.port
        if "://" not in port and not os.path.exists(port):
            raise FileNotFoundError(f"serial {self.config.name}: no such port {port}")

    async def run(self) -> None:
        """Read lines until cancelled; reopen the port forever when it fails."""
        self.check_port()
        backoff = Backoff()
        while True:
            writer: Any = None
            try:
                reader, writer = await self._open()
                self.state.connected = True
                self.ready.set()
                backoff.reset()
                log.info("serial %s: opened %s", self.name, self.config.port)
                framer = LineFramer(self.config.max_line)
                while True:
                    data = await reader.read(4096)
                    if not data:
                        raise ConnectionError("port closed")
                    for line in framer.feed(data):
                        await self.handle_line(line)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the port going away never stops the gateway
                if cancel_requested():
                    raise asyncio.CancelledError from e
                self.state.record_error(e)
                log.warning("serial %s: %s; reopening", self.name, e)
            finally:
                self.state.connected = False
                if writer is not None:
                    writer.close()
                    with contextlib.suppress(Exception):
                        await writer.wait_closed()
            await backoff.wait()
