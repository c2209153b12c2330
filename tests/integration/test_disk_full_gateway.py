"""``edgeway run`` with its data directory on a small, nearly full tmpfs.

Other files (a 9 MiB filler, as old logs would) leave the outbox a few MiB. MQTT
v5 devices publish while the cloud is down until the disk is full: they are
refused with 0x97 (quota exceeded), the gateway stays up, and once the cloud is
back every acknowledged reading arrives once, in order, and devices are
accepted again.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from edgeway_process import StartGateway, edgeway_only, free_port
from mqtt_peers import TIMEOUT, PahoPeer, connected, unique

CONFIG = """
outbox: {disk_reserve: 1MiB}
sinks:
  - {name: cloud, url: "http://127.0.0.1:%d/ingest", options: {max_records: 100}}
"""


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs with 9 MiB taken by other files; always unmounted."""
    d = tmp_path / "disk"
    d.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(d)],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        (d / "old.log").write_bytes(b"\0" * (9 * 1024 * 1024))
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


async def test_gateway_on_a_full_disk_refuses_then_drains_and_accepts_again(
    small_disk: Path, start_gateway: StartGateway, peers: list[PahoPeer]
) -> None:
    edgeway_only()
    up = asyncio.Event()
    arrived = asyncio.Event()
    received: list[dict[str, Any]] = []

    async def ingest(request: web.Request) -> web.Response:
        body = await request.json()
        if not up.is_set():
            return web.Response(status=503, text="down")
        received.extend(body["records"])
        arrived.set()
        return web.json_response({"ok": True})

    app = web.Application(client_max_size=8 * 1024 * 1024)
    app.router.add_post("/ingest", ingest)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()

    async def wait_received(n: int) -> None:
        async with asyncio.timeout(TIMEOUT * 4):
            while len(received) < n:
                arrived.clear()
                await arrived.wait()

    admin: httpx.AsyncClient | None = None
    try:
        admin_port = free_port()
        gw = await asyncio.to_thread(
            start_gateway,
            CONFIG % runner.addresses[0][1],
            data_dir=small_disk / "data",
            extra_args=["--admin-listen", f"127.0.0.1:{admin_port}"],
        )
        admin = httpx.AsyncClient(base_url=f"http://127.0.0.1:{admin_port}")
        device = unique("dev")
        topic = f"devices/{device}/telemetry"
        pub = await asyncio.to_thread(connected, gw, peers, version=5, client_id=device)
        accepted: list[int] = []
        refused = 0
        for i in range(5000):  # bounded: a few MiB hold far fewer 3 KiB readings
            code = await asyncio.to_thread(
                pub.publish, topic, json.dumps({"i": i, "pad": "x" * 3000}), 1
            )
            if code == 0:
                assert not refused, "accepted again while the disk is full"
                accepted.append(i)
                continue
            assert code == 0x97, f"PUBACK {code:#x}, not quota exceeded"
            refused += 1
            if refused == 5:
                break
        assert refused == 5, "the disk never filled up"
        assert len(accepted) > 100
        assert gw.process.poll() is None, "the gateway died on a full disk"
        health = await admin.get("/healthz")
        assert health.status_code == 503
        assert "outbox: the disk is full, new readings are refused" in health.json()["problems"]

        up.set()  # the cloud is back: the backlog drains, space comes back
        await wait_received(len(accepted))
        got = [r["metrics"]["i"] for r in received if r["device_id"] == device]
        assert got == accepted, "every acknowledged reading once, in order"

        # The device is accepted again once the outbox gave the space back.
        async with asyncio.timeout(30):
            while True:
                code = await asyncio.to_thread(
                    pub.publish, topic, json.dumps({"i": 10_000, "pad": "y"}), 1
                )
                if code == 0:
                    break
                assert code == 0x97
                await asyncio.sleep(0.2)  # a device retries a refused reading later
        await wait_received(len(accepted) + 1)
        assert received[-1]["metrics"]["i"] == 10_000
        assert (await admin.get("/healthz")).status_code == 200
    finally:
        if admin is not None:
            await admin.aclose()
        up.set()
        await runner.cleanup()
