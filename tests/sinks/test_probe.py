"""Probing a sink while it backs off: a drain starts within seconds of the
cloud's return, not when a long backoff ends."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Sequence
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from edgeway.config import OutboxSection, SinkConfig
from edgeway.outbox import Outbox, SinkRunner
from edgeway.reading import Reading
from edgeway.sinks.base import Record, Sink, create_sink
from edgeway.sinks.http import HttpSink


class LongestBackoff(random.Random):
    """Jitter that always picks the whole backoff: the longest wait."""

    def uniform(self, a: float, b: float) -> float:
        return b


class Cloud:
    """An aiohttp ingest endpoint on a fixed port, started and stopped at will."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ids: list[str] = []
        self.arrived = asyncio.Event()
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.ids.extend(r["id"] for r in orjson.loads(await request.read())["records"])
        self.arrived.set()
        return web.Response(text="ok")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/ingest", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class WatchedHttpSink(HttpSink):
    """The HTTP sink, telling the test when a send failed."""

    def __init__(self, config: SinkConfig, gateway_id: str) -> None:
        super().__init__(config, gateway_id)
        self.failed = asyncio.Event()

    async def send_batch(self, records: Sequence[Record]) -> None:
        try:
            await super().send_batch(records)
        except Exception:
            self.failed.set()
            raise


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_drain_starts_within_seconds_of_the_clouds_return_despite_a_long_backoff(
    tmp_path: Path,
) -> None:
    port = free_port()
    cloud = Cloud(port)  # down for now: connections are refused
    sink = WatchedHttpSink(SinkConfig(name="cloud", url=f"http://127.0.0.1:{port}/ingest"), "gw")
    await sink.start()
    ob = Outbox(tmp_path / "o.db", gateway_id="gw", config=OutboxSection(), sink_names=["cloud"])
    await ob.open()
    # Every failure backs off 30 s; the default probe interval (1 s) applies.
    runner = SinkRunner(ob, sink, backoff_initial=30.0, backoff_max=60.0, rng=LongestBackoff())
    task = asyncio.create_task(runner.run())
    try:
        await ob.submit([Reading(f"d{i % 3}", 1_700_000_000.0 + i, {"i": i}) for i in range(50)])
        async with asyncio.timeout(10):
            await sink.failed.wait()  # the first attempt failed: a 30 s backoff began
        await asyncio.sleep(1.5)  # the outage goes on for a while
        await cloud.start()
        back = time.monotonic()
        async with asyncio.timeout(5):  # within a few seconds, not 30
            while len(cloud.ids) < 50:
                cloud.arrived.clear()
                await cloud.arrived.wait()
        assert time.monotonic() - back < 5
        assert sorted(cloud.ids) == sorted(f"gw:{i}" for i in range(1, 51))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sink.close()
        await ob.close()
        await cloud.stop()


class ProbedSink(Sink):
    """A sink whose probe answers from a script (None: no probe)."""

    schemes = ()

    def __init__(self, answers: list[bool | None]) -> None:
        super().__init__(SinkConfig(name="p", url="test://"), "gw")
        self.answers = answers
        self.probes = 0

    async def send_batch(self, records: Sequence[Record]) -> None:
        raise AssertionError("not sent in these tests")

    async def probe(self) -> bool | None:
        self.probes += 1
        return self.answers[min(self.probes, len(self.answers)) - 1]


@pytest.mark.parametrize(
    ("answers", "cut_short"),
    [
        ([False, False, True], True),  # refused, then accepted: the cloud is back
        ([True], False),  # accepted from the start: no news, the backoff runs its course
        ([None], False),  # no probe for this sink
    ],
)
async def test_wait_backoff_ends_early_only_when_the_remote_side_came_back(
    tmp_path: Path, answers: list[bool | None], cut_short: bool
) -> None:
    ob = Outbox(tmp_path / "o.db", gateway_id="gw", config=OutboxSection(), sink_names=["p"])
    sink = ProbedSink(answers)
    runner = SinkRunner(ob, sink, probe_interval=0.05)
    t0 = time.monotonic()
    await runner.wait_backoff(1.0, probe=True)
    took = time.monotonic() - t0
    if cut_short:
        assert took < 0.9 and sink.probes == 3  # three probes 0.05 s apart, not 1 s
    else:
        assert took >= 0.95
    t0 = time.monotonic()
    probes = sink.probes
    await runner.wait_backoff(0.3, probe=False)  # after a Retry-After: no probe at all
    assert time.monotonic() - t0 >= 0.29 and sink.probes == probes


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/ingest",
        "https://127.0.0.1:{port}/ingest",
        "mqtt://127.0.0.1:{port}",
        "nats://127.0.0.1:{port}",
        "amqp://guest:guest@127.0.0.1:{port}/",
        "postgresql://u:p@127.0.0.1:{port}/db",
    ],
)
async def test_each_network_sink_probes_its_endpoint_with_a_tcp_connect(url: str) -> None:
    accepted = asyncio.Event()

    def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sink = create_sink(SinkConfig(name="s", url=url.format(port=port)), "gw")
    try:
        assert await sink.probe() is True
        async with asyncio.timeout(5):
            await accepted.wait()
    finally:
        server.close()
        await server.wait_closed()
    assert await sink.probe() is False  # nothing listens there any more


def test_sinks_without_a_network_endpoint_have_no_probe(tmp_path: Path) -> None:
    file_sink = create_sink(SinkConfig(name="f", url=f"file://{tmp_path}"), "gw")
    socket_pg = create_sink(
        SinkConfig(name="pg", url="postgresql:///db?host=/run/postgresql"), "gw"
    )
    assert file_sink.probe_addresses() == [] and socket_pg.probe_addresses() == []
    assert asyncio.run(file_sink.probe()) is None


def test_retry_after_is_a_lower_bound_not_the_delay() -> None:
    # A cloud answering 503 with "Retry-After: 0" to every attempt was retried
    # in a busy loop that starved the devices' acknowledgements (tests/faults,
    # "sink answers 503"): the backoff still grows, Retry-After only lengthens it.
    sink = HttpSink(SinkConfig(name="c", url="http://127.0.0.1:9/ingest"), "gw")
    runner = SinkRunner(None, sink, backoff_initial=0.5, backoff_max=60.0, rng=LongestBackoff())  # type: ignore[arg-type]
    assert [runner.backoff_delay(a, 0.0) for a in range(4)] == [0.5, 1.0, 2.0, 4.0]
    assert runner.backoff_delay(0, 7.0) == 7.0  # the remote side's word when longer
    assert runner.backoff_delay(20, None) == 60.0
    assert runner.backoff_delay(0, 10_000.0) == 3600.0  # RETRY_AFTER_MAX
