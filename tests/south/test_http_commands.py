"""Commands to HTTP devices: long-poll and result POST, with a real httpx client
against a gateway running in-process."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from ingest_doubles import wait_until

from edgeway.commands.model import CommandState
from edgeway.config import parse_config
from edgeway.gateway import Gateway
from edgeway.south.http import HttpIngestAdapter

TOKEN = "token-of-pump-1-0123456789"
OTHER = "token-of-pump-2-0123456789"


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[tuple[Gateway, str]]:
    cfg = parse_config(
        f"""
gateway: {{id: gw-h, data_dir: "{tmp_path}"}}
mqtt: {{enabled: false}}
http_ingest:
  listen: "127.0.0.1:0"
  allow_anonymous: true
  tokens: {{pump-1: "{TOKEN}", pump-2: "{OTHER}"}}
""",
        "t.yaml",
    )
    gw = Gateway(cfg)
    task = asyncio.create_task(gw.run())
    await asyncio.wait_for(gw.ready.wait(), 10)
    adapter = next(a for a in gw.adapters if isinstance(a, HttpIngestAdapter))
    yield gw, f"http://127.0.0.1:{adapter.port}"
    gw.request_stop()
    await asyncio.wait_for(task, 10)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_long_poll_round_trip(gateway: tuple[Gateway, str]) -> None:
    gw, base = gateway
    assert gw.commands is not None
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        # The poll waits; the command queued meanwhile answers it at once.
        poll = asyncio.create_task(http.get("/devices/pump-1/commands?wait=5", headers=auth(TOKEN)))
        await asyncio.sleep(0.2)
        cmd, _ = await gw.commands.submit("pump-1", "set_speed", {"rpm": 1200})
        r = await poll
        assert r.status_code == 200
        doc = r.json()
        assert doc["id"] == cmd.id and doc["params"] == {"rpm": 1200}
        await asyncio.sleep(0.05)
        assert cmd.state is CommandState.DELIVERED
        # Another device cannot answer it.
        r = await http.post(
            f"/devices/pump-2/commands/{cmd.id}/result", json={"status": "ok"}, headers=auth(OTHER)
        )
        assert r.status_code == 404
        # Nor can pump-2's token speak for pump-1.
        r = await http.post(
            f"/devices/pump-1/commands/{cmd.id}/result", json={"status": "ok"}, headers=auth(OTHER)
        )
        assert r.status_code == 401
        r = await http.post(
            f"/devices/pump-1/commands/{cmd.id}/result",
            json={"status": "ok", "result": {"rpm": 1199}},
            headers=auth(TOKEN),
        )
        assert r.status_code == 200
        done = await gw.commands.wait(cmd.id, 5)
        assert done.state is CommandState.SUCCEEDED and done.result == {"rpm": 1199}


async def test_queued_command_is_answered_at_once_and_empty_poll_is_204(
    gateway: tuple[Gateway, str],
) -> None:
    gw, base = gateway
    assert gw.commands is not None
    cmd, _ = await gw.commands.submit("pump-1", "stop")
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        r = await http.get("/devices/pump-1/commands?wait=5", headers=auth(TOKEN))
        assert r.status_code == 200 and r.json()["id"] == cmd.id
        t0 = asyncio.get_running_loop().time()
        r = await http.get("/devices/pump-1/commands?wait=0.3", headers=auth(TOKEN))
        assert r.status_code == 204
        assert asyncio.get_running_loop().time() - t0 >= 0.25


async def test_commands_need_a_token_even_with_anonymous_telemetry(
    gateway: tuple[Gateway, str],
) -> None:
    gw, base = gateway
    assert gw.commands is not None
    await gw.commands.submit("pump-1", "stop")
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        # Anonymous telemetry is allowed on this listener...
        r = await http.post("/devices/pump-1/telemetry", json={"t": 1})
        assert r.status_code == 200
        # ...but taking the device's commands is not.
        r = await http.get("/devices/pump-1/commands?wait=0.1")
        assert r.status_code == 401
        r = await http.get("/devices/pump-1/commands?wait=0.1", headers=auth(OTHER))
        assert r.status_code == 401


async def test_a_newer_poll_supersedes_the_older(gateway: tuple[Gateway, str]) -> None:
    gw, base = gateway
    assert gw.commands is not None
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        first = asyncio.create_task(
            http.get("/devices/pump-1/commands?wait=5", headers=auth(TOKEN))
        )
        await asyncio.sleep(0.2)
        second = asyncio.create_task(
            http.get("/devices/pump-1/commands?wait=5", headers=auth(TOKEN))
        )
        r1 = await first
        assert r1.status_code == 409
        cmd, _ = await gw.commands.submit("pump-1", "stop")
        r2 = await second
        assert r2.status_code == 200 and r2.json()["id"] == cmd.id


async def test_a_waiting_poll_does_not_hold_the_gateway_stop(tmp_path: Path) -> None:
    cfg = parse_config(
        f"""
gateway: {{id: gw-h, data_dir: "{tmp_path}"}}
mqtt: {{enabled: false}}
http_ingest:
  listen: "127.0.0.1:0"
  tokens: {{pump-1: "{TOKEN}"}}
  command_poll_max: 60
""",
        "t.yaml",
    )
    gw = Gateway(cfg)
    task = asyncio.create_task(gw.run())
    await asyncio.wait_for(gw.ready.wait(), 10)
    adapter = next(a for a in gw.adapters if isinstance(a, HttpIngestAdapter))
    downlink = adapter._downlink
    assert downlink is not None
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{adapter.port}", timeout=70) as http:
        poll = asyncio.create_task(
            http.get("/devices/pump-1/commands?wait=60", headers=auth(TOKEN))
        )
        await wait_until(lambda: "pump-1" in downlink._polls)  # the gateway holds the poll
        t0 = asyncio.get_running_loop().time()
        gw.request_stop()
        # Before, the stop waited for the poll's 60 s (aiohttp's graceful shutdown).
        await asyncio.wait_for(task, 10)
        assert asyncio.get_running_loop().time() - t0 < 5
        r = await asyncio.wait_for(poll, 5)
        assert r.status_code == 503 and r.json()["error"] == "stopping"
        assert r.headers["Retry-After"] == "5"


class _NoQueue:
    """DownlinkEvents with no queue behind it: polls wait, then 204."""

    def device_reachable(self, device_id: str) -> None:
        pass

    def report(self, result: object) -> bool:
        return False


async def test_a_restarted_listener_serves_polls_again(tmp_path: Path) -> None:
    """The gateway restarts a failed adapter (same object): its stop answered
    polls 503, the restart must serve them again."""
    from ingest_doubles import RecordingIngest

    from edgeway.config import HttpIngestSection

    adapter = HttpIngestAdapter(
        HttpIngestSection(listen="127.0.0.1:0", tokens={"pump-1": TOKEN}),
        ingest=RecordingIngest(),
        gateway_id="gw",
        data_dir=tmp_path,
    )
    adapter.downlink(_NoQueue())
    for _run in range(2):
        adapter.port = 0
        task = asyncio.create_task(adapter.run())
        try:
            await wait_until(lambda: adapter.port != 0)
            async with httpx.AsyncClient(timeout=10) as http:
                r = await http.get(
                    f"http://127.0.0.1:{adapter.port}/devices/pump-1/commands?wait=0.1",
                    headers=auth(TOKEN),
                )
            assert r.status_code == 204, r.text
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
