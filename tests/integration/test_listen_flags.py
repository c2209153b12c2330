"""``edgeway run --http-listen HOST:PORT --coap-listen HOST:PORT``: with no
configuration file, each flag turns its listener on, and what a device posts
there reaches a sink through the outbox (issue 5: "Listeners get command-line
flags like the MQTT one")."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import httpx
from edgeway_process import StartGateway, free_port
from mqtt_peers import TIMEOUT


def free_udp_port() -> int:
    """A UDP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _http_up(url: str) -> None:
    """Wait (bounded) until the HTTP ingest answers /healthz."""
    deadline = time.monotonic() + TIMEOUT * 2
    async with httpx.AsyncClient() as client:
        while True:
            try:
                if (await client.get(f"{url}/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "HTTP ingest never answered"
            await asyncio.sleep(0.05)


def _records(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def test_http_and_coap_listen_flags_turn_the_listeners_on(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    from aiocoap import POST, Context, Message
    from aiocoap.numbers.contentformat import ContentFormat

    http_port, coap_port = free_port(), free_udp_port()
    out = tmp_path / "out.jsonl"
    gw = await asyncio.to_thread(
        start_gateway,
        extra_args=[
            "--http-listen",
            f"127.0.0.1:{http_port}",
            "--coap-listen",
            f"127.0.0.1:{coap_port}",
            "--sink",
            f"file://{out}",
        ],
    )
    url = f"http://127.0.0.1:{http_port}"
    await _http_up(url)
    # --http-listen on loopback with no config: anonymous devices are accepted.
    async with httpx.AsyncClient() as client:
        r = await client.post(f"{url}/devices/flag-http/telemetry", json={"t": 1.5})
    assert (r.status_code, r.json()) == (200, {"accepted": 1})

    ctx = await Context.create_client_context()
    try:
        request = Message(
            code=POST,
            uri=f"coap://127.0.0.1:{coap_port}/devices/flag-coap/telemetry",
            payload=b'{"t": 2.5}',
            content_format=ContentFormat.JSON,
        )
        async with asyncio.timeout(TIMEOUT * 2):
            response = await ctx.request(request).response
    finally:
        await ctx.shutdown()
    assert str(response.code.dotted) == "2.04", response.payload

    # Both were acknowledged only once in the outbox; the file sink gets them.
    deadline = time.monotonic() + TIMEOUT * 2
    while {str(r["device_id"]) for r in _records(out)} < {"flag-http", "flag-coap"}:
        assert time.monotonic() < deadline, f"sink got {_records(out)}\n{gw.output()}"
        await asyncio.sleep(0.05)
    got = {str(r["device_id"]): r["metrics"] for r in _records(out)}
    assert got == {"flag-http": {"t": 1.5}, "flag-coap": {"t": 2.5}}
