"""Simulated devices against a real in-process gateway and the bundled cloud receiver."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from edgeway.config import (
    CoapSection,
    HttpIngestSection,
    ReceiptsSection,
)
from edgeway.gateway import Gateway
from edgeway.sim.cloud import CloudReceiver
from edgeway.sim.demo import lost_messages
from edgeway.sim.devices import make_devices
from edgeway.sim.runner import CoapFleet, HttpFleet, ModbusSimServer, MqttFleet, OpcUaSimServer
from sim_gateway import (
    devices_seen,
    free_port,
    gateway_config,
    mqtt_requests,
    records,
    running,
    wait_until,
)


def _command(port: int, device_id: str) -> dict[str, Any]:
    """Send a command straight to the device's topic with paho; its answer."""
    (answer,) = mqtt_requests(
        port,
        f"devices/{device_id}/commands/response",
        [(f"devices/{device_id}/commands", b'{"id": "c-1", "name": "ping"}')],
    )
    return dict(orjson.loads(answer))


async def test_mqtt_devices_free_their_buffers_on_receipts_and_answer_commands(
    tmp_path: Path, cloud: CloudReceiver
) -> None:
    async with running(Gateway(gateway_config(tmp_path / "gw", cloud))) as gw:
        port = gw.listeners[0].bound[1]
        devices = make_devices(5, prefix="mq", seed=1, rate=20.0)
        fleet = MqttFleet(devices, "127.0.0.1", port, qos=1)
        stop = asyncio.Event()
        task = asyncio.create_task(fleet.run(stop, drain=15.0))
        try:
            await asyncio.wait_for(fleet.all_connected.wait(), 10)
            await wait_until(lambda: cloud.stats.unique >= 100)
            answer = await asyncio.to_thread(_command, port, "mq-0002")
            assert answer["id"] == "c-1" and answer["status"] == "ok" and "pong" in answer["result"]
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
        assert fleet.stats.commands == 1
        assert sum(len(d.buffer) for d in devices) == 0, "receipts must free every buffer"
        assert fleet.stats.receipts == fleet.stats.produced
        assert lost_messages(devices, cloud) == []
        for d in devices:
            assert cloud.received_seqs(d.device_id) == set(range(1, d.seq + 1))


async def test_mqtt_devices_buffer_while_the_gateway_is_down_and_deliver_after(
    tmp_path: Path, cloud: CloudReceiver
) -> None:
    port = free_port()
    cfg = gateway_config(tmp_path / "gw", cloud, mqtt_port=port)
    devices = make_devices(4, prefix="rs", seed=2, rate=20.0)
    fleet = MqttFleet(devices, "127.0.0.1", port, qos=1, reconnect_delay=0.3, receipt_grace=2.0)
    stop = asyncio.Event()
    task: asyncio.Task[None] | None = None
    try:
        async with running(Gateway(cfg)):
            task = asyncio.create_task(fleet.run(stop, drain=20.0))
            await asyncio.wait_for(fleet.all_connected.wait(), 10)
            await wait_until(lambda: cloud.stats.unique >= 40)
        # Gateway down: the devices keep producing into their own buffers.
        produced = fleet.stats.produced
        await wait_until(lambda: fleet.stats.produced >= produced + 40)
        held = sum(len(d.buffer) for d in devices)
        assert held >= 40
        connects = fleet.stats.connects
        async with running(Gateway(cfg)):
            await wait_until(lambda: fleet.stats.connects >= connects + len(devices))
            await wait_until(lambda: cloud.stats.unique >= produced + 40)
            stop.set()
            await asyncio.wait_for(task, 30)
            task = None
        assert lost_messages(devices, cloud) == []
        assert sum(len(d.buffer) for d in devices) == 0
    finally:
        stop.set()
        if task is not None:
            await asyncio.wait_for(task, 30)


async def test_coap_and_http_devices_deliver_everything(
    tmp_path: Path, cloud: CloudReceiver
) -> None:
    cfg = gateway_config(
        tmp_path,
        cloud,
        coap=CoapSection(listen="127.0.0.1:0"),
        http_ingest=HttpIngestSection(listen="127.0.0.1:0", allow_anonymous=True),
    )
    async with running(Gateway(cfg)) as gw:
        coap = next(a for a in gw.adapters if a.section == "coap")
        http = next(a for a in gw.adapters if a.section == "http_ingest")
        co = make_devices(3, prefix="co", seed=3, rate=10.0)
        ht = make_devices(3, prefix="ht", seed=4, rate=10.0)
        fleets = [
            CoapFleet(co, "127.0.0.1", coap.port),  # type: ignore[attr-defined]
            HttpFleet(ht, "127.0.0.1", http.port),  # type: ignore[attr-defined]
        ]
        stop = asyncio.Event()
        tasks = [asyncio.create_task(f.run(stop, drain=10.0)) for f in fleets]
        try:
            await wait_until(lambda: all(f.stats.acked >= 20 for f in fleets))
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 30)
        await wait_until(lambda: gw.status()["outbox"]["cloud"]["pending"] == 0)
        assert lost_messages(co + ht, cloud) == []
        assert all(f.stats.acked == f.stats.produced for f in fleets)


async def test_modbus_and_opcua_simulators_are_polled(tmp_path: Path, cloud: CloudReceiver) -> None:
    mb = ModbusSimServer(make_devices(2, prefix="mb", seed=5, kinds=("machine", "meter")))
    ua = OpcUaSimServer(make_devices(1, prefix="ua", seed=6, kinds=("env",), rate=5.0))
    await mb.start()
    await ua.start()
    stop = asyncio.Event()
    try:
        cfg = gateway_config(
            tmp_path / "gw",
            cloud,
            modbus=mb.gateway_config(interval=0.1),
            opcua=ua.gateway_config(sampling_interval=0.1),
        )
        async with running(Gateway(cfg)):
            updates = asyncio.create_task(ua.run(stop))
            try:
                await wait_until(lambda: {"mb-0000", "mb-0001", "ua-0000"} <= devices_seen(cloud))
            finally:
                stop.set()
                await updates
        assert mb.reads >= 2
    finally:
        await ua.stop()
        await mb.stop()
    stored = records(cloud)
    machine = [r for r in stored if r["device_id"] == "mb-0000"]
    assert {"vibration", "current", "bearing_temp", "rpm", "running"} <= set(machine[0]["metrics"])
    assert 0 < machine[-1]["metrics"]["rpm"] < 3100 or machine[-1]["metrics"]["running"] == 0
    env = [r for r in stored if r["device_id"] == "ua-0000"]
    assert {"temperature", "humidity", "battery"} & set(env[0]["metrics"])


async def test_cloud_receiver_outages_and_duplicates(tmp_path: Path) -> None:
    cloud = CloudReceiver(store_path=tmp_path / "cloud.jsonl")
    await cloud.start()
    body = orjson.dumps(
        {
            "gateway_id": "g",
            "records": [{"id": "g:1", "device_id": "d", "ts": 1.0, "metrics": {"seq": 1}}],
        }
    )
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(cloud.url, data=body) as r:
                assert r.status == 200
            await cloud.take_down("503")
            async with s.post(cloud.url, data=body) as r:
                assert r.status == 503 and r.headers["Retry-After"] == "1"
            await cloud.bring_up()
            await cloud.take_down("refuse")
            with pytest.raises(aiohttp.ClientConnectionError):
                async with s.post(cloud.url, data=body) as r:
                    pass
            await cloud.bring_up()
            async with s.post(cloud.url, data=body) as r:
                assert r.status == 200
            async with s.post(cloud.url, data=b"{") as r:
                assert r.status == 400
        assert cloud.stats.unique == 1 and cloud.stats.duplicates == 1 and cloud.stats.refused == 1
        assert cloud.received_seqs("d") == {1}
    finally:
        await cloud.stop()
    assert len((tmp_path / "cloud.jsonl").read_bytes().splitlines()) == 2


def test_simulate_modbus_prints_the_gateway_config() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgeway",
            "simulate",
            "--protocol",
            "modbus",
            "--devices",
            "2",
            "--target",
            "127.0.0.1:0",
            "--duration",
            "1",
            "--interval",
            "0.5",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "modbus simulator with 2 devices listening on 127.0.0.1:" in out.stdout
    assert "device_id: sim-0000" in out.stdout and "unit_id: 2" in out.stdout
    assert "metric: temperature" in out.stdout


async def _simulate_mqtt(port: int, devices: int, duration: float) -> str:
    """``edgeway simulate`` as a user runs it; its standard output."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "edgeway",
        "simulate",
        "--devices",
        str(devices),
        "--rate",
        "5",
        "--target",
        f"127.0.0.1:{port}",
        "--duration",
        str(duration),
        "--interval",
        "1",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_simulate_mqtt_against_a_gateway(tmp_path: Path, cloud: CloudReceiver) -> None:
    async with running(Gateway(gateway_config(tmp_path / "gw", cloud))) as gw:
        text = await _simulate_mqtt(gw.listeners[0].bound[1], 10, 3)
        assert "10 mqtt devices -> 127.0.0.1:" in text
        assert "stopped: mqtt: produced" in text and "held 0" in text.splitlines()[-1]
        assert len({r["device_id"] for r in records(cloud)}) == 10


async def test_simulate_without_receipts_reports_acknowledged_not_lost(
    tmp_path: Path, cloud: CloudReceiver
) -> None:
    # A gateway without receipts never frees the devices' buffers: the last
    # line must say what the devices know (the gateway acknowledged every
    # message) and what they cannot know (delivery to the cloud), instead of
    # "confirmed 0 held N", which reads like data loss.
    cfg = gateway_config(tmp_path / "gw", cloud)
    cfg.receipts = ReceiptsSection(enabled=False)
    async with running(Gateway(cfg)) as gw:
        text = await _simulate_mqtt(gw.listeners[0].bound[1], 3, 2)
        last = text.splitlines()[-1]
        assert last.startswith("stopped: mqtt: produced "), last
        produced = int(last.split("produced ")[1].split()[0])
        assert produced > 0
        assert f"sent {produced} acknowledged {produced} " in last
        assert "delivery to the cloud not confirmed" in last
        assert "held" not in last and "confirmed 0" not in last
        await wait_until(lambda: len(records(cloud)) >= produced)
