"""Serial line devices' configuration (``serial:``; docs/protocols/serial.md)."""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import Field, model_validator

from edgeway.config_types import (
    InputLimitsSection,
    Size,
    _Model,
)


class SerialCsv(_Model):
    columns: list[str] = Field(min_length=1)
    """Metric name per column, in order; ``""`` skips a column."""
    delimiter: str = Field(default=",", min_length=1, max_length=1)
    """Column separator (one character)."""
    header: bool = False
    """Skip lines equal to the joined column names."""


class SerialPortConfig(_Model):
    """One serial line device read by ``edgeway.south.serial``."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    """Adapter name (logs, state)."""
    enabled: bool = True
    """Read this port."""
    device_id: str = Field(min_length=1, max_length=128)
    """Device id of the readings."""
    port: str = Field(min_length=1)
    """Serial device (``/dev/ttyUSB0``) or a pyserial URL (``socket://host:port``)."""
    baudrate: int = Field(default=9600, ge=50)
    """Line speed."""
    bytesize: Literal[5, 6, 7, 8] = 8
    """Data bits."""
    parity: Literal["N", "E", "O", "M", "S"] = "N"
    """Parity: none, even, odd, mark, space."""
    stopbits: float = Field(default=1, ge=1, le=2)
    """1, 1.5 or 2."""
    format: Literal["json", "csv", "kv", "nmea"] = "json"
    """Line format: JSON objects, CSV, ``key=value`` pairs or NMEA 0183."""
    csv: SerialCsv | None = None
    """Column map for ``format: csv``."""
    codec_options: dict[str, Any] = Field(default_factory=dict)
    """Options of the ``json`` codec for JSON lines."""
    max_line: Size = 4096
    """Longest line kept (bytes). NMEA sentences are at most 82 characters and
    telemetry lines a few hundred; a longer line is noise or a wrong baud
    rate, and is dropped and counted."""
    input_limits: InputLimitsSection | None = None
    """Overrides of the top-level ``input_limits`` for this port (only the keys given)."""

    @model_validator(mode="after")
    def _check_combination(self) -> Self:
        if self.format == "csv" and self.csv is None:
            raise ValueError("format csv needs 'csv: {columns: [...]}'")
        if self.stopbits not in (1, 1.5, 2):
            raise ValueError(f"stopbits must be 1, 1.5 or 2, got {self.stopbits}")
        return self
