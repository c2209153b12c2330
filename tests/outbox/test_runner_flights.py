"""A runner that keeps up sends the next batch while the previous one waits
for its acknowledgement, on a sink that takes several at once
(``Sink.max_batches_in_flight``; the MQTT sink with several connections).

What must hold: the next batch leaves before the previous one is
acknowledged; confirmations (the cursor) follow batch order whatever order
the acknowledgements come in; a batch never flies beside one holding the
same device, so a device's order survives a batch that fails and is sent
again; no more batches fly than the sink takes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from edgeway.config import SinkConfig
from edgeway.outbox import Outbox, SinkRunner
from edgeway.reading import Origin, Reading
from edgeway.sinks.base import Record, RetryableSinkError, Sink
from outbox_db import opened


def reading(device: str, i: int) -> Reading:
    return Reading(device, 1_700_000_000.0 + i, {"i": i}, origin=Origin("test"))


class HeldSink(Sink):
    """A real in-process sink whose acknowledgements the test releases, one
    batch at a time, in any order; a batch can be told to fail once."""

    schemes = ()

    def __init__(self, depth: int) -> None:
        super().__init__(SinkConfig(name="a", url="test://"), "gw")
        self.max_wait = 0.0
        self.depth = depth
        self.sent: list[list[Record]] = []
        """Every send, in the order they started (retries included)."""
        self.acks: dict[int, asyncio.Future[BaseException | None]] = {}
        """By first record seq: resolve to acknowledge (None) or fail."""
        self.flying = 0
        self.most_flying = 0
        self.started = asyncio.Event()

    def max_batches_in_flight(self) -> int:
        return self.depth

    async def send_batch(self, records: Sequence[Record]) -> None:
        self.sent.append(list(records))
        fut = asyncio.get_running_loop().create_future()
        self.acks[records[0].seq] = fut
        self.flying += 1
        self.most_flying = max(self.most_flying, self.flying)
        self.started.set()
        try:
            error = await fut
        finally:
            self.flying -= 1
        if error is not None:
            raise error

    async def wait_sent(self, n: int) -> None:
        async with asyncio.timeout(5):
            while len(self.sent) < n:
                self.started.clear()
                await self.started.wait()

    def ack(self, seq: int, error: BaseException | None = None) -> None:
        self.acks.pop(seq).set_result(error)


@pytest.fixture
async def outbox(tmp_path: Path) -> AsyncIterator[Outbox]:
    async with opened(tmp_path / "o.db") as ob:
        yield ob


def cursor(ob: Outbox) -> int:
    """The sink's cursor as last committed."""
    return ob._reads["a"].cursor


async def ack_until_cursor(ob: Outbox, sink: HeldSink, n: int) -> None:
    """Acknowledge every batch the sink is sent until the cursor reaches ``n``."""
    async with asyncio.timeout(5):
        while cursor(ob) != n:
            for seq in list(sink.acks):
                sink.ack(seq)
            await asyncio.sleep(0.01)  # the runner sends the next batches meanwhile


async def until_cursor(ob: Outbox, n: int) -> None:
    async with asyncio.timeout(5):
        while cursor(ob) != n:
            await ob.wait_for_commit()  # the cursor moves at commits only


@contextlib.asynccontextmanager
async def running(ob: Outbox, depth: int) -> AsyncIterator[HeldSink]:
    """A runner driving a :class:`HeldSink` that takes ``depth`` batches at once."""
    sink = HeldSink(depth)
    runner = SinkRunner(ob, sink, backoff_initial=0.01, backoff_max=0.02, probe_interval=0)
    task = asyncio.create_task(runner.run())
    try:
        yield sink
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_the_next_batch_leaves_before_the_previous_is_acknowledged(
    outbox: Outbox,
) -> None:
    async with running(outbox, 4) as sink:
        await outbox.submit([reading("d1", 1)])
        await sink.wait_sent(1)
        await outbox.submit([reading("d2", 2)])
        await sink.wait_sent(2)  # batch 1 still waits for its acknowledgement
        assert sink.flying == 2
        await outbox.submit([reading("d3", 3)])
        await sink.wait_sent(3)
        # Acknowledged out of order: the cursor follows batch order.
        sink.ack(3)
        sink.ack(2)
        await asyncio.sleep(0.1)  # ten times the confirmations' linger
        assert cursor(outbox) == 0
        sink.ack(1)
        await until_cursor(outbox, 3)
        assert outbox.counters()["a"]["delivered"] == 3
        assert outbox.counters()["a"]["pending"] == 0


async def test_a_device_never_flies_twice(outbox: Outbox) -> None:
    """The same device's next record waits for the previous batch: if that
    one fails and is sent again, the device's order at the remote side holds."""
    async with running(outbox, 4) as sink:
        await outbox.submit([reading("d1", 1)])
        await sink.wait_sent(1)
        await outbox.submit([reading("d1", 2)])
        await outbox.submit([reading("d2", 3)])  # waits behind d1's second record
        await asyncio.sleep(0.05)
        assert len(sink.sent) == 1
        sink.ack(1, RetryableSinkError("broker away"))
        await sink.wait_sent(2)  # the retry of batch 1
        assert [r.seq for r in sink.sent[1]] == [1]
        sink.ack(1)
        await ack_until_cursor(outbox, sink, 3)
        order = [r.seq for b in sink.sent for r in b]
        d1 = [r.seq for b in sink.sent for r in b if r.device_id == "d1"]
        assert d1 == [1, 1, 2]  # never 2 before the retried 1
        assert sorted(set(order)) == [1, 2, 3]


async def test_a_failed_batch_is_confirmed_before_the_ones_after_it(outbox: Outbox) -> None:
    """Batch 1 fails and is retried while batch 2 (another device) lands:
    batch 2's confirmation waits, so the cursor never passes batch 1 before
    it is delivered."""
    async with running(outbox, 4) as sink:
        await outbox.submit([reading("d1", 1)])
        await sink.wait_sent(1)
        await outbox.submit([reading("d2", 2)])
        await sink.wait_sent(2)
        sink.ack(2)
        sink.ack(1, RetryableSinkError("broker away"))
        await sink.wait_sent(3)  # batch 1 again
        await asyncio.sleep(0.1)
        assert cursor(outbox) == 0
        sink.ack(1)
        await until_cursor(outbox, 2)
        assert outbox.counters()["a"]["delivered"] == 2


async def test_no_more_batches_fly_than_the_sink_takes(outbox: Outbox) -> None:
    async with running(outbox, 2) as sink:
        for i in range(1, 6):
            await outbox.submit([reading(f"d{i}", i)])
            await asyncio.sleep(0.01)
        assert len(sink.sent) == 2 and sink.most_flying == 2
        await ack_until_cursor(outbox, sink, 5)
        assert sink.most_flying == 2
        assert sorted(r.seq for b in sink.sent for r in b) == [1, 2, 3, 4, 5]


async def test_one_at_a_time_without_the_sinks_word(outbox: Outbox) -> None:
    async with running(outbox, 1) as sink:
        await outbox.submit([reading("d1", 1)])
        await sink.wait_sent(1)
        await outbox.submit([reading("d2", 2)])
        await asyncio.sleep(0.05)
        assert len(sink.sent) == 1
        sink.ack(1)
        await sink.wait_sent(2)
        sink.ack(2)


async def test_a_sinks_confirmations_in_one_commit_are_one_move(outbox: Outbox) -> None:
    """Many small batches (a sink that keeps up) confirmed before the next
    commit: one cursor move with every record, each caller's future
    resolved; a dead letter between two keeps its own place."""
    for i in range(6):
        await outbox.submit([reading(f"d{i}", i)])
    batches = [await outbox.read_batch("a", 1, 1 << 20) for _ in range(6)]
    assert [b.records[0].seq for b in batches] == [1, 2, 3, 4, 5, 6]
    futs = [outbox.confirm(b, linger=True) for b in batches[:3]]
    futs.append(outbox.dead_letter(batches[3], "refused"))
    futs += [outbox.confirm(b, linger=True) for b in batches[4:]]
    assert [(op.kind, op.cursor, len(op.records)) for op in outbox._ops] == [
        ("confirm", 3, 3),
        ("dead_letter", 4, 1),
        ("confirm", 6, 2),
    ]
    assert [len(b.records) for b in batches] == [1] * 6  # the batches' own lists kept
    await asyncio.wait_for(asyncio.gather(*futs), 5)
    c = outbox.counters()["a"]
    assert (c["delivered"], c["dropped_dead_letter"], c["pending"]) == (5, 1, 0)
    assert cursor(outbox) == 6
