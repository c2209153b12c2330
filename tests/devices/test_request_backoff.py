"""Failed-token backoff and ``auth_failed`` lifecycle events on the
connection-less listeners, against a running gateway with real clients
(aiohttp for HTTP, aiocoap for CoAP): wrong tokens for one device lock that
device id (HTTP 429 / CoAP 4.29, even with the right token, nothing checked);
wrong tokens for many device ids from one address lock the address; each
refusal is a ``device_event`` record ``auth_failed`` at the sink."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from device_events import device_events

from edgeway.config import parse_config
from edgeway.devices.backoff import RequestBackoff
from edgeway.devices.credentials import CredentialStore
from edgeway.gateway import Gateway

aiocoap = pytest.importorskip("aiocoap")
from aiocoap import Code, Message  # noqa: E402

CONFIG = """
gateway: {{id: gw-bo, data_dir: "{data}"}}
mqtt: {{enabled: false}}
http_ingest: {{listen: "127.0.0.1:0"}}
coap: {{listen: "127.0.0.1:0", allow_anonymous: false, probe_interval: 60}}
twins: {{enabled: true}}
sinks:
  - {{name: files, url: "file://{out}"}}
devices: {{flush_interval: 0.05s, events: true}}
"""


def test_request_backoff_per_device_and_per_address() -> None:
    now = [0.0]
    b = RequestBackoff(clock=lambda: now[0])
    for _ in range(5):
        assert b.locked_for("d-1", "10.0.0.1:5000") == 0
        b.failed("d-1", "10.0.0.1:5000")
    assert b.locked_for("d-1", "10.0.0.2:1") > 0  # the device id, from anywhere
    assert b.locked_for("d-2", "10.0.0.1:5001") == 0  # one id: the address is not locked
    for i in range(2, 6):
        b.failed(f"d-{i}", "10.0.0.1:5002")
    assert b.locked_for("d-9", "10.0.0.1:6000") > 0  # five ids from one address
    assert b.locked_for("d-9", "10.0.0.3:1") == 0
    assert b.locked_out == 2
    now[0] += 2.0
    b.succeeded("d-1")
    assert b.locked_for("d-1", "10.0.0.4:1") == 0


@contextlib.asynccontextmanager
async def gateway(tmp_path: Path) -> AsyncIterator[tuple[Gateway, dict[str, str], Path]]:
    data = tmp_path / "data"
    store = CredentialStore.open(data)
    secrets = {f"{d}/{k}": store.issue(d, k) for d in ("dev-1", "dev-2") for k in ("http", "coap")}
    store.close()
    gw = Gateway(parse_config(CONFIG.format(data=data, out=tmp_path / "out")))
    task = asyncio.create_task(gw.run())
    try:
        await asyncio.wait_for(gw.ready.wait(), 15)
        yield gw, secrets, tmp_path / "out"
    finally:
        gw.request_stop()
        await asyncio.wait_for(task, 15)


async def _auth_failed(out: Path, n: int, protocol: str) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while True:
        got = [
            e for e in device_events(out)
            if e["metrics"]["event"] == "auth_failed" and e["metrics"].get("protocol") == protocol
        ]  # fmt: skip
        if len(got) >= n or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.05)


async def test_http_wrong_tokens_lock_the_device_then_the_address(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (gw, secrets, out), aiohttp.ClientSession() as s:
        port = next(a for a in gw.adapters if a.section == "http_ingest").port  # type: ignore[attr-defined]

        async def post(device: str, token: str) -> aiohttp.ClientResponse:
            async with s.post(
                f"http://127.0.0.1:{port}/devices/{device}/telemetry",
                json={"v": 1},
                headers={"Authorization": f"Bearer {token}"},
            ) as r:
                await r.read()
                return r

        assert (await post("dev-1", secrets["dev-1/http"])).status == 200
        for i in range(5):
            assert (await post("dev-1", f"wrong-{i}")).status == 401
        locked = await post("dev-1", secrets["dev-1/http"])
        assert locked.status == 429 and int(locked.headers["Retry-After"]) >= 1
        # Another device from the same address is not locked by one device's failures.
        assert (await post("dev-2", secrets["dev-2/http"])).status == 200
        # Five ids failing from this address (dev-1 and four more): the address is locked.
        for i in range(4):
            assert (await post(f"guess-{i}", "x")).status == 401
        assert (await post("dev-2", secrets["dev-2/http"])).status == 429
        events = await _auth_failed(out, 9, "http")
        assert len(events) == 9
        assert {e["device_id"] for e in events} == {"dev-1", *(f"guess-{i}" for i in range(4))}
        assert all(e["metrics"]["reason"] == "bad token" for e in events)


async def test_coap_wrong_tokens_lock_the_device(tmp_path: Path) -> None:
    ctx = await aiocoap.Context.create_client_context()
    try:
        async with gateway(tmp_path) as (gw, secrets, out):
            port = next(a for a in gw.adapters if a.section == "coap").port  # type: ignore[attr-defined]

            async def post(device: str, token: str) -> Any:
                msg = Message(
                    code=Code.POST,
                    uri=f"coap://127.0.0.1:{port}/devices/{device}/telemetry?token={token}",
                    payload=b'{"v": 1}',
                )
                msg.opt.content_format = 50
                async with asyncio.timeout(10):
                    return await ctx.request(msg).response

            assert (await post("dev-1", secrets["dev-1/coap"])).code == Code.CHANGED
            for i in range(5):
                assert (await post("dev-1", f"wrong-{i}")).code == Code.UNAUTHORIZED
            locked = await post("dev-1", secrets["dev-1/coap"])
            assert locked.code == Code.TOO_MANY_REQUESTS and locked.opt.max_age >= 1
            assert (await post("dev-2", secrets["dev-2/coap"])).code == Code.CHANGED
            events = await _auth_failed(out, 5, "coap")
            assert len(events) == 5 and {e["device_id"] for e in events} == {"dev-1"}

            # The device's own data (its twin) counts the same way.
            async def twin(token: str) -> Any:
                msg = Message(
                    code=Code.GET,
                    uri=f"coap://127.0.0.1:{port}/devices/dev-2/twin?token={token}",
                )
                async with asyncio.timeout(10):
                    return await ctx.request(msg).response

            assert (await twin(secrets["dev-2/coap"])).code == Code.CONTENT
            for i in range(5):
                assert (await twin(f"wrong-{i}")).code == Code.UNAUTHORIZED
            assert (await twin(secrets["dev-2/coap"])).code == Code.TOO_MANY_REQUESTS
            events = await _auth_failed(out, 10, "coap")
            assert [e["device_id"] for e in events].count("dev-2") == 5
    finally:
        await ctx.shutdown()
