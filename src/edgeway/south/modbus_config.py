"""Modbus devices' configuration (``modbus:``; docs/protocols/modbus.md)."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, field_validator, model_validator

from edgeway.config_types import (
    Duration,
    _Model,
)

ModbusFunction = Literal["coils", "discrete_inputs", "holding_registers", "input_registers"]


ModbusDataType = Literal[
    "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64", "string", "bits"
]


class ModbusPoint(_Model):
    """One value in a Modbus register map."""

    metric: str = Field(min_length=1)
    """Metric name in the reading."""
    address: int = Field(ge=0, le=65535)
    """Zero-based protocol address (register 40001 is holding address 0)."""
    data_type: ModbusDataType = "uint16"
    """Ignored for coils and discrete inputs (always booleans)."""
    count: int = Field(default=1, ge=1, le=125)
    """Registers for ``string``; registers for ``bits`` (16 booleans each);
    coils or inputs for coils/discrete inputs (more than 1: ``metric.N``)."""
    byte_order: Literal["big", "little"] = "big"
    """Byte order inside each 16-bit register (Modbus itself is big-endian)."""
    word_order: Literal["big", "little"] = "big"
    """Register order of 32/64-bit values: ``big`` = high word first."""
    scale: float = 1.0
    """Multiplier applied to the raw number."""
    offset: float = 0.0
    """value = raw * scale + offset (numbers only)."""
    unit: str | None = None
    """Stored as the tag ``unit:<metric>`` on each reading."""
    writable: bool = False
    """Allow :meth:`ModbusAdapter.write` (holding registers and coils only)."""


class ModbusGroup(_Model):
    """Points read together at one interval, from one table of one unit."""

    function: ModbusFunction = "holding_registers"
    """Modbus table the group reads (function code 1, 2, 3 or 4)."""
    unit_id: int | None = Field(default=None, ge=0, le=255)
    """Defaults to the device's ``unit_id``."""
    interval: Duration = 10.0
    """Time between two polls of the group."""
    points: list[ModbusPoint] = Field(min_length=1)
    """Values read; adjacent addresses share one request."""


class ModbusDeviceConfig(_Model):
    """One Modbus TCP server or RTU line polled by ``edgeway.south.modbus``."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    """Adapter name (logs, state, commands)."""
    enabled: bool = True
    """Poll this device."""
    device_id: str = Field(min_length=1, max_length=128)
    """Device id of the readings."""
    transport: Literal["tcp", "rtu"] = "tcp"
    """``tcp`` (Modbus TCP) or ``rtu`` (serial line)."""
    host: str | None = None
    """TCP: the server's host."""
    port: int = Field(default=502, ge=1, le=65535)
    """TCP: the server's port."""
    serial_port: str | None = None
    """RTU: the serial device (``/dev/ttyUSB0``)."""
    baudrate: int = Field(default=9600, ge=50)
    """RTU: line speed."""
    bytesize: Literal[7, 8] = 8
    """RTU: data bits."""
    parity: Literal["N", "E", "O"] = "N"
    """RTU: parity (none, even, odd)."""
    stopbits: Literal[1, 2] = 1
    """RTU: stop bits."""
    unit_id: int = Field(default=1, ge=0, le=255)
    """Unit (slave) id; a group may override it."""
    timeout: Duration = 3.0
    """Per request; a timeout drops the connection and reconnects with backoff."""
    max_gap: int = Field(default=0, ge=0, le=124)
    """Merge points into one request across gaps of up to this many unused
    registers (some devices refuse reads of unmapped registers: default 0)."""
    groups: list[ModbusGroup] = Field(min_length=1)
    """Register groups, each polled at its own interval."""

    @field_validator("host")
    @classmethod
    def _host_nonempty(cls, v: str | None) -> str | None:
        if v is not None and not v:
            raise ValueError("expected a host name or address")
        return v

    @model_validator(mode="after")
    def _check_combination(self) -> Self:
        if self.transport == "tcp" and not self.host:
            raise ValueError("transport tcp needs 'host'")
        if self.transport == "rtu" and not self.serial_port:
            raise ValueError("transport rtu needs 'serial_port'")
        return self
