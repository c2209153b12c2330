"""The outbox: group commit, ids, cursors, deletion, limits, counters, drain order."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from edgeway.config import OutboxSection, SinkConfig
from edgeway.ingest import IngestStatus
from edgeway.outbox import Confirmed, Outbox, SinkRunner, deadletter_main, list_dead_letters
from edgeway.outbox import store as store_mod
from edgeway.reading import Origin, Reading
from edgeway.sinks.base import PermanentSinkError, Record, RetryableSinkError, Sink
from outbox_db import pending_for, stored_records

OpenOutbox = Callable[..., Any]


def reading(device: str, i: int, priority: int = 0, msg_id: str | None = None) -> Reading:
    return Reading(
        device,
        1_700_000_000.0 + i,
        {"i": i, "temp": 20.5},
        origin=Origin("test", message_id=msg_id),
        priority=priority,
    )


class CollectSink(Sink):
    """A real in-process sink: keeps what it is sent; can be told to fail."""

    schemes = ()

    def __init__(
        self,
        name: str,
        *,
        max_records: int = 100,
        fail: Callable[[int], BaseException | None] | None = None,
    ) -> None:
        super().__init__(SinkConfig(name=name, url="test://"), "gw")
        self.max_batch_records = max_records
        self.max_wait = 0.0
        self.batches: list[list[Record]] = []
        self.calls = 0
        self.fail = fail
        self.got = asyncio.Event()

    async def send_batch(self, records: Sequence[Record]) -> None:
        self.calls += 1
        if self.fail is not None:
            err = self.fail(self.calls)
            if err is not None:
                raise err
        self.batches.append(list(records))
        self.got.set()

    @property
    def records(self) -> list[Record]:
        return [r for b in self.batches for r in b]


def db_rows(path: Path) -> int:
    """Records on disk (in chunks), whatever their sinks."""
    return len(stored_records(path))


def sink_bit(path: Path, name: str) -> int:
    with sqlite3.connect(path) as c:
        return int(c.execute("SELECT bit FROM sinks WHERE name=?", (name,)).fetchone()[0])


async def until(ob: Outbox, cond: Callable[[], bool], within: float = 10.0) -> None:
    """Wait (bounded) for ``cond`` to hold, re-checking after every commit."""
    async with asyncio.timeout(within):
        while not cond():
            await ob.wait_for_commit()


def assert_conservation(ob: Outbox) -> None:
    for name, c in ob.counters().items():
        assert c["accepted"] == c["delivered"] + c["pending"] + c["dropped"], (name, c)
        assert c["pending"] == pending_for(ob.path, name), (name, c)


@pytest.fixture
async def open_outbox(tmp_path: Path) -> AsyncIterator[OpenOutbox]:
    opened: list[Outbox] = []

    async def make(sinks: Sequence[str] = ("a",), **cfg: Any) -> Outbox:
        ob = Outbox(
            tmp_path / "outbox.db",
            gateway_id=cfg.pop("gateway_id", "gw"),
            config=OutboxSection(**cfg),
            sink_names=list(sinks),
        )
        await ob.open()
        opened.append(ob)
        return ob

    try:
        yield make
    finally:
        for ob in opened:
            await ob.close()


async def drain(ob: Outbox, sink: str, max_records: int = 1000) -> list[Record]:
    """Read and confirm everything pending for ``sink``."""
    out: list[Record] = []
    for _ in range(10_000):
        b = await ob.read_batch(sink, max_records, 1 << 30)
        if b.records:
            out.extend(b.records)
            await ob.confirm(b)
        if not b.more and not b.records:
            return out
    raise AssertionError("drain did not finish")


async def test_group_commit_batches_concurrent_submits(open_outbox: OpenOutbox) -> None:
    ob = await open_outbox()
    futs = [ob.submit([reading(f"d{i % 7}", i)]) for i in range(2000)]
    assert not any(f.done() for f in futs)  # nothing resolves before its commit
    first_done: list[int] = []

    def on_done(f: asyncio.Future[IngestStatus]) -> None:
        # When a future resolves, its row must already be visible to another connection.
        first_done.append(db_rows(ob.path))

    futs[0].add_done_callback(on_done)
    assert set(await asyncio.gather(*futs)) == {IngestStatus.ACCEPTED}
    assert first_done and first_done[0] >= 1
    assert ob.commits <= 3  # all submits of one loop iteration share a commit
    assert db_rows(ob.path) == 2000
    # Submits made while a commit runs join the next one: a stream of submits
    # across iterations still needs far fewer commits than submits.
    before = ob.commits
    pending = []
    for i in range(200):
        pending.append(ob.submit([reading("d", 10_000 + i)]))
        await asyncio.sleep(0)
    await asyncio.gather(*pending)
    assert ob.commits - before < 200


async def test_ids_stable_and_monotonic_across_restart(
    tmp_path: Path, open_outbox: OpenOutbox
) -> None:
    ob = await open_outbox()
    await asyncio.gather(*(ob.submit([reading("d", i)]) for i in range(10)))
    first = await ob.read_batch("a", 100, 1 << 20)
    assert [r.id for r in first.records] == [f"gw:{i}" for i in range(1, 11)]
    await ob.close()
    ob2 = await open_outbox()
    again = await ob2.read_batch("a", 100, 1 << 20)
    assert [r.id for r in again.records] == [r.id for r in first.records]
    await ob2.confirm(again)
    await ob2.close()
    ob3 = await open_outbox()  # every row deleted: the sequence must still continue
    await ob3.submit([reading("d", 99)])
    b = await ob3.read_batch("a", 100, 1 << 20)
    assert [r.id for r in b.records] == ["gw:11"]
    await ob3.close()
    ob4 = await open_outbox(gateway_id="gw-new")  # a renamed gateway keeps old ids
    await ob4.submit([reading("d", 100)])
    b = await ob4.read_batch("a", 100, 1 << 20)
    assert [r.id for r in b.records] == ["gw:11", "gw-new:12"]


async def test_per_sink_cursors_and_deletion_when_all_confirmed(open_outbox: OpenOutbox) -> None:
    ob = await open_outbox(sinks=("a", "b"))
    await asyncio.gather(*(ob.submit([reading("d", i)]) for i in range(50)))
    await ob.submit([reading("only-a", 0)], sinks=["a"])
    got_a = await drain(ob, "a", 7)
    assert [r.seq for r in got_a] == list(range(1, 52))
    # a confirmed everything, b nothing: the 50 shared rows stay, a's own row is gone
    assert db_rows(ob.path) == 50
    assert_conservation(ob)
    b1 = await ob.read_batch("b", 20, 1 << 20)
    await ob.confirm(b1)
    # b's cursor is inside the chunk of 50: the chunk stays until b passes its end
    assert pending_for(ob.path, "b") == 30
    got_b = await drain(ob, "b")
    assert [r.seq for r in b1.records + got_b] == list(range(1, 51))
    assert db_rows(ob.path) == 0
    c = ob.counters()
    assert c["a"]["accepted"] == c["a"]["delivered"] == 51
    assert c["b"]["accepted"] == c["b"]["delivered"] == 50
    assert ob.stored_bytes == 0
    assert_conservation(ob)
    with pytest.raises(ValueError, match="unknown sink"):
        ob.submit([reading("d", 1)], sinks=["nope"])


async def test_cursor_survives_restart_without_resending(open_outbox: OpenOutbox) -> None:
    ob = await open_outbox(sinks=("a", "b"))
    await asyncio.gather(*(ob.submit([reading("d", i)]) for i in range(30)))
    b = await ob.read_batch("a", 10, 1 << 20)
    await ob.confirm(b)
    await ob.close()
    ob2 = await open_outbox(sinks=("a", "b"))
    rest = await drain(ob2, "a")
    assert [r.seq for r in rest] == list(range(11, 31))
    assert ob2.counters()["a"]["delivered"] == 30
    assert ob2.counters()["b"]["pending"] == 30
    assert_conservation(ob2)


async def test_drop_oldest_counts_exactly(open_outbox: OpenOutbox) -> None:
    one = store_mod.stored_size(reading("dev", 0), "gw")
    ob = await open_outbox(sinks=("a", "b"), max_bytes=one * 100, when_full="drop_oldest")
    # b has confirmed the first 40 before the overflow; drops count only for sinks still pending
    await asyncio.gather(*(ob.submit([reading("dev", i % 10)]) for i in range(100)))
    b = await ob.read_batch("b", 40, 1 << 20)
    await ob.confirm(b)
    for i in range(150):
        await ob.submit([reading("dev", i % 10)])
    c = ob.counters()
    assert ob.stored_bytes <= one * 100
    assert db_rows(ob.path) == 100
    assert c["a"]["accepted"] == 250 and c["a"]["dropped_max_bytes"] == 150
    assert c["b"]["accepted"] == 250 and c["b"]["delivered"] == 40
    assert c["b"]["dropped_max_bytes"] == 110
    assert_conservation(ob)
    got = await drain(ob, "a")
    assert [r.seq for r in got] == list(range(151, 251))  # the newest survive


async def test_reject_new_refuses_and_recovers(open_outbox: OpenOutbox) -> None:
    one = store_mod.stored_size(reading("dev", 0), "gw")
    ob = await open_outbox(max_bytes=one * 10, when_full="reject_new")
    statuses = [await ob.submit([reading("dev", i % 10)]) for i in range(15)]
    assert statuses.count(IngestStatus.ACCEPTED) == 10
    assert statuses[10:] == [IngestStatus.REJECTED_FULL] * 5
    assert ob.is_saturated()
    c = ob.counters()["a"]
    assert c["accepted"] == 10 and c["rejected_full"] == 5 and c["dropped"] == 0
    b = await ob.read_batch("a", 4, 1 << 20)
    await ob.confirm(b)
    assert not ob.is_saturated()
    assert await ob.submit([reading("dev", 1)]) == IngestStatus.ACCEPTED
    assert_conservation(ob)


async def test_max_age_drops_old_rows(
    open_outbox: OpenOutbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_mod, "AGE_CHECK_INTERVAL", 0.05)
    ob = await open_outbox(max_age=0.2)
    await asyncio.gather(*(ob.submit([reading("d", i)]) for i in range(20)))
    await asyncio.sleep(0.25)
    await ob.submit([reading("d", 99)])
    await until(ob, lambda: ob.counters()["a"]["dropped_max_age"] >= 20)
    c = ob.counters()["a"]
    assert c["dropped_max_age"] == 20
    assert_conservation(ob)
    got = await drain(ob, "a")
    assert [r.seq for r in got] == [21]


async def test_counters_survive_restart(open_outbox: OpenOutbox) -> None:
    ob = await open_outbox(max_bytes=2000)
    for i in range(60):
        await ob.submit([reading("d", i)])
    await ob.confirm(await ob.read_batch("a", 5, 1 << 20))
    before = ob.counters()
    await ob.close()
    ob2 = await open_outbox(max_bytes=2000)
    assert ob2.counters() == before
    assert_conservation(ob2)


async def test_priority_goes_first(open_outbox: OpenOutbox) -> None:
    ob = await open_outbox()
    await asyncio.gather(*(ob.submit([reading("d", i)]) for i in range(300)))
    await ob.submit([reading("alarm", 0, priority=5)])
    b = await ob.read_batch("a", 50, 1 << 20)
    assert b.records[0].device_id == "alarm" and b.records[0].priority == 5
    assert [r.seq for r in b.records[1:]] == list(range(1, 50))
    await ob.confirm(b)
    rest = await drain(ob, "a", 50)
    seqs = [r.seq for r in rest]
    assert seqs == list(range(50, 301))  # the alarm is not sent twice
    assert ob.counters()["a"]["delivered"] == 301
    assert db_rows(ob.path) == 0


async def test_a_batch_read_ahead_is_given_back_for_a_priority_record(
    open_outbox: OpenOutbox,
) -> None:
    """The sink runner's read-ahead: a batch read before a priority record was
    committed can be given back unsent; the next read starts where it did,
    priority first. Only the latest read can be given back."""
    ob = await open_outbox()
    await asyncio.gather(*(ob.submit([reading("d", i)]) for i in range(300)))
    on_wire = await ob.read_batch("a", 50, 1 << 20)
    mark = ob.priority_mark("a")
    ahead = await ob.read_batch("a", 50, 1 << 20)
    assert [r.seq for r in ahead.records] == list(range(51, 101))
    await ob.submit([reading("d", 300)])  # telemetry does not move the mark
    assert ob.priority_mark("a") == mark
    await ob.submit([reading("alarm", 0, priority=5)])
    assert ob.priority_mark("a") == mark + 1
    assert not ob.give_back(on_wire)  # not the latest read
    assert ob.give_back(ahead)
    assert not ob.give_back(ahead)  # once
    again = await ob.read_batch("a", 50, 1 << 20)
    assert again.records[0].device_id == "alarm"
    assert [r.seq for r in again.records[1:]] == list(range(51, 100))
    await ob.confirm(on_wire)
    await ob.confirm(again)
    rest = await drain(ob, "a", 50)
    assert [r.seq for r in rest] == list(range(100, 302))  # none twice, none skipped
    assert ob.counters()["a"]["delivered"] == 302
    assert_conservation(ob)


async def test_live_first_shares_the_link(open_outbox: OpenOutbox) -> None:
    ob = await open_outbox(drain="live_first")
    await asyncio.gather(*(ob.submit([reading("d", i)]) for i in range(1000)))
    b = await ob.read_batch("a", 100, 1 << 20)  # starts the catch-up at seq 1000
    await ob.confirm(b)
    await asyncio.gather(*(ob.submit([reading("live", i)]) for i in range(30)))
    b2 = await ob.read_batch("a", 100, 1 << 20)
    live = [r for r in b2.records if r.device_id == "live"]
    assert live, "fresh readings must share the batch during the catch-up"
    assert len(b2.records) == 100
    await ob.confirm(b2)
    rest = await drain(ob, "a", 100)
    seqs = sorted(r.seq for r in b.records + b2.records + rest)
    assert seqs == list(range(1, 1031))  # everything exactly once
    backlog = [r.seq for r in b.records + b2.records + rest if r.device_id == "d"]
    assert backlog == sorted(backlog)  # the backlog itself stays in order


async def test_runner_retries_in_order_and_receipts(open_outbox: OpenOutbox) -> None:
    ob = await open_outbox()
    receipts: list[Confirmed] = []
    ob.add_confirmed_listener(receipts.extend)

    def fail(call: int) -> BaseException | None:
        if call <= 3:
            return RetryableSinkError("down", retry_after=0.01)
        if call == 4:
            return ConnectionError("reset")
        return None

    sink = CollectSink("a", max_records=25, fail=fail)
    runner = SinkRunner(ob, sink, backoff_initial=0.01, backoff_max=0.05)
    task = asyncio.create_task(runner.run())
    try:
        for i in range(200):
            ob.submit([reading(f"d{i % 3}", i, msg_id=f"m{i}")])
        await until(ob, lambda: ob.counters()["a"]["delivered"] >= 200)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert ob.counters()["a"]["delivered"] == 200
    ids = [r.id for r in sink.records]
    assert len(ids) == len(set(ids)) == 200
    for dev in ("d0", "d1", "d2"):
        seqs = [r.seq for r in sink.records if r.device_id == dev]
        assert seqs == sorted(seqs)
    assert sink.state.records_sent == 200 and sink.state.last_error is not None
    assert sorted(c.seq for c in receipts) == list(range(1, 201))
    assert {c.message_id for c in receipts} == {f"m{i}" for i in range(200)}
    assert receipts[0].record_id == f"gw:{receipts[0].seq}"


async def test_down_sink_does_not_block_another(open_outbox: OpenOutbox) -> None:
    ob = await open_outbox(sinks=("up", "down"))
    up = CollectSink("up")
    down = CollectSink("down", fail=lambda _n: RetryableSinkError("down"))
    tasks = [
        asyncio.create_task(SinkRunner(ob, s, backoff_initial=0.01, backoff_max=0.02).run())
        for s in (up, down)
    ]
    try:
        for i in range(300):
            assert await ob.submit([reading("d", i)]) == IngestStatus.ACCEPTED
        await until(ob, lambda: ob.counters()["up"]["delivered"] >= 300)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert ob.counters()["up"]["delivered"] == 300
    assert ob.counters()["down"]["pending"] == 300
    assert down.calls > 1
    assert_conservation(ob)


async def test_permanent_error_dead_letters_and_replay(
    tmp_path: Path, open_outbox: OpenOutbox, capsys: pytest.CaptureFixture[str]
) -> None:
    ob = await open_outbox()
    sink = CollectSink(
        "a", max_records=10, fail=lambda n: PermanentSinkError("HTTP 400 bad") if n == 1 else None
    )
    task = asyncio.create_task(SinkRunner(ob, sink).run())
    try:
        await asyncio.gather(*(ob.submit([reading("d", i)]) for i in range(30)))
        await until(ob, lambda: ob.counters()["a"]["pending"] == 0)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    c = ob.counters()["a"]
    assert c["dropped_dead_letter"] == 10 and c["delivered"] == 20
    assert_conservation(ob)
    letters = list_dead_letters(ob.path)
    assert [d.seq for d in letters] == list(range(1, 11))
    assert letters[0].record_id == "gw:1" and "HTTP 400" in letters[0].error
    # replay needs the outbox lock: refused while open
    assert deadletter_main(["replay"], tmp_path) == 1
    await ob.close()
    assert deadletter_main(["list", "--json"], tmp_path) == 0
    assert capsys.readouterr().out.count('"record_id"') == 10
    assert deadletter_main(["replay"], tmp_path) == 0
    ob2 = await open_outbox()
    assert ob2.counters()["a"]["accepted"] == 40 and ob2.counters()["a"]["pending"] == 10
    got = await drain(ob2, "a")
    assert [r.id for r in got] == [f"gw:{i}" for i in range(1, 11)]
    assert_conservation(ob2)
    assert list_dead_letters(ob2.path) == []


async def test_purge_needs_ids_or_all(tmp_path: Path, open_outbox: OpenOutbox) -> None:
    ob = await open_outbox()
    await ob.submit([reading("d", 1), reading("d", 2)])
    b = await ob.read_batch("a", 10, 1 << 20)
    await ob.dead_letter(b, "HTTP 422")
    await ob.close()
    assert deadletter_main(["purge"], tmp_path) == 2
    letters = list_dead_letters(tmp_path / "outbox.db")
    assert deadletter_main(["purge", str(letters[0].id)], tmp_path) == 0
    assert len(list_dead_letters(tmp_path / "outbox.db")) == 1
    assert deadletter_main(["purge", "--all"], tmp_path) == 0
    assert list_dead_letters(tmp_path / "outbox.db") == []


async def test_readings_without_sinks_go_to_the_first_sink_added(open_outbox: OpenOutbox) -> None:
    ob = await open_outbox(sinks=())
    await asyncio.gather(*(ob.submit([reading("d", i)]) for i in range(5)))
    await ob.close()
    ob2 = await open_outbox(sinks=("late",))
    assert ob2.counters()["late"]["accepted"] == 5
    assert [r.seq for r in await drain(ob2, "late")] == [1, 2, 3, 4, 5]


async def test_second_process_is_locked_out(tmp_path: Path, open_outbox: OpenOutbox) -> None:
    await open_outbox()
    other = Outbox(
        tmp_path / "outbox.db", gateway_id="gw", config=OutboxSection(), sink_names=["a"]
    )
    with pytest.raises(RuntimeError, match="in use"):
        await other.open()


async def test_open_is_fast_with_a_large_backlog(tmp_path: Path, open_outbox: OpenOutbox) -> None:
    ob = await open_outbox(durability="os")
    batch = [reading(f"d{i % 50}", i) for i in range(1000)]
    await asyncio.gather(*(ob.submit(batch) for _ in range(100)))  # 100,000 rows
    await ob.close()
    t0 = time.perf_counter()
    ob2 = await open_outbox(durability="os")
    elapsed = time.perf_counter() - t0
    assert ob2.counters()["a"]["pending"] == 100_000
    assert elapsed < 1.0, elapsed  # nothing at open scans the backlog
    b = await ob2.read_batch("a", 500, 1 << 20)
    assert b.records[0].seq == 1


async def test_failed_confirmation_commit_rewinds(
    open_outbox: OpenOutbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit that fails (disk full) loses no confirmation silently: the sink's
    reads rewind to the last committed cursor and the rows are sent again."""
    ob = await open_outbox()
    real = store_mod._Writer._apply_op
    failures = confirms = 0

    def flaky(self: Any, op: Any, res: Any, want: bool) -> None:
        nonlocal failures, confirms
        confirms += op.kind == "confirm"
        if confirms == 2 and failures == 0:  # the second batch's confirmation
            failures += 1
            raise sqlite3.OperationalError("database or disk is full")
        real(self, op, res, want)

    monkeypatch.setattr(store_mod._Writer, "_apply_op", flaky)
    sink = CollectSink("a", max_records=20)
    runner = SinkRunner(ob, sink, backoff_initial=0.01, backoff_max=0.02)
    task = asyncio.create_task(runner.run())
    try:
        await asyncio.gather(*(ob.submit([reading(f"d{i % 2}", i)]) for i in range(100)))
        await until(ob, lambda: ob.counters()["a"]["delivered"] >= 100)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert failures == 1
    assert {r.seq for r in sink.records} == set(range(1, 101))
    assert len(sink.records) > 100  # the batch whose confirmation failed came again
    assert ob.counters()["a"]["delivered"] == 100
    assert db_rows(ob.path) == 0
    assert_conservation(ob)


def test_backoff_is_full_jitter_capped_and_honours_retry_after(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "x.db", gateway_id="gw", config=OutboxSection(), sink_names=["a"])
    runner = SinkRunner(ob, CollectSink("a"), backoff_initial=0.5, backoff_max=8.0)
    for attempt, ceiling in [(0, 0.5), (1, 1.0), (3, 4.0), (4, 8.0), (50, 8.0), (10_000, 8.0)]:
        delays = [runner.backoff_delay(attempt) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.5  # spread over the whole range
    assert runner.backoff_delay(5, retry_after=30.0) == 30.0
    # Retry-After is a lower bound, not the delay: "Retry-After: 0" on every
    # attempt must not turn into an immediate retry loop (tests/faults).
    zero = [runner.backoff_delay(0, retry_after=0.0) for _ in range(200)]
    assert all(0.0 <= d <= 0.5 for d in zero) and max(zero) > 0.25
    assert runner.backoff_delay(0, retry_after=1e9) == 3600.0
    with pytest.raises(ValueError):
        SinkRunner(ob, CollectSink("a"), backoff_initial=0.0)


async def test_routed_to_no_sink_is_not_stored(open_outbox: OpenOutbox) -> None:
    ob = await open_outbox(sinks=("a", "b"))
    assert await ob.submit([reading("d", 1)], sinks=[]) == IngestStatus.ACCEPTED
    await ob.submit([reading("d", 2)], sinks=["b"])
    assert db_rows(ob.path) == 1
    assert ob.counters()["a"]["accepted"] == 0 and ob.counters()["b"]["accepted"] == 1


@pytest.mark.parametrize(("durability", "level"), [("fsync", 2), ("os", 1)])
async def test_durability_maps_to_synchronous(
    open_outbox: OpenOutbox, durability: str, level: int
) -> None:
    """fsync -> synchronous=FULL (WAL fsynced at every commit); os -> NORMAL."""
    ob = await open_outbox(durability=durability)
    assert ob._writer is not None
    conn = ob._writer.conn
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == level
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_commit_interval_gathers_more(open_outbox: OpenOutbox) -> None:
    ob = await open_outbox(commit_interval=0.05)
    futs = []
    for i in range(50):
        futs.append(ob.submit([reading("d", i)]))
        await asyncio.sleep(0)  # separate loop iterations
    await asyncio.gather(*futs)
    assert ob.commits == 1


async def test_confirm_only_commits_skip_the_fsync(open_outbox: OpenOutbox) -> None:
    """A commit that stores readings runs with synchronous=FULL; one that only
    confirms a sink's batch runs with NORMAL (losing it re-sends records with
    the same ids, it never loses an acknowledged reading), then FULL again."""
    ob = await open_outbox(durability="fsync")
    assert ob._writer is not None
    statements: list[str] = []
    ob._writer.conn.set_trace_callback(statements.append)
    await ob.submit([reading("d", i) for i in range(5)])
    store_stmts = list(statements)
    statements.clear()
    batch = await ob.read_batch("a", 100, 1 << 20)
    await ob.confirm(batch)
    confirm_stmts = [s for s in statements if not s.startswith("SELECT")]
    ob._writer.conn.set_trace_callback(None)
    assert not any("synchronous" in s for s in store_stmts)
    assert confirm_stmts[0] == "PRAGMA synchronous=NORMAL"
    assert confirm_stmts[-1] == "PRAGMA synchronous=FULL"
    assert ob._writer.conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    assert ob.counters()["a"]["delivered"] == 5


async def test_a_caught_up_confirmation_rides_with_the_next_readings(
    open_outbox: OpenOutbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``confirm(linger=True)`` (the runner's, when its sink is caught up) joins
    the next commit of new readings instead of a commit of its own; with no
    new readings it commits after CONFIRM_LINGER; ``expedite`` commits it now."""
    # A linger long enough that "now" and "after the linger" stay apart on a
    # loaded machine (at 10 ms, "now" had to be under 8 ms: it failed at load 15).
    monkeypatch.setattr(store_mod, "CONFIRM_LINGER", 0.5)
    ob = await open_outbox()
    await ob.submit([reading("d", 0)])
    b = await ob.read_batch("a", 100, 1 << 20)
    commits = ob.commits
    fut = ob.confirm(b, linger=True)
    await asyncio.sleep(0.005)
    assert not fut.done() and ob.commits == commits
    await ob.submit([reading("d", 1)])  # the readings' commit carries it
    assert fut.done() and ob.commits == commits + 1
    assert ob.counters()["a"]["delivered"] == 1
    # Idle: it commits on its own after the linger.
    b = await ob.read_batch("a", 100, 1 << 20)
    t0 = time.monotonic()
    await ob.confirm(b, linger=True)
    waited = time.monotonic() - t0
    assert store_mod.CONFIRM_LINGER * 0.8 <= waited < store_mod.CONFIRM_LINGER + 1.0
    assert ob.counters()["a"]["delivered"] == 2
    # Someone waits on it: now.
    await ob.submit([reading("d", 2)])
    b = await ob.read_batch("a", 100, 1 << 20)
    fut = ob.confirm(b, linger=True)
    ob.expedite()
    t0 = time.monotonic()
    await fut
    assert time.monotonic() - t0 < store_mod.CONFIRM_LINGER * 0.8
    assert ob.counters()["a"]["delivered"] == 3
    assert_conservation(ob)
