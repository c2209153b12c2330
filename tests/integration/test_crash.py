"""Crash test (issue 3, section 4): nothing a device got a PUBACK for is lost.

paho-mqtt publishes QoS 1 telemetry while ``edgeway run`` is killed with
SIGKILL at random moments, several times, and restarted on the same data
directory. Afterwards every message that was acknowledged is at the HTTP
server the test runs, and a message that arrived twice arrived with the same
record id both times.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import pytest
from aiohttp import web
from edgeway_process import StartGateway, free_port

from edgeway.config import OutboxSection
from edgeway.outbox import Outbox
from outbox_db import pending_for

KILLS = 4
"""Gateway lives ended by SIGKILL; a fifth life drains the outbox."""
MESSAGES_PER_LIFE = 600
"""Publishes attempted per life; the kill lands somewhere in them."""
DRAIN_TIMEOUT = 30.0


@dataclass
class ThreadedIngestServer:
    """A real aiohttp server on its own thread and loop (the test itself is sync)."""

    port: int
    records: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _runner: web.AppRunner | None = None
    _site: web.TCPSite | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        with self.lock:
            self.records.extend(body["records"])
        return web.Response(text="ok")

    def start(self) -> None:
        ready = threading.Event()

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            app = web.Application()
            app.router.add_post("/ingest", self._handle)
            self._runner = web.AppRunner(app, access_log=None)
            loop.run_until_complete(self._runner.setup())
            loop.run_until_complete(self._open())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=main, name="ingest-server", daemon=True)
        self._thread.start()
        assert ready.wait(10), "ingest server did not start"

    async def _open(self) -> None:
        """Listen on ``port`` (again, after :meth:`_close`: the fault suite's outages)."""
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()

    async def _close(self) -> None:
        """Stop listening: new connections are refused, as from a cloud that is down."""
        if self._site is not None:
            await self._site.stop()
            self._site = None

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def snapshot(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.records)


@pytest.fixture
def ingest_server() -> Iterator[ThreadedIngestServer]:
    srv = ThreadedIngestServer(free_port())
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


ACK_WAIT = 15.0
"""Seconds a life waits for its first acknowledgement before it is killed anyway."""


def publish_until_killed(
    host: str, port: int, first_n: int, kill_after: float, kill: Any
) -> set[int]:
    """Publish messages ``first_n...`` at QoS 1; call ``kill`` ``kill_after``
    seconds after the first acknowledgement (on a loaded machine the
    connection and the first fsync'd commit can take longer than that from
    the start; at most ACK_WAIT is waited for it); return the message
    numbers the gateway acknowledged (PUBACK)."""
    acked_mids: set[int] = set()
    mid_to_n: dict[int, int] = {}
    lock = threading.Lock()
    first_ack: list[float] = []

    def on_publish(_c: Any, _u: Any, mid: int, _rc: Any = None, _p: Any = None) -> None:
        # paho calls this holding its own message lock, and publish() takes
        # that lock: never call publish() while holding ours (the two
        # deadlocked, hanging the test). So only the mid is noted here; the
        # mids of one client do not wrap (MESSAGES_PER_LIFE < 65,535).
        with lock:
            acked_mids.add(mid)
            if not first_ack:
                first_ack.append(time.monotonic())

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"crash-{first_n}")
    client.on_publish = on_publish
    client.max_inflight_messages_set(20)
    client.connect(host, port)
    client.loop_start()
    started = time.monotonic()
    killed = False

    def due() -> bool:
        now = time.monotonic()
        with lock:
            since = first_ack[0] if first_ack else None
        return (since is not None and now - since >= kill_after) or now - started >= ACK_WAIT

    try:
        for k in range(first_n, first_n + MESSAGES_PER_LIFE):
            if not killed and due():
                kill()
                killed = True
            payload = orjson.dumps({"n": k, "msg_id": f"m{k}"})
            info = client.publish(f"devices/dev{k % 5}/telemetry", payload, qos=1)
            mid_to_n[info.mid] = k
            if killed:
                break
            time.sleep(0.001)  # pace: a device, not a flood; the kill lands mid-stream
        while not killed:  # all published: kill once the first ack is kill_after old
            if due():
                kill()
                killed = True
            time.sleep(0.01)
        time.sleep(0.2)  # let paho notice the dead connection; acks after the kill are impossible
    finally:
        client.loop_stop()
        client.disconnect()
    with lock:
        return {mid_to_n[mid] for mid in acked_mids if mid in mid_to_n}


def test_sigkill_loses_nothing_acknowledged(
    start_gateway: StartGateway, ingest_server: ThreadedIngestServer, tmp_path: Path
) -> None:
    rng = random.Random(20261125)
    data_dir = tmp_path / "data"
    config = f"""
        gateway: {{id: crashgw}}
        outbox: {{durability: fsync}}
        sinks:
          - name: cloud
            url: http://127.0.0.1:{ingest_server.port}/ingest
            options: {{max_records: 200}}
        """
    acked: set[int] = set()
    n = 0
    t0 = time.monotonic()
    for life in range(KILLS):
        gw = start_gateway(config, data_dir=data_dir)

        def kill(gw: Any = gw) -> None:
            gw.process.kill()
            gw.process.wait(10)

        got = publish_until_killed(gw.host, gw.port, n, rng.uniform(0.1, 0.5), kill)
        assert gw.process.returncode == -9
        assert got, f"life {life}: no message was acknowledged before the kill"
        acked |= got
        n += MESSAGES_PER_LIFE
    # A last life, not killed, drains the outbox to the server.
    gw = start_gateway(config, data_dir=data_dir)
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while time.monotonic() < deadline:
        arrived = {int(r["metrics"]["n"]) for r in ingest_server.snapshot()}
        if acked <= arrived:
            break
        time.sleep(0.1)
    records = ingest_server.snapshot()
    arrived = {int(r["metrics"]["n"]) for r in records}
    missing = sorted(acked - arrived)
    assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {missing[:10]}"
    # Duplicates are allowed, but only with the same record id.
    ids_of: dict[int, set[str]] = {}
    for r in records:
        ids_of.setdefault(int(r["metrics"]["n"]), set()).add(r["id"])
    assert all(len(ids) == 1 for ids in ids_of.values())
    # Per device, first arrivals come in publish order (a retry may repeat, never reorder).
    first: dict[str, list[int]] = {}
    seen: set[str] = set()
    for r in records:
        if r["id"] not in seen:
            seen.add(r["id"])
            first.setdefault(r["device_id"], []).append(int(r["metrics"]["n"]))
    for device, ns in first.items():
        assert ns == sorted(ns), device
    assert time.monotonic() - t0 < 60
    assert gw.terminate() == 0
    # After five lives, four of them killed, the counters still balance and
    # match the rows on disk.
    counters, on_disk = asyncio.run(_counters_after(data_dir / "outbox.db"))
    c = counters["cloud"]
    assert c["accepted"] == c["delivered"] + c["pending"] + c["dropped"], c
    assert c["pending"] == on_disk, (c, on_disk)
    assert c["accepted"] >= len(acked) and c["dropped"] == 0


async def _counters_after(db: Path) -> tuple[dict[str, dict[str, int]], int]:
    ob = Outbox(db, gateway_id="crashgw", config=OutboxSection(), sink_names=["cloud"])
    await ob.open()
    try:
        counters = ob.counters()
    finally:
        await ob.close()
    return counters, pending_for(db, "cloud")
