"""Counters that are exact, not only balanced: each record counted once, under
the outcome it really had (delivered, dropped for a reason, refused)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from edgeway.config import OutboxSection
from edgeway.outbox import Outbox
from edgeway.outbox import store as store_mod
from edgeway.outbox.store import stored_size
from edgeway.reading import Reading
from outbox_db import pending_for

OpenOutbox = Callable[..., Any]


def reading(i: int, priority: int = 0) -> Reading:
    # Same number of digits in every reading below: equal stored sizes.
    return Reading("dev", 1_700_000_000.0 + i, {"i": 100 + i}, priority=priority)


@pytest.fixture
async def open_outbox(tmp_path: Path) -> AsyncIterator[OpenOutbox]:
    opened: list[Outbox] = []

    async def make(**cfg: Any) -> Outbox:
        ob = Outbox(
            tmp_path / "outbox.db", gateway_id="gw", config=OutboxSection(**cfg), sink_names=["a"]
        )
        await ob.open()
        opened.append(ob)
        return ob

    try:
        yield make
    finally:
        for ob in opened:
            await ob.close()


def check(ob: Outbox, **expected: int) -> None:
    c = ob.counters()["a"]
    assert {k: c[k] for k in expected} == expected
    assert c["accepted"] == c["delivered"] + c["pending"] + c["dropped"]
    assert c["pending"] == pending_for(ob.path, "a")


async def test_records_dropped_while_their_batch_was_sent_count_as_delivered(
    open_outbox: OpenOutbox, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.WARNING, logger="edgeway.outbox")
    one = stored_size(reading(1), "gw")
    ob = await open_outbox(max_bytes=20 * one, when_full="drop_oldest")
    for i in range(1, 21):
        await ob.submit([reading(i)])
    batch = await ob.read_batch("a", 10, 1 << 20)  # records 1..10 on their way
    assert [r.seq for r in batch.records] == list(range(1, 11))
    for i in range(21, 26):  # five more: retention drops 1..5, in flight
        await ob.submit([reading(i)])
    check(ob, accepted=25, delivered=0, dropped_max_bytes=5, pending=20)
    await ob.confirm(batch)  # the cloud confirmed all ten: 1..5 were delivered
    check(ob, accepted=25, delivered=10, dropped_max_bytes=0, pending=15)
    # Drop log lines come at most every 10 s: the four drops not logged yet were
    # taken back with the counts, so the next line does not claim them.
    monkeypatch.setattr(store_mod, "DROP_LOG_INTERVAL", 0.0)
    caplog.clear()
    # Retention that drops records no batch holds still counts them as dropped.
    for i in range(26, 31):
        await ob.submit([reading(i)])
    check(ob, accepted=30, delivered=10, dropped_max_bytes=0, pending=20)
    for i in range(31, 34):
        await ob.submit([reading(i)])
    check(ob, accepted=33, delivered=10, dropped_max_bytes=3, pending=20)
    drops = [r.getMessage() for r in caplog.records if "outbox dropped" in r.getMessage()]
    assert drops == ["outbox dropped 1 records for sink a (max_bytes)"] * 3
    rest = await ob.read_batch("a", 100, 1 << 20)
    assert [r.seq for r in rest.records] == list(range(14, 34))
    await ob.confirm(rest)
    check(ob, accepted=33, delivered=30, dropped_max_bytes=3, pending=0)


async def test_records_dropped_by_several_commits_in_flight_count_as_delivered(
    open_outbox: OpenOutbox,
) -> None:
    one = stored_size(reading(1), "gw")
    ob = await open_outbox(max_bytes=10 * one)
    for i in range(1, 11):
        await ob.submit([reading(i)])
    batch = await ob.read_batch("a", 4, 1 << 20)  # 1..4 in flight
    await ob.submit([reading(11), reading(12)])  # drops 1, 2 (in flight)
    await ob.submit([reading(13)])  # drops 3 (in flight)
    check(ob, accepted=13, dropped_max_bytes=3, pending=10)
    await ob.confirm(batch)
    check(ob, accepted=13, delivered=4, dropped_max_bytes=0, pending=9)


async def test_records_expired_by_max_age_while_sent_count_as_delivered(tmp_path: Path) -> None:
    mono = [100.0]
    ob = Outbox(
        tmp_path / "outbox.db",
        gateway_id="gw",
        config=OutboxSection(max_age=60),
        sink_names=["a", "nudge"],
        monotonic_clock=lambda: mono[0],
    )
    await ob.open()
    try:
        await ob.submit([reading(i) for i in range(1, 11)], ["a"])
        batch = await ob.read_batch("a", 6, 1 << 20)  # 1..6 on their way
        mono[0] += 61
        await ob.submit([reading(0)], ["nudge"])  # a commit: the age sweep drops 1..10
        check(ob, accepted=10, dropped_max_age=10, pending=0)
        await ob.confirm(batch)
        check(ob, accepted=10, delivered=6, dropped_max_age=4, pending=0)
    finally:
        await ob.close()


async def test_a_priority_chunk_passed_by_the_ordered_read_counts_once(
    open_outbox: OpenOutbox,
) -> None:
    ob = await open_outbox()
    await ob.submit([reading(1)])
    await ob.submit([reading(2, priority=1)])
    await ob.submit([reading(3)])
    batch = await ob.read_batch("a", 100, 1 << 20)
    assert sorted(r.seq for r in batch.records) == [1, 2, 3]
    await ob.confirm(batch)
    check(ob, accepted=3, delivered=3, pending=0)
