"""The batching options every sink takes (``max_records``, ``max_bytes``,
``max_wait``; sinks.base.BatchOptions), as the runner applies them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from edgeway.config import OutboxSection, SinkConfig
from edgeway.outbox import Outbox, SinkRunner
from edgeway.reading import Reading
from edgeway.sinks.base import BatchOptions, Record, Sink


class TimedSink(Sink):
    """Keeps every batch with the time it was sent."""

    schemes = ()

    def __init__(self, opts: BatchOptions) -> None:
        super().__init__(SinkConfig(name="a", url="test://"), "gw")
        self.use_batch_options(opts)
        self.batches: list[tuple[float, list[Record]]] = []
        self.got = asyncio.Event()

    async def send_batch(self, records: Sequence[Record]) -> None:
        self.batches.append((time.monotonic(), list(records)))
        self.got.set()

    async def wait_records(self, n: int) -> None:
        async with asyncio.timeout(10):
            while sum(len(b) for _, b in self.batches) < n:
                self.got.clear()
                await self.got.wait()


def reading(i: int, pad: int = 0) -> Reading:
    return Reading("d", 1_700_000_000.0 + i, {"i": i, "pad": "x" * pad})


@pytest.fixture
async def outbox(tmp_path: Path) -> AsyncIterator[Outbox]:
    ob = Outbox(tmp_path / "outbox.db", gateway_id="gw", config=OutboxSection(), sink_names=["a"])
    await ob.open()
    try:
        yield ob
    finally:
        await ob.close()


async def run(ob: Outbox, sink: TimedSink) -> asyncio.Task[None]:
    task = asyncio.create_task(SinkRunner(ob, sink).run())
    await asyncio.sleep(0)  # the runner is waiting for rows
    return task


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_max_wait_lets_a_batch_fill_but_not_longer(outbox: Outbox) -> None:
    sink = TimedSink(BatchOptions(max_records=10, max_wait=0.3))
    task = await run(outbox, sink)
    try:
        t0 = time.monotonic()
        for i in range(3):  # trickle: three readings, 20 ms apart
            await outbox.submit([reading(i)])
            await asyncio.sleep(0.02)
        await sink.wait_records(3)
        sent_at, first = sink.batches[0]
        assert [r.seq for r in first] == [1, 2, 3]  # gathered into one batch
        assert sent_at - t0 < 0.3 + 0.25, "waited well past max_wait"
        # A full batch does not wait for max_wait.
        t1 = time.monotonic()
        await outbox.submit([reading(i) for i in range(3, 13)])
        await sink.wait_records(13)
        assert len(sink.batches[1][1]) == 10
        assert sink.batches[1][0] - t1 < 0.2
    finally:
        await stop(task)


async def test_max_records_and_max_bytes_bound_every_batch(outbox: Outbox) -> None:
    # ~300-byte rows, 1 KiB batches: three per batch at most, whatever max_records says.
    sink = TimedSink(BatchOptions(max_records=100, max_bytes=1024))
    await outbox.submit([reading(i, pad=250) for i in range(20)])
    task = await run(outbox, sink)
    try:
        await sink.wait_records(20)
    finally:
        await stop(task)
    sizes = [len(b) for _, b in sink.batches]
    assert all(1 <= n <= 4 for n in sizes) and len(sizes) >= 5, sizes
    assert [r.seq for _, b in sink.batches for r in b] == list(range(1, 21))
    sink = TimedSink(BatchOptions(max_records=7))
    await outbox.submit([reading(i) for i in range(20, 40)])
    task = await run(outbox, sink)
    try:
        await sink.wait_records(20)
    finally:
        await stop(task)
    assert [len(b) for _, b in sink.batches] == [7, 7, 6]
