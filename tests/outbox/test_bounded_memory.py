"""Memory stays bounded whatever the backlog (issue 3, section 1): the backlog
lives on disk, and neither opening the outbox nor draining it loads it.

Python-level allocations are traced (tracemalloc) while a sink drains a small
and a ten times larger backlog; the peaks must be about the same. SQLite's own
page cache is bounded by its configuration and is not what would grow."""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

from edgeway.config import OutboxSection, SinkConfig
from edgeway.outbox import Outbox, SinkRunner
from edgeway.reading import Reading
from edgeway.sinks.base import Record, Sink


class CountingSink(Sink):
    """Counts records and keeps none of them."""

    schemes = ()

    def __init__(self) -> None:
        super().__init__(SinkConfig(name="a", url="test://"), "gw")
        self.max_batch_records = 500
        self.max_wait = 0.0
        self.n = 0
        self.got = asyncio.Event()

    async def send_batch(self, records: Sequence[Record]) -> None:
        self.n += len(records)
        self.got.set()


async def drain_peak(path: Path, rows: int) -> int:
    """Store ``rows`` readings, reopen, drain them; the traced peak (bytes)
    from the reopen to the end of the drain."""
    cfg = OutboxSection(durability="os")
    ob = Outbox(path, gateway_id="gw", config=cfg, sink_names=["a"])
    await ob.open()
    batch = [Reading(f"d{i % 50}", 1.7e9 + i, {"i": i, "temp": 20.5}) for i in range(1000)]
    await asyncio.gather(*(ob.submit(batch) for _ in range(rows // 1000)))
    await ob.close()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        ob = Outbox(path, gateway_id="gw", config=cfg, sink_names=["a"])
        await ob.open()
        sink = CountingSink()
        task = asyncio.create_task(SinkRunner(ob, sink).run())
        try:
            async with asyncio.timeout(60):
                while ob.counters()["a"]["pending"] > 0:
                    await ob.wait_for_commit()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await ob.close()
        assert sink.n >= rows
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


async def test_draining_ten_times_the_backlog_takes_no_more_memory(tmp_path: Path) -> None:
    small = await drain_peak(tmp_path / "small.db", 4_000)
    large = await drain_peak(tmp_path / "large.db", 40_000)
    # A backlog held in memory would cost ~100+ bytes per row: 40,000 rows add
    # several MB. Allow noise, not growth with the backlog.
    assert large < small * 1.5 + 1_000_000, (small, large)
