"""Modbus adapter: register decoding, request planning, and polling a real
pymodbus server over TCP and over RTU through pseudo-terminals."""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import tty
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pymodbus")

from ingest_doubles import RecordingIngest, wait_until
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from edgeway.codecs.base import DecodeError
from edgeway.config import ModbusDeviceConfig, ModbusGroup, ModbusPoint, parse_config
from edgeway.ingest import IngestStatus
from edgeway.south.modbus import (
    MAX_READ_REGISTERS,
    ModbusAdapter,
    decode_point,
    encode_point,
    plan_reads,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "protocols" / "modbus.md"


def pt(**kw: Any) -> ModbusPoint:
    return ModbusPoint(**{"metric": "m", "address": 0, **kw})


def regs_of(fmt: str, value: Any) -> list[int]:
    data = struct.pack(fmt, value)
    return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]


# ---------------------------------------------------------------- sans-IO


@pytest.mark.parametrize(
    ("data_type", "fmt", "value"),
    [
        ("int16", ">h", -215),
        ("uint16", ">H", 65000),
        ("int32", ">i", -100000),
        ("uint32", ">I", 4_000_000_000),
        ("int64", ">q", -(2**40)),
        ("uint64", ">Q", 2**63 + 5),
        ("float32", ">f", 1.5),
        ("float64", ">d", -2.25e10),
    ],
)
def test_decode_numbers_big_endian(data_type: str, fmt: str, value: Any) -> None:
    p = pt(data_type=data_type)
    assert decode_point(p, "holding_registers", regs_of(fmt, value)) == {"m": value}


def test_word_and_byte_order() -> None:
    words = regs_of(">f", 1.5)  # [0x3FC0, 0x0000]
    assert decode_point(
        pt(data_type="float32", word_order="little"), "input_registers", words[::-1]
    ) == {"m": 1.5}
    swapped = [((w & 0xFF) << 8) | (w >> 8) for w in words]
    assert decode_point(
        pt(data_type="float32", byte_order="little"), "input_registers", swapped
    ) == {"m": 1.5}
    assert decode_point(
        pt(data_type="uint16", byte_order="little"), "holding_registers", [0x3412]
    ) == {"m": 0x1234}


def test_scale_offset_string_bits() -> None:
    assert decode_point(pt(data_type="int16", scale=0.1), "holding_registers", [0xFF29]) == {
        "m": pytest.approx(-21.5)
    }
    assert decode_point(pt(data_type="uint16", scale=2, offset=-10), "holding_registers", [7]) == {
        "m": 4.0
    }
    assert decode_point(
        pt(data_type="string", count=4), "holding_registers", [0x4142, 0x2D31, 0x3200, 0]
    ) == {"m": "AB-12"}
    bits = decode_point(pt(data_type="bits"), "holding_registers", [0b101])
    assert len(bits) == 16 and bits["m.0"] and not bits["m.1"] and bits["m.2"]
    assert decode_point(pt(count=3), "coils", [True, False, True, False]) == {
        "m.0": True,
        "m.1": False,
        "m.2": True,
    }
    assert decode_point(pt(), "discrete_inputs", [True]) == {"m": True}


def test_nan_is_a_decode_error() -> None:
    with pytest.raises(DecodeError) as e:
        decode_point(pt(data_type="float32"), "input_registers", [0x7FC0, 0])
    assert e.value.reason == "bad_value"


@pytest.mark.parametrize(
    ("kw", "value"),
    [
        ({"data_type": "int16", "scale": 0.1}, -21.5),
        ({"data_type": "uint32", "word_order": "little"}, 70000),
        ({"data_type": "float64", "byte_order": "little"}, 3.25),
        ({"data_type": "string", "count": 3}, "hello"),
    ],
)
def test_encode_roundtrip(kw: dict[str, Any], value: Any) -> None:
    p = pt(**kw)
    assert decode_point(p, "holding_registers", encode_point(p, value)) == {
        "m": pytest.approx(value)
    }


def test_encode_refuses_what_does_not_fit() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        encode_point(pt(data_type="uint16"), 70000)
    with pytest.raises(ValueError, match="longer"):
        encode_point(pt(data_type="string", count=1), "abc")
    with pytest.raises(ValueError, match="finite"):
        encode_point(pt(data_type="float32"), float("nan"))


def test_plan_merges_adjacent_and_respects_the_protocol_limit() -> None:
    group = ModbusGroup(
        function="holding_registers",
        points=[
            pt(metric="a", address=0),
            pt(metric="b", address=1, data_type="float32"),
            pt(metric="c", address=3),
            pt(metric="d", address=10),
            pt(metric="e", address=200, data_type="string", count=100),
            pt(metric="f", address=300, data_type="string", count=30),
        ],
    )
    plan = plan_reads(group)
    assert [(r.address, r.count) for r in plan] == [(0, 4), (10, 1), (200, 100), (300, 30)]
    # With a gap allowance, 0..10 is one read; 200..330 would be 130 registers > 125: split.
    plan = plan_reads(group, max_gap=100)
    assert [(r.address, r.count) for r in plan] == [(0, 11), (200, 100), (300, 30)]
    assert all(r.count <= MAX_READ_REGISTERS for r in plan)
    many = ModbusGroup(points=[pt(metric=f"r{i}", address=i) for i in range(300)])
    assert [(r.address, r.count) for r in plan_reads(many)] == [(0, 125), (125, 125), (250, 50)]


def test_docs_example_parses() -> None:
    text = DOCS.read_text()
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    cfg = parse_config(block, str(DOCS))
    assert cfg.modbus and cfg.modbus[0].groups


# ---------------------------------------------------------------- real server

HOLDING = [0] * 64
HOLDING[0] = 0xFF29  # temperature int16 -215, scale 0.1
HOLDING[1:3] = regs_of(">f", 1.5)[::-1]  # pressure float32, little word order
HOLDING[3:5] = regs_of(">I", 70000)
HOLDING[5:9] = regs_of(">d", 12.75)
HOLDING[10:13] = [0x4142, 0x2D31, 0x3200]  # serial "AB-12"
HOLDING[20] = 55  # setpoint
INPUT = [0] * 16
INPUT[0:2] = regs_of(">i", -100000)


def sim_device() -> SimDevice:
    return SimDevice(
        id=1,
        simdata=(
            [SimData(0, count=16, values=False, datatype=DataType.BITS)],
            [SimData(0, count=16, values=True, datatype=DataType.BITS)],
            [SimData(0, values=HOLDING, datatype=DataType.REGISTERS)],
            [SimData(0, values=INPUT, datatype=DataType.REGISTERS)],
        ),
    )


def device_config(**kw: Any) -> ModbusDeviceConfig:
    groups = [
        {
            "function": "holding_registers",
            "interval": 0.05,
            "points": [
                {
                    "metric": "temperature",
                    "address": 0,
                    "data_type": "int16",
                    "scale": 0.1,
                    "unit": "Cel",
                },
                {
                    "metric": "pressure",
                    "address": 1,
                    "data_type": "float32",
                    "word_order": "little",
                },
                {"metric": "energy", "address": 3, "data_type": "uint32"},
                {"metric": "flow", "address": 5, "data_type": "float64"},
                {"metric": "serial", "address": 10, "data_type": "string", "count": 3},
                {"metric": "setpoint", "address": 20, "writable": True},
            ],
        },
        {
            "function": "input_registers",
            "interval": 0.05,
            "points": [{"metric": "delta", "address": 0, "data_type": "int32"}],
        },
        {
            "function": "coils",
            "interval": 0.05,
            "points": [
                {"metric": "pump_on", "address": 0, "writable": True},
                {"metric": "valve", "address": 4, "count": 2, "writable": True},
            ],
        },
        {
            "function": "discrete_inputs",
            "interval": 0.05,
            "points": [{"metric": "door", "address": 2}],
        },
    ]
    return ModbusDeviceConfig.model_validate(
        {"name": "boiler", "device_id": "boiler-1", "groups": groups, "timeout": 1.0, **kw}
    )


class Requests:
    """Counts read requests the server receives (trace_pdu hook)."""

    def __init__(self) -> None:
        self.reads = 0

    def __call__(self, sending: bool, pdu: Any) -> Any:
        if not sending and pdu.function_code in (1, 2, 3, 4):
            self.reads += 1
        return pdu


@contextlib.asynccontextmanager
async def tcp_server(
    port: int = 0, trace: Callable[[bool, Any], Any] | None = None
) -> AsyncIterator[tuple[ModbusTcpServer, int]]:
    server = ModbusTcpServer(sim_device(), address=("127.0.0.1", port), trace_pdu=trace)
    await server.serve_forever(background=True)
    try:
        yield server, server.transport.sockets[0].getsockname()[1]
    finally:
        await server.shutdown()


@contextlib.asynccontextmanager
async def running(adapter: ModbusAdapter) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(adapter.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def check_reading_metrics(readings: list[Any]) -> None:
    merged: dict[str, Any] = {}
    for r in readings:
        assert r.device_id == "boiler-1"
        merged.update(r.metrics)
    assert merged["temperature"] == pytest.approx(-21.5)
    assert merged["pressure"] == 1.5
    assert merged["energy"] == 70000
    assert merged["flow"] == 12.75
    assert merged["serial"] == "AB-12"
    assert merged["setpoint"] == 55
    assert merged["delta"] == -100000
    assert merged["pump_on"] is False
    assert merged["valve.0"] is False and merged["valve.1"] is False
    assert merged["door"] is True


async def test_tcp_polls_decodes_batches_and_writes() -> None:
    trace = Requests()
    async with tcp_server(trace=trace) as (_, port):
        ingest = RecordingIngest()
        adapter = ModbusAdapter(device_config(host="127.0.0.1", port=port), ingest=ingest)
        async with running(adapter):
            await ingest.wait_readings(4)
            check_reading_metrics(ingest.readings[:4])
            holding = next(r for r in ingest.readings if "temperature" in r.metrics)
            assert holding.tags == {"unit:temperature": "Cel"}
            assert holding.origin.adapter == "modbus"
            assert adapter.state.connected
            # Holding group: 0..8 and 10..12 and 20 -> 3 requests; one each for the others.
            assert len(adapter.plans[0]) == 3
            polls_before, reads_before = adapter.polls, trace.reads
            await adapter.poll_group(0)
            assert trace.reads - reads_before == 3 and adapter.polls == polls_before + 1

            await adapter.write("setpoint", 61)
            await adapter.write("pump_on", True)
            await adapter.write("valve.1", True)
            n = len(ingest.readings)
            await ingest.wait_readings(n + 8)
            latest: dict[str, Any] = {}
            for r in ingest.readings[n + 4 :]:
                latest.update(r.metrics)
            assert latest["setpoint"] == 61 and latest["pump_on"] is True
            assert latest["valve.1"] is True and latest["valve.0"] is False

            with pytest.raises(PermissionError):
                await adapter.write("temperature", 1)
            with pytest.raises(KeyError):
                await adapter.write("nope", 1)
            with pytest.raises(ValueError):
                await adapter.write("setpoint", -1)

        # a real client sees what the adapter wrote
        client = AsyncModbusTcpClient("127.0.0.1", port=port)
        await client.connect()
        try:
            rr = await client.read_holding_registers(20, count=1, device_id=1)
            assert rr.registers == [61]
        finally:
            client.close()


async def test_refused_range_is_counted_and_other_points_still_arrive() -> None:
    cfg = device_config(host="127.0.0.1")
    bad = cfg.model_copy(deep=True)
    bad.groups[1].points.append(ModbusPoint(metric="ghost", address=1000))
    async with tcp_server() as (_, port):
        bad.port = port
        ingest = RecordingIngest()
        adapter = ModbusAdapter(bad, ingest=ingest)
        async with running(adapter):
            await ingest.wait_readings(8)
            assert adapter.state.errors >= 1 and "1000" in (adapter.state.last_error or "")
            assert adapter.state.connected
            assert any(r.metrics.get("delta") == -100000 for r in ingest.readings)
            assert not any("ghost" in r.metrics for r in ingest.readings)


async def test_rejected_readings_are_counted() -> None:
    async with tcp_server() as (_, port):
        ingest = RecordingIngest(status=IngestStatus.REJECTED_FULL)
        adapter = ModbusAdapter(device_config(host="127.0.0.1", port=port), ingest=ingest)
        async with running(adapter):
            await ingest.wait_readings(4)
            await wait_until(lambda: adapter.state.rejected >= 4)
            assert adapter.state.readings == 0


async def test_reconnects_forever_when_the_server_goes_away_and_comes_back() -> None:
    ingest = RecordingIngest()
    async with tcp_server() as (_, port):
        adapter = ModbusAdapter(device_config(host="127.0.0.1", port=port), ingest=ingest)
        task = asyncio.create_task(adapter.run())
        await ingest.wait_readings(1)
    # the server is gone under the running adapter
    try:
        await wait_until(lambda: not adapter.state.connected)
        n = len(ingest.readings)
        async with tcp_server(port):
            await ingest.wait_readings(n + 4, within=15)
            assert adapter.state.connected and not task.done()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_unreachable_server_never_raises() -> None:
    ingest = RecordingIngest()
    adapter = ModbusAdapter(device_config(host="127.0.0.1", port=1), ingest=ingest)
    async with running(adapter) as task:
        await wait_until(lambda: adapter.state.errors >= 2)
        assert not task.done() and not adapter.state.connected


# ---------------------------------------------------------------- RTU over ptys


def _pty() -> tuple[int, int, str]:
    master, slave = os.openpty()
    tty.setraw(slave)
    return master, slave, os.ttyname(slave)


@contextlib.asynccontextmanager
async def null_modem() -> AsyncIterator[tuple[str, str]]:
    """Two pseudo-terminals whose masters the test relays into each other: a
    null-modem cable between the two slave device paths. The test keeps the
    slave fds open so a master never reads EIO while a peer reopens its end."""
    (ma, sa, a), (mb, sb, b) = _pty(), _pty()
    loop = asyncio.get_running_loop()

    def relay(src: int, dst: int) -> None:
        try:
            os.write(dst, os.read(src, 4096))
        except OSError:
            loop.remove_reader(src)

    loop.add_reader(ma, relay, ma, mb)
    loop.add_reader(mb, relay, mb, ma)
    try:
        yield a, b
    finally:
        loop.remove_reader(ma)
        loop.remove_reader(mb)
        for fd in (ma, sa, mb, sb):
            os.close(fd)


async def test_rtu_through_a_pseudo_terminal_pair() -> None:
    async with null_modem() as (server_port, client_port):
        server = ModbusSerialServer(sim_device(), port=server_port, baudrate=115200)
        await server.serve_forever(background=True)
        try:
            ingest = RecordingIngest()
            cfg = device_config(transport="rtu", serial_port=client_port, baudrate=115200)
            adapter = ModbusAdapter(cfg, ingest=ingest)
            async with running(adapter):
                await ingest.wait_readings(4)
                check_reading_metrics(ingest.readings[:4])
                await adapter.write("setpoint", 42)
                n = len(ingest.readings)
                await ingest.wait_readings(n + 4)
                assert any(r.metrics.get("setpoint") == 42 for r in ingest.readings[n:])
                assert ingest.readings[0].origin.address.startswith(client_port)
        finally:
            await server.shutdown()


async def test_cancel_stops_the_poller_even_mid_request() -> None:
    # pymodbus turns a cancellation inside a request into its own I/O error;
    # the reconnect loop must still stop (found by bench/ingest_protocols.py).
    in_request = asyncio.Event()

    async def slow(*_: Any) -> None:
        in_request.set()
        await asyncio.sleep(0.5)

    device = sim_device()
    device.action = slow
    server = ModbusTcpServer(device, address=("127.0.0.1", 0))
    await server.serve_forever(background=True)
    try:
        port = server.transport.sockets[0].getsockname()[1]
        adapter = ModbusAdapter(
            device_config(host="127.0.0.1", port=port), ingest=RecordingIngest()
        )
        task = asyncio.create_task(adapter.run())
        async with asyncio.timeout(10):
            await in_request.wait()
        task.cancel()
        async with asyncio.timeout(3):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert task.done()
    finally:
        await server.shutdown()


# ---------------------------------------------------------------- commands


async def test_commands_write_points_on_the_real_server(tmp_path: Path) -> None:
    """`write` commands through the command queue reach the pymodbus server
    with the read's data type; bad ones fail without writing anything."""
    from edgeway.commands.model import CommandState
    from edgeway.commands.service import CommandService
    from edgeway.config import CommandsSection

    async with tcp_server() as (_, port):
        ingest = RecordingIngest()
        adapter = ModbusAdapter(device_config(host="127.0.0.1", port=port), ingest=ingest)
        svc = CommandService(tmp_path, CommandsSection())
        await svc.open()
        try:
            # Queued while the adapter is not connected yet: sent once it is.
            ok, _ = await svc.submit("boiler-1", "write", {"setpoint": 63, "valve.1": True})
            await asyncio.sleep(0.1)
            dl = adapter.downlink(svc)
            assert dl is not None
            svc.add_downlink(dl)
            async with running(adapter):
                done = await svc.wait(ok.id, 10)
                assert done.state is CommandState.SUCCEEDED, done
                assert done.result == {"written": {"setpoint": 63, "valve.1": True}}
                bad, _ = await svc.submit("boiler-1", "write", {"setpoint": 64, "temperature": 1})
                assert (await svc.wait(bad.id, 10)).state is CommandState.FAILED
                assert "not writable" in (bad.error or "")
                refused, _ = await svc.submit("boiler-1", "write", {"setpoint": -5})
                assert (await svc.wait(refused.id, 10)).state is CommandState.FAILED
                unknown, _ = await svc.submit("boiler-1", "explode")
                assert (await svc.wait(unknown.id, 10)).state is CommandState.FAILED
        finally:
            await svc.close()
        client = AsyncModbusTcpClient("127.0.0.1", port=port)
        await client.connect()
        try:
            rr = await client.read_holding_registers(20, count=1, device_id=1)
            assert rr.registers == [63]  # the failed commands wrote nothing
            coils = await client.read_coils(4, count=2, device_id=1)
            assert coils.bits[:2] == [False, True]
        finally:
            client.close()
