"""The issue's campaign test (issue 16, section 3): 1,000 simulated devices in
3 registry groups, 20 % integrity failures injected in group 2. A real
``edgeway run`` is killed (SIGKILL) in the middle of the campaign and started
again on the same data directory; the campaign goes on by itself and halts
before group 3 (group 2 below its success threshold). No device gets the
update twice: each that succeeded ran it once and received the image's bytes
once (what a resumed download had is not fetched again). Then an operator
resumes, group 3 is updated, and still nobody got anything twice.

The devices: one gmqtt MQTT 5 connection per device (1,000 connections, all
in this test's event loop: each device is its own client id and session on
the gateway's broker, so commands, ``speaks_for`` and the per-device download
check work as for real devices; only the CPU is shared). Even-numbered
devices download over HTTP (Range resume), odd ones in MQTT chunks. The image
is 24 KiB so that the test is about the campaign, not the bandwidth
(bench/firmware.py measures that). Longer variant: ``EDGEWAY_FW_DEVICES=5000``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path
from typing import Any

import httpx
from edgeway_process import StartGateway, free_port

from edgeway.firmware.model import UpdateResult
from edgeway.sim.devices import make_devices
from edgeway.sim.firmware import FailurePlan, FirmwareFleet, make_agents, running
from firmware_rig import PUBLIC, sign_image

N = int(os.environ.get("EDGEWAY_FW_DEVICES", "1000"))
IMAGE = os.urandom(24 * 1024)

CONFIG = """
mqtt:
  listeners: [{{bind: "127.0.0.1:{{port}}", allow_anonymous: true}}]
http_ingest: {{listen: "127.0.0.1:{http}", allow_anonymous: true, commands_allow_anonymous: true}}
admin: {{listen: "127.0.0.1:{admin}", auth: none}}
firmware:
  keys: {{release: "{key}"}}
  download_base: "http://127.0.0.1:{http}"
"""


async def _until_up(http: httpx.AsyncClient, limit: float = 30) -> None:
    async with asyncio.timeout(limit):
        while True:
            try:
                if (await http.get("/api/firmware/campaigns")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)


async def _campaign(http: httpx.AsyncClient, cid: str) -> dict[str, Any]:
    while True:
        try:
            return (await http.get(f"/api/firmware/campaigns/{cid}")).json()  # type: ignore[no-any-return]
        except httpx.HTTPError:
            await asyncio.sleep(0.2)


async def test_1000_devices_halt_before_group_3_across_a_kill(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    t0 = time.monotonic()
    admin, hport = free_port(), free_port()
    text = CONFIG.format(admin=admin, http=hport, key=PUBLIC)
    data = tmp_path / "data"
    gw = start_gateway(text, data_dir=data)
    port = gw.port
    ids = [f"fw-{i:05d}" for i in range(N)]
    third = N // 3
    groups = {"g1": ids[:third], "g2": ids[third : 2 * third], "g3": ids[2 * third :]}
    agents = make_agents(
        groups,
        {
            "g1": FailurePlan(cut=0.05),
            "g2": FailurePlan(rate=0.2, result=UpdateResult.INTEGRITY_CHECK_FAILURE),
        },
        seed=16,
    )
    fleets = []
    for transport, names in (("http", ids[0::2]), ("mqtt", ids[1::2])):
        devices = make_devices(len(names), prefix="x", seed=1)
        for dev, name in zip(devices, names, strict=True):
            dev.device_id = name
        fleets.append(
            FirmwareFleet(
                devices,
                "127.0.0.1",
                port,
                transport=transport,  # type: ignore[arg-type]
                agents={d: agents[d] for d in names},
                reconnect_delay=0.5,
            )
        )
    base = f"http://127.0.0.1:{admin}"
    async with (
        running(fleets[0]),
        running(fleets[1]),
        httpx.AsyncClient(base_url=base, timeout=30) as http,
    ):
        await _until_up(http)
        csv = "id,type,groups\n" + "".join(
            f"{d},pump,{g}\n" for g, members in groups.items() for d in members
        )
        r = await http.post("/api/devices/import", content=csv.encode())
        assert r.status_code == 200 and r.json()["created"] == N, r.text
        r = await http.put(
            "/api/firmware/images?hardware=pump-ctl&version=2.0",
            content=IMAGE,
            headers={
                "X-Image-SHA256": hashlib.sha256(IMAGE).hexdigest(),
                "X-Image-Signature": sign_image("pump-ctl", "2.0", IMAGE),
            },
        )
        image = r.json()["image"]["id"]
        for f in fleets:
            await asyncio.wait_for(f.all_connected.wait(), 60)
        setup = time.monotonic() - t0
        r = await http.post(
            "/api/firmware/campaigns",
            json={"image": image, "groups": ["g1", "g2", "g3"], "type": "pump",
                  "canary_share": 0, "pace": 100_000, "max_in_flight": 200,
                  "success_threshold": 0.9, "error_threshold": 0.25},
        )  # fmt: skip
        assert r.status_code == 201, r.text
        camp = r.json()["campaign"]
        cid = camp["id"]
        assert camp["waves"] == ["canary", "g1", "g2", "g3"] and camp["counts"] == {"pending": N}
        # Kill the gateway once group 2 is under way.
        async with asyncio.timeout(120):
            while True:
                body = await _campaign(http, cid)
                if body["campaign"]["counts"].get("succeeded", 0) >= third + third // 4:
                    break
                await asyncio.sleep(0.2)
        in_flight_at_kill = body["campaign"]["counts"].get("sent", 0)
        gw.process.kill()
        gw.process.wait(10)
        killed = time.monotonic()
        gw = start_gateway(text, data_dir=data, port=port)
        await _until_up(http)
        restarted = time.monotonic() - killed
        async with asyncio.timeout(120):
            while True:
                body = await _campaign(http, cid)
                if body["campaign"]["state"] != "running":
                    break
                await asyncio.sleep(0.3)
        halted_after = time.monotonic() - t0
        camp = body["campaign"]
        assert camp["state"] == "halted" and "wave g2" in camp["reason"], camp
        waves = {d["device_id"]: d for d in body["devices"]}
        # Group 3 never started; group 1 all succeeded; group 2's failures are
        # exactly the injected ones.
        assert all(waves[d]["state"] == "pending" for d in groups["g3"])
        assert all(agents[d].updates == 0 for d in groups["g3"])
        assert all(waves[d]["state"] == "succeeded" for d in groups["g1"])
        injected = {d for d in groups["g2"] if agents[d].fail is not None}
        failed = {d for d, t in waves.items() if t["state"] == "failed"}
        assert failed == injected and len(injected) == round(0.2 * third)
        assert all(waves[d]["result"] == "integrity_check_failure" for d in failed)
        once(agents, [d for d, t in waves.items() if t["state"] == "succeeded"])
        # The operator goes on: group 3, and nobody else again.
        r = await http.post(f"/api/firmware/campaigns/{cid}/resume")
        assert r.json()["campaign"]["state"] == "running"
        async with asyncio.timeout(120):
            while (body := await _campaign(http, cid))["campaign"]["state"] == "running":  # noqa: ASYNC110
                await asyncio.sleep(0.3)
        assert body["campaign"]["state"] == "completed", body["campaign"]
        counts = body["campaign"]["counts"]
        assert counts == {"succeeded": N - len(injected), "failed": len(injected)}
        once(agents, [d for d in ids if d not in injected])
        assert all(agents[d].updates == 1 for d in injected)  # failed: not retried
    print(
        f"\n{N} devices: set-up {setup:.1f} s, halted at {halted_after:.1f} s "
        f"({in_flight_at_kill} in flight at the kill, restart {restarted:.1f} s), "
        f"all done at {time.monotonic() - t0:.1f} s"
    )
    assert gw.terminate() == 0


def once(agents: dict[str, Any], succeeded: list[str]) -> None:
    """Each of ``succeeded`` ran the update once and received the image once."""
    assert succeeded
    twice = [d for d in succeeded if agents[d].updates != 1 or agents[d].downloads != 1]
    assert not twice, [(d, agents[d].updates, agents[d].downloads) for d in twice[:5]]
    more = [d for d in succeeded if agents[d].received != len(IMAGE)]
    assert not more, [(d, agents[d].received) for d in more[:5]]
    assert all(agents[d].version == "2.0" for d in succeeded)
