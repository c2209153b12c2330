"""The simulator's firmware side against a real gateway: gmqtt devices take a
campaign, download over HTTP (range resume) and in MQTT chunks, verify the
SHA-256, report their state and new version; one device per LwM2M failure
result, each reached the way a device meets it. Every result code of
LwM2M Object 5 ends up on a campaign target here."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import httpx
import pytest

from edgeway.firmware.model import UpdateResult, UpdateState
from edgeway.sim.devices import make_devices
from edgeway.sim.firmware import FailurePlan, FirmwareAgent, FirmwareFleet, make_agents, running
from firmware_rig import IMAGE, Rig, upload, wait_campaign

SRC = str(Path(__file__).resolve().parents[2] / "src")
RIG_EXTRA = "devices: {flush_interval: 0.2}\n"


FAILURES = [r for r in UpdateResult if r not in (UpdateResult.INITIAL, UpdateResult.SUCCESS)]


def fleet_of(rig: Rig, agents: dict[str, FirmwareAgent], transport: str) -> FirmwareFleet:
    devices = make_devices(len(agents), prefix="x", seed=1)
    for dev, name in zip(devices, agents, strict=True):
        dev.device_id = name
    return FirmwareFleet(devices, "127.0.0.1", rig.mport, agents=agents, transport=transport)  # type: ignore[arg-type]


async def test_every_result_code_and_both_transports(rig: Rig) -> None:
    codes = {f"code-{r.label}": FirmwareAgent(f"code-{r.label}", fail=r) for r in FAILURES}
    http_ok = make_agents({"h": ["http-1", "http-2", "http-3"]}, {"h": FailurePlan(cut=1 / 3)})
    mqtt_ok = make_agents({"m": ["mqtt-1", "mqtt-2", "mqtt-3"]}, {"m": FailurePlan(cut=2 / 3)})
    over_http = fleet_of(rig, {**codes, **http_ok}, "http")
    over_mqtt = fleet_of(rig, mqtt_ok, "mqtt")
    everyone = [*codes, *http_ok, *mqtt_ok]
    async with running(over_http), running(over_mqtt):
        await asyncio.wait_for(over_http.all_connected.wait(), 30)
        await asyncio.wait_for(over_mqtt.all_connected.wait(), 30)
        async with httpx.AsyncClient(base_url=rig.base, timeout=20) as http:
            image = (await upload(http, "9.0")).json()["image"]["id"]
            r = await http.post(
                "/api/firmware/campaigns",
                json={"image": image, "groups": {"all": everyone}, "canary_share": 0,
                      "pace": 6000, "error_threshold": 1.0, "success_threshold": 0.0},
            )  # fmt: skip
            cid = r.json()["campaign"]["id"]
            body = await wait_campaign(http, cid, {"completed", "halted"})
            results = {d["device_id"]: d["result"] for d in body["devices"]}
            for r_ in FAILURES:
                assert results[f"code-{r_.label}"] == r_.label
            for d in [*http_ok, *mqtt_ok]:
                assert results[d] == "success", (d, results[d])
            assert {*results.values()} == {r_.label for r_ in UpdateResult} - {"initial"}
            # The new version reaches the registry through the devices' telemetry.
            async with asyncio.timeout(20):
                while (await http.get("/api/devices/mqtt-1")).json()["device"][  # noqa: ASYNC110
                    "firmware"
                ] != "9.0":
                    await asyncio.sleep(0.2)
    agents = {**codes, **http_ok, **mqtt_ok}
    # Downloads: each successful device got the image once (a resume does not
    # fetch again what it had); the cut ones resumed.
    for d in [*http_ok, *mqtt_ok]:
        a = agents[d]
        assert a.updates == 1 and a.downloads == 1 and a.received == len(IMAGE), a
        assert a.version == "9.0" and a.state is UpdateState.IDLE
        assert [s for s, _ in a.history] == [1, 2, 3, 0]
    assert sum(agents[d].resumes for d in http_ok) == 1
    assert sum(agents[d].resumes for d in mqtt_ok) == 2
    # The cut ones each got a new connection (gmqtt may add a reconnect of its own).
    assert over_mqtt.stats.reconnects >= 2
    # The integrity failure downloaded everything, then the hash check failed;
    # the connection-lost device stopped half way.
    integrity = agents["code-integrity_check_failure"]
    assert integrity.received == len(IMAGE) and integrity.history[-1] == (0, 5)
    lost = agents["code-connection_lost"]
    assert lost.received == len(IMAGE) // 2 and lost.version == "1.0"


async def test_simulate_command_takes_a_campaign(rig: Rig) -> None:
    """``edgeway simulate --firmware mqtt``, a process of its own: its devices
    take a campaign, one fails as told, the others report the new version."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edgeway", "simulate", "--devices", "3", "--protocol", "mqtt",
        "--target", f"127.0.0.1:{rig.mport}", "--firmware", "mqtt", "--seed", "3",
        "--firmware-fail", "0.34:out_of_memory", "--firmware-cut", "0.34", "--rate", "0.2",
        "--duration", "60", "--interval", "1",
        env={**os.environ, "PYTHONPATH": SRC},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    ids = ["sim-0000", "sim-0001", "sim-0002"]
    try:
        async with httpx.AsyncClient(base_url=rig.base, timeout=20) as http:
            async with asyncio.timeout(60):
                for d in ids:  # the process connects its devices in its own time
                    while (await http.get(f"/api/devices/{d}")).status_code != 200:  # noqa: ASYNC110
                        await asyncio.sleep(0.3)
            image = (await upload(http, "9.5")).json()["image"]["id"]
            r = await http.post(
                "/api/firmware/campaigns",
                json={"image": image, "groups": {"all": ids}, "canary_share": 0,
                      "error_threshold": 1.0, "success_threshold": 0.0, "pace": 6000},
            )  # fmt: skip
            body = await wait_campaign(http, r.json()["campaign"]["id"], {"completed", "halted"})
            results = sorted(d["result"] for d in body["devices"])
            assert results == ["out_of_memory", "success", "success"], body
    finally:
        proc.terminate()
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert b"3 mqtt devices" in out, out[-2000:]


def test_parse_failure() -> None:
    from edgeway.sim.firmware import parse_failure

    assert parse_failure("0.2:integrity_check_failure") == (0.2, UpdateResult(5))
    for bad in ("0.2", "2:update_failed", "x:update_failed", "0.1:success", "0.1:nope"):
        with pytest.raises(ValueError):
            parse_failure(bad)
