"""Modbus TCP and RTU poller (pymodbus): register maps in, readings out.

Example::

    modbus:
      - name: boiler
        device_id: boiler-1
        transport: tcp            # or rtu, with serial_port/baudrate/parity/...
        host: 192.168.10.20
        port: 502
        unit_id: 1
        groups:
          - function: holding_registers
            interval: 5s
            points:
              - {metric: temperature, address: 0, data_type: int16, scale: 0.1, unit: Cel}
              - {metric: pressure, address: 1, data_type: float32, word_order: little, unit: bar}
              - {metric: setpoint, address: 10, data_type: uint16, writable: true}
          - function: coils
            interval: 1s
            points:
              - {metric: pump_on, address: 0, writable: true}

Each group is polled at its interval; points of a group at adjacent addresses
are read in one request (see :func:`plan_reads`), and one poll of a group
becomes one :class:`~edgeway.reading.Reading` for the device. Units go into
the reading's tags as ``unit:<metric>``. Commands write with
:meth:`ModbusAdapter.write`.

Register decoding and request planning are sans-IO functions
(:func:`decode_point`, :func:`encode_point`, :func:`plan_reads`) so they can be
tested without a server; pymodbus is imported only when the adapter runs.
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from edgeway.codecs.base import DecodeError, metric_value
from edgeway.downlink import Downlink, DownlinkEvents
from edgeway.ingest import Ingest, IngestStatus
from edgeway.reading import MetricValue, Origin, Reading
from edgeway.south.base import Backoff, SouthAdapter, register_adapter
from edgeway.south.cancel import cancel_requested
from edgeway.south.decode_errors import DecodeErrorCounter
from edgeway.south.modbus_config import ModbusDeviceConfig, ModbusFunction, ModbusGroup, ModbusPoint

log = logging.getLogger(__name__)

MAX_READ_REGISTERS = 125
"""Registers per read request (function codes 3 and 4). A Modbus PDU is at most
253 bytes (a 256-byte RTU frame minus address and CRC); the response's byte
count is one byte, and 125 registers = 250 data bytes is what the spec allows."""
MAX_READ_BITS = 2000
"""Coils or discrete inputs per read request (function codes 1 and 2): 2000 bits
= 250 data bytes, the same PDU limit."""
MAX_WRITE_REGISTERS = 123
"""Registers per write request (function code 16): the request also carries
address, count and byte count, so 123 registers fit in 253 bytes."""

_REGISTERS_OF = {
    "int16": 1,
    "uint16": 1,
    "int32": 2,
    "uint32": 2,
    "float32": 2,
    "int64": 4,
    "uint64": 4,
    "float64": 4,
}
_STRUCT_OF = {
    "int16": ">h",
    "uint16": ">H",
    "int32": ">i",
    "uint32": ">I",
    "float32": ">f",
    "int64": ">q",
    "uint64": ">Q",
    "float64": ">d",
}
_BIT_TABLES = ("coils", "discrete_inputs")


def point_size(point: ModbusPoint, function: ModbusFunction) -> int:
    """Registers (or bits, for coils/discrete inputs) a point occupies."""
    if function in _BIT_TABLES or point.data_type in ("string", "bits"):
        return point.count
    return _REGISTERS_OF[point.data_type]


@dataclass(slots=True, frozen=True)
class ReadRequest:
    """One read: ``count`` registers or bits from ``address``, covering ``points``."""

    address: int
    count: int
    points: tuple[ModbusPoint, ...]


def plan_reads(group: ModbusGroup, max_gap: int = 0) -> list[ReadRequest]:
    """Batch a group's points into as few reads as the protocol allows.

    Points are sorted by address; a point joins the current request when it
    starts at most ``max_gap`` registers after the request's end and the
    request stays within :data:`MAX_READ_REGISTERS` (:data:`MAX_READ_BITS`).
    Overlapping points (two views of one register) share a request.
    """
    limit = MAX_READ_BITS if group.function in _BIT_TABLES else MAX_READ_REGISTERS
    out: list[ReadRequest] = []
    start = end = -1
    members: list[ModbusPoint] = []
    for p in sorted(group.points, key=lambda p: p.address):
        p_end = p.address + point_size(p, group.function)
        if members and p.address - end <= max_gap and max(end, p_end) - start <= limit:
            members.append(p)
            end = max(end, p_end)
            continue
        if members:
            out.append(ReadRequest(start, end - start, tuple(members)))
        start, end, members = p.address, p_end, [p]
    if members:
        out.append(ReadRequest(start, end - start, tuple(members)))
    return out


def _register_bytes(registers: Sequence[int], byte_order: str) -> bytes:
    return b"".join(
        (r & 0xFFFF).to_bytes(2, "big" if byte_order == "big" else "little") for r in registers
    )


def _scaled(raw: int | float, point: ModbusPoint) -> int | float:
    if point.scale == 1.0 and point.offset == 0.0:
        return raw
    return raw * point.scale + point.offset


def decode_point(
    point: ModbusPoint, function: ModbusFunction, values: Sequence[int] | Sequence[bool]
) -> dict[str, MetricValue]:
    """Turn the registers (or bits) of one point into metrics.

    Raises :class:`DecodeError` (``bad_value``) for a value no sink can carry,
    such as a NaN float a device reports for a failed sensor.
    """
    if function in _BIT_TABLES:
        bits = [bool(b) for b in values[: point.count]]
        if point.count == 1:
            return {point.metric: bits[0]}
        return {f"{point.metric}.{i}": b for i, b in enumerate(bits)}
    regs = [int(v) for v in values]
    if point.data_type == "bits":
        return {
            f"{point.metric}.{i}": bool((regs[i // 16] >> (i % 16)) & 1)
            for i in range(16 * point.count)
        }
    if point.data_type == "string":
        raw = _register_bytes(regs[: point.count], point.byte_order)
        text = raw.split(b"\x00", 1)[0].decode("utf-8", errors="replace").rstrip()
        return {point.metric: metric_value(text, point.metric)}
    n = _REGISTERS_OF[point.data_type]
    words = regs[:n]
    if point.word_order == "little":
        words = words[::-1]
    (raw_value,) = struct.unpack(
        _STRUCT_OF[point.data_type], _register_bytes(words, point.byte_order)
    )
    value = _scaled(raw_value, point)
    return {point.metric: metric_value(value, point.metric)}


def encode_point(point: ModbusPoint, value: MetricValue) -> list[int]:
    """Registers that write ``value`` to a holding-register point (inverse of scale/offset).

    :class:`ValueError` for a value the point cannot hold.
    """
    if point.data_type == "bits":
        raise ValueError(f"{point.metric}: bits points are read-only")
    if point.data_type == "string":
        if not isinstance(value, str):
            raise ValueError(f"{point.metric}: expected a string")
        data = value.encode("utf-8")
        if len(data) > 2 * point.count:
            raise ValueError(f"{point.metric}: longer than {2 * point.count} bytes")
        data = data.ljust(2 * point.count, b"\x00")
        order: Literal["big", "little"] = point.byte_order
        return [int.from_bytes(data[i : i + 2], order) for i in range(0, len(data), 2)]
    if isinstance(value, str) or not math.isfinite(float(value)):
        raise ValueError(f"{point.metric}: expected a finite number")
    raw: float | int = (float(value) - point.offset) / point.scale
    fmt = _STRUCT_OF[point.data_type]
    if not point.data_type.startswith("float"):
        raw = round(raw)
    try:
        data = struct.pack(fmt, raw)
    except struct.error:
        raise ValueError(f"{point.metric}: {value!r} does not fit {point.data_type}") from None
    order = "big" if point.byte_order == "big" else "little"
    words = [int.from_bytes(data[i : i + 2], order) for i in range(0, len(data), 2)]
    if point.word_order == "little":
        words = words[::-1]
    return words


class ModbusPeerError(Exception):
    """The server answered with a Modbus exception (illegal address, device busy, ...)."""


@register_adapter
class ModbusAdapter(SouthAdapter):
    """Polls one Modbus TCP server or RTU line; see the module docstring."""

    section = "modbus"
    config_model = ModbusDeviceConfig
    config: ModbusDeviceConfig

    def __init__(
        self,
        config: ModbusDeviceConfig,
        *,
        ingest: Ingest,
        gateway_id: str = "",
        data_dir: Path = Path(),
    ) -> None:
        super().__init__(config, ingest=ingest, gateway_id=gateway_id, data_dir=data_dir)
        self.decode_errors = DecodeErrorCounter()
        self.plans: list[list[ReadRequest]] = [plan_reads(g, config.max_gap) for g in config.groups]
        for g in config.groups:
            for p in g.points:
                if p.address + point_size(p, g.function) > 65536:
                    raise ValueError(f"modbus {config.name}: {p.metric} runs past address 65535")
                if p.writable and g.function not in ("holding_registers", "coils"):
                    raise ValueError(
                        f"modbus {config.name}: {p.metric}: only holding registers and coils are writable"
                    )
        self._client: Any = None
        self._lock = asyncio.Lock()
        """RTU is one request at a time on the wire, and a TCP device is often a
        gateway to an RTU line: one request in flight per adapter."""
        self.polls = 0
        self.registers_read = 0

    @property
    def address(self) -> str:
        c = self.config
        return f"{c.host}:{c.port}" if c.transport == "tcp" else str(c.serial_port)

    def _make_client(self) -> Any:
        from pymodbus import FramerType
        from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient

        c = self.config
        # reconnect_delay=0: pymodbus must not reconnect on its own; run() does, with Backoff.
        if c.transport == "tcp":
            return AsyncModbusTcpClient(
                str(c.host), port=c.port, timeout=c.timeout, retries=0, reconnect_delay=0
            )
        return AsyncModbusSerialClient(
            str(c.serial_port),
            framer=FramerType.RTU,
            baudrate=c.baudrate,
            bytesize=c.bytesize,
            parity=c.parity,
            stopbits=c.stopbits,
            timeout=c.timeout,
            retries=0,
            reconnect_delay=0,
        )

    async def run(self) -> None:
        """Connect, poll every group at its interval; on a lost connection reconnect forever."""
        backoff = Backoff()
        while True:
            client = self._make_client()
            try:
                if not await client.connect():
                    raise ConnectionError(f"cannot connect to {self.address}")
                self._client = client
                self.state.connected = True
                self.ready.set()
                backoff.reset()
                log.info("modbus connected", extra={"adapter": self.name, "address": self.address})
                await self._poll_forever()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a misbehaving peer never stops the gateway
                if cancel_requested():
                    raise asyncio.CancelledError from e
                self.state.record_error(e)
                log.warning("modbus %s: %s; reconnecting", self.name, e)
            finally:
                self._client = None
                self.state.connected = False
                client.close()
            await backoff.wait()

    async def _poll_forever(self) -> None:
        groups = self.config.groups
        loop = asyncio.get_running_loop()
        due = [loop.time()] * len(groups)
        while True:
            if cancel_requested():
                # pymodbus can swallow a cancellation inside a request and
                # return normally: without this check the loop never stops.
                raise asyncio.CancelledError
            i = min(range(len(groups)), key=due.__getitem__)
            delay = due[i] - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await self.poll_group(i)
            # A slow poll skips missed slots instead of firing a burst to catch up.
            due[i] = max(due[i] + groups[i].interval, loop.time())

    async def poll_group(self, index: int) -> IngestStatus | None:
        """Read one group now and submit its reading; None when nothing decoded."""
        group = self.config.groups[index]
        unit = group.unit_id if group.unit_id is not None else self.config.unit_id
        metrics: dict[str, MetricValue] = {}
        tags: dict[str, str] = {}
        for req in self.plans[index]:
            try:
                values = await self._read(group.function, unit, req)
            except ModbusPeerError as e:
                # The device is there but refuses this range (wrong map, busy):
                # count it and keep the connection and the other requests.
                self.state.record_error(e)
                continue
            for p in req.points:
                off = p.address - req.address
                try:
                    metrics.update(
                        decode_point(
                            p, group.function, values[off : off + point_size(p, group.function)]
                        )
                    )
                except DecodeError as e:
                    self.decode_errors.record(self.state, self.config.device_id, e.reason, e.detail)
                    continue
                if p.unit:
                    tags[f"unit:{p.metric}"] = p.unit
        self.polls += 1
        if not metrics:
            return None
        reading = Reading(
            device_id=self.config.device_id,
            ts=time.time(),
            metrics=metrics,
            origin=Origin("modbus", f"{self.address}/{unit}/{group.function}"),
            tags=tags,
        )
        status = await self.ingest.submit([reading])
        if status is IngestStatus.ACCEPTED:
            self.state.record_readings(1)
        else:
            self.state.rejected += 1
        return status

    async def _read(
        self, function: ModbusFunction, unit: int, req: ReadRequest
    ) -> list[int] | list[bool]:
        client = self._client
        if client is None:
            raise ConnectionError("not connected")
        call = {
            "coils": client.read_coils,
            "discrete_inputs": client.read_discrete_inputs,
            "holding_registers": client.read_holding_registers,
            "input_registers": client.read_input_registers,
        }[function]
        async with self._lock:
            rr = await call(req.address, count=req.count, device_id=unit)
        if rr.isError():
            raise ModbusPeerError(f"{function} {req.address}+{req.count} unit {unit}: {rr}")
        if function in _BIT_TABLES:
            bits: list[bool] = list(rr.bits)
            return bits
        self.registers_read += req.count
        regs: list[int] = list(rr.registers)
        if len(regs) < req.count:
            raise ModbusPeerError(f"short response: {len(regs)} of {req.count} registers")
        return regs

    def _find(self, metric: str) -> tuple[ModbusGroup, ModbusPoint, int]:
        for g in self.config.groups:
            for p in g.points:
                if p.metric == metric:
                    return g, p, 0
                if g.function == "coils" and p.count > 1 and metric.startswith(p.metric + "."):
                    idx = metric[len(p.metric) + 1 :]
                    if idx.isdigit() and int(idx) < p.count:
                        return g, p, int(idx)
        raise KeyError(f"no point {metric!r} on modbus device {self.config.name}")

    def writable_point(self, metric: str) -> tuple[ModbusGroup, ModbusPoint, int]:
        """The point a write of ``metric`` goes to: KeyError for an unknown
        metric, PermissionError for one not configured ``writable``."""
        group, point, bit = self._find(metric)
        if not point.writable:
            raise PermissionError(f"{metric} is not writable (set writable: true)")
        return group, point, bit

    def downlink(self, events: DownlinkEvents) -> Downlink | None:
        """Commands ``write`` (and, for OPC-UA, ``call``/method names); see
        :mod:`edgeway.south.write_downlink`."""
        from edgeway.south.write_downlink import WriteDownlink

        return WriteDownlink(self, self.config.device_id, events)

    async def write(self, metric: str, value: MetricValue) -> None:
        """Write a command value to a ``writable`` holding-register or coil point.

        :class:`KeyError` for an unknown metric, :class:`PermissionError` for a
        point that is not writable, :class:`ValueError` for a value it cannot
        hold, :class:`ConnectionError` when not connected and
        :class:`ModbusPeerError` when the device refuses.
        """
        group, point, bit = self.writable_point(metric)
        unit = group.unit_id if group.unit_id is not None else self.config.unit_id
        client = self._client
        if client is None:
            raise ConnectionError(f"modbus {self.config.name} is not connected")
        async with self._lock:
            if group.function == "coils":
                if isinstance(value, str):
                    raise ValueError(f"{metric}: expected a boolean")
                rr = await client.write_coil(point.address + bit, bool(value), device_id=unit)
            else:
                regs = encode_point(point, value)
                if len(regs) > MAX_WRITE_REGISTERS:
                    raise ValueError(f"{metric}: more than {MAX_WRITE_REGISTERS} registers")
                if len(regs) == 1:
                    rr = await client.write_register(point.address, regs[0], device_id=unit)
                else:
                    rr = await client.write_registers(point.address, regs, device_id=unit)
        if rr.isError():
            raise ModbusPeerError(f"write {metric} refused: {rr}")
