"""A pipeline in front of a real outbox on a temporary data directory.

``harness(config_text)`` builds both from a YAML text (``routes:`` /
``pipeline:``; the sinks ``cloud``, ``archive`` and ``quarantine`` exist),
with a fake wall clock and no timers: tests call ``h.tick(now)``. ``h.take()``
returns the records stored for a sink since the last call.
"""

from __future__ import annotations

import asyncio
import gzip
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import pytest
from aiohttp import web
from paho.mqtt.enums import CallbackAPIVersion

from edgeway.config import parse_config
from edgeway.ingest import IngestStatus
from edgeway.outbox import Outbox
from edgeway.pipeline import Pipeline
from edgeway.reading import MetricValue, Origin, Reading
from edgeway.sinks.base import Record

SINKS = """
sinks:
  - {name: cloud, url: "file:///dev/null"}
  - {name: archive, url: "file:///dev/null"}
  - {name: quarantine, url: "file:///dev/null"}
"""


def rd(
    device: str,
    ts: float,
    metrics: dict[str, MetricValue],
    *,
    tags: dict[str, str] | None = None,
    adapter: str = "mqtt",
    address: str = "",
) -> Reading:
    """A reading, tersely."""
    return Reading(device, ts, metrics, Origin(adapter, address), tags or {})


class Harness:
    def __init__(
        self, config_text: str, data_dir: Path, services: dict[str, Any] | None = None
    ) -> None:
        self.config = parse_config(SINKS + config_text, "test.yaml")
        self.data_dir = data_dir
        self.services = services
        self.now = 0.0
        self.outbox: Outbox | None = None
        self.pipeline: Pipeline | None = None

    async def open(self) -> None:
        self.outbox = Outbox(
            self.data_dir / "outbox.db",
            gateway_id="gw",
            config=self.config.outbox,
            sink_names=[s.name for s in self.config.sinks],
        )
        await self.outbox.open()
        self.pipeline = Pipeline(
            self.config.routes,
            self.config.pipeline,
            outbox=self.outbox,
            data_dir=self.data_dir,
            durability=self.config.outbox.durability,
            clock=lambda: self.now,
            timers=False,
            services=self.services,
        )
        await self.pipeline.open()

    async def close(self) -> None:
        if self.pipeline is not None:
            await self.pipeline.close()
        if self.outbox is not None:
            await self.outbox.close()

    async def send(self, *readings: Reading, now: float | None = None) -> IngestStatus:
        """Submit readings at wall clock ``now`` (default: the last reading's ts)."""
        assert self.pipeline is not None
        self.now = now if now is not None else max(r.ts for r in readings)
        return await self.pipeline.submit(list(readings))

    async def tick(self, now: float) -> None:
        assert self.pipeline is not None
        self.now = now
        inflight = set(self.pipeline._inflight)
        self.pipeline.tick(now)
        new = set(self.pipeline._inflight) - inflight
        if new:
            await asyncio.wait(new)

    async def take(self, sink: str = "cloud") -> list[Record]:
        assert self.outbox is not None
        await self.settle()
        out: list[Record] = []
        while True:
            batch = await self.outbox.read_batch(sink, 10_000, 1 << 30)
            out.extend(batch.records)
            if not batch.more or not batch.records:
                return out

    async def settle(self) -> None:
        assert self.pipeline is not None
        if self.pipeline._inflight:
            await asyncio.wait(set(self.pipeline._inflight))

    def stats(self) -> dict[str, Any]:
        assert self.pipeline is not None
        return self.pipeline.report()


MakeHarness = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[MakeHarness]:
    made: list[Harness] = []

    async def make(
        config_text: str, data_dir: Path | None = None, services: dict[str, Any] | None = None
    ) -> Harness:
        h = Harness(config_text, data_dir or tmp_path, services)
        made.append(h)
        await h.open()
        return h

    try:
        yield make
    finally:
        for h in made:
            await h.close()


# -- a cloud HTTP server and MQTT devices (end-to-end tests) -------------------

T0 = 1700000000


class CloudServer:
    """Records every record POSTed to /ingest."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.changed = asyncio.Event()
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        self.records.extend(orjson.loads(raw)["records"])
        self.changed.set()
        return web.Response(text="ok")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/ingest", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def wait_for(self, n: int, limit: float = 20.0) -> None:
        async with asyncio.timeout(limit):
            while len(self.records) < n:
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
async def cloud() -> AsyncIterator[CloudServer]:
    server = CloudServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def publish_all(port: int, messages: list[tuple[str, str, dict[str, Any]]]) -> dict[str, list[int]]:
    """Publish at QoS 1 (MQTT 5) from one client per device; PUBACK reason codes per device."""
    codes: dict[str, list[int]] = {}
    clients = []
    lock = threading.Lock()
    done = threading.Semaphore(0)
    try:
        for device in dict.fromkeys(m[0] for m in messages):
            c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device, protocol=mqtt.MQTTv5)

            def on_publish(
                _c: Any, _u: Any, mid: int, rc: Any, _p: Any, device: str = device
            ) -> None:
                with lock:
                    codes.setdefault(device, []).append((mid, rc.value))  # type: ignore[arg-type]
                done.release()

            c.on_publish = on_publish
            c.connect("127.0.0.1", port)
            c.loop_start()
            clients.append((device, c))
        by_device = dict(clients)
        for device, topic, body in messages:
            by_device[device].publish(topic, orjson.dumps(body), qos=1)
        for _ in messages:
            assert done.acquire(timeout=10), "PUBACK missing"
    finally:
        for _, c in clients:
            c.disconnect()
            c.loop_stop()
    return {d: [rc for _, rc in sorted(v)] for d, v in codes.items()}
