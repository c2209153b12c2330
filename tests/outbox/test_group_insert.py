"""The outbox's hot-path shapes: chunks of records and one future per group commit.

Every record of a large group commit is stored exactly as submitted (whatever
chunks it was split into), submits in one commit share a future that a
caller cannot cancel for the others, and ``reject_new`` keeps one future (and
one verdict) per submit.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edgeway.config import OutboxSection
from edgeway.ingest import IngestStatus
from edgeway.outbox import Outbox
from edgeway.outbox.store import stored_size
from edgeway.reading import Origin, Reading
from outbox_db import stored_records


@pytest.fixture
async def outbox(tmp_path: Path) -> AsyncIterator[Outbox]:
    ob = Outbox(tmp_path / "outbox.db", gateway_id="gw", config=OutboxSection(), sink_names=["a"])
    await ob.open()
    try:
        yield ob
    finally:
        await ob.close()


def _reading(i: int) -> Reading:
    # Every 7th reading carries tags, a message id and a priority: the rows
    # that are not plain must survive the multi-row statements too.
    special = i % 7 == 0
    return Reading(
        f"dev-{i % 5}",
        1_700_000_000.0 + i / 8,
        {"i": i, "temp": 20.5 + i, "on": i % 2 == 0, "mode": f"m{i}"},
        origin=Origin("test", message_id=f"m-{i}" if special else None),
        tags={"site": "s1"} if special else {},
        priority=1 if special else 0,
    )


async def test_one_large_commit_stores_every_row_as_submitted(outbox: Outbox) -> None:
    # 1,151 records, every 7th with tags/priority/message id: runs of equal
    # priority become separate chunks, long runs are split at CHUNK_MAX.
    readings = [_reading(i) for i in range(1151)]
    futs = [outbox.submit(readings[i : i + 100]) for i in range(0, len(readings), 100)]
    statuses = await asyncio.gather(*futs)
    assert statuses == [IngestStatus.ACCEPTED] * len(futs)
    assert outbox.commits == 1
    assert outbox.counters()["a"]["accepted"] == 1151

    rows = stored_records(outbox.path)
    assert [r.seq for r in rows] == list(range(1, 1152))
    for row, r in zip(rows, readings, strict=True):
        assert row.pending == 1
        assert row.doc["id"] == f"gw:{row.seq}"
        assert (row.doc["device_id"], row.doc["ts"], row.priority) == (
            r.device_id,
            r.ts,
            r.priority,
        )
        assert row.doc["metrics"] == r.metrics
        assert row.doc.get("tags", {}) == r.tags
        assert row.doc.get("priority", 0) == r.priority
        assert row.msg_id == r.origin.message_id
        assert row.size == stored_size(r, "gw")
    assert outbox.stored_bytes == sum(r.size for r in rows)


async def test_submits_in_one_commit_share_a_future_that_refuses_cancel(outbox: Outbox) -> None:
    first = outbox.submit([_reading(1)])
    second = outbox.submit([_reading(2), _reading(3)])
    assert first is second
    # A caller that gives up must not fail the other submitters.
    assert first.cancel() is False
    assert await first is IngestStatus.ACCEPTED
    assert outbox.counters()["a"]["accepted"] == 3
    # The next commit gets a future of its own.
    third = outbox.submit([_reading(4)])
    assert third is not first
    assert await third is IngestStatus.ACCEPTED


async def test_cancelled_waiter_does_not_fail_others(outbox: Outbox) -> None:
    shared = outbox.submit([_reading(1)])
    waiter = asyncio.create_task(asyncio.wait_for(asyncio.ensure_future(shared), 10))
    await asyncio.sleep(0)
    waiter.cancel()
    assert await shared is IngestStatus.ACCEPTED
    with pytest.raises(asyncio.CancelledError):
        await waiter


async def test_reject_new_keeps_one_future_and_verdict_per_submit(tmp_path: Path) -> None:
    # Room for about one reading: the second submit of the same commit is
    # refused on its own while the first is accepted.
    ob = Outbox(
        tmp_path / "outbox.db",
        gateway_id="gw",
        config=OutboxSection(when_full="reject_new", max_bytes=200),
        sink_names=["a"],
    )
    await ob.open()
    try:
        one = ob.submit([_reading(1)])
        two = ob.submit([_reading(2), _reading(3)])
        assert one is not two
        assert await one is IngestStatus.ACCEPTED
        assert await two is IngestStatus.REJECTED_FULL
        c = ob.counters()["a"]
        assert (c["accepted"], c["rejected_full"]) == (1, 2)
    finally:
        await ob.close()


async def test_rows_for_different_sinks_in_one_commit(tmp_path: Path) -> None:
    ob = Outbox(
        tmp_path / "outbox.db", gateway_id="gw", config=OutboxSection(), sink_names=["a", "b"]
    )
    await ob.open()
    try:
        only_a = ob.submit([_reading(1), _reading(2)], ["a"])
        only_b = ob.submit([_reading(3), _reading(7)], ["b"])
        both = ob.submit([_reading(4)])
        assert only_a is not only_b and only_b is not both
        await asyncio.gather(only_a, only_b, both)
        assert ob.commits == 1
        c = ob.counters()
        assert (c["a"]["accepted"], c["b"]["accepted"]) == (3, 3)
        rows = [(r.seq, r.pending, r.msg_id) for r in stored_records(ob.path)]
        assert rows == [(1, 1, None), (2, 1, None), (3, 2, None), (4, 2, "m-7"), (5, 3, None)]
    finally:
        await ob.close()
