"""``when_full: reject_new`` seen from a device, against ``edgeway run``.

The outbox refuses what does not fit while the cloud does not confirm; the
device learns it from the acknowledgement (MQTT v5 PUBACK 0x97, quota
exceeded), nothing it was told is stored is lost, nothing it was refused
reaches the cloud, and the counters in ``/api/status`` add up. When the cloud
confirms again, the same devices are accepted again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
from aiohttp import web
from edgeway_process import StartGateway, edgeway_only, free_port
from mqtt_peers import TIMEOUT, PahoPeer, connected, raw_connack, raw_connect_packet, unique

# Each reading is stored as roughly 100-200 bytes: 4 KiB holds a few dozen.
CONFIG = """
outbox: {when_full: reject_new, max_bytes: 4KiB}
sinks:
  - {name: cloud, url: "http://127.0.0.1:%d/ingest", options: {max_records: 5}}
"""


@contextlib.asynccontextmanager
async def _cloud(
    ingest: Callable[[web.Request], Awaitable[web.Response]], release: asyncio.Event
) -> AsyncIterator[int]:
    """A cloud answering ``POST /ingest`` with ``ingest`` on a free port (yielded);
    ``release`` is set on the way out so that a handler held on it returns."""
    app = web.Application()
    app.router.add_post("/ingest", ingest)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        release.set()
        await runner.cleanup()


async def _wait_received(received: list[Any], arrived: asyncio.Event, n: int) -> None:
    async with asyncio.timeout(TIMEOUT * 2):
        while len(received) < n:
            arrived.clear()
            await arrived.wait()


async def test_reject_new_answers_0x97_loses_nothing_and_recovers(
    start_gateway: StartGateway, peers: list[PahoPeer]
) -> None:
    edgeway_only()
    cloud_up = asyncio.Event()
    arrived = asyncio.Event()
    received: list[dict[str, Any]] = []

    async def ingest(request: web.Request) -> web.Response:
        # The cloud hangs (no confirmation) until the test lets it answer.
        await cloud_up.wait()
        received.extend((await request.json())["records"])
        arrived.set()
        return web.json_response({"ok": True})

    async with _cloud(ingest, release=cloud_up) as port:
        admin_port = free_port()
        gw = await asyncio.to_thread(
            start_gateway,
            CONFIG % port,
            extra_args=["--admin-listen", f"127.0.0.1:{admin_port}"],
        )
        device = unique("dev")
        topic = f"devices/{device}/telemetry"
        pub = await asyncio.to_thread(connected, gw, peers, version=5, client_id=device)
        codes: dict[int, int] = {}
        for i in range(500):  # bounded: 4 KiB fills long before this
            body = json.dumps({"i": i, "pad": "x" * 40})
            codes[i] = await asyncio.to_thread(pub.publish, topic, body, 1)
            if codes[i] != 0:
                break
        refused = [i for i, c in codes.items() if c != 0]
        accepted = [i for i, c in codes.items() if c == 0]
        assert refused, "the outbox never filled up"
        assert codes[refused[0]] == 0x97, f"PUBACK {codes[refused[0]]:#x}, not quota exceeded"
        assert len(accepted) >= 5

        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{admin_port}") as admin:
            c = (await admin.get("/api/status")).json()["outbox"]["cloud"]
            assert c["rejected_full"] == len(refused)
            assert c["dropped"] == 0  # reject_new refuses; it never drops
            assert c["accepted"] == len(accepted) == c["delivered"] + c["pending"] + c["dropped"]

            cloud_up.set()  # the cloud confirms: the backlog drains, space frees
            await _wait_received(received, arrived, len(accepted))
            got = [r["metrics"]["i"] for r in received if r["device_id"] == device]
            assert got == accepted, "every acknowledged reading, in order, nothing refused"

            # The device is accepted again, over v5 and over 3.1.1.
            assert await asyncio.to_thread(pub.publish, topic, json.dumps({"i": 1000}), 1) == 0
            old = await asyncio.to_thread(connected, gw, peers, version=4)
            assert await asyncio.to_thread(old.publish, topic, json.dumps({"i": 1001}), 1) == 0
            await _wait_received(received, arrived, len(accepted) + 2)
            # The counters follow the confirmation's commit, a moment after the
            # cloud answered.
            for _ in range(200):  # polls an HTTP endpoint: at most 10 s
                c = (await admin.get("/api/status")).json()["outbox"]["cloud"]
                if c["delivered"] >= len(accepted) + 2:
                    break
                await asyncio.sleep(0.05)
            assert c["accepted"] == len(accepted) + 2 == c["delivered"]
            assert c["pending"] == 0 and c["rejected_full"] == len(refused)


def _publish_311(sock: socket.socket, topic: str, body: bytes, pid: int) -> None:
    t = topic.encode()
    payload = struct.pack("!H", len(t)) + t + struct.pack("!H", pid) + body
    sock.sendall(bytes([0x32, len(payload)]) + payload)


def _recv_exactly(sock: socket.socket, n: int, timeout: float) -> bytes | None:
    """``n`` bytes; fewer if the peer closed; None if nothing came in ``timeout``."""
    sock.settimeout(timeout)
    data = b""
    while len(data) < n:
        try:
            chunk = sock.recv(n - len(data))
        except TimeoutError:
            return None if not data else data
        if not chunk:
            break
        data += chunk
    return data


async def test_saturated_outbox_stops_reading_311_sockets_until_it_drains(
    start_gateway: StartGateway,
) -> None:
    """MQTT 3.1.1 has no refusal code: once the outbox is saturated the
    gateway stops reading a 3.1.1 client's socket; the next PUBLISH waits in
    the socket and is taken, stored and acknowledged once the outbox drains.
    (A PUBLISH that is read and refused anyway closes the connection
    unacknowledged; docs/protocols/mqtt-broker.md.)"""
    edgeway_only()
    cloud_up = asyncio.Event()
    arrived = asyncio.Event()
    received: list[dict[str, Any]] = []

    async def ingest(request: web.Request) -> web.Response:
        await cloud_up.wait()
        received.extend((await request.json())["records"])
        arrived.set()
        return web.json_response({"ok": True})

    async with _cloud(ingest, release=cloud_up) as port:
        sock: socket.socket | None = None
        try:
            # The saturation margin (1 % of 64 KiB) is larger than one row: some
            # accepted PUBLISH brings the outbox into it before one is refused.
            config = (CONFIG % port).replace("max_bytes: 4KiB", "max_bytes: 64KiB")
            gw = await asyncio.to_thread(start_gateway, config)
            topic = f"devices/{unique('dev')}/telemetry"
            connack, sock = await asyncio.to_thread(
                raw_connack, gw.host, gw.port, raw_connect_packet(unique("old"))
            )
            assert connack == b"\x20\x02\x00\x00"
            accepted = 0
            waiting: int | None = None
            for pid in range(1, 5000):  # bounded: 64 KiB fills long before this
                body = json.dumps({"i": pid, "pad": "x" * 40}).encode()
                _publish_311(sock, topic, body, pid)
                ack = await asyncio.to_thread(_recv_exactly, sock, 4, 1.0)
                if ack is None:  # not read: the socket is paused
                    waiting = pid
                    break
                assert ack == b"\x40\x02" + struct.pack("!H", pid), f"closed or refused at {pid}"
                accepted += 1
            assert waiting is not None, "the outbox never filled up"
            assert accepted >= 5
            cloud_up.set()  # the backlog drains; the socket is read again
            ack = await asyncio.to_thread(_recv_exactly, sock, 4, TIMEOUT)
            assert ack == b"\x40\x02" + struct.pack("!H", waiting)
            await _wait_received(received, arrived, accepted + 1)
            assert [r["metrics"]["i"] for r in received] == list(range(1, waiting + 1))
        finally:
            if sock is not None:
                sock.close()


# 1% of 64 KiB (the band where is_saturated() refuses up front) is wider than a
# reading: the pipeline, not the outbox's insert, refuses these.
CONFIG_WIDE_BAND = """
outbox: {when_full: reject_new, max_bytes: 64KiB}
sinks:
  - {name: cloud, url: "http://127.0.0.1:%d/ingest"}
"""


async def test_readings_refused_up_front_count_in_the_sinks_rejected_full(
    start_gateway: StartGateway, peers: list[PahoPeer]
) -> None:
    """Every refused reading counts in its sink's ``rejected_full``, also those the
    pipeline refuses before the outbox sees them (``is_saturated``)."""
    edgeway_only()
    hang = asyncio.Event()

    async def ingest(request: web.Request) -> web.Response:
        await hang.wait()  # the cloud never confirms during the test
        return web.json_response({"ok": True})

    async with _cloud(ingest, release=hang) as port:
        admin_port = free_port()
        gw = await asyncio.to_thread(
            start_gateway,
            CONFIG_WIDE_BAND % port,
            extra_args=["--admin-listen", f"127.0.0.1:{admin_port}"],
        )
        device = unique("dev")
        topic = f"devices/{device}/telemetry"
        pub = await asyncio.to_thread(connected, gw, peers, version=5, client_id=device)
        accepted = refused = 0
        for i in range(2000):  # bounded: 64 KiB fills long before this
            body = json.dumps({"i": i, "pad": "x" * 60})
            code = await asyncio.to_thread(pub.publish, topic, body, 1)
            if code == 0:
                accepted += 1
                continue
            assert code == 0x97
            refused += 1
            if refused == 25:
                break
        assert refused == 25, "the outbox never filled up"
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{admin_port}") as admin:
            for _ in range(200):  # the refusals join the counters with the next commit
                c = (await admin.get("/api/status")).json()["outbox"]["cloud"]
                if c["rejected_full"] >= refused:
                    break
                await asyncio.sleep(0.05)
            assert c["rejected_full"] == refused
            assert c["accepted"] == accepted and c["dropped"] == 0
