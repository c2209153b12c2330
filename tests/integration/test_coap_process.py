"""The CoAP listener of a real ``edgeway run`` (on uvloop, as in production)
keeps serving after a client that closed its socket before the answer."""

from __future__ import annotations

import asyncio
import socket

import httpx
from edgeway_process import StartGateway, free_port
from mqtt_peers import TIMEOUT
from test_listen_flags import _http_up, free_udp_port

from coap_datagrams import con_post


async def test_coap_listener_survives_a_client_gone_before_the_answer(
    start_gateway: StartGateway,
) -> None:
    from aiocoap import POST, Context, Message

    coap_port, admin_port = free_udp_port(), free_port()
    gw = await asyncio.to_thread(
        start_gateway,
        extra_args=[
            "--coap-listen",
            f"127.0.0.1:{coap_port}",
            "--admin-listen",
            f"127.0.0.1:{admin_port}",
        ],
    )
    admin = f"http://127.0.0.1:{admin_port}"
    await _http_up(admin)
    async with httpx.AsyncClient() as http:
        # Sends a confirmable POST and closes at once: the answer draws an
        # ICMP port unreachable, which used to stop uvloop polling the socket.
        for i in range(3):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as gone:
                gone.sendto(con_post(i + 1, "gone", b'{"v": 1}'), ("127.0.0.1", coap_port))
        ctx = await Context.create_client_context()
        try:
            request = Message(
                code=POST,
                uri=f"coap://127.0.0.1:{coap_port}/devices/after/telemetry",
                payload=b'{"v": 2}',
                content_format=50,
            )
            async with asyncio.timeout(TIMEOUT * 2):
                response = await ctx.request(request).response
        finally:
            await ctx.shutdown()
        assert str(response.code.dotted) == "2.04", gw.output()[-2000:]
        health = await http.get(f"{admin}/healthz")
        status = (await http.get(f"{admin}/api/status")).json()
    assert health.status_code == 200, health.text
    coap = status["adapters"]["coap:coap"]
    # Served by the listener it started with: no restart was needed.
    assert coap["listening"] is True and coap["last_error"] is None
    assert "Traceback" not in gw.output()


async def test_commands_round_trip_over_coap_on_a_real_gateway(
    start_gateway: StartGateway,
) -> None:
    """Admin API -> queue -> confirmable notification (and Block2 for a large
    command) -> the device's ACK -> its result POSTed back, in ``edgeway run``
    (uvloop, where the listener's transport also watches ACKs)."""
    import json

    from aiocoap import GET, POST, Context, Message

    coap_port, admin_port = free_udp_port(), free_port()
    gw = await asyncio.to_thread(
        start_gateway,
        f"""
        mqtt: {{enabled: false}}
        coap: {{listen: "127.0.0.1:{coap_port}", commands: true}}
        admin: {{listen: "127.0.0.1:{admin_port}", auth: none}}
        """,
        listen=False,
        wait=False,  # no MQTT port to wait for: the admin API says when it is up
    )
    admin = f"http://127.0.0.1:{admin_port}"
    await _http_up(admin)
    base = f"coap://127.0.0.1:{coap_port}/devices/valve-4/commands"
    ctx = await Context.create_client_context()
    try:
        async with httpx.AsyncClient(base_url=admin, timeout=TIMEOUT * 3) as http:
            observation = ctx.request(Message(code=GET, uri=base, observe=0))
            first = await asyncio.wait_for(observation.response, TIMEOUT)
            assert str(first.code.dotted) == "2.05" and first.payload == b""
            notifications = aiter(observation.observation)
            for params in ({"percent": 30}, {"table": "z" * 20_000}):
                sent = asyncio.create_task(
                    http.post(
                        "/api/devices/valve-4/commands?wait=20",
                        json={"name": "set", "params": params},
                    )
                )
                note = await asyncio.wait_for(anext(notifications), TIMEOUT * 2)
                doc = json.loads(note.payload)
                assert doc["params"] == params
                answer = Message(
                    code=POST,
                    uri=f"{base}/{doc['id']}/result",
                    payload=json.dumps({"status": "ok", "result": len(note.payload)}).encode(),
                    content_format=50,
                )
                r = await asyncio.wait_for(ctx.request(answer).response, TIMEOUT)
                assert str(r.code.dotted) == "2.04"
                done = (await sent).json()["command"]
                assert done["state"] == "succeeded" and done["result"] == len(note.payload)
                assert done["attempts"] == 1
            status = (await http.get("/api/status")).json()
            observation.observation.cancel()
    finally:
        await ctx.shutdown()
    counts = status["adapters"]["coap:coap"]["commands"]
    assert counts["acknowledged"] == 1 and counts["blocks_served"] >= 19, counts
    assert "Traceback" not in gw.output()
