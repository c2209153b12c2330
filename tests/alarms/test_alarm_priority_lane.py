"""Alarm transitions go to the cloud ahead of telemetry: a gateway whose
HTTP cloud is down holds 10,000 readings; an alarm raised after them reaches
the cloud, once it is back, ahead of every reading but the one batch that was
on the wire when the alarm came (the one the sink's runner was retrying: a
batch in flight is retried whole, so the cloud sees each device's readings in
order). The batch the runner had read ahead is given back unsent and read
again after the alarm."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from edgeway.config import parse_config
from edgeway.gateway import Gateway
from edgeway.reading import Origin, Reading

BACKLOG = 10_000


def _is_alarm(record: dict[str, Any]) -> bool:
    return bool(record.get("tags", {}).get("record_type") == "alarm")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_an_alarm_behind_10000_readings_reaches_the_cloud_first(tmp_path: Path) -> None:
    port = _free_port()
    cfg = parse_config(
        f"""
gateway: {{id: gw-alarm, data_dir: "{tmp_path / "data"}"}}
mqtt: {{enabled: false}}
sinks:
  - name: cloud
    url: http://127.0.0.1:{port}/ingest
    options: {{max_records: 500}}
"""
    )
    gw = Gateway(cfg)
    task = asyncio.create_task(gw.run())
    async with asyncio.timeout(10):
        await gw.ready.wait()
    bodies: list[dict[str, Any]] = []
    got = asyncio.Event()

    async def ingest(request: web.Request) -> web.Response:
        bodies.append(orjson.loads(await request.read()))
        got.set()
        return web.json_response({"ok": True})

    runner: web.AppRunner | None = None
    try:
        assert gw.outbox is not None and gw.alarms is not None
        origin = Origin("test")
        readings = [Reading(f"m{i % 50}", 1.8e9 + i, {"v": i}, origin) for i in range(BACKLOG)]
        for i in range(0, BACKLOG, 1000):
            await gw.outbox.submit(readings[i : i + 1000])
        assert gw.outbox.counters()["cloud"]["pending"] == BACKLOG
        alarm = await gw.alarms.raise_alarm(
            "boiler-1", "overheat", severity=900, message="92 C", by="rule:hot"
        )
        # The cloud comes back: the sink's probe finds it within a second.
        app = web.Application()
        app.router.add_post("/ingest", ingest)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        async with asyncio.timeout(30):
            while not any(_is_alarm(r) for body in bodies for r in body["records"]):
                got.clear()
                await got.wait()
        received = [r for body in bodies for r in body["records"]]
        at = next(i for i, r in enumerate(received) if _is_alarm(r))
        # Ahead of it only the batch on the wire when the alarm came (the one
        # the runner was retrying, 500); the batch read ahead and the other
        # 9,000 readings come after it.
        assert at == 500, at
        assert all(not _is_alarm(r) for r in received[:at])
        assert [r["metrics"]["v"] for r in received[:at]] == list(range(at))
        rec = received[at]
        assert rec["device_id"] == "boiler-1" and rec["priority"] == 5
        assert rec["metrics"]["alarm_id"] == alarm.id and rec["metrics"]["event"] == "raise"
        assert rec["metrics"]["by"] == "rule:hot" and rec["metrics"]["message"] == "92 C"
    finally:
        gw.request_stop()
        await asyncio.wait_for(task, 15)
        if runner is not None:
            await runner.cleanup()
