"""Readings forwarded early: a caught-up sink gets a reading while its group
commit is under way (``outbox.forward_early``, edgeway.outbox.store._forward).

What must hold: the device is acknowledged only after the commit; the sink
gets every record once, in order, with the id and text that are stored; a
confirmation waits for the records' commit; a refused commit, retention and
priority readings send the sink back to the tail without losing or repeating
a record; a number a cloud may have seen on a record forwarded early is never
given to another reading, even after a crash (``seq_lease``).
"""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeway.ingest import IngestStatus
from edgeway.outbox import Outbox
from edgeway.outbox import store as store_mod
from edgeway.reading import Origin, Reading
from outbox_db import opened


def reading(i: int, device: str = "d", priority: int = 0, key: str | None = None) -> Reading:
    return Reading(
        device,
        1_700_000_000.0 + i,
        {"i": i},
        origin=Origin("mqtt", key=key, message_id=f"m{i}" if key else None),
        priority=priority,
    )


class HeldWriter:
    """Holds the writer thread before each job while ``hold`` is set: a
    group commit that has not ended yet, for as long as a test needs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.go = threading.Event()
        self.go.set()
        self.entered = threading.Event()
        self.fail_next = False
        """The next job with readings fails: a real SQLite error (the
        connection is read-only for that job)."""
        real = store_mod._Writer.run_job

        def run_job(writer: Any, job: Any) -> Any:
            if not job.submits:
                return real(writer, job)
            self.entered.set()
            assert self.go.wait(10)
            if not self.fail_next:
                return real(writer, job)
            self.fail_next = False
            writer.conn.execute("PRAGMA query_only=ON")
            try:
                return real(writer, job)
            finally:
                writer.conn.execute("PRAGMA query_only=OFF")

        monkeypatch.setattr(store_mod._Writer, "run_job", run_job)

    def hold(self) -> None:
        self.entered.clear()
        self.go.clear()

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 10)


@pytest.fixture
async def outbox(tmp_path: Path) -> AsyncIterator[Outbox]:
    async with opened(tmp_path / "o.db") as ob:
        yield ob


async def caught_up(ob: Outbox, sink: str = "a") -> None:
    """Commit one reading and read it: the sink has then read everything."""
    await ob.submit([reading(0)])
    b = await ob.read_batch(sink, 100, 1 << 20)
    await ob.confirm(b)
    b = await ob.read_batch(sink, 100, 1 << 20)
    assert not b.records and not b.more


def stored_lease(path: Path) -> tuple[int, int]:
    with sqlite3.connect(path) as c:
        meta = dict(c.execute("SELECT key, value FROM meta").fetchall())
    return int(meta["next_seq"]), int(meta.get("seq_lease", 0))


async def test_a_caught_up_sink_gets_a_reading_before_its_commit_ends(
    outbox: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = HeldWriter(monkeypatch)
    await caught_up(outbox)
    held.hold()
    fut = outbox.submit([reading(1), reading(2)])
    await held.wait_entered()  # the commit is under way, and held
    b = await asyncio.wait_for(outbox.read_batch("a", 100, 1 << 20), 5)
    assert [r.seq for r in b.records] == [2, 3]
    assert b.early == 3
    assert not fut.done()  # the device is not acknowledged before the commit
    # What the sink sends is exactly what will be stored.
    sent = [r.to_json_bytes() for r in b.records]
    assert [r.id for r in b.records] == ["gw:2", "gw:3"]
    done = outbox.confirm(b)
    await asyncio.sleep(0.05)
    assert not done.done()  # the confirmation waits for the records' commit
    assert outbox.counters()["a"]["delivered"] == 1
    held.go.set()
    assert await asyncio.wait_for(fut, 5) is IngestStatus.ACCEPTED
    await asyncio.wait_for(done, 5)
    counters = outbox.counters()["a"]
    assert counters["delivered"] == 3 and counters["pending"] == 0
    with sqlite3.connect(outbox.path) as c:
        assert c.execute("SELECT count(*) FROM chunks").fetchone()[0] == 0
    assert sent == [b'{"id":"gw:2","device_id":"d","ts":1700000001.0,"metrics":{"i":1}}',
                    b'{"id":"gw:3","device_id":"d","ts":1700000002.0,"metrics":{"i":2}}']  # fmt: skip


async def test_the_stored_text_is_the_forwarded_text(tmp_path: Path) -> None:
    """Two sinks: one forwarded early, one reading from the table after
    the commit; keyed (client mode) and tagged readings included."""
    # b reads the rows through the query
    async with opened(tmp_path / "o.db", ("a", "b"), tail_reads=False) as ob:
        await caught_up(ob)
        r2 = Reading("d", 1.5, {"x": 1}, Origin("mqtt_client", key="k1", message_id="m2"))
        r3 = Reading("e", 2.5, {"y": "s"}, Origin("mqtt"), tags={"site": "n"})
        fut = ob.submit([r2, r3])
        early = await ob.read_batch("a", 100, 1 << 20)
        assert early.early and len(early.records) == 2
        await fut
        late = []
        while True:
            b = await ob.read_batch("b", 100, 1 << 20)
            late += b.records
            if not b.more:
                break
        late = [r for r in late if r.seq >= 2]
        assert [(r.id, r.seq, r.device_id, r.to_json_bytes()) for r in early.records] == [
            (r.id, r.seq, r.device_id, r.to_json_bytes()) for r in late
        ]
        assert early.records[0].id != "gw:2"  # keyed: a hash of the message


async def test_a_refused_commit_sends_the_sink_back_to_the_tail(
    outbox: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit of readings forwarded early fails (a read-only database,
    a real SQLite failure): the device gets the error, the sink is not sent
    the refused readings it had not read yet, counts stay exact, and the
    next readings go through."""
    held = HeldWriter(monkeypatch)
    await caught_up(outbox)
    held.hold()
    f1 = outbox.submit([reading(1)])
    await held.wait_entered()
    read1 = await outbox.read_batch("a", 1, 1 << 20)  # read before the failure
    assert [r.seq for r in read1.records] == [2]
    outbox.submit([reading(2)])  # joins the next commit, forwarded, not read
    confirm1 = outbox.confirm(read1)
    held.fail_next = True
    held.go.set()
    with pytest.raises(RuntimeError, match="outbox commit failed"):
        await asyncio.wait_for(f1, 5)
    # Reading 2 was forwarded but not read: dropped from the early list,
    # read from the tail once committed.
    assert not outbox._reads["a"].early_records
    await asyncio.wait_for(confirm1, 5)  # confirms nothing: not stored
    await asyncio.wait_for(outbox.wait_for_rows("a", 1), 5)
    b = await outbox.read_batch("a", 100, 1 << 20)
    assert [r.seq for r in b.records] == [3] and not b.early
    await outbox.confirm(b)
    counters = outbox.counters()["a"]
    assert counters["accepted"] == 2  # reading 0 and reading 2
    assert counters["delivered"] == 2 and counters["pending"] == 0
    # And the sink is forwarded readings again.
    f3 = outbox.submit([reading(3)])
    b = await outbox.read_batch("a", 100, 1 << 20)
    assert [r.seq for r in b.records] == [4] and b.early == 4
    await f3
    await outbox.confirm(b)
    assert outbox.counters()["a"]["delivered"] == 3


async def test_a_refused_reading_forwarded_early_is_not_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reading forwarded early that the commit then refuses (here
    ``reject_new``; a full disk is the same status) is taken back from the
    sink if it has not read it yet: the cloud never gets a refused reading
    from a sink that was busy (tests/integration/test_disk_full_gateway.py
    caught this with the sink retrying)."""
    held = HeldWriter(monkeypatch)
    async with opened(tmp_path / "o.db", max_bytes=2000, when_full="reject_new") as ob:
        await caught_up(ob)
        held.hold()
        f = ob.submit([Reading("d", 1.0, {"pad": "x" * 3000}, Origin("mqtt"))])
        await held.wait_entered()
        assert len(ob._reads["a"].early_records) == 1  # forwarded, not read yet
        held.go.set()
        assert await f is IngestStatus.REJECTED_FULL
        b = await ob.read_batch("a", 10, 1 << 20)
        assert b.records == [] and not b.more
        counters = ob.counters()["a"]
        assert counters["rejected_full"] == 1 and counters["accepted"] == 1


async def test_a_sink_that_retries_takes_no_more_readings_early(outbox: Outbox) -> None:
    """A batch sent again means the sink is not caught up: what it held
    forwarded is read from the tail after the batch, in order."""
    await caught_up(outbox)
    f = outbox.submit([reading(1)])
    b = await outbox.read_batch("a", 1, 1 << 20)
    assert b.early == 2
    g = outbox.submit([reading(2)])
    assert len(outbox._reads["a"].early_records) == 1
    b = await outbox.refresh_batch(b)  # the runner's retry of batch b
    assert [r.seq for r in b.records] == [2]
    assert not outbox._reads["a"].early_records and not outbox._early_mask
    await asyncio.gather(f, g)
    await outbox.confirm(b)
    b = await outbox.read_batch("a", 10, 1 << 20)
    assert [r.seq for r in b.records] == [3] and not b.early


async def test_a_priority_reading_is_not_forwarded_early(outbox: Outbox) -> None:
    await caught_up(outbox)
    f = outbox.submit([reading(1)])
    b1 = await outbox.read_batch("a", 100, 1 << 20)
    assert [r.seq for r in b1.records] == [2] and b1.early
    g = outbox.submit([reading(2, priority=5)])
    h = outbox.submit([reading(3)])
    assert not outbox._early_mask  # the sink reads the tail again
    await asyncio.gather(f, g, h)
    await outbox.confirm(b1)
    seen: list[tuple[int, int]] = []
    while True:
        b = await outbox.read_batch("a", 100, 1 << 20)
        seen += [(r.seq, r.priority) for r in b.records]
        await outbox.confirm(b)
        if not b.more and not b.records:
            break
    assert seen == [(3, 5), (4, 0)]
    assert outbox.counters()["a"]["pending"] == 0


async def test_early_records_are_bounded(outbox: Outbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sink that stops reading holds at most EARLY_MAX_RECORDS forwarded
    records; the rest it reads from the tail, in order."""
    monkeypatch.setattr(store_mod, "EARLY_MAX_RECORDS", 5)
    await caught_up(outbox)
    futs = [outbox.submit([reading(i)]) for i in range(1, 13)]
    assert len(outbox._reads["a"].early_records) == 5
    await asyncio.gather(*futs)
    seqs: list[int] = []
    while True:
        b = await outbox.read_batch("a", 4, 1 << 20)
        seqs += [r.seq for r in b.records]
        await outbox.confirm(b)
        if not b.more and not b.records:
            break
    assert seqs == list(range(2, 14))
    assert outbox.counters()["a"]["delivered"] == 13


async def test_a_number_seen_early_is_never_given_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a reading forwarded early is not committed, the database says
    its number is leased; a start after a crash numbers above the lease, a
    start after a clean close right after the last number."""
    path = tmp_path / "o.db"
    held = HeldWriter(monkeypatch)
    async with opened(path) as ob:
        await caught_up(ob)
        held.hold()
        ob.submit([reading(1)])
        b = await ob.read_batch("a", 10, 1 << 20)
        assert [r.seq for r in b.records] == [2]
        next_seq, lease = stored_lease(path)
        assert next_seq <= 2 < lease  # seq 2 is not committed, and leased
        held.go.set()
    assert stored_lease(path) == (3, 3)  # clean close: no gap
    async with opened(path) as ob:
        await ob.submit([reading(2)])
        b = await ob.read_batch("a", 10, 1 << 20)
        assert [r.seq for r in b.records][-1] == 3
    # A crash: the last commit's lease is what the database says.
    with sqlite3.connect(path) as c:
        c.execute("UPDATE meta SET value = 70000 WHERE key = 'seq_lease'")
    async with opened(path) as ob:
        await ob.submit([reading(3)])
        seqs: list[int] = []
        while True:
            b = await ob.read_batch("a", 10, 1 << 20)
            seqs += [r.seq for r in b.records]
            if not b.more:
                break
        assert seqs[-1] == 70000


async def test_off_the_sink_reads_only_what_is_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = HeldWriter(monkeypatch)
    async with opened(tmp_path / "o.db", forward_early=False) as ob:
        await caught_up(ob)
        held.hold()
        fut = ob.submit([reading(1)])
        await held.wait_entered()
        read = asyncio.ensure_future(ob.wait_for_rows("a", 1))
        await asyncio.sleep(0.05)
        assert not read.done()
        held.go.set()
        await fut
        await asyncio.wait_for(read, 5)
        b = await ob.read_batch("a", 10, 1 << 20)
        assert [r.seq for r in b.records] == [2] and not b.early


# -- differential: forwarded early or not, each sink gets the same records --

SINKS = ("a", "b")
ROUTES: tuple[tuple[str, ...] | None, ...] = (None, ("a",), ("b",))

submit_op = st.tuples(
    st.just("submit"),
    st.integers(0, len(ROUTES) - 1),
    st.integers(1, 12),
    st.sampled_from([0, 0, 0, 0, 0, 3]),
    st.booleans(),  # wait for the commit before going on
)
read_op = st.tuples(
    st.just("read"),
    st.sampled_from(SINKS),
    st.integers(1, 30),
    # retry: the runner sends the batch again (refresh_batch) before it is confirmed.
    st.sampled_from(["confirm", "confirm", "confirm", "dead_letter", "retry"]),
)
settle_op = st.tuples(st.just("settle"))


async def _play(path: Path, cfg: dict[str, Any], ops: list[tuple[Any, ...]]) -> Any:
    cfg = dict(cfg)
    early_max = cfg.pop("early_max", None)
    if early_max is None:
        return await _play_ops(path, cfg, ops)
    saved = store_mod.EARLY_MAX_RECORDS
    store_mod.EARLY_MAX_RECORDS = early_max  # a sink falls behind after so many
    try:
        return await _play_ops(path, cfg, ops)
    finally:
        store_mod.EARLY_MAX_RECORDS = saved


async def _play_ops(path: Path, cfg: dict[str, Any], ops: list[tuple[Any, ...]]) -> Any:
    got: dict[str, list[tuple[str, int, bytes]]] = {s: [] for s in SINKS}
    early = 0
    pending: list[asyncio.Future[Any]] = []
    n = 0
    async with opened(path, SINKS, **cfg) as ob:

        async def drain(sink: str, then: str, max_records: int) -> None:
            nonlocal early
            while True:
                b = await ob.read_batch(sink, max_records, 1 << 20)
                early += bool(b.early)
                if b.records:
                    if then == "retry":
                        b = await ob.refresh_batch(b)
                    got[sink].extend((r.id, r.seq, r.to_json_bytes()) for r in b.records)
                    # A runner keeps one confirmation in flight.
                    await (ob.dead_letter(b, "refused") if then == "dead_letter" else ob.confirm(b))
                if not b.more:
                    return

        for op in ops:
            if op[0] == "submit":
                _, route, count, prio, wait = op
                readings = [reading(n + k, f"dev-{(n + k) % 3}", prio) for k in range(count)]
                n += count
                f = ob.submit(readings, ROUTES[route])
                pending.append(f)
                if wait:
                    await f
            elif op[0] == "read":
                _, sink, max_records, then = op
                await drain(sink, then, max_records)
            else:
                await asyncio.gather(*pending)
        await asyncio.gather(*pending)
        for sink in SINKS:
            await drain(sink, "confirm", 1000)
        return got, ob.counters(), early


@pytest.mark.parametrize(
    "cfg",
    [
        {"durability": "os"},
        {"durability": "os", "max_bytes": 3000},
        {"durability": "os", "early_max": 5},
    ],
    ids=["ordered", "max_bytes", "early_max"],
)
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=st.lists(st.one_of(submit_op, read_op, read_op, settle_op), min_size=1, max_size=30))
def test_forwarding_early_sends_the_same_records(
    cfg: dict[str, Any], ops: list[tuple[Any, ...]]
) -> None:
    with tempfile.TemporaryDirectory() as d:
        fast, fast_counters, _ = asyncio.run(_play(Path(d) / "early.db", cfg, ops))
        slow, slow_counters, none = asyncio.run(
            _play(Path(d) / "late.db", {**cfg, "forward_early": False}, ops)
        )
    assert none == 0

    def plain(got: list[tuple[str, int, bytes]]) -> list[tuple[str, int, bytes]]:
        return [r for r in got if b'"priority"' not in r[2]]

    for sink in SINKS:
        if "max_bytes" not in cfg:
            # The same records, texts and ids; in the same order but for
            # priority readings, which go ahead of those not yet read (one
            # forwarded early was read at once).
            assert sorted(fast[sink]) == sorted(slow[sink])
            assert plain(fast[sink]) == plain(slow[sink])
        else:
            # Retention may drop different records (commits fall differently),
            # but never sends one twice, nor one out of order.
            seqs = [r[1] for r in fast[sink]]
            assert len(seqs) == len(set(seqs))
            assert [r[1] for r in plain(fast[sink])] == sorted(r[1] for r in plain(fast[sink]))
    if "max_bytes" not in cfg and not any(op[0] == "read" and op[3] == "dead_letter" for op in ops):
        # (A read that dead-letters what it got may get different records.)
        assert fast_counters == slow_counters
    for c in fast_counters.values():
        assert c["pending"] == 0
        assert c["accepted"] == c["delivered"] + c["dropped"]


def test_forwarding_happens_in_the_differential() -> None:
    """The differential above must exercise early forwarding at all."""
    ops: list[tuple[Any, ...]] = [("submit", 0, 2, 0, True)]
    ops += [("read", "a", 10, "confirm"), ("read", "b", 10, "confirm")]
    ops += [("submit", 0, 3, 0, False), ("read", "a", 10, "confirm")] * 3
    with tempfile.TemporaryDirectory() as d:
        _, _, early = asyncio.run(_play(Path(d) / "o.db", {"durability": "os"}, ops))
    assert early >= 3
