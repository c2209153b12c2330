"""Receipts follow routing: a reading is confirmed to its device only when
every sink it was routed to has confirmed it, and never when one of them lost
it (retention drop). Issue 3, section 3. Also: drops are logged per sink and
reason without flooding the log."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edgeway.config import OutboxSection
from edgeway.outbox import Confirmed, Outbox
from edgeway.reading import Origin, Reading


def reading(i: int) -> Reading:
    return Reading("d", 1_700_000_000.0 + i, {"i": i}, origin=Origin("t", message_id=f"m{i}"))


@pytest.fixture
async def outbox(tmp_path: Path) -> AsyncIterator[Outbox]:
    # Room for about eight of these rows: the ninth pushes the oldest out.
    ob = Outbox(
        tmp_path / "outbox.db",
        gateway_id="gw",
        config=OutboxSection(max_bytes=8 * 100, when_full="drop_oldest"),
        sink_names=["a", "b"],
    )
    await ob.open()
    try:
        yield ob
    finally:
        await ob.close()


async def confirm_all(ob: Outbox, sink: str) -> list[int]:
    b = await ob.read_batch(sink, 1000, 1 << 30)
    await ob.confirm(b)  # resolves once the confirmation is committed
    return [r.seq for r in b.records]


async def test_receipt_waits_for_every_routed_sink(outbox: Outbox) -> None:
    got: list[Confirmed] = []
    outbox.add_confirmed_listener(got.extend)
    await outbox.submit([reading(1), reading(2)])  # both sinks
    await outbox.submit([reading(3)], sinks=["a"])  # routed to a only
    assert await confirm_all(outbox, "a") == [1, 2, 3]
    assert [c.message_id for c in got] == ["m3"]  # 1 and 2 still wait for b
    assert await confirm_all(outbox, "b") == [1, 2]
    assert sorted(c.message_id or "" for c in got) == ["m1", "m2", "m3"]


async def test_no_receipt_for_a_reading_one_sink_lost(outbox: Outbox) -> None:
    got: list[Confirmed] = []
    outbox.add_confirmed_listener(got.extend)
    await outbox.submit([reading(1), reading(2)])
    await confirm_all(outbox, "a")
    assert got == []
    # b is down while more arrives: retention drops the oldest rows, which b
    # never confirmed (a did).
    for i in range(3, 30):
        await outbox.submit([reading(i)])
    dropped = outbox.counters()["b"]["dropped_max_bytes"]
    assert dropped >= 2
    sent_to_b = await confirm_all(outbox, "b")
    assert sent_to_b and 1 not in sent_to_b and 2 not in sent_to_b
    assert got == []  # a has not confirmed the rows b got
    sent_to_a = await confirm_all(outbox, "a")
    assert sent_to_a == sent_to_b  # the rows retention left, for both
    # Receipts for exactly the rows both sinks confirmed; never for 1 and 2,
    # which a confirmed but b lost.
    assert sorted(c.seq for c in got) == sent_to_b


async def test_drops_are_logged_per_sink_and_reason_without_flooding(
    outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    """Guarantee 4 of docs/outbox.md: counted and logged, at most one line per
    sink and reason every 10 s however many rows go."""
    with caplog.at_level(logging.WARNING, logger="edgeway.outbox.store"):
        for i in range(60):
            await outbox.submit([reading(i)])
    c = outbox.counters()
    assert c["a"]["dropped_max_bytes"] == c["b"]["dropped_max_bytes"] >= 40
    lines = [r.getMessage() for r in caplog.records if "outbox dropped" in r.getMessage()]
    found = sorted(
        re.findall(r"^outbox dropped \d+ records for sink (\w+) \((\w+)\)$", "\n".join(lines), re.M)
    )
    assert found == [("a", "max_bytes"), ("b", "max_bytes")], lines
