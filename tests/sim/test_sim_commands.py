"""Simulated devices answer commands from the gateway's command queue: MQTT and
HTTP devices through a real in-process gateway, Modbus and OPC-UA simulators
take writes that show in later readings."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from edgeway.commands.model import Command, CommandState
from edgeway.config import CoapSection, HttpIngestSection
from edgeway.gateway import Gateway
from edgeway.sim.cloud import CloudReceiver
from edgeway.sim.devices import ANSWERED_MAX, make_devices
from edgeway.sim.runner import (
    CoapFleet,
    HttpFleet,
    ModbusSimServer,
    MqttFleet,
    OpcUaSimServer,
    decode_register_write,
)
from sim_gateway import gateway_config, mqtt_requests, records, running, wait_until

TOKEN = "sim-device-token-0123456789"


async def _round_trip(
    gw: Gateway, device: str, name: str, params: dict[str, Any] | None = None
) -> Command:
    assert gw.commands is not None
    cmd, _ = await gw.commands.submit(device, name, params, ttl=20, result_timeout=20)
    done = await gw.commands.wait(cmd.id, 25)
    assert done.state.terminal, done
    return done


def _later_readings(cloud: CloudReceiver, device: str, after: float) -> list[dict[str, Any]]:
    """The device's telemetry records in the cloud taken after wall time ``after``."""
    return [
        r
        for r in records(cloud)
        if r["device_id"] == device and r["ts"] > after and "command_id" not in r["metrics"]
    ]


@pytest.fixture
async def mqtt_fleet(
    tmp_path: Path, cloud: CloudReceiver
) -> AsyncIterator[tuple[Gateway, MqttFleet]]:
    async with running(Gateway(gateway_config(tmp_path / "gw", cloud))) as gw:
        fleet = MqttFleet(
            make_devices(3, prefix="mq", seed=11, rate=5.0), "127.0.0.1", gw.listeners[0].bound[1]
        )
        stop = asyncio.Event()
        task = asyncio.create_task(fleet.run(stop, drain=5.0))
        try:
            await asyncio.wait_for(fleet.all_connected.wait(), 10)
            yield gw, fleet
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)


async def test_mqtt_sim_devices_answer_commands_from_the_queue(
    mqtt_fleet: tuple[Gateway, MqttFleet], cloud: CloudReceiver
) -> None:
    gw, fleet = mqtt_fleet
    dev = fleet.devices[1]
    done = await _round_trip(gw, dev.device_id, "set_rate", {"rate": 20})
    assert done.state is CommandState.SUCCEEDED, done
    assert done.result == {"rate": 20.0} and dev.rate == 20.0
    # What the device publishes changes: 20 readings/s from now on (bursts only add).
    after = time.time()
    await wait_until(lambda: len(_later_readings(cloud, dev.device_id, after)) >= 20)
    got = _later_readings(cloud, dev.device_id, after)
    span = got[19]["ts"] - got[0]["ts"]
    assert span < 19 / 5.0, f"20 readings over {span:.2f} s: still 5/s"

    failed = await _round_trip(gw, dev.device_id, "reboot")
    assert failed.state is CommandState.FAILED and "unknown command 'reboot'" in (
        failed.error or ""
    )
    bad = await _round_trip(gw, dev.device_id, "set_rate", {"rate": -1})
    assert bad.state is CommandState.FAILED and "set_rate needs" in (bad.error or "")
    assert dev.commands_answered == 1


def _publish_twice(port: int, device: str, command: dict[str, Any]) -> list[bytes]:
    """Publish ``command`` to the device's command topic, then again as a
    redelivery (same id), the way the gateway does after a restart; the answers."""
    topic = f"devices/{device}/commands/{command['name']}"
    payloads = [orjson.dumps(command), orjson.dumps({**command, "redelivery": True})]
    return mqtt_requests(port, f"{topic}/result", [(topic, p) for p in payloads], "replayer")


async def test_mqtt_sim_device_runs_a_redelivered_command_once(
    mqtt_fleet: tuple[Gateway, MqttFleet],
) -> None:
    gw, fleet = mqtt_fleet
    dev = fleet.devices[2]
    port = gw.listeners[0].bound[1]
    cmd = {"id": "replayed-1", "name": "set_rate", "params": {"rate": 7}}
    first, again = await asyncio.to_thread(_publish_twice, port, dev.device_id, cmd)
    assert orjson.loads(first) == {"id": "replayed-1", "status": "ok", "result": {"rate": 7.0}}
    assert again == first
    assert dev.commands_answered == 1 and dev.commands_repeated == 1
    # Ran once: a rate set after it is not undone by the redelivery.
    assert (
        await _round_trip(gw, dev.device_id, "set_rate", {"rate": 3})
    ).state is CommandState.SUCCEEDED
    (answer,) = await asyncio.to_thread(lambda: _publish_twice(port, dev.device_id, cmd)[1:])
    assert answer == first and dev.rate == 3.0


def test_device_remembers_a_bounded_number_of_answers() -> None:
    (dev,) = make_devices(1, seed=1)
    first = dev.handle_command(b'{"id": "c0", "name": "set_rate", "params": {"rate": 2}}', 0.0)
    for i in range(1, ANSWERED_MAX + 1):
        dev.handle_command(orjson.dumps({"id": f"c{i}", "name": "ping"}), 0.0)
    assert len(dev.answered) == ANSWERED_MAX and "c0" not in dev.answered
    dev.rate = 1.0
    # Forgotten: run again (the gateway redelivers only the last few).
    assert (
        dev.handle_command(b'{"id": "c0", "name": "set_rate", "params": {"rate": 2}}', 0.0) == first
    )
    assert dev.rate == 2.0 and dev.commands_repeated == 0


async def test_http_sim_devices_long_poll_and_answer(tmp_path: Path, cloud: CloudReceiver) -> None:
    cfg = gateway_config(
        tmp_path / "gw",
        cloud,
        http_ingest=HttpIngestSection(
            listen="127.0.0.1:0", allow_anonymous=True, tokens={"*": TOKEN}
        ),
    )
    async with running(Gateway(cfg)) as gw:
        http = next(a for a in gw.adapters if a.section == "http_ingest")
        # Kinds env, env, machine, meter: ht-0002 is a machine.
        devices = make_devices(4, prefix="ht", seed=12, rate=5.0)
        fleet = HttpFleet(devices, "127.0.0.1", http.port, token=TOKEN, command_wait=5.0)  # type: ignore[attr-defined]
        stop = asyncio.Event()
        task = asyncio.create_task(fleet.run(stop, drain=5.0))
        try:
            pong = await _round_trip(gw, "ht-0000", "ping")
            assert pong.state is CommandState.SUCCEEDED and "pong" in pong.result
            machine = devices[2]
            assert machine.kind == "machine"
            stopped = await _round_trip(gw, machine.device_id, "write", {"running": False})
            assert stopped.state is CommandState.SUCCEEDED, stopped
            assert stopped.result == {"written": {"running": False}}
            after = time.time()
            await wait_until(lambda: len(_later_readings(cloud, machine.device_id, after)) >= 3)
            for r in _later_readings(cloud, machine.device_id, after):
                assert r["metrics"]["running"] is False and r["metrics"]["rpm"] == 0, r
            unknown = await _round_trip(gw, "ht-0001", "reboot")
            assert unknown.state is CommandState.FAILED and "unknown command" in (
                unknown.error or ""
            )
            env_write = await _round_trip(gw, "ht-0001", "write", {"running": False})
            assert env_write.state is CommandState.FAILED
            assert "running is not writable on env devices" in (env_write.error or "")
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
    assert fleet.stats.commands == 4 and fleet.stats.command_errors == 0
    assert fleet.stats.acked == fleet.stats.produced  # telemetry as before


async def test_http_sim_devices_without_a_token_do_not_poll(
    tmp_path: Path, cloud: CloudReceiver
) -> None:
    cfg = gateway_config(
        tmp_path / "gw",
        cloud,
        http_ingest=HttpIngestSection(listen="127.0.0.1:0", allow_anonymous=True),
    )
    async with running(Gateway(cfg)) as gw:
        http = next(a for a in gw.adapters if a.section == "http_ingest")
        fleet = HttpFleet(make_devices(2, prefix="nt", seed=13, rate=10.0), "127.0.0.1", http.port)  # type: ignore[attr-defined]
        assert not fleet.takes_commands
        stop = asyncio.Event()
        task = asyncio.create_task(fleet.run(stop, drain=5.0))
        try:
            await wait_until(lambda: fleet.stats.acked >= 10)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
    # A poll without a token would have been refused (401) and counted.
    assert fleet.stats.command_errors == 0 and fleet.stats.acked == fleet.stats.produced


def test_register_writes_the_simulator_takes_and_refuses() -> None:
    # machine: running (uint16 at 4) is writable; rpm (3) is not.
    assert decode_register_write("machine", 4, [0]) == {"running": 0.0}
    assert decode_register_write("machine", 3, [0]) is None
    assert decode_register_write("machine", 3, [0, 1]) is None  # rpm + running
    assert decode_register_write("machine", 5, [1]) is None  # outside the map
    # meter: parts is a uint32 at 4-5: both registers or nothing.
    assert decode_register_write("meter", 4, [0, 7]) == {"parts": 7.0}
    assert decode_register_write("meter", 4, [0]) is None
    assert decode_register_write("meter", 5, [7]) is None
    assert decode_register_write("env", 0, [100]) is None


async def test_modbus_sim_write_is_visible_in_later_readings(
    tmp_path: Path, cloud: CloudReceiver
) -> None:
    from pymodbus.client import AsyncModbusTcpClient

    mb = ModbusSimServer(make_devices(2, prefix="mb", seed=14, kinds=("machine", "meter")))
    await mb.start()
    try:
        cfg = gateway_config(tmp_path / "gw", cloud, modbus=mb.gateway_config(interval=0.2))
        async with running(Gateway(cfg)) as gw:
            await wait_until(lambda: len(_later_readings(cloud, "mb-0001", 0)) >= 1)
            parts_before = _later_readings(cloud, "mb-0001", 0)[-1]["metrics"]["parts"]
            assert parts_before > 1000  # a meter part-way through its life

            stop = await _round_trip(gw, "mb-0000", "write", {"running": False})
            assert stop.state is CommandState.SUCCEEDED, stop
            reset = await _round_trip(gw, "mb-0001", "write", {"parts": 0})
            assert reset.state is CommandState.SUCCEEDED, reset
            after = time.time()
            await wait_until(
                lambda: (
                    len(_later_readings(cloud, "mb-0000", after)) >= 3
                    and len(_later_readings(cloud, "mb-0001", after)) >= 3
                )
            )
            for r in _later_readings(cloud, "mb-0000", after):
                assert r["metrics"]["running"] == 0 and r["metrics"]["rpm"] == 0, r
            for r in _later_readings(cloud, "mb-0001", after):
                assert r["metrics"]["parts"] < 100, r  # counted up from 0

            # A point that is not writable: the gateway refuses before writing.
            rpm = await _round_trip(gw, "mb-0000", "write", {"rpm": 100})
            assert rpm.state is CommandState.FAILED and "not writable" in (rpm.error or "")
            assert mb.writes == 2
        # The simulator itself refuses a write to a read-only register.
        client = AsyncModbusTcpClient("127.0.0.1", port=mb.port)
        await client.connect()
        try:
            rr = await client.write_register(3, 100, device_id=1)
            assert rr.isError() and rr.exception_code == 2  # ILLEGAL_ADDRESS
            rr = await client.write_register(4, 7, device_id=1)  # running = 7
            assert rr.isError() and rr.exception_code == 3  # ILLEGAL_VALUE
        finally:
            client.close()
        assert mb.writes == 2 and mb.refused_writes == 2
    finally:
        await mb.stop()


async def test_opcua_sim_write_is_visible_in_later_readings(
    tmp_path: Path, cloud: CloudReceiver
) -> None:
    ua = OpcUaSimServer(make_devices(1, prefix="ua", seed=15, kinds=("machine",), rate=5.0))
    await ua.start()
    stop = asyncio.Event()
    try:
        cfg = gateway_config(tmp_path / "gw", cloud, opcua=ua.gateway_config(sampling_interval=0.1))
        async with running(Gateway(cfg)) as gw:
            updates = asyncio.create_task(ua.run(stop))
            try:
                done = await _round_trip(gw, "ua-0000", "write", {"running": False})
                assert done.state is CommandState.SUCCEEDED, done
                assert ua.client_writes == 1 and ua.devices[0].signal.halted  # type: ignore[union-attr]
                after = time.time()
                await wait_until(
                    lambda: any(
                        r["metrics"].get("rpm") == 0
                        for r in _later_readings(cloud, "ua-0000", after)
                    )
                )
                later = _later_readings(cloud, "ua-0000", after)
                assert all(r["metrics"].get("running") in (False, None) for r in later), later
                refused = await _round_trip(gw, "ua-0000", "write", {"rpm": 5})
                assert refused.state is CommandState.FAILED
            finally:
                stop.set()
                await updates
    finally:
        await ua.stop()


@pytest.mark.parametrize(
    ("protocol", "options"),
    [("http", ["--token", TOKEN]), ("coap", ["--coap-commands"])],
)
async def test_simulate_devices_take_commands(
    tmp_path: Path, cloud: CloudReceiver, protocol: str, options: list[str]
) -> None:
    """``edgeway simulate --protocol http --token T`` / ``--protocol coap
    --coap-commands`` (a real process) take commands."""
    import sys

    cfg = gateway_config(
        tmp_path / "gw",
        cloud,
        http_ingest=HttpIngestSection(listen="127.0.0.1:0", tokens={"*": TOKEN}),
        coap=CoapSection(listen="127.0.0.1:0", commands=True),
    )
    async with running(Gateway(cfg)) as gw:
        adapter = next(
            a for a in gw.adapters if a.section == protocol.replace("http", "http_ingest")
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edgeway", "simulate", "--protocol", protocol,
            "--devices", "1", "--prefix", "cli", *options, "--duration", "30",
            "--target", f"127.0.0.1:{adapter.port}",  # type: ignore[attr-defined]
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        try:
            done = await _round_trip(gw, "cli-0000", "set_rate", {"rate": 4})
            assert done.state is CommandState.SUCCEEDED, done
            assert done.result == {"rate": 4.0}
        finally:
            proc.terminate()
            await proc.wait()


async def test_demo_command_rounds_go_on_after_a_refusal(tmp_path: Path) -> None:
    """A refused submit (queue full) is a line, not the end of the demo's rounds."""
    from edgeway.commands.service import CommandService
    from edgeway.config import CommandsSection
    from edgeway.sim.demo import CommandRounds, CommandTarget

    service = CommandService(tmp_path, CommandsSection(max_per_device=1), durability="os")
    await service.open()
    try:
        await service.submit("nobody", "ping")  # no device takes it: the queue stays full
        lines: list[str] = []
        target = CommandTarget("MQTT", "nobody", (("ping", {}),))
        rounds = CommandRounds(service, lines.append, target, [], first_after=0, every=0.01)
        ending = asyncio.Event()
        task = asyncio.create_task(rounds.run(ending))
        await wait_until(lambda: len(lines) >= 2)  # two rounds: the first did not end them
        ending.set()
        await asyncio.wait_for(task, 5)
        assert all("nobody (MQTT)  ping  refused:" in line for line in lines), lines
        assert rounds.sent == 0 and rounds.succeeded == 0
    finally:
        await service.close()


async def test_coap_sim_devices_observe_and_answer(tmp_path: Path, cloud: CloudReceiver) -> None:
    cfg = gateway_config(
        tmp_path / "gw", cloud, coap=CoapSection(listen="127.0.0.1:0", commands=True)
    )
    async with running(Gateway(cfg)) as gw:
        coap = next(a for a in gw.adapters if a.section == "coap")
        devices = make_devices(2, prefix="co", seed=16, rate=5.0)
        fleet = CoapFleet(devices, "127.0.0.1", coap.port, observe_commands=True)  # type: ignore[attr-defined]
        stop = asyncio.Event()
        task = asyncio.create_task(fleet.run(stop, drain=5.0))
        try:
            done = await _round_trip(gw, "co-0001", "set_rate", {"rate": 8})
            assert done.state is CommandState.SUCCEEDED and done.result == {"rate": 8.0}, done
            assert devices[1].rate == 8.0
            unknown = await _round_trip(gw, "co-0000", "reboot")
            assert unknown.state is CommandState.FAILED and "unknown command" in (
                unknown.error or ""
            )
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
    assert fleet.stats.commands == 2 and fleet.stats.acked == fleet.stats.produced


async def test_coap_sim_devices_stop_asking_a_gateway_without_coap_commands(
    tmp_path: Path, cloud: CloudReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = gateway_config(tmp_path / "gw", cloud, coap=CoapSection(listen="127.0.0.1:0"))
    async with running(Gateway(cfg)) as gw:
        coap = next(a for a in gw.adapters if a.section == "coap")
        fleet = CoapFleet(
            make_devices(3, prefix="nc", seed=17, rate=10.0),
            "127.0.0.1",
            coap.port,  # type: ignore[attr-defined]
            observe_commands=True,
        )
        stop = asyncio.Event()
        task = asyncio.create_task(fleet.run(stop, drain=5.0))
        try:
            # Each device is refused once (4.04) and stops asking; telemetry goes on.
            await wait_until(lambda: fleet.stats.command_errors == 3 and fleet.stats.acked >= 30)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
    assert fleet.stats.command_errors == 3
    refusals = [r for r in caplog.records if "refuses command requests" in r.getMessage()]
    assert len(refusals) == 1, refusals  # once per fleet, not per device


async def test_http_command_polls_do_not_starve_telemetry(
    tmp_path: Path, cloud: CloudReceiver
) -> None:
    """More polling devices than aiohttp's default pool (100): uploads still go
    (before, the polls held every connection and nothing was confirmed)."""
    cfg = gateway_config(
        tmp_path / "gw",
        cloud,
        http_ingest=HttpIngestSection(listen="127.0.0.1:0", tokens={"*": TOKEN}),
    )
    async with running(Gateway(cfg)) as gw:
        http = next(a for a in gw.adapters if a.section == "http_ingest")
        devices = make_devices(120, prefix="many", seed=18, rate=1.0)
        fleet = HttpFleet(devices, "127.0.0.1", http.port, token=TOKEN)  # type: ignore[attr-defined]
        stop = asyncio.Event()
        task = asyncio.create_task(fleet.run(stop, drain=5.0))
        try:
            await wait_until(lambda: all(d.buffer.confirmed for d in devices), limit=20)
            done = await _round_trip(gw, devices[-1].device_id, "ping")
            assert done.state is CommandState.SUCCEEDED, done
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
