"""Commands through the admin API and the `edgeway command` CLI, with a real
paho-mqtt device answering on the embedded broker."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
from admin_harness import Device, create_token, edgeway_cli, running_gateway

TOKENS = '{listen: "127.0.0.1:0", auth: tokens}'


def mqtt_port(rg: Any) -> int:
    return int(rg.gateway.listeners[0].bound[1])


async def test_cli_send_wait_exit_status_follows_the_device(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, TOKENS) as rg:
        operator = await create_token(rg.data_dir, "operator", "op")
        viewer = await create_token(rg.data_dir, "viewer", "view")
        good = await asyncio.to_thread(Device, mqtt_port(rg), "pump-1")
        bad = await asyncio.to_thread(Device, mqtt_port(rg), "valve-1", "error")
        try:
            assert await asyncio.to_thread(good.ready.wait, 5)
            assert await asyncio.to_thread(bad.ready.wait, 5)
            admin = ["--admin", rg.base]
            r = await edgeway_cli(
                "command", "send", "pump-1", "stop", "--params", '{"why": "test"}',
                "--wait", "10", *admin, env={"EDGEWAY_TOKEN": operator},
            )  # fmt: skip
            assert r.code == 0, r.stderr
            assert "succeeded" in r.stdout and '{"echo":{"why":"test"}}' in r.stdout
            r = await edgeway_cli(
                "command", "send", "valve-1", "open", "--wait", "10", *admin,
                env={"EDGEWAY_TOKEN": operator},
            )  # fmt: skip
            assert r.code == 1 and "failed" in r.stdout and "valve stuck" in r.stdout
            # A viewer may list but not send.
            r = await edgeway_cli(
                "command", "send", "pump-1", "stop", *admin, env={"EDGEWAY_TOKEN": viewer}
            )
            assert r.code == 1 and "403" in r.stderr
            r = await edgeway_cli("command", "list", *admin, env={"EDGEWAY_TOKEN": viewer})
            assert r.code == 0 and len(r.stdout.strip().splitlines()) == 2
            # Without a token: refused, with a hint.
            r = await edgeway_cli("command", "list", *admin)
            assert r.code == 1 and "EDGEWAY_TOKEN" in r.stderr
        finally:
            await asyncio.to_thread(good.stop)
            await asyncio.to_thread(bad.stop)


async def test_api_send_list_show_cancel_and_errors(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, TOKENS, extra="commands: {max_per_device: 2}") as rg:
        token = await create_token(rg.data_dir, "operator", "api-test")
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=rg.base, headers=headers, timeout=10) as http:
            r = await http.post(
                "/api/devices/offline-1/commands",
                json={"name": "reboot", "ttl": "5m"},
                headers={"Idempotency-Key": "abc"},
            )
            assert r.status_code == 202
            cmd = r.json()["command"]
            assert cmd["state"] == "queued" and cmd["source"] == "api:api-test"
            assert 299 <= cmd["expires_at"] - cmd["created_at"] <= 301
            again = await http.post(
                "/api/devices/offline-1/commands",
                json={"name": "reboot"},
                headers={"Idempotency-Key": "abc"},
            )
            assert again.status_code == 200 and again.json()["command"]["id"] == cmd["id"]
            r = await http.post("/api/devices/offline-1/commands", json={"name": "b"})
            assert r.status_code == 202
            r = await http.post("/api/devices/offline-1/commands", json={"name": "c"})
            assert r.status_code == 429 and r.json()["error"] == "queue_full"
            r = await http.post("/api/devices/offline-1/commands", json={"name": "bad name"})
            assert r.status_code == 400 and r.json()["error"] == "invalid"
            r = await http.post(
                "/api/devices/offline-1/commands", json={"name": "x", "ttl": "soon"}
            )
            assert r.status_code == 400
            r = await http.post("/api/devices/offline-1/commands", content=b"[1]")
            assert r.status_code == 400
            r = await http.get("/api/devices/offline-1/commands")
            assert [c["name"] for c in r.json()["commands"]] == ["b", "reboot"]
            r = await http.get(f"/api/commands/{cmd['id']}")
            assert r.json()["command"]["state"] == "queued"
            r = await http.post(f"/api/commands/{cmd['id']}/cancel")
            assert r.json()["command"]["state"] == "cancelled"
            r = await http.get("/api/commands?state=cancelled")
            assert [c["id"] for c in r.json()["commands"]] == [cmd["id"]]
            r = await http.get("/api/commands/nope")
            assert r.status_code == 404
